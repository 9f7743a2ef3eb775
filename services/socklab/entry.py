"""The container entrypoint: shape the link as root, then run the role unprivileged.

    python -m socklab entry ROLE [ARGS ...]     ROLE: server, client, summary, shape
    python -m socklab entry exec CMD [ARGS ...]  any program (iperf3), same treatment
    python -m socklab entry hold                 keep the container up for `docker exec`
    python -m socklab entry ready PORT [SECONDS] exit 0 once this network namespace listens on PORT

``ready`` is the gate the clients wait for (``server-ready`` in compose.yaml): it
runs in the server's network namespace, reads the kernel's socket tables until a
socket listens on the port, and exits. A Docker healthcheck would ask the same
by a ``docker exec`` every interval for the server's whole life, measurements
included: in an emulated VM that kept 75 % of a core busy.

The link comes from ``SOCKLAB_LINK_*`` environment variables (see shaping).
When the kernel cannot do what the link asks, the container stops here with one
sentence and a non-zero status: it never runs unshaped silently.

The workload runs in a child process as the ``socklab`` user, so the program
under study has no privileges. This process stays as a small root supervisor:
it forwards signals to the workload and, once the workload has ended, stops the
userspace backend's delay line (if the link has one: a root process started
with the shaping, before the workload) and prints a ``link`` result line with
the qdisc and delay-line counters — the interfaces vanish with the container,
so afterwards nobody could read them.

Around the workload, as root, and only when the orchestrator asks (see the
functions below): the server answers the link probe on UDP (SOCKLAB_PROBE_RESPOND);
a client first measures its path to the server (SOCKLAB_PROBE) and prints a
``probe`` line, and the link's counters are then counted from there; tcpdump
captures eth0 from before the workload's first packet until its connections
have closed (SOCKLAB_CAPTURE), and a ``capture`` line says what was kept.

A container the orchestrator keeps between cases runs ``hold`` and gets each
case's role by ``docker exec ... entry ROLE`` with SOCKLAB_KEEP_CONTAINER=1:
then the kernel's TCP metrics cache (ssthresh and RTT remembered per peer,
which a fresh network namespace would not have) is flushed before the link is
applied, and the link is removed after it is reported, so each case starts as
in a new container.
"""

from __future__ import annotations

import os
import pwd
import resource
import signal
import sys
import time

from .errors import SocklabError, UsageError
from .results import ENV_FAILURE_LINE, emit_failure, emit_file, emit_result
from .units import parse_duration_s

WORKLOAD_USER = "socklab"
# Roles that run as root because their job is the link itself.
_ROOT_ROLES = {"shape"}
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ENV_KEEP = "SOCKLAB_KEEP_CONTAINER"
# Files (paths, space-separated) printed into the log once the role has ended: where
# the orchestrator cannot copy them out of the container (a task on another node).
ENV_EMIT_FILES = "SOCKLAB_EMIT_FILES"
FLUSH_TCP_METRICS = ["ip", "tcp_metrics", "flush", "all"]


def raise_descriptor_limit() -> int:
    """Raise this process's descriptor limit (RLIMIT_NOFILE) to its hard limit; the new soft limit.

    A server holds a descriptor per connection, and the soft limit a container
    starts with can be far below its hard one (Docker 25 and later give soft
    1024 under a hard 524288), which would stop a server at about a thousand
    connections. Raising the soft limit up to the hard one needs no privilege,
    and every process the role starts inherits it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def drop_privileges(user: str = WORKLOAD_USER) -> None:
    """Become ``user`` for good: supplementary groups, gid, then uid.

    Leaving uid 0 clears the capability sets, so the workload loses NET_ADMIN too.
    """
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = "/tmp"
    os.environ["USER"] = user


def prepare_result_dir(path: str, reset: bool) -> None:
    """Make the shared result directory writable by the workload user.

    ``reset`` clears earlier results, so a summary never shows a stale run.
    """
    os.makedirs(path, exist_ok=True)
    if reset:
        for name in os.listdir(path):
            if name.endswith(".json"):
                os.unlink(os.path.join(path, name))
    entry = pwd.getpwnam(WORKLOAD_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def supervise(command: list[str]) -> int:
    """Run ``command`` unprivileged in a child, forwarding signals; its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            drop_privileges()
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"socklab: cannot run {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    _, status = os.waitpid(pid, 0)  # retried by Python across forwarded signals
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def stop_delay_line() -> dict | None:
    """Stop the link's delay line, if it has one; its final counters, or None."""
    from . import shaping

    try:
        return shaping.stop_delay_line(shaping.run, state_path=shaping.commands.state_path_from(os.environ))
    except (SocklabError, OSError, ValueError) as exc:  # the workload's result matters more than this
        print(f"socklab: could not stop the delay line: {exc}", file=sys.stderr, flush=True)
        return None


def report_link(delay_line: dict | None = None, since: dict | None = None) -> None:
    """Print the link as applied, with its counters, as a ``link`` result line.

    ``delay_line``: the delay line's final counters, when it was stopped first.
    ``since``: the link as it was once the link probe had measured it; the counts
    are then those of what passed after (``counted``: "after the link probe").
    """
    from . import shaping

    try:
        shown = shaping.show_link(shaping.run, state_path=shaping.commands.state_path_from(os.environ),
                                  delay_line=delay_line)
    except (SocklabError, OSError) as exc:  # the workload's result matters more than this
        print(f"socklab: could not read the link's counters: {exc}", file=sys.stderr, flush=True)
        return
    if since is not None:
        shown = {**shaping.counts_since(shown, since), "counted": "after the link probe"}
    emit_result({"role": "link", **shown})


def start_responder(applied: dict):
    """The server's answer to the clients' link probes (SOCKLAB_PROBE_RESPOND: its UDP port), or None."""
    from . import linkprobe, shaping

    port = os.environ.get(linkprobe.ENV_PROBE_RESPOND, "").strip()
    if not port:
        return None
    state_path = shaping.commands.state_path_from(os.environ)

    def link_now() -> dict:
        # Read at each hello: a link changed by `shape set` since the start is the one probed.
        state = shaping.commands.read_state(state_path)
        return (state or applied).get("applied") or {}

    return linkprobe.start_responder(int(port), link_now)


def probe_link(applied: dict) -> dict | None:
    """Measure this container's path to the server before the workload (SOCKLAB_PROBE: HOST:PORT),
    and print what was measured as a ``probe`` result line.

    The link's counters once the probe is done, or None when there was no probe: the
    ``link`` line counts from there, so that its counters are the workload's alone.
    """
    from . import linkprobe, shaping

    target = os.environ.get(linkprobe.ENV_PROBE, "").strip()
    if not target:
        return None
    host, port = linkprobe.parse_server(target)
    group = os.environ.get(linkprobe.ENV_PROBE_GROUP, "").strip() or None
    measured = linkprobe.measure_link(host, port, applied.get("applied") or {}, group=group)
    emit_result({"role": "probe", **measured})
    try:
        return shaping.show_link(shaping.run, state_path=shaping.commands.state_path_from(os.environ))
    except (SocklabError, OSError) as exc:  # the workload matters more than its counters
        print(f"socklab: could not read the link's counters after the probe: {exc}", file=sys.stderr, flush=True)
        return None


def start_capture():
    """Start capturing the lab device's packets (SOCKLAB_CAPTURE), before the workload's first
    one; None when no capture is asked for."""
    from . import capture
    from .linkprobe import ENV_PROBE, ENV_PROBE_RESPOND, parse_server

    settings = capture.CaptureSettings.from_env(os.environ)
    if settings is None:
        return None
    # The probe's packets are the lab's measurement of itself, not the workload's traffic.
    respond, target = os.environ.get(ENV_PROBE_RESPOND, "").strip(), os.environ.get(ENV_PROBE, "").strip()
    probe_port = int(respond) if respond else parse_server(target)[1] if target else None
    # eth0 whatever device the link shapes: the capture is of the lab's traffic, where it really goes.
    return capture.start_capture(settings, exclude_udp_port=probe_port)


# How long a capture waits, once the workload has ended, for its connections to close at both
# ends (its FIN acknowledged, the peer's FIN received), and then for the last packets to reach
# tcpdump.
CAPTURE_CLOSE_WAIT_S = 10.0
CAPTURE_SETTLE_S = 0.2


def stop_capture(running) -> None:
    """Stop a capture once the connections have closed, and print its ``capture`` result line."""
    from .program import drain_wait, open_connections, read_tables

    drain_wait(read_tables, CAPTURE_CLOSE_WAIT_S, pending=open_connections)
    time.sleep(CAPTURE_SETTLE_S)
    emit_result({"role": "capture", **running.stop()})


def report_killed(role: str, code: int) -> None:
    """Print the failure line of a workload that a signal killed (status 128+N)."""
    try:
        name = signal.Signals(code - 128).name
    except ValueError:
        name = f"signal {code - 128}"
    emit_failure(role, f"the {role} was killed by {name}", code)


def hold() -> int:
    """Wait, doing nothing, until SIGTERM or SIGINT (a kept container's main process)."""
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)
    return 0


# /proc/net/tcp and tcp6: "sl local_address rem_address st ...", the port in hex
# after the colon, the state in hex (0A: LISTEN).
_SOCKET_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"
READY_POLL_S = 0.02


def listening_ports(tables: tuple[str, ...] = _SOCKET_TABLES) -> set[int]:
    """The TCP ports something listens on in this network namespace."""
    ports = set()
    for table in tables:
        try:
            with open(table, encoding="ascii") as fh:
                next(fh, None)  # the header
                for line in fh:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == _LISTEN:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return ports


def wait_listening(port: int, timeout_s: float, tables: tuple[str, ...] = _SOCKET_TABLES) -> bool:
    """Wait (at most ``timeout_s``) until something listens on ``port``; whether it did."""
    deadline = time.monotonic() + timeout_s
    while port not in listening_ports(tables):
        if time.monotonic() >= deadline:
            return False
        time.sleep(READY_POLL_S)
    return True


def ready(args: list[str]) -> int:
    """``entry ready PORT [SECONDS]``: 0 once PORT listens here, 1 after SECONDS (default 60)."""
    if not 1 <= len(args) <= 2 or not args[0].isdigit() or not 0 < int(args[0]) < 65536:
        raise UsageError("entry ready needs a port (1-65535) and optionally how long to wait (e.g. 60s)")
    timeout_s = parse_duration_s(args[1]) if len(args) == 2 else 60.0
    if wait_listening(int(args[0]), timeout_s):
        return 0
    print(f"socklab: nothing listened on port {args[0]} within {timeout_s:g} s", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str]) -> int:
    """Shape, prepare, then run the role named in ``argv`` without privileges."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    role, args = argv[0], argv[1:]
    if role == "hold":
        return hold()
    if role == "ready":  # never shapes: it shares the server's network namespace and link
        return ready(args)
    # From here a failure, this process's or the workload's, prints its failure line.
    os.environ[ENV_FAILURE_LINE] = "1"
    raise_descriptor_limit()
    if role == "exec":
        if not args:
            raise UsageError("entry exec needs a command to run")
        command = args
    else:
        command = [sys.executable, "-m", "socklab", role, *args]

    if os.geteuid() != 0 or role in _ROOT_ROLES:
        os.execvp(command[0], command)

    from . import shaping

    kept = os.environ.get(ENV_KEEP) == "1"
    if kept:
        shaping.run(FLUSH_TCP_METRICS)
    applied = shaping.apply_from_env(os.environ, shaping.run)
    print(f"socklab: {applied['summary']}", file=sys.stderr, flush=True)
    result_dir = os.environ.get("SOCKLAB_RESULT_DIR")
    if result_dir:
        prepare_result_dir(result_dir, os.environ.get("SOCKLAB_RESULT_RESET") == "1")
    responder = start_responder(applied)
    probed = probe_link(applied)
    capture = start_capture()
    try:
        code = supervise(command)
    finally:
        if capture is not None:
            stop_capture(capture)
        if responder is not None:
            responder.stop()
    if code > 128:  # killed: the workload could not say so itself
        report_killed(role if role != "exec" else os.path.basename(command[0]), code)
    final = stop_delay_line()
    if os.environ.get("SOCKLAB_REPORT_LINK") == "1":
        report_link(final, probed)
    for path in os.environ.get(ENV_EMIT_FILES, "").split():
        emit_file(path)
    if kept:
        shaping.remove_link(shaping.run, state_path=shaping.commands.state_path_from(os.environ))
    return code
