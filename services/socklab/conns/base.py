"""What both connection kinds share: counters, failure handling, the connect logic, finish."""

from __future__ import annotations

import abc
import errno
import socket
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from ..protocol import TRAILER_MAX_LEN, parse_trailer
from ..sockcall import CallFailed, Expired, Limit, Step, earliest
from ..tcpinfo import read_tcp_info
from ..trace import Tracer

# Bytes asked per recv(): large enough that reading an echo stream or the
# trailer takes few calls, small enough not to matter for memory.
RECV_BYTES = 65536


@dataclass(frozen=True)
class Mode:
    """How a client mode treats its sockets."""

    name: str
    blocking: bool = False              # the kernel waits inside each call
    call_timeout_s: float | None = None  # mode timeout: settimeout(T) on a blocking socket
    retries_sends: bool = True          # False: the tutorial's single non-blocking send()
    busy_retry: bool = False            # retry at once after EAGAIN, never wait
    waiter: str = "select"              # what a non-blocking wait for readiness uses
    shared_loop: bool = False           # one event loop for all connections, no threads
    uses_asyncio: bool = False


@dataclass(frozen=True)
class Settings:
    """What every connection of one client run shares."""

    family: int
    address: tuple
    sndbuf_bytes: int | None
    rcvbuf_bytes: int | None
    eof_wait_s: float
    connect_timeout_s: float | None
    deadline: Limit | None
    clock: Callable[[], float]
    origin_s: float
    tracer: Tracer | None
    # False when the server is not the lab's (a program of the user's): it owes no trailer.
    trailer: bool = True


def errno_name(exc: OSError) -> str:
    """The errno's symbolic name (ECONNRESET), or the exception's type without one."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _seconds(value: float) -> str:
    return f"{value:g}s"


class ConnBase(abc.ABC):
    """Counters, failure handling and the connect logic shared by both connection kinds."""

    def __init__(self, index: int, mode: Mode, settings: Settings) -> None:
        self.index = index
        self.mode = mode
        self.settings = settings
        self.clock = settings.clock
        self._trace = settings.tracer.add if settings.tracer is not None else None
        self._origin_s = settings.origin_s
        self.sock: socket.socket | None = None
        # Totals for this connection; clients.py sums them over connections.
        self.bytes_requested = 0
        self.bytes_accepted = 0
        self.bytes_delivered: int | None = None
        self.eagain = 0
        self.timeouts = 0
        self.blocked_s = 0.0
        self.calls: Counter[str] = Counter()
        self.call_s: defaultdict[str, float] = defaultdict(float)
        self.connect_s: list[float] = []
        self.attempts: list[tuple[str, float]] = []  # connect workload: (outcome, control away s)
        self.latencies_s: list[float] = []
        self.tcp_infos: list[dict[str, Any] | None] = []
        self.sndbuf_bytes: int | None = None
        self.rcvbuf_bytes: int | None = None
        self.first_send_at: float | None = None
        self.last_reply_at: float | None = None
        self.eof_at: float | None = None
        self.expired: Limit | None = None
        self.errors: list[str] = []

    # -- bookkeeping -------------------------------------------------------

    def _count(self, call: str, spent_s: float) -> None:
        self.calls[call] += 1
        self.call_s[call] += spent_s
        self.blocked_s += spent_s

    def _record(self, start: float, call: str, asked: int, returned: int, err: str,
                spent_s: float, attempts: int = 1) -> None:
        if self._trace is not None:
            self._trace((start - self._origin_s, self.index, call, asked, returned, err, spent_s, attempts))

    def _connect_timeout_s(self) -> float | None:
        # A settimeout(T) program's connect() gives up after T unless told otherwise.
        if self.settings.connect_timeout_s is not None:
            return self.settings.connect_timeout_s
        return self.mode.call_timeout_s

    def _connect_limit(self, start: float, cancel_after_s: float | None = None) -> Limit | None:
        timeout_s = self._connect_timeout_s()
        timeout = Limit(start + timeout_s, "timeout") if timeout_s is not None else None
        # A blocking connect() keeps control until it returns: the user's stop
        # cannot interrupt it, so only a non-blocking mode gets the cancel limit.
        cancel = None
        if cancel_after_s is not None and not self.mode.blocking:
            cancel = Limit(start + cancel_after_s, "cancel")
        return earliest(self.settings.deadline, timeout, cancel)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, Expired):
            return self._limit_message(exc.limit)
        if isinstance(exc, (CallFailed, ConnectionError)):
            return str(exc)
        return f"{type(exc).__name__}: {exc}"

    def _limit_message(self, limit: Limit) -> str:
        s = self.settings
        if limit.reason == "timeout":
            return f"connect() timed out after {_seconds(self._connect_timeout_s() or 0)}"
        if limit.reason == "deadline":
            return (f"the workload deadline passed with {self.bytes_accepted} of "
                    f"{self.bytes_requested} bytes accepted")
        if limit.reason == "reply":
            return f"no echo reply from the server within {_seconds(s.eof_wait_s)}"
        if limit.reason == "eof":
            return f"no EOF from the server within {_seconds(s.eof_wait_s)} after shutdown"
        return "connect() cancelled"

    def _expire(self, limit: Limit) -> None:
        """Stop the workload at ``limit``; the connection still finishes cleanly."""
        self.expired = limit
        self.errors.append(self._limit_message(limit))

    def _take_trailer(self, tail: bytes) -> None:
        self.eof_at = self.clock()
        if not self.settings.trailer:
            return  # what arrived is the server's to say
        delivered = parse_trailer(tail)
        if delivered is None:
            self.errors.append("the server closed the connection without a SOCKLAB-RCVD trailer")
        else:
            self.bytes_delivered = (self.bytes_delivered or 0) + delivered

    def fail(self, exc: BaseException) -> None:
        """Record why this connection stopped, and release its socket."""
        self.errors.append(self._describe(exc))
        self._drop()

    def _drop(self) -> None:
        if self.sock is not None:
            if self.settings.tracer is not None:
                self.settings.tracer.unwatch(self.index)
            self._close_socket()
            self.sock = None

    def _close_socket(self) -> None:
        """Close the socket and whatever wraps it."""
        self.sock.close()

    def _new_socket(self) -> socket.socket:
        sock = socket.socket(self.settings.family, socket.SOCK_STREAM)
        # Buffer sizes must be set before connect() to shape the window scale.
        if self.settings.sndbuf_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.sndbuf_bytes)
        if self.settings.rcvbuf_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.settings.rcvbuf_bytes)
        # What the kernel granted (it doubles a request for its bookkeeping):
        # the figure a non-blocking send()'s partial count is to be read against.
        self.sndbuf_bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.rcvbuf_bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.sock = sock
        return sock

    def _watch(self) -> None:
        if self.settings.tracer is not None and self.sock is not None:
            self.settings.tracer.watch(self.index, self.sock.fileno())

    # -- the interface workloads use --------------------------------------

    @abc.abstractmethod
    def _connect_step(self, limit: Limit | None) -> Step:
        """Open a socket and connect it, giving up at ``limit``."""

    def connect(self) -> Step:
        """Open the connection the workload runs on (raises Expired or CallFailed)."""
        start = self.clock()
        yield from self._connect_step(self._connect_limit(start))
        self.connect_s.append(self.clock() - start)

    def connect_attempt(self, cancel_after_s: float | None) -> Step:
        """One attempt of the connect workload; returns its outcome.

        Outcomes: ``connected``, ``cancelled`` (the stop at ``cancel_after_s``;
        a blocking mode acts on it only once connect() returns), ``timed_out``,
        ``failed``. A connected attempt ends with ``finish()`` like any client.
        """
        start = self.clock()
        outcome = "connected"
        try:
            yield from self._connect_step(self._connect_limit(start, cancel_after_s))
        except Expired as exc:
            if exc.limit.reason == "deadline":
                raise
            outcome = "cancelled" if exc.limit.reason == "cancel" else "timed_out"
        except CallFailed as exc:
            outcome = "failed"
            self.errors.append(str(exc))
        away_s = self.clock() - start
        connected = outcome == "connected"
        if connected:
            self.connect_s.append(away_s)
            # The stop came while a blocking connect() held control: the
            # program can act on it only now, and drops the connection.
            if cancel_after_s is not None and away_s >= cancel_after_s:
                outcome = "cancelled"
        self.attempts.append((outcome, away_s))
        if connected:
            yield from self.finish()
        else:
            self._drop()
        return outcome

    @abc.abstractmethod
    def send_payload(self, view: memoryview, chunk_bytes: int | None) -> Step:
        """Send ``view`` the mode's way; returns the bytes accepted."""

    @abc.abstractmethod
    def recv_exactly(self, nbytes: int) -> Step:
        """Read an echo reply of ``nbytes``; returns what arrived."""

    def finish(self) -> Step:
        """TCP_INFO, shutdown(SHUT_WR), then read to the server's EOF: the trailer gives
        the bytes delivered. The socket is released however it ends."""
        try:
            self.tcp_infos.append(read_tcp_info(self.sock))
            yield from self._shutdown_write()
            limit = Limit(self.clock() + self.settings.eof_wait_s, "eof")
            tail = b""
            while True:
                data = yield from self._recv_step(RECV_BYTES, limit)
                if not data:
                    break
                tail = (tail + data[-TRAILER_MAX_LEN:])[-TRAILER_MAX_LEN:]
            self._take_trailer(tail)
        finally:
            self._drop()

    @abc.abstractmethod
    def _shutdown_write(self) -> Step:
        """End this side's sending, the mode's way (traced as ``shutdown``)."""

    @abc.abstractmethod
    def _recv_step(self, nbytes: int, limit: Limit | None) -> Step:
        """One traced receive of at most ``nbytes``; returns the bytes (b"" at EOF)."""
