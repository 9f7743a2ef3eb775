"""`lab.py link`: show, change or verify the links of a running lab's containers."""

from __future__ import annotations

import json

from socklab.errors import SocklabError, UsageError

from socklab.results import find_results

from .. import engine as engines
from .. import linkcheck
from ..headline import last_line
from ..scenario import SERVER_PORT, SERVER_SERVICE
from .common import say


def running_containers(lab, service: str | None):
    """The running containers of ``service`` (every service when None) of ``lab``; UsageError when none."""
    found = [c for c in lab.containers(service) if lab.running(c)]
    if not found:
        what = f"service {service} of " if service else ""
        raise UsageError(f"no running container of {what}lab project {lab.name!r} "
                         "(start one with `docker compose up`, or name it with --project)")
    return found


def _shown(lab, container) -> dict:
    code, out = lab.exec(container, ["python3", "-m", "socklab", "shape", "show", "--json"])
    if code != 0:
        raise SocklabError(f"reading the link of {container.name} failed: {out.strip()}")
    return json.loads(out)


def verify(lab, service: str | None) -> dict[str, dict]:
    """Each running client container's path to the server, probed as a case probes it and judged
    against the links applied at both ends (see labkit.linkcheck), by container name."""
    servers = [c for c in lab.containers(SERVER_SERVICE) if lab.running(c)]
    if not servers:
        raise UsageError(f"lab project {lab.name!r} has no running server: its links have no far end to measure "
                         "(start the lab with `docker compose up`, or name it with --project)")
    if service == SERVER_SERVICE:
        raise UsageError("lab.py link verify measures from the clients: name a client service, or none for all "
                         "(the server's link is on every client's path)")
    clients = [c for c in running_containers(lab, service) if c.service.startswith("client")]
    if not clients:
        raise UsageError(f"lab project {lab.name!r} has no running client container to probe from")
    verdicts = {}
    for container in clients:
        code, out = lab.exec(container, ["python3", "-m", "socklab", "probe", "--server",
                                         f"{SERVER_SERVICE}:{SERVER_PORT}"])
        probes = [r for r in find_results(out) if r.get("role") == "probe"]
        if code != 0 or not probes:
            raise SocklabError(f"probing the link of {container.name} failed: {last_line(out) or f'exit {code}'}")
        verdicts[container.name] = linkcheck.judge(probes[-1])
    return verdicts


def cmd_link(args) -> int:
    """Show, change or verify the shaping of a running lab's containers."""
    lab = engines.open_engine().attach(args.project)
    if args.link_command == "verify":
        verdicts = verify(lab, args.service)
        if args.json:
            say(json.dumps(verdicts, indent=2))
        else:
            width = max(len(name) for name in verdicts)
            for name, verdict in verdicts.items():
                say(f"{name:<{width}}  {linkcheck.verdict_text(verdict)}")
            say(f"(tolerance: {linkcheck.TOLERANCE_TEXT})")
        return 0 if all(v.get("ok") is True for v in verdicts.values()) else 1
    if args.link_command == "show":
        shown = {}
        for container in running_containers(lab, args.service):
            shown[container.name] = _shown(lab, container)
        if args.json:
            say(json.dumps(shown, indent=2))
        else:
            for name, link in shown.items():
                say(f"{name}: backend {link['backend']}, up {link['applied']['up']}, "
                    f"down {link['applied']['down']}")
        return 0
    for container in running_containers(lab, args.service):
        code, out = lab.exec(container, ["python3", "-m", "socklab", "shape", "set", *args.assignments])
        if code != 0:
            line = last_line(out) or f"exit status {code}"
            raise (UsageError if code == 2 else SocklabError)(f"{container.name}: {line}")
        say(f"{container.name}: {out.strip()}")
    return 0
