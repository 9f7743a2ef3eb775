"""One client connection in each I/O mode, with its counters and its trace records.

Workloads (workloads.py) are written once, against the interface every
connection class offers; each method is a generator used with ``yield from``:

* ``connect()`` — open the connection the workload runs on;
* ``connect_attempt(cancel_after_s)`` — one attempt of the connect workload;
* ``send_payload(view, chunk_bytes)`` — send the mode's way, return bytes accepted;
* ``recv_exactly(nbytes)`` — read an echo reply;
* ``finish()`` — TCP_INFO, ``shutdown(SHUT_WR)``, read to the server's EOF.

``SocketConn`` does real socket calls for the blocking, timeout and
non-blocking modes (its generators yield ``Wait``/``Sleep`` to an EventLoop);
``AsyncConn`` does the same with asyncio streams (its generators yield
coroutines to ``run_asyncio``).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import socket
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from .protocol import TRAILER_MAX_LEN, parse_trailer
from .pollers import POLLERS
from .sockcall import CallFailed, EventLoop, Expired, Limit, Sleep, Step, Task, Wait, earliest
from .tcpinfo import read_tcp_info
from .trace import Tracer

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


def _errno_name(exc: OSError) -> str:
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


class SocketConn(ConnBase):
    """A connection driven by plain socket calls (every mode but asyncio)."""

    _sock_timeout_s: float | None = None

    def _bound(self, call: str, limit: Limit | None, now: float) -> None:
        """Give a call on a blocking socket the timeout its mode and limit allow.

        Mode blocking leaves send() unbounded (bounding it would turn it into
        a partial, timed send) and bounds the calls given a limit (connect
        with a timeout, an echo reply, the EOF wait) so that a dead server
        cannot hold the client forever. Mode timeout bounds every call by T,
        connect() by its own limit.
        """
        remaining_s = None if limit is None else limit.at_s - now
        call_timeout_s = self.mode.call_timeout_s
        if call == "connect" or call_timeout_s is None:
            timeout_s = None if call == "send" else remaining_s
        else:
            timeout_s = call_timeout_s if remaining_s is None else min(call_timeout_s, remaining_s)
        if timeout_s != self._sock_timeout_s:
            self.sock.settimeout(timeout_s)
            self._sock_timeout_s = timeout_s

    def _call(self, call: str, fn: Callable[[], Any], asked: int, want_write: bool,
              limit: Limit | None, retry: bool = True) -> Step:
        """Run one socket call until it completes, the mode's way; return its result.

        The one try / EAGAIN / wait / retry loop of every mode. A blocking
        socket waits inside the call. A timed socket (mode timeout) comes back
        with a timeout, counted, and tries again. A non-blocking socket meets
        EAGAIN and then waits for readiness (yields ``Wait`` to the event
        loop) or, busy-looping, tries again at once. Raises Expired once
        ``limit`` passes and CallFailed on an OS error; with ``retry=False``
        an EAGAIN returns None instead of waiting.
        """
        clock = self.clock
        mode = self.mode
        busy_start, busy_errno, busy_attempts, busy_s = 0.0, 0, 0, 0.0
        try:
            while True:
                now = clock()
                if limit is not None and now >= limit.at_s:
                    raise Expired(limit)
                if mode.blocking:
                    self._bound(call, limit, now)
                start = clock()
                try:
                    result = fn()
                except BlockingIOError as exc:
                    spent_s = clock() - start
                    self._count(call, spent_s)
                    if call == "send":  # the tutorial's EAGAIN; others show in the trace
                        self.eagain += 1
                    if mode.busy_retry:
                        # Millions of identical attempts would swamp the trace:
                        # they become one record with their count.
                        if busy_attempts == 0:
                            busy_start, busy_errno = start, exc.errno
                        busy_attempts += 1
                        busy_s += spent_s
                        continue
                    self._record(start, call, asked, -1, _errno_name(exc), spent_s)
                    if not retry:
                        return None
                    ready = yield Wait(self.sock.fileno(), want_write,
                                       None if limit is None else limit.at_s)
                    if not ready:
                        raise Expired(limit)
                    continue
                except OSError as exc:
                    spent_s = clock() - start
                    self._count(call, spent_s)
                    # socket.timeout is a TimeoutError without errno; a kernel
                    # ETIMEDOUT (a connect nobody answered) is a real failure.
                    if isinstance(exc, TimeoutError) and exc.errno is None:
                        if mode.call_timeout_s is not None:
                            self.timeouts += 1
                        self._record(start, call, asked, -1, "TIMEOUT", spent_s)
                        continue
                    self._record(start, call, asked, -1, _errno_name(exc), spent_s)
                    raise CallFailed(call, exc) from exc
                spent_s = clock() - start
                self._count(call, spent_s)
                trace = self._trace
                if trace is not None:  # inlined: this is the path every successful call takes
                    returned = result if isinstance(result, int) else len(result) if result is not None else 0
                    trace((start - self._origin_s, self.index, call, asked, returned, "", spent_s, 1))
                return result
        finally:
            if busy_attempts:
                self._record(busy_start, call, asked, -1, errno.errorcode.get(busy_errno, "EAGAIN"),
                             busy_s, busy_attempts)

    def _connect_once(self) -> int:
        try:
            self.sock.connect(self.settings.address)
        except OSError as exc:
            # Retrying connect() after EINPROGRESS is how a non-blocking client
            # learns the outcome; Linux answers EISCONN once it is connected.
            if exc.errno != errno.EISCONN:
                raise
        return 0

    def _connect_step(self, limit: Limit | None) -> Step:
        sock = self._new_socket()
        self._sock_timeout_s = None
        if not self.mode.blocking:
            sock.setblocking(False)
            self._sock_timeout_s = 0.0
        yield from self._call("connect", self._connect_once, 0, True, limit)
        self._watch()

    def send_payload(self, view: memoryview, chunk_bytes: int | None) -> Step:
        """Send ``view``, each call offering at most ``chunk_bytes`` (None: all that is left).

        Returns the bytes send() accepted. Mode nonblocking makes exactly one
        call, whatever it returns (the tutorial); the others go on until all
        is accepted or the workload deadline passes.
        """
        total = len(view)
        self.bytes_requested += total
        if self.expired is not None:
            return 0
        send = self.sock.send
        retries = self.mode.retries_sends
        sent = 0
        while sent < total:
            piece = view[sent:sent + chunk_bytes] if chunk_bytes else view[sent:]
            if self.first_send_at is None:
                self.first_send_at = self.clock()
            try:
                accepted = yield from self._call("send", partial(send, piece), len(piece), True,
                                                 self.settings.deadline, retry=retries)
            except Expired as exc:
                self._expire(exc.limit)
                break
            if accepted is None:
                break
            sent += accepted
            self.bytes_accepted += accepted
            if not retries:
                break
        return sent

    def recv_exactly(self, nbytes: int) -> Step:
        """Read ``nbytes`` (an echo reply); returns what arrived before a limit passed."""
        received = 0
        recv = self.sock.recv
        while received < nbytes and self.expired is None:
            limit = earliest(self.settings.deadline,
                             Limit(self.clock() + self.settings.eof_wait_s, "reply"))
            asked = min(RECV_BYTES, nbytes - received)
            try:
                data = yield from self._call("recv", partial(recv, asked), asked, False, limit)
            except Expired as exc:
                self._expire(exc.limit)
                break
            if not data:
                raise ConnectionError(f"the server closed the connection with {nbytes - received} "
                                      "echo bytes still due")
            received += len(data)
        if received == nbytes:
            self.last_reply_at = self.clock()
        return received

    def _shutdown_write(self) -> Step:
        yield from self._call("shutdown", partial(self.sock.shutdown, socket.SHUT_WR), 0, True, None)

    def _recv_step(self, nbytes: int, limit: Limit | None) -> Step:
        return (yield from self._call("recv", partial(self.sock.recv, nbytes), nbytes, False, limit))


def _run_alone(loop: EventLoop, conn: SocketConn, work: Step) -> None:
    try:
        loop.run([Task(work, conn.fail)])
    except Exception as exc:  # the wait itself failed: report it, not a traceback
        conn.fail(exc)


def run_threads(conns: list[SocketConn], steps: list[Step]) -> list[EventLoop]:
    """One thread per connection, each with its own loop for its waits (if any)."""
    loops, threads = [], []
    for conn, work in zip(conns, steps):
        s = conn.settings
        loop = EventLoop(POLLERS[conn.mode.waiter](), s.clock,
                         s.tracer.add if s.tracer else None, s.origin_s, conn.index)
        thread = threading.Thread(target=_run_alone, args=(loop, conn, work),
                                  name=f"socklab-conn-{conn.index}", daemon=True)
        loops.append(loop)
        threads.append(thread)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return loops


def run_shared_loop(conns: list[SocketConn], steps: list[Step]) -> list[EventLoop]:
    """All connections in one thread: each round of waits is one select/poll/epoll call."""
    s = conns[0].settings
    poller = POLLERS[conns[0].mode.waiter]()
    loop = EventLoop(poller, s.clock, s.tracer.add if s.tracer else None, s.origin_s, -1)
    try:
        loop.run([Task(work, conn.fail) for conn, work in zip(conns, steps)])
    finally:
        poller.close()
    return [loop]


class AsyncConn(ConnBase):
    """A connection driven by asyncio streams; time in drain() counts as blocked."""

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def _await(self, call: str, asked: int, awaitable: Any, limit: Limit | None) -> Any:
        """Await one stream operation, timed and traced; Expired once ``limit`` passes."""
        start = self.clock()
        returned, err = -1, "EOF"
        try:
            # asyncio.timeout, unlike wait_for, needs no extra task per call.
            async with asyncio.timeout(None if limit is None else max(0.0, limit.at_s - start)):
                result = await awaitable
            returned, err = (len(result) if isinstance(result, bytes) else 0), ""
            return result
        except OSError as exc:
            if isinstance(exc, TimeoutError) and exc.errno is None:
                err = "TIMEOUT"
                raise Expired(limit) from None
            err = _errno_name(exc)
            raise CallFailed(call, exc) from exc
        finally:
            spent_s = self.clock() - start
            self._count(call, spent_s)
            self._record(start, call, asked, returned, err, spent_s)

    async def _connect_async(self, limit: Limit | None) -> None:
        sock = self._new_socket()
        sock.setblocking(False)
        await self._await("connect", 0, asyncio.get_running_loop().sock_connect(sock, self.settings.address),
                          limit)
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self._watch()

    def _connect_step(self, limit: Limit | None) -> Step:
        yield self._connect_async(limit)

    def send_payload(self, view: memoryview, chunk_bytes: int | None) -> Step:
        """write() each chunk and drain(); returns bytes the transport accepted."""
        self.bytes_requested += len(view)
        if self.expired is not None:
            return 0
        return (yield self._send_async(view, chunk_bytes))

    async def _send_async(self, view: memoryview, chunk_bytes: int | None) -> int:
        writer = self.writer
        sent = 0
        while sent < len(view):
            piece = view[sent:sent + chunk_bytes] if chunk_bytes else view[sent:]
            if self.first_send_at is None:
                self.first_send_at = self.clock()
            start = self.clock()
            writer.write(piece)
            spent_s = self.clock() - start
            self._count("write", spent_s)
            self._record(start, "write", len(piece), len(piece), "", spent_s)
            sent += len(piece)
            self.bytes_accepted += len(piece)
            try:
                await self._await("drain", writer.transport.get_write_buffer_size(), writer.drain(),
                                  self.settings.deadline)
            except Expired as exc:
                self._expire(exc.limit)
                break
        return sent

    def recv_exactly(self, nbytes: int) -> Step:
        """readexactly() an echo reply; returns what arrived before a limit passed."""
        if nbytes == 0 or self.expired is not None:
            return 0
        limit = earliest(self.settings.deadline, Limit(self.clock() + self.settings.eof_wait_s, "reply"))
        try:
            yield self._await("recv", nbytes, self.reader.readexactly(nbytes), limit)
        except Expired as exc:
            self._expire(exc.limit)
            return 0
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"the server closed the connection with {nbytes - len(exc.partial)} "
                                  "echo bytes still due") from None
        self.last_reply_at = self.clock()
        return nbytes

    def _shutdown_write(self) -> Step:
        # write_eof() shuts the socket down once the transport's buffer is flushed.
        start = self.clock()
        self.writer.write_eof()
        spent_s = self.clock() - start
        self._count("shutdown", spent_s)
        self._record(start, "shutdown", 0, 0, "", spent_s)
        yield from ()

    def _recv_step(self, nbytes: int, limit: Limit | None) -> Step:
        return (yield self._await("recv", nbytes, self.reader.read(nbytes), limit))

    def _close_socket(self) -> None:
        # Once the streams exist, the transport owns the socket.
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None
        else:
            super()._close_socket()


def run_asyncio(conns: list[AsyncConn], steps: list[Step]) -> None:
    """Drive every connection's generator on one asyncio event loop."""

    async def drive(conn: AsyncConn, work: Step) -> None:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                request = work.send(value) if error is None else work.throw(error)
            except StopIteration:
                return
            except Exception as exc:  # one connection's failure must not stop the others
                conn.fail(exc)
                return
            value, error = None, None
            try:
                if isinstance(request, Sleep):
                    await asyncio.sleep(max(0.0, request.until_s - conn.clock()))
                else:
                    value = await request
            except Exception as exc:
                error = exc

    async def drive_all() -> None:
        await asyncio.gather(*(drive(conn, work) for conn, work in zip(conns, steps)))

    asyncio.run(drive_all())
