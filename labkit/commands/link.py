"""`lab.py link`: show or change the links of a running lab's containers."""

from __future__ import annotations

import json

from socklab.errors import SocklabError, UsageError

from .. import engine as engines
from ..headline import last_line
from .common import say


def _running(lab, service: str | None):
    found = [c for c in lab.containers(service) if lab.running(c)]
    if not found:
        what = f"service {service} of " if service else ""
        raise UsageError(f"no running container of {what}lab project {lab.name!r} "
                         "(start one with `docker compose up`, or name it with --project)")
    return found


def cmd_link(args) -> int:
    """Show or change the shaping of a running lab's containers."""
    lab = engines.open_engine().attach(args.project)
    if args.link_command == "show":
        shown = {}
        for container in _running(lab, args.service):
            code, out = lab.exec(container, ["python3", "-m", "socklab", "shape", "show", "--json"])
            if code != 0:
                raise SocklabError(f"reading the link of {container.name} failed: {out.strip()}")
            shown[container.name] = json.loads(out)
        if args.json:
            say(json.dumps(shown, indent=2))
        else:
            for name, link in shown.items():
                say(f"{name}: backend {link['backend']}, up {link['applied']['up']}, "
                    f"down {link['applied']['down']}")
        return 0
    for container in _running(lab, args.service):
        code, out = lab.exec(container, ["python3", "-m", "socklab", "shape", "set", *args.assignments])
        if code != 0:
            line = last_line(out) or f"exit status {code}"
            raise (UsageError if code == 2 else SocklabError)(f"{container.name}: {line}")
        say(f"{container.name}: {out.strip()}")
    return 0
