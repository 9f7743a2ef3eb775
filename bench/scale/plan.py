"""What the scale benchmark tries, and every process it starts: the plan and the roles' arguments.

The lab's servers and clients get their arguments from an experiment rendered
by labkit.scenario (experiments.server_argv/client_argv); set on top: the slow
workload on the server (scenario picks bulk for slow clients; both only
count bytes, and the ramp's servers were measured with slow), a backlog the
size of somaxconn, an idle timeout past any step, and for the clients an idle
rate of 0 bytes/s (the config's least is 1), a connect timeout that waits for
SYN retransmissions and a shorter wait for EOF. The reference holders are
programs of bench/probes/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import math

from experiments import SOCKLAB, client_argv, probe_command, server_argv
from labkit.config.limits import EPHEMERAL_PORTS
from labkit.scenario import SERVER_PORT as PORT

C10K = 10_000
# What the epoll and asyncio servers are asked to hold (issue 17): the C100K line.
C100K = 100_000
# net.core.somaxconn in a fresh network namespace, the most a listen() backlog
# gets. Not more: asyncio also takes the backlog as the number of accept()s to
# try per wakeup, even after one has failed (see _asyncio_at_limit).
BACKLOG = 4096
# One client process holds at most this many: it needs a descriptor per
# connection too, and keeping it well under the server's limit makes the
# server, not the client, the side that runs out first.
PER_CLIENT_PROCESS = 5000
# One client container holds at most this many: all its connections go from its one
# address to the server's one address and port, so each needs an ephemeral port of its
# own (EPHEMERAL_PORTS, 28,232); the rest are left for ports a killed step's
# connections may still hold. 100,000 connections take four client containers.
PER_CLIENT_CONTAINER = 25_000
assert PER_CLIENT_CONTAINER < EPHEMERAL_PORTS
# Generous: a SYN dropped at a full accept queue is sent again 1, 3, 7, 15 and
# 31 s later, and the server may be slow to make room on a loaded host.
CONNECT_TIMEOUT_S = 60
# Stop waiting for more once nothing has changed for this long: a server that
# has stopped accepting leaves the rest established in its accept queue...
SERVER_STALL_S = 3.0
# ...while connections the client has not completed may be waiting for a SYN
# retransmission (1, 2, 4, 8, 16 s apart after an overflow): give those longer.
CONNECT_STALL_S = 20.0
# After the count is reached, before memory is read: asyncio makes each
# connection's transport a loop turn after accept() returned it.
SETTLE_S = 1.0
PROBE_INTERVAL_S = 0.5
# A server this close to its descriptor limit is out of them: the rest are its listener,
# poller, standard streams and the interpreter's own.
FD_SLACK = 16
# How long each client connection stays. Every step ends sooner (the client is
# killed once the count is read): this only has to outlast the watching.
HOLD_S = CONNECT_TIMEOUT_S + CONNECT_STALL_S + 60
PIDFILE = "/tmp/scale-server.pid"
REFERENCE = {"epoll": "ref-epoll", "asyncio": "ref-asyncio"}

# The reference holders: the least the same idiom needs to keep a connection.
REFERENCE_PROBE = {"ref-epoll": "hold_epoll", "ref-asyncio": "hold_asyncio"}



@dataclass(frozen=True)
class Plan:
    """How far to ramp each mode, and how often."""

    ramps: dict[str, tuple[int, ...]]
    repetitions: dict[str, int]
    # The ramp of every repetition after the first, where it differs from ``ramps``.
    repeat_ramps: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def ramp(self, mode: str, repetition: int) -> tuple[int, ...]:
        """The steps ``mode`` tries in its ``repetition`` (from 0)."""
        return self.repeat_ramps.get(mode, self.ramps[mode]) if repetition else self.ramps[mode]

    def reaching_top(self, mode: str) -> int:
        """How many of ``mode``'s repetitions (the first ones) try its largest step."""
        if mode not in self.repeat_ramps or max(self.repeat_ramps[mode]) == max(self.ramps[mode]):
            return self.repetitions.get(mode, 1)
        return 1


# --quick: the C10K line (where memory is compared) and the C100K line for the
# two modes that must reach it, one step at the C10K line for poll and threaded,
# the select server just past its cap, the iterative server with a queue behind it.
QUICK = Plan(ramps={"epoll": (C10K, C100K), "asyncio": (C10K, C100K), "poll": (C10K,), "threaded": (C10K,),
                    "select": (1000,), "blocking": (100,)},
             repetitions={"epoll": 1, "asyncio": 1})
# epoll and asyncio on to the C100K line; poll and threaded past C10K to 20,000
# (threaded meets vm.max_map_count at about 22,000 threads: see threaded_costs).
# Where the engine caps a container's descriptors (Docker daemons started with
# 20,000), a step stops at that cap: see limits.why_stopped.
# Only the first repetition goes on past C10K: the others are there for the memory
# figures at C10K, and a step of 100,000 costs 25-45 s (the whole benchmark stays
# under six minutes).
FULL = Plan(ramps={"epoll": (1000, C10K, C100K), "asyncio": (1000, C10K, C100K),
                   "poll": (1000, C10K, 20_000), "threaded": (1000, C10K, 20_000),
                   "select": (500, 1000), "blocking": (100,)},
            repetitions={"epoll": 3, "asyncio": 3}, repeat_ramps={"epoll": (C10K,), "asyncio": (C10K,)})
# The server container only hosts the processes started by exec (so nothing
# listens when it starts: it is started without waiting for that). Without
# SYN cookies a connection that meets a full accept queue is retried by the
# client's SYN until there is room; with them (the default) the kernel lets the
# client believe it is connected while the server never gets it, and a slow
# acceptor (the threaded server in a burst) silently loses a few hundred.
SERVER_SERVICE = {"command": ["exec", "sleep", "infinity"],
                  "sysctls": {"net.ipv4.tcp_syncookies": "0"}}
# The order steps run in: the two C10K candidates first, the others after.
MODE_ORDER = ("epoll", "asyncio", "poll", "threaded", "select", "blocking")



def server_command(mode: str) -> list[str]:
    """The command of one server process: a socklab mode or a reference holder."""
    if mode in REFERENCE_PROBE:
        return probe_command(REFERENCE_PROBE[mode], PORT, BACKLOG)
    # No --max-connections: it runs until signalled. The idle timeout outlasts any step.
    return [*SOCKLAB, *server_argv({"mode": mode}, {"name": "idle", "workload": {"kind": "slow"}},
                                   options={"--workload": "slow", "--idle-timeout": "600",
                                            "--backlog": BACKLOG})]


def client_chunks(connections: int) -> list[int]:
    """``connections`` over as few client processes as PER_CLIENT_PROCESS allows."""
    chunks = [PER_CLIENT_PROCESS] * (connections // PER_CLIENT_PROCESS)
    if connections % PER_CLIENT_PROCESS:
        chunks.append(connections % PER_CLIENT_PROCESS)
    return chunks


def client_containers(connections: int) -> list[int]:
    """``connections`` split as evenly as possible over as few client containers as PER_CLIENT_CONTAINER allows."""
    containers = max(1, math.ceil(connections / PER_CLIENT_CONTAINER))
    base, extra = divmod(connections, containers)
    return [base + (1 if i < extra else 0) for i in range(containers)]


def client_commands(connections: int, hold_s: float) -> list[list[str]]:
    """One client container's program per share of ``connections`` (see client_containers)."""
    return [client_command(n, hold_s) for n in client_containers(connections)]


def client_command(connections: int, hold_s: float) -> list[str]:
    """The client container's program: ``connections`` idle connections held for ``hold_s``, in chunks."""
    clients = [[*SOCKLAB, *client_argv({"mode": "epoll", "connections": n,
                                        "workload": {"kind": "slow", "hold": f"{hold_s:g}s"}},
                                       {"--rate": "0", "--connect-timeout": f"{CONNECT_TIMEOUT_S}s",
                                        "--eof-wait": "30s"})]
               for n in client_chunks(connections)]
    return probe_command("idle_clients", json.dumps(clients))
