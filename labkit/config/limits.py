"""Loads no container can carry, refused when an experiment is loaded.

Three bounds, each a fact about the containers rather than a guess (README,
"Loads a container can carry", says why each one is what it is):

- **connections per client container** — every connection of one client container
  goes from its one address to the server's one address and port, so each needs its
  own ephemeral port: 28,232 of them (Linux's ``net.ipv4.ip_local_port_range``,
  32768–60999, which every new network namespace starts with; the image and its
  entrypoint leave it alone);
- **memory per container** — what the workload holds in user space (below), plus the
  interpreter, against ``container_memory`` (default 1 GiB, the one bound a bigger
  host can sensibly raise);
- **containers per case** — Compose puts every container of a case on one bridge
  network, and a Linux bridge has at most 1,023 ports (``BR_MAX_PORTS`` 1024, port 0
  reserved): the server and at most 1,022 client replicas.

What a container holds, counted from the roles' code (``socklab.workloads``,
``clients``, ``conns``, ``servers``):

- a client builds its payload once (``make_payload``: the pattern repeated, then the
  cut-off rest appended, so twice its size while it is built unless the pattern
  divides it) and every connection sends from that one buffer: bulk ``bytes``, echo
  ``size``, one slow piece; connect holds none. A large payload is usually tiled
  (``socklab.payload``: a small memory file mapped again and again) and holds far
  less, but it falls back to those plain bytes when it cannot be mapped, so they count;
- each client connection reads with ``recv(64 KiB)``: modes with a thread per
  connection (blocking, nonblocking, nonblocking-spin, timeout) can all be inside one
  at once; the event-loop modes (select, poll, epoll) read one at a time; asyncio's
  stream reader buffers up to twice its 64 KiB limit per connection;
- the server reads into one ``recv_size`` buffer, except the threaded server (one per
  connection thread); an echo server of the reactor modes or asyncio queues up to
  256 KiB of output per connection (its high-water mark) plus one read past it;
- per-connection bookkeeping as measured (``bench/results/benchmarks.json``, resident
  memory per idle connection at 10,000: epoll 0.21 KiB, asyncio 1.8 KiB, threaded
  17.8 KiB with its thread), rounded up with room, and 20 MiB for the idle interpreter
  (the idle server measured 20.0 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from socklab.conns import RECV_BYTES
from socklab.servers.connection import ECHO_HIGH_WATER_BYTES

from .experiment import ClientGroup, ServerConfig
from .raw import KeyPath

# 60999 - 32768 + 1: the ports one source address has towards one destination address and port.
EPHEMERAL_PORTS = 28_232
# A Linux bridge's ports (BR_MAX_PORTS 1024, port 0 reserved); one per container.
COMPOSE_MAX_CONTAINERS = 1_023

_KIB = 1024
_MIB = 1024 * 1024
INTERPRETER_BYTES = 20 * _MIB
# What a client asks of each recv(), and the output one echo connection of a server may
# have queued: the roles' own constants, so the bounds follow the code that holds the bytes.
CLIENT_RECV_BYTES = RECV_BYTES
SERVER_ECHO_QUEUE_BYTES = ECHO_HIGH_WATER_BYTES

# How a role serves its connections, by mode (client and server modes share the names).
_SERVING = {"blocking": "thread", "nonblocking": "thread", "nonblocking-spin": "thread", "timeout": "thread",
            "threaded": "thread", "select": "reactor", "poll": "reactor", "epoll": "reactor",
            "asyncio": "asyncio"}
# Resident bookkeeping per connection, measured at 10,000 idle connections (threaded 17.8,
# asyncio 1.8, epoll 0.21 KiB; before the servers were made lean 17.9, 2.9 and 0.62), rounded up
# with room, so a server's bound does not move with each measurement. The iterative server holds
# one connection at a time.
_BOOKKEEPING_BYTES = {"thread": 20 * _KIB, "asyncio": 4 * _KIB, "reactor": 1 * _KIB, "iterative": 0}

Failer = Callable[[KeyPath], Callable[[str], NoReturn]]


@dataclass(frozen=True)
class Holding:
    """The memory one container would hold: the total and the parts, in words."""

    total_bytes: int
    parts: tuple[str, ...]
    # The bytes of the one setting the rest of the total scales with: the payload of a
    # client, the recv buffers of a server; when they are most of it, that key is blamed.
    sized_bytes: int = 0

    @property
    def mostly_sized(self) -> bool:
        """True when the sized part is at least half of the total."""
        return 2 * self.sized_bytes >= self.total_bytes

    def describe(self) -> str:
        """'about 1.2 GiB (the interpreter 20 MiB, ...)'."""
        return f"about {_size(self.total_bytes)} ({', '.join(self.parts)})"


def _size(nbytes: float) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.4g} {unit}"
    return f"{nbytes:.0f} B"


def _built_payload_bytes(size: int, pattern: str) -> int:
    """Peak bytes of ``make_payload(size, pattern)``: ``pattern * n + pattern[:rest]``."""
    rest = size % len(pattern.encode("utf-8", "surrogateescape"))
    # With no rest CPython returns the repeated pattern itself; otherwise both exist at once.
    return size if rest == 0 else 2 * size - rest


def client_holding(group: ClientGroup) -> Holding:
    """What one container of ``group`` holds in user space (see the module's docstring)."""
    workload, n = group.workload, group.connections
    parts = [f"the interpreter {_size(INTERPRETER_BYTES)}"]
    total = INTERPRETER_BYTES
    payload = {"bulk": workload.bytes, "echo": workload.size_bytes}.get(workload.kind)
    built = 0
    if payload is not None:
        built = _built_payload_bytes(payload, workload.pattern or "Hello Python\n")
        total += built
        parts.append(f"the {_size(payload)} payload every connection shares, {_size(built)} while it is built")
    serving = _SERVING[group.mode]
    per_connection = _BOOKKEEPING_BYTES[serving]
    if serving == "thread":
        per_connection += CLIENT_RECV_BYTES
        what = "a 64 KiB receive and a thread"
    elif serving == "asyncio":
        per_connection += 2 * CLIENT_RECV_BYTES
        what = "a stream reader's 128 KiB"
    else:
        total += CLIENT_RECV_BYTES
        what = "its bookkeeping"
    total += n * per_connection
    parts.append(f"{n} connection(s) × {_size(per_connection)} ({what})")
    return Holding(total, tuple(parts), built)


def server_holding(server: ServerConfig, connections: int, echo: bool) -> Holding:
    """What the server holds with ``connections`` at once (``echo``: it sends every byte back)."""
    recv = server.recv_size_bytes
    total = INTERPRETER_BYTES
    parts = [f"the interpreter {_size(INTERPRETER_BYTES)}"]
    serving = "iterative" if server.mode == "blocking" else _SERVING[server.mode]
    per_connection = _BOOKKEEPING_BYTES[serving]
    if serving == "thread":
        per_connection += recv
        what = [f"its own {_size(recv)} recv buffer and thread"]
        recv_total = connections * recv
    else:
        recv_total = recv
        total += recv
        parts.append(f"one {_size(recv)} recv buffer")
        what = ["bookkeeping"]
        # The iterative server sends each echo before its next recv(): nothing queues.
        if echo and serving != "iterative":
            per_connection += SERVER_ECHO_QUEUE_BYTES + recv
            what.append("up to 256 KiB of echo output queued and one read past it")
            recv_total += connections * recv
    total += connections * per_connection
    parts.append(f"{connections} connection(s) × {_size(per_connection)} ({', '.join(what)})")
    return Holding(total, tuple(parts), recv_total)


def check_loads(server: ServerConfig, clients: Sequence[ClientGroup], budget_bytes: int, failer: Failer) -> None:
    """Refuse, naming the key that breaks it, a load beyond one of the three bounds."""
    budget = f"the {_size(budget_bytes)} a container may hold (container_memory; raise it if the host has more)"
    containers = 1
    for index, group in enumerate(clients):
        at: KeyPath = ("clients", index)
        if group.connections > EPHEMERAL_PORTS:
            failer(at + ("connections",))(
                f"{group.connections} connections from one container need as many ephemeral ports, and one "
                f"source address has {EPHEMERAL_PORTS} towards the server's port (net.ipv4.ip_local_port_range "
                f"32768-60999): use at most {EPHEMERAL_PORTS} per container and more replicas")
        containers += group.replicas
        if containers > COMPOSE_MAX_CONTAINERS:
            failer(at + ("replicas",))(
                f"{group.replicas} replicas make {containers} containers in a case, and Compose puts them on one "
                f"bridge network, which takes at most {COMPOSE_MAX_CONTAINERS} (the server and "
                f"{COMPOSE_MAX_CONTAINERS - 1} client replicas in all)")
        if group.program is not None:
            continue  # what a program of the user's holds is the program's to say
        holding = client_holding(group)
        if holding.total_bytes > budget_bytes:
            key = {"bulk": "bytes", "echo": "size"}.get(group.workload.kind)
            failer(at + (("workload", key) if key and holding.mostly_sized else ("connections",)))(
                f"a container of group {group.name} would hold {holding.describe()}, more than {budget}")
    if server.program is not None:
        return
    echo = any(g.workload.kind == "echo" for g in clients)
    concurrent = 0
    for index, group in enumerate(clients):
        concurrent += group.replicas * group.connections
        holding = server_holding(server, concurrent, echo)
        if holding.total_bytes > budget_bytes:
            failer(("server", "recv_size") if holding.mostly_sized else ("clients", index, "connections"))(
                f"the server container would hold {holding.describe()} for the {concurrent} connections of "
                f"the client groups up to {group.name}, more than {budget}")
