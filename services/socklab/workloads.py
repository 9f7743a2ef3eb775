"""The client workloads, written once for every I/O mode.

Each workload is a generator over one connection (see conns/ for the
interface); the mode decides how each socket call is made and waited for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .conns import ConnBase
from .sockcall import Sleep, Step

# The slow workload sends a piece about this often: fine enough to look like a
# trickle, coarse enough that a 10 B/s peer still sends whole bytes.
SLOW_TICK_S = 0.1


@dataclass(frozen=True)
class WorkloadOptions:
    """The workload options of one client run (those of other workloads unused)."""

    bytes: int = 136314880
    pattern: bytes = b"Hello Python\n"
    chunk_bytes: int | None = None
    requests: int = 1000
    size_bytes: int = 1024
    think_s: float = 0.0
    attempts: int = 5
    cancel_after_s: float | None = None
    rate_bps: int = 100  # bytes per second
    hold_s: float = 10.0


def make_payload(nbytes: int, pattern: bytes) -> bytes:
    """``pattern`` repeated and cut to exactly ``nbytes``."""
    whole, rest = divmod(nbytes, len(pattern))
    return pattern * whole + pattern[:rest]


def bulk(conn: ConnBase, opts: WorkloadOptions, payload: memoryview) -> Step:
    """The tutorial: push one large payload, then wait for the server to confirm it."""
    yield from conn.connect()
    yield from conn.send_payload(payload, opts.chunk_bytes)
    yield from conn.finish()


def echo(conn: ConnBase, opts: WorkloadOptions, request: memoryview) -> Step:
    """Round trips: send a request, read its echo, record the latency."""
    yield from conn.connect()
    clock = conn.clock
    for _ in range(opts.requests):
        started = clock()
        accepted = yield from conn.send_payload(request, None)
        # A non-blocking send may take less than the request: only that comes back.
        yield from conn.recv_exactly(accepted)
        if conn.expired is not None:
            break
        if accepted:
            conn.latencies_s.append(clock() - started)
        if opts.think_s:
            yield Sleep(clock() + opts.think_s)
    yield from conn.finish()


def connect(conn: ConnBase, opts: WorkloadOptions, _payload: memoryview) -> Step:
    """Connection attempts one after another, each possibly cancelled by the user's stop."""
    for _ in range(opts.attempts):
        yield from conn.connect_attempt(opts.cancel_after_s)


def slow(conn: ConnBase, opts: WorkloadOptions, piece: memoryview) -> Step:
    """A slow peer: trickle ``rate_bps`` bytes per second, keep the connection ``hold_s``."""
    yield from conn.connect()
    start = conn.clock()
    end = start + opts.hold_s
    if opts.rate_bps:
        interval_s = len(piece) / opts.rate_bps
        sent_pieces = 0
        while conn.expired is None:
            due = start + sent_pieces * interval_s
            if due >= end:
                break
            if due > conn.clock():
                yield Sleep(due)
            yield from conn.send_payload(piece, None)
            sent_pieces += 1
    if conn.expired is None and end > conn.clock():
        yield Sleep(end)
    yield from conn.finish()


def slow_piece_bytes(rate_bps: int) -> int:
    """Bytes per send() of the slow workload."""
    return max(1, round(rate_bps * SLOW_TICK_S))


# kind -> (workload, bytes each connection's generator is given to send)
WORKLOADS: dict[str, tuple[Callable[..., Step], Callable[[WorkloadOptions], int]]] = {
    "bulk": (bulk, lambda o: o.bytes),
    "echo": (echo, lambda o: o.size_bytes),
    "connect": (connect, lambda o: 0),
    "slow": (slow, lambda o: slow_piece_bytes(o.rate_bps)),
}
