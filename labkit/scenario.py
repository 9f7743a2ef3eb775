"""A case as containers: the Compose override, every role's argv and link.

Pure functions from a resolved :class:`~labkit.config.Experiment` to what the
engine starts, so that the override saved in the run directory, the dry run and
the real run are one and the same thing.
"""

from __future__ import annotations

from typing import Any, Mapping

from socklab import shaping
from socklab.shaping.commands import DEFAULT_STATE_PATH
from socklab.errors import UsageError

from .compose import COMPOSE_FILE, LAB_LABEL, READY_SERVICE, SERVER_SERVICE
from .config import ClientGroup, Experiment, LinkConfig, Workload

SERVER_PORT = 5000
# Where each client writes its trace inside its container; copied out at the end.
TRACE_PATH = "/tmp/socklab-trace.gz"
CASE_LABEL = "io.socklab.case"
# Written by the container's entrypoint once its link is shaped.
LINK_STATE_PATH = DEFAULT_STATE_PATH
# Long enough for any case's slowest peer; short enough that a vanished peer is
# noticed within a case (the server never hangs on it).
SERVER_IDLE_TIMEOUT = "60s"

def client_service(group: ClientGroup | str) -> str:
    """The Compose service of a client group."""
    name = group if isinstance(group, str) else group.name
    return f"client-{name}"


def link_env(link: LinkConfig) -> dict[str, str]:
    """The ``SOCKLAB_LINK_*`` variables that make a container shape ``link``.

    Rendered by the container's own link model (its inverse parses them), every
    variable present (empty when unset), so nothing from the base compose file or
    the user's environment leaks into a case's link.
    """
    return shaping.env_from_changes(link.changes(), link.backend or "auto")


def link_assignments(change: LinkConfig) -> list[str]:
    """A schedule step's change as `shape set` words (``rate=1mbit``, ``up.delay=5ms``)."""
    return shaping.assignments_from_changes(change.changes())


def server_workload(experiment: Experiment) -> str:
    """What the server does with bytes: echo them (when a group wants echoes) or count them.

    Slow and connect peers work against either; a bulk sender cannot share an
    echo server, since it never reads the echo of what it sends and both would stall.
    """
    kinds = {group.workload.kind for group in experiment.clients}
    if "echo" not in kinds:
        return "bulk"
    if "bulk" in kinds:
        raise UsageError(
            f"experiment {experiment.name}: echo and bulk client groups cannot share one server "
            "in a case: the server would echo the bulk payload to a client that never reads it")
    return "echo"


def server_argv(experiment: Experiment) -> list[str]:
    """The server role's arguments (it runs until the orchestrator stops it)."""
    server = experiment.server
    argv = ["server", "--mode", server.mode, "--port", str(SERVER_PORT),
            "--recv-size", str(server.recv_size_bytes), "--workload", server_workload(experiment),
            "--idle-timeout", SERVER_IDLE_TIMEOUT]
    if server.rcvbuf_bytes is not None:
        argv += ["--rcvbuf", str(server.rcvbuf_bytes)]
    return argv


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:g}s"


def _workload_args(workload: Workload) -> list[str]:
    options = {
        "bulk": [("--bytes", workload.bytes), ("--pattern", workload.pattern),
                 ("--chunk", workload.chunk_bytes)],
        "echo": [("--requests", workload.requests), ("--size", workload.size_bytes),
                 ("--think", _seconds(workload.think_s))],
        "connect": [("--attempts", workload.attempts), ("--cancel-after", _seconds(workload.cancel_after_s)),
                    ("--connect-timeout", _seconds(workload.connect_timeout_s))],
        "slow": [("--rate", workload.rate_bytes_per_s), ("--hold", _seconds(workload.hold_s))],
    }[workload.kind]
    args = []
    for flag, value in options:
        if value is not None:
            args += [flag, str(value)]
    return args


def client_argv(group: ClientGroup, *, trace: bool = True) -> list[str]:
    """A client group's role arguments."""
    argv = ["client", "--mode", group.mode, "--host", SERVER_SERVICE, "--port", str(SERVER_PORT),
            "--workload", group.workload.kind, "--connections", str(group.connections),
            *_workload_args(group.workload)]
    for flag, value in (("--sndbuf", group.sndbuf_bytes), ("--rcvbuf", group.rcvbuf_bytes)):
        if value is not None:
            argv += [flag, str(value)]
    if group.mode == "timeout":
        argv += ["--timeout", _seconds(group.socket_timeout_s)]
    if trace:
        argv += ["--trace", TRACE_PATH]
    return argv


def compose_override(experiment: Experiment, case_id: str, *, trace: bool = True,
                     owner: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Compose override file that turns compose.yaml into this case's lab.

    ``owner``: labels naming the run that owns the objects (see labkit.owner);
    they go on every container, network and volume, so that `lab.py clean`
    leaves a live run's objects alone.
    """
    def labels() -> dict[str, str]:
        return {LAB_LABEL: "true", CASE_LABEL: case_id}

    services: dict[str, Any] = {
        SERVER_SERVICE: {
            "command": server_argv(experiment),
            "environment": {**link_env(experiment.server.link), "SOCKLAB_RESULT_DIR": "",
                            "SOCKLAB_RESULT_RESET": "0", "SOCKLAB_REPORT_LINK": "1"},
            "labels": labels(),
            **placement(experiment.server.placement),
        },
        READY_SERVICE: {"labels": labels()},
    }
    for group in experiment.clients:
        services[client_service(group)] = {
            "extends": {"file": str(COMPOSE_FILE), "service": "client"},
            "command": client_argv(group, trace=trace),
            "environment": {**link_env(group.link), "SOCKLAB_RESULT_DIR": "",
                            "SOCKLAB_REPORT_LINK": "1"},
            "labels": labels(),
            "depends_on": {READY_SERVICE: {"condition": "service_completed_successfully"}},
            "deploy": {"replicas": group.replicas, **placement(group.placement).get("deploy", {})},
        }
    return owned({"services": services}, owner)


def placement(constraints: tuple[str, ...] | None) -> dict[str, Any]:
    """A service's Compose keys for Swarm placement ``constraints`` (none when they are unset)."""
    return {"deploy": {"placement": {"constraints": list(constraints)}}} if constraints else {}


def owned(definition: dict[str, Any], owner: Mapping[str, str] | None) -> dict[str, Any]:
    """``definition`` (a Compose override: ``{"services": ...}``) with ``owner``'s labels on
    every service, the lab network and the results volume (see labkit.owner), so that
    `lab.py clean` leaves a live run's objects alone; unchanged without an owner."""
    if not owner:
        return definition
    services = {name: {**service, "labels": {**service.get("labels", {}), **owner}}
                for name, service in definition["services"].items()}
    # compose.yaml labels the network and volume as the lab's already; Compose
    # concatenates a volume's labels, and would refuse that one twice.
    return {**definition, "services": services, "networks": {"lab": {"labels": dict(owner)}},
            "volumes": {"results": {"labels": dict(owner)}}}


def client_services(experiment: Experiment) -> list[str]:
    """The Compose services of the experiment's client groups, in order."""
    return [client_service(g) for g in experiment.clients]


def containers_key(override: dict[str, Any]) -> dict[str, Any]:
    """What a case's containers are made of: its override without the roles' arguments and case label.

    Two cases with equal keys can run in the same kept containers.
    """
    key = {}
    for name, service in override["services"].items():
        key[name] = {k: v for k, v in service.items() if k not in ("command", "labels")}
    return key


def kept_override(override: dict[str, Any]) -> dict[str, Any]:
    """The override for containers kept between cases: each runs ``entry hold``; roles come by exec.

    No server role listens while they start, so the gate (READY_SERVICE) is
    left out and the clients wait only for the server's container; the runner
    starts each case's server role and waits for it to listen.
    """
    services = {}
    for name, service in override["services"].items():
        if name == READY_SERVICE:
            continue
        kept = {**service, "command": ["hold"]}
        if name != SERVER_SERVICE:
            kept["depends_on"] = {SERVER_SERVICE: {"condition": "service_started"}}
        services[name] = kept
    return {"services": services}


def shaping_plans(experiment: Experiment) -> dict[str, list[list[str]]]:
    """Every tc/ip command each service's containers would run, for a dry run.

    Built by the functions the containers use, from each link as the loader
    resolved (and validated) it; the backend is what the link asks for ('auto' is
    shown as netem, the kernel qdisc it prefers — the real choice is made by
    probing the kernel).
    """
    links = {SERVER_SERVICE: experiment.server.link}
    links.update({client_service(g): g.link for g in experiment.clients})
    plans = {}
    for service, link in links.items():
        spec = link.spec
        backend = link.backend or "auto"
        plans[service] = shaping.build_plan(spec, "netem" if backend == "auto" else backend) if spec.shaped else []
    return plans
