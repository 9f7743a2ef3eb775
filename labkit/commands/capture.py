"""`lab.py capture SERVICE [-w FILE]`: a running lab's packets, live, as pcap.

tcpdump runs in the service's container (its network namespace, eth0: the
lab's traffic, not the link probe's) and its pcap stream is copied to stdout or
a file as it comes, so that ``python lab.py capture client-blocking | wireshark
-k -i -`` shows the packets while the lab runs. However the command ends —
tcpdump's own count or duration, Ctrl-C, the reader going away — tcpdump is
stopped in the container too: nothing is left running.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import ExitStack

from socklab.capture import tcpdump_argv
from socklab.errors import SocklabError, UsageError

from .. import engine as engines
from ..scenario import SERVER_PORT
from .common import say
from .link import running_containers

# Where the container remembers the live capture's tcpdump, to stop it from outside.
LIVE_PID_PATH = "/tmp/socklab-live-capture.pid"
# Whole packets: a live capture is for reading them.
LIVE_SNAPLEN = 262144


def live_capture_argv(count: int | None, duration_s: float | None, snaplen_bytes: int = LIVE_SNAPLEN) -> list[str]:
    """The command run in the container: tcpdump writing pcap to stdout, its pid kept so it can be stopped."""
    dump = tcpdump_argv(snaplen_bytes, exclude_udp_port=SERVER_PORT, count=count)
    if duration_s is not None:
        # SIGINT, so that tcpdump flushes what it has and ends the file cleanly.
        dump = ["timeout", "-s", "INT", f"{duration_s:g}", *dump]
    return ["sh", "-c", f'echo $$ > {LIVE_PID_PATH} && exec "$@"', "sh", *dump]


def stop_argv() -> list[str]:
    """The command that stops a live capture's tcpdump (and the timeout wrapping it) in the container."""
    return ["sh", "-c", f"[ -f {LIVE_PID_PATH} ] && kill -INT $(cat {LIVE_PID_PATH}) 2>/dev/null; "
                        f"rm -f {LIVE_PID_PATH}; true"]


def cmd_capture(args) -> int:
    """Stream one container's packets as pcap to stdout or ``-w FILE``."""
    if args.write in (None, "-") and sys.stdout.isatty():
        raise UsageError("lab.py capture: pcap is binary: give -w FILE, or pipe it (| wireshark -k -i -)")
    if args.count is not None and args.count < 1:
        raise UsageError(f"lab.py capture: --count {args.count}: give a number of packets of at least 1")
    if args.duration is not None and args.duration <= 0:
        raise UsageError(f"lab.py capture: --duration {args.duration:g}: give seconds above zero")
    lab = engines.open_engine().attach(args.project)
    found = running_containers(lab, args.service)
    if args.replica > len(found) or args.replica < 1:
        raise UsageError(f"lab.py capture: --replica {args.replica}: {args.service} has {len(found)} running "
                         "container(s), numbered from 1")
    container = found[args.replica - 1]
    argv = live_capture_argv(args.count, args.duration)
    with ExitStack() as stack:
        sink = sys.stdout.buffer if args.write in (None, "-") else stack.enter_context(open(args.write, "wb"))
        try:
            code, errors = lab.stream(container, argv, sink)
        except (KeyboardInterrupt, BrokenPipeError):
            lab.exec(container, stop_argv())
            raise
        finally:
            lab.exec(container, ["rm", "-f", LIVE_PID_PATH])
    # tcpdump says how many packets it took on stderr; timeout's SIGINT ends it with 124.
    if code not in (0, 124):
        last = [line for line in errors.splitlines() if line.strip()]
        raise SocklabError(f"tcpdump in {container.name} failed ({shlex.join(argv[4:])}): "
                           f"{last[-1] if last else f'exit status {code}'}")
    summary = [line for line in errors.splitlines() if "packets captured" in line]
    if args.write not in (None, "-"):
        say(f"{container.name}: {summary[0] if summary else 'capture ended'}; written to {args.write}")
    return 0
