"""The echo benchmark's roles: the lab's server and client as lab.py builds them, and the reference.

Every role's arguments come from an experiment rendered by labkit.scenario
(see experiments.server_argv/client_argv); what an experiment cannot say (a listen
backlog for 1,000 simultaneous connects, an idle timeout longer than any
point, the client's wait for EOF, the server's container name as host) is set
on top.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from experiments import SOCKLAB, client_argv, server_argv
from labkit.scenario import SERVER_PORT as PORT

REQUEST_SIZE = "1KiB"
# The client mode that spends the least CPU per round trip, measured against
# the reference on loopback and in the lab's containers (see CLIENT_MODE_WHY);
# the full run measures the candidates again and records them (on a shared
# host a single calibration can rank poll, epoll and select either way).
CLIENT_MODE = "poll"
CLIENT_MODE_WHY = (
    "The client processes' CPU per round trip bounds what any server can show (the host has two cores). Of the "
    "modes that hold 1,000 connections in one thread, poll spent the least where the client sets the pace: its "
    "shared loop registers each socket before every wait and unregisters it after, which for poll only edits "
    "the list handed to the next poll() and for epoll costs two epoll_ctl() system calls per round trip. On "
    "loopback (8 alternating runs against the reference) poll used 24.7 µs of client CPU per round trip at 100 "
    "connections and 29.5 at 1,000, epoll 26.4 and 35.4, select 25.1 and 36.7 (and select cannot watch "
    "descriptors past 1,023); at 1 connection, where the round trip sets the pace, all three were within noise "
    "(29-33). The asyncio client (streams, a task per connection) costs about 3x as much; the blocking client "
    "is the cheapest at 1 connection (no poller) but needs a thread per connection (73 µs per round trip at "
    "10, 143 at 1,000). One mode for every point: poll.")
REFERENCE_SOURCE = (Path(__file__).resolve().parent.parent / "reference_echo.py").read_text()
# The blocking server serves the connections one after another while the rest
# wait in the backlog: room for all of them, an idle timeout that a waiting
# connection cannot reach, and no --max-connections (stopped by a signal).
# Receives of 64 KiB (the reactor's read budget per event; the reference's
# transport asks for 256 KiB): with the tutorial's 1 KiB default every 1 KiB
# request fills the buffer exactly, and the select/poll/epoll loop cannot tell
# that the socket is empty, so it pays a second recv() that fails with EAGAIN
# (and its exception) per request: about 4 µs of its 12-16 µs on loopback.
SERVER_RECV_SIZE = "64KiB"
SERVER_OPTIONS = {"--backlog": "1024", "--idle-timeout": "600s"}
# Generous: a point that takes this long has failed anyway.
CLIENT_EOF_WAIT = "120s"
# The load is split over this many client processes (fewer when there are fewer
# connections), each with its share of the connections: one process was 85-100 %
# busy from 10 connections on, so it set the pace and the servers were not what
# was measured. Four share the host's second core, the server having the first.
CLIENT_PROCESSES = 4
# A client process busier than this share of its wall time may be what sets the pace.
CLIENT_BUSY_SHARE = 0.80
# Where each client process of a split load leaves its output in the client container.
CLIENT_OUTPUT = "/tmp/echo-client-{index}.out"


def _echo_group(mode: str = CLIENT_MODE, connections: int = 1, requests: int = 1) -> dict:
    return {"name": "load", "mode": mode, "connections": connections,
            "workload": {"kind": "echo", "requests": requests, "size": REQUEST_SIZE}}


def lab_server_command(mode: str) -> list[str]:
    """The lab server of ``mode`` as the benchmark runs it (the entrypoint's ``server`` role)."""
    return server_argv({"mode": mode, "recv_size": SERVER_RECV_SIZE}, _echo_group(), options=SERVER_OPTIONS)


def lab_server_options() -> str:
    """The lab server's options besides its mode and port, as the results record them."""
    argv = lab_server_command("epoll")
    return " ".join(argv[argv.index("--port") + 2:])


def reference_command() -> list[str]:
    """The reference server, its source passed on the command line: nothing of it is in the image."""
    return ["exec", "python3", "-c", REFERENCE_SOURCE, str(PORT)]


def client_split(connections: int, processes: int = CLIENT_PROCESSES) -> list[int]:
    """``connections`` split as evenly as possible over at most ``processes`` client processes."""
    count = max(1, min(processes, connections))
    base, extra = divmod(connections, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def load_command(host: str, connections: int, requests: int, mode: str = CLIENT_MODE) -> str:
    """Shell that runs the split load against ``host`` at once and prints every client's output in turn.

    Each process writes to a file of its own, so no two result lines can
    interleave; every process makes ``requests`` round trips per connection.
    """
    outputs = [CLIENT_OUTPUT.format(index=i) for i in range(len(client_split(connections)))]
    starts = " ".join(f"{client_command(host, n, requests, mode)} >{out} 2>&1 &"
                      for n, out in zip(client_split(connections), outputs))
    return f"{starts} wait; cat {' '.join(outputs)}; rm -f {' '.join(outputs)}"


def client_command(host: str, connections: int, requests: int, mode: str = CLIENT_MODE) -> str:
    """The lab's echo client against ``host``, as a shell command."""
    return shlex.join([*SOCKLAB, *client_argv(_echo_group(mode, connections, requests),
                                              {"--host": host, "--eof-wait": CLIENT_EOF_WAIT})])
