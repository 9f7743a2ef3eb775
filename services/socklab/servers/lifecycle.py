"""The lab's TCP server: one lifecycle, one workload object, six ways to wait.

``python -m socklab server --mode MODE --port P ...`` listens, serves every
connection with the workload (count and discard, or echo), answers each EOF
with the protocol's trailer, and prints one result line when it stops.

The layout follows the stdlib's socketserver/selectors split so that the modes
can be compared fairly: ``Server`` owns everything the modes share (bind and
listen, signals, the stop condition, statistics, the result), ``Connection``
owns what is done with a connection's bytes, and a strategy per mode owns only
*how the server waits* for sockets to be ready.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import errno
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .cli import ArgumentParser, duration_arg, positive_int, size_arg
from .errors import SocklabError
from .protocol import encode_trailer
from .results import cpu_seconds, emit_result, peak_rss_kib

WORKLOADS = ("bulk", "echo", "connect", "slow")

# Echo output one connection may have queued before the server stops reading
# from it. A peer that sends but does not read then stalls itself, as it would
# against a blocking echo server, instead of growing the server's memory.
_ECHO_HIGH_WATER_BYTES = 256 * 1024
# What one readiness event may read from one connection before the event loop
# turns to the others, so that one fast sender cannot starve slow ones.
_READ_BUDGET_BYTES = 64 * 1024
_ACCEPTS_PER_WAKEUP = 64
# select() cannot watch a descriptor >= FD_SETSIZE (1024 with glibc). The
# margin covers the process's own descriptors (stdio, listener, self-pipe).
_SELECT_MAX_CONNECTIONS = 1024 - 32
# Out of descriptors or threads in a blocking accept loop: nothing to wait on
# but time.
_EXHAUSTED_RETRY_S = 0.05
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Errors accept() reports for one failed connection, not for the listener
# (accept(2), "Error handling"): take the next connection.
_TRANSIENT_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
        "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "EPERM",
    ) if hasattr(errno, name)
)
# The process or system is out of descriptors or memory: retrying at once
# would spin; wait until a connection has ended.
_EXHAUSTED_ACCEPT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


@dataclass(frozen=True)
class ServerConfig:
    """What the command line asked for."""

    mode: str
    host: str
    port: int
    recv_size_bytes: int
    max_connections: int | None
    workload: str
    idle_timeout_s: float
    backlog: int
    rcvbuf_bytes: int | None


class Connection:
    """One connection's workload state, driven identically by every mode.

    A strategy calls ``on_data`` with each chunk received, sends back what it
    returns, calls ``on_sent`` with what the kernel took, and on EOF sends
    ``on_eof()`` after everything else it owes the peer.
    """

    __slots__ = ("peer", "echo", "bytes_received", "bytes_sent", "start_s", "end_s", "closed_by")

    def __init__(self, peer: str, echo: bool, start_s: float) -> None:
        self.peer = peer
        self.echo = echo
        self.bytes_received = 0
        self.bytes_sent = 0
        self.start_s = start_s
        self.end_s: float | None = None
        self.closed_by: str | None = None

    def on_data(self, data: memoryview) -> memoryview | bytes:
        """Count a received chunk; return the bytes to send back.

        When echoing, the result is ``data`` itself, usually a view of the
        caller's receive buffer: send or copy it before the next receive.
        """
        self.bytes_received += len(data)
        return data if self.echo else b""

    def on_eof(self) -> bytes:
        """The trailer owed once the peer has finished sending."""
        return encode_trailer(self.bytes_received)

    def on_sent(self, nbytes: int) -> None:
        """Count bytes the kernel accepted for sending."""
        self.bytes_sent += nbytes

    def record(self) -> dict[str, Any]:
        """This connection's entry of the result's ``per_connection``."""
        return {
            "peer": self.peer,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "start_s": round(self.start_s, 6),
            "end_s": None if self.end_s is None else round(self.end_s, 6),
            "closed_by": self.closed_by,
        }


class Server:
    """The lifecycle every mode shares: listen, serve through a strategy, stop, report.

    Strategies call ``open_connection`` / ``close_connection`` around each
    connection and poll ``stopping``; ``request_stop`` may be called from a
    signal handler or any thread.
    """

    def __init__(self, config: ServerConfig, strategy: "Strategy") -> None:
        self.config = config
        self.strategy = strategy
        self.listener: socket.socket | None = None
        # A plain attribute, read after every blocking call: cheap and atomic.
        self.stopping = False
        self.stopped_by: str | None = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._connections: list[Connection] = []
        self._open = 0
        self._finished = 0
        self._max_concurrent = 0
        self._threads_max = threading.active_count()
        self._idle_timeouts = 0

    def listen(self) -> None:
        """Bind and listen; a failure is a one-sentence SocklabError."""
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if cfg.rcvbuf_bytes:
                # Set on the listener, before listen(): accepted sockets inherit
                # it, and the window scale is fixed during the handshake.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.rcvbuf_bytes)
            sock.bind((cfg.host, cfg.port))
            sock.listen(cfg.backlog)
        except OSError as exc:
            sock.close()
            raise SocklabError(
                f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
            ) from None
        self.listener = sock
        self._t0 = time.monotonic()

    def serve(self, result_file: str | None = None) -> dict[str, Any]:
        """Run until the stop condition, print the result line (also to ``result_file``), return it."""
        # Handlers first: whoever waits for the port may signal as soon as it
        # opens; a stop before the strategy runs is seen by its first check.
        # They stay until the result is out, so that a second SIGTERM cannot
        # kill the process between stopping and reporting.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            try:
                self.listen()
                assert self.listener is not None
                port = self.listener.getsockname()[1]
                print(f"socklab server listening on {self.config.host}:{port} mode={self.config.mode}",
                      file=sys.stderr, flush=True)
                self.strategy.run(self)
            finally:
                if self.listener is not None:
                    self.listener.close()
            wall_s = time.monotonic() - self._t0
            self._close_stragglers()
            result = self._result(wall_s)
            emit_result(result, result_file)
            return result
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.request_stop("signal")

    def request_stop(self, reason: str) -> None:
        """Stop serving: the first reason is the one reported."""
        if self.stopped_by is None:
            self.stopped_by = reason
        self.stopping = True
        self.strategy.wake(self)

    def now_s(self) -> float:
        """Seconds since the server started listening."""
        return time.monotonic() - self._t0

    def open_connection(self, address: Any) -> Connection:
        """Register a newly accepted connection from ``address`` (the peer's sockaddr)."""
        conn = Connection(_format_peer(address), self.config.workload == "echo", self.now_s())
        with self._lock:
            self._connections.append(conn)
            self._open += 1
            self._max_concurrent = max(self._max_concurrent, self._open)
            self._threads_max = max(self._threads_max, threading.active_count())
        return conn

    def close_connection(self, conn: Connection, closed_by: str) -> None:
        """Record the end of ``conn``; stop once enough connections have finished.

        ``closed_by``: "eof", "idle" and "reset" finish a connection; "shutdown"
        (cut because the server stops) does not count towards --max-connections.
        """
        conn.end_s = self.now_s()
        conn.closed_by = closed_by
        with self._lock:
            self._open -= 1
            # A thread-per-connection worker calls this while still alive, so
            # every thread that ever ran is counted here at its busiest.
            self._threads_max = max(self._threads_max, threading.active_count())
            if closed_by == "idle":
                self._idle_timeouts += 1
            if closed_by != "shutdown":
                self._finished += 1
            limit = self.config.max_connections
            reached = limit is not None and self._finished >= limit
        if reached:
            self.request_stop("max-connections")

    def _close_stragglers(self) -> None:
        # A connection a strategy could not close in time (a worker thread that
        # missed its join deadline, an asyncio transport made during shutdown)
        # is reported as cut by the shutdown rather than left without an end.
        with self._lock:
            open_conns = [c for c in self._connections if c.closed_by is None]
        for conn in open_conns:
            self.close_connection(conn, "shutdown")

    def _result(self, wall_s: float) -> dict[str, Any]:
        conns = self._connections
        return {
            "role": "server",
            "mode": self.config.mode,
            "workload": self.config.workload,
            "connections": self._finished,
            "bytes_received": sum(c.bytes_received for c in conns),
            "bytes_sent": sum(c.bytes_sent for c in conns),
            "cpu_s": round(cpu_seconds(), 6),
            "max_concurrent": self._max_concurrent,
            "threads_max": self._threads_max,
            "peak_rss_kib": peak_rss_kib(),
            "idle_timeouts": self._idle_timeouts,
            "wall_s": round(wall_s, 6),
            "stopped_by": self.stopped_by,
            "per_connection": [c.record() for c in conns],
        }


class Strategy(abc.ABC):
    """How a mode waits. ``run`` serves until ``server.stopping``; ``wake`` unblocks it."""

    @abc.abstractmethod
    def run(self, server: Server) -> None:
        """Serve connections until ``server.stopping``; close every open one before returning."""

    @abc.abstractmethod
    def wake(self, server: Server) -> None:
        """Make ``run`` notice ``server.stopping`` soon; safe in a signal handler.

        May be called before ``run`` starts or after it returns.
        """


# ---------------------------------------------------------------------------
# Blocking calls: the iterative server and thread-per-connection.
#
# Stopping them: Python runs signal handlers in the main thread only, and after
# a handler returns CPython retries the interrupted accept()/recv() (PEP 475).
# So the handler (through ``wake``) shuts down the sockets the main thread may
# be blocked on: accept() on a shut-down listener fails with EINVAL and recv()
# on a shut-down socket returns EOF, whichever call the signal interrupted or
# comes next. This needs no polling timeout (which would cost wakeups and delay
# the stop) and no exception raised at an arbitrary point of the serving code.
# Every loop re-reads ``server.stopping`` after each call.
#
# Idle timeout: SO_RCVTIMEO/SO_SNDTIMEO on the still-blocking socket make a
# silent recv() or a stuck send() fail with EAGAIN. socket.settimeout() would
# do the same by switching to non-blocking mode plus a poll() before every
# call, doubling the system calls this mode is measured on.
# ---------------------------------------------------------------------------


def _shutdown_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing left to unblock


def _timeval(seconds: float) -> bytes:
    # A zero timeval means "never time out": round tiny timeouts up, not to zero.
    total_us = max(1, round(seconds * 1_000_000))
    return struct.pack("@ll", total_us // 1_000_000, total_us % 1_000_000)


def _configure_accepted(sock: socket.socket, config: ServerConfig, *, blocking: bool) -> None:
    # Echo replies and the trailer are small writes that follow unacknowledged
    # data; Nagle plus the peer's delayed ACK would hold them ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if blocking:
        timeout = _timeval(config.idle_timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
    else:
        sock.setblocking(False)


def _accept_blocking(server: Server) -> tuple[socket.socket, Any] | None:
    """The next connection from the blocking listener; None once the server stops."""
    assert server.listener is not None
    while not server.stopping:
        try:
            return server.listener.accept()
        except OSError as exc:
            if server.stopping:
                return None
            if exc.errno in _EXHAUSTED_ACCEPT_ERRNOS:
                time.sleep(_EXHAUSTED_RETRY_S)
            elif exc.errno not in _TRANSIENT_ACCEPT_ERRNOS:
                raise
    return None


def _send_counted(sock: socket.socket, data: memoryview | bytes, conn: Connection) -> None:
    # sendall() would lose the count of what went out before an error.
    view = memoryview(data)
    while view:
        sent = sock.send(view)
        conn.on_sent(sent)
        view = view[sent:]


def _blocking_exchange(server: Server, sock: socket.socket, conn: Connection,
                       buf: bytearray) -> str:
    """Serve one connection with blocking calls until it ends; return its closed_by."""
    view = memoryview(buf)
    try:
        while True:
            nbytes = sock.recv_into(buf)
            if nbytes:
                reply = conn.on_data(view[:nbytes])
                if reply:
                    _send_counted(sock, reply, conn)
            if server.stopping:
                return "shutdown"
            if not nbytes:
                break
        _send_counted(sock, conn.on_eof(), conn)
        return "eof"
    except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO expired
        return "shutdown" if server.stopping else "idle"
    except OSError:
        return "shutdown" if server.stopping else "reset"


class BlockingStrategy(Strategy):
    """The tutorial's iterative server: one connection at a time, all calls blocking."""

    def __init__(self) -> None:
        self._current: socket.socket | None = None

    def run(self, server: Server) -> None:
        buf = bytearray(server.config.recv_size_bytes)
        while True:
            accepted = _accept_blocking(server)
            if accepted is None:
                return
            sock, address = accepted
            _configure_accepted(sock, server.config, blocking=True)
            conn = server.open_connection(address)
            closed_by = "reset"
            self._current = sock
            try:
                closed_by = _blocking_exchange(server, sock, conn, buf)
            finally:
                # Cleared before close so that wake() never touches a closed socket.
                self._current = None
                sock.close()
                server.close_connection(conn, closed_by)

    def wake(self, server: Server) -> None:
        # Runs in the main thread, the only one that closes these sockets, so
        # neither can be closed (and its descriptor reused) under our feet.
        _shutdown_quietly(server.listener)
        _shutdown_quietly(self._current)


class ThreadedStrategy(Strategy):
    """A thread per connection, each driving its blocking socket."""

    # Workers are woken by shutdown(), so they end within milliseconds; the
    # deadline only bounds a stop if one is stuck in something unforeseen.
    _JOIN_DEADLINE_S = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Sockets open in workers. A worker removes and closes its socket under
        # the lock, so the main thread never shuts down a reused descriptor.
        self._workers: dict[socket.socket, threading.Thread] = {}

    def run(self, server: Server) -> None:
        while True:
            accepted = _accept_blocking(server)
            if accepted is None:
                break
            sock, address = accepted
            _configure_accepted(sock, server.config, blocking=True)
            conn = server.open_connection(address)
            thread = threading.Thread(target=self._work, args=(server, sock, conn),
                                      name=f"conn-{conn.peer}", daemon=True)
            with self._lock:
                self._workers[sock] = thread
            try:
                thread.start()
            except RuntimeError:
                # Out of threads (or of memory for their stacks): the limit of
                # this model. The peer is turned away, its connection counted
                # as reset (which closing it unread does), and serving goes on.
                with self._lock:
                    del self._workers[sock]
                    sock.close()
                server.close_connection(conn, "reset")
                time.sleep(_EXHAUSTED_RETRY_S)
        with self._lock:
            for sock in self._workers:
                _shutdown_quietly(sock)
            threads = list(self._workers.values())
        deadline = time.monotonic() + self._JOIN_DEADLINE_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self, server: Server, sock: socket.socket, conn: Connection) -> None:
        # Stop signals go to the main thread, whose accept() they must
        # interrupt; Linux would pick any thread that does not block them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        closed_by = "reset"
        try:
            closed_by = _blocking_exchange(server, sock, conn, bytearray(server.config.recv_size_bytes))
        finally:
            with self._lock:
                del self._workers[sock]
                sock.close()
            server.close_connection(conn, closed_by)

    def wake(self, server: Server) -> None:
        # Only the main thread's accept() needs waking here (a worker calls
        # this at --max-connections; the signal handler runs in the main
        # thread). run() then shuts down the workers' sockets itself, outside
        # any signal handler, under the lock.
        _shutdown_quietly(server.listener)


# ---------------------------------------------------------------------------
# One thread, non-blocking sockets, a readiness loop: select, poll, epoll.
#
# The three modes share the loop below and differ only in the poller, the way
# selectors.DefaultSelector's implementations do. All three are used level-
# triggered. Edge-triggered epoll saves epoll_ctl() calls only for a loop that
# would otherwise toggle write interest all the time; this loop registers for
# writability only while output is queued. And edge-triggering obliges a loop
# to read until EAGAIN before it may wait again, which defeats the per-event
# read budget that keeps one fast sender from starving the others (or forces a
# private ready list). Level-triggered keeps all three modes the same program.
# ---------------------------------------------------------------------------


class SelectPoller:
    """select.select(): the whole interest set is passed on every call."""

    max_connections = _SELECT_MAX_CONNECTIONS

    def __init__(self) -> None:
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def register(self, fd: int, read: bool, write: bool) -> None:
        """Watch ``fd`` for the given readiness."""
        self.modify(fd, read, write)

    def modify(self, fd: int, read: bool, write: bool) -> None:
        """Change what ``fd`` is watched for."""
        (self._readers.add if read else self._readers.discard)(fd)
        (self._writers.add if write else self._writers.discard)(fd)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``."""
        self._readers.discard(fd)
        self._writers.discard(fd)

    def wait(self, timeout_s: float | None) -> list[tuple[int, bool, bool]]:
        """Block until something is ready: (fd, readable, writable) per event."""
        readable, writable, _ = select.select(self._readers, self._writers, (), timeout_s)
        return [(fd, True, False) for fd in readable] + [(fd, False, True) for fd in writable]

    def close(self) -> None:
        """Release the poller (select keeps no kernel state)."""


# An error or hang-up is reported to both handlers so that the next recv() or
# send() raises it (or reads the final EOF).
_POLL_READ = select.POLLIN | select.POLLERR | select.POLLHUP
_POLL_WRITE = select.POLLOUT | select.POLLERR | select.POLLHUP


class PollPoller:
    """select.poll(): interest kept in the kernel call's array, results per fd."""

    max_connections = sys.maxsize

    def __init__(self) -> None:
        self._poll = select.poll()

    @staticmethod
    def _mask(read: bool, write: bool) -> int:
        return (select.POLLIN if read else 0) | (select.POLLOUT if write else 0)

    def register(self, fd: int, read: bool, write: bool) -> None:
        """Watch ``fd`` for the given readiness."""
        self._poll.register(fd, self._mask(read, write))

    def modify(self, fd: int, read: bool, write: bool) -> None:
        """Change what ``fd`` is watched for."""
        self._poll.modify(fd, self._mask(read, write))

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``."""
        self._poll.unregister(fd)

    def wait(self, timeout_s: float | None) -> list[tuple[int, bool, bool]]:
        """Block until something is ready: (fd, readable, writable) per event."""
        timeout_ms = None if timeout_s is None else timeout_s * 1000.0
        return [(fd, bool(ev & _POLL_READ), bool(ev & _POLL_WRITE))
                for fd, ev in self._poll.poll(timeout_ms)]

    def close(self) -> None:
        """Release the poller (poll keeps no kernel state)."""


# epoll is Linux-only; elsewhere the module still imports for the other modes.
if hasattr(select, "epoll"):
    _EPOLL_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
    _EPOLL_WRITE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class EpollPoller:
    """select.epoll(), level-triggered: interest lives in the kernel; only ready fds come back."""

    max_connections = sys.maxsize

    def __init__(self) -> None:
        self._epoll = select.epoll()

    @staticmethod
    def _mask(read: bool, write: bool) -> int:
        return (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)

    def register(self, fd: int, read: bool, write: bool) -> None:
        """Watch ``fd`` for the given readiness."""
        self._epoll.register(fd, self._mask(read, write))

    def modify(self, fd: int, read: bool, write: bool) -> None:
        """Change what ``fd`` is watched for."""
        self._epoll.modify(fd, self._mask(read, write))

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``."""
        self._epoll.unregister(fd)

    def wait(self, timeout_s: float | None) -> list[tuple[int, bool, bool]]:
        """Block until something is ready: (fd, readable, writable) per event."""
        events = self._epoll.poll(-1 if timeout_s is None else timeout_s)
        return [(fd, bool(ev & _EPOLL_READ), bool(ev & _EPOLL_WRITE)) for fd, ev in events]

    def close(self) -> None:
        """Release the epoll descriptor."""
        self._epoll.close()


class _Channel:
    """A non-blocking connection in the readiness loop: socket, workload, queued output."""

    __slots__ = ("sock", "fd", "conn", "out", "eof", "last_active_s", "reading", "writing")

    def __init__(self, sock: socket.socket, conn: Connection, now_s: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.out = bytearray()  # owed to the peer, not yet taken by the kernel
        self.eof = False
        self.last_active_s = now_s
        self.reading = True
        self.writing = False


class ReactorStrategy(Strategy):
    """One thread, non-blocking sockets, woken by a poller (select, poll or epoll)."""

    def __init__(self, poller_class: Callable[[], Any]) -> None:
        self._poller_class = poller_class
        self._wake_w: int | None = None

    def run(self, server: Server) -> None:
        cfg = server.config
        assert server.listener is not None
        self._server = server
        self._poller = self._poller_class()
        self._max_connections = self._poller.max_connections
        self._channels: dict[int, _Channel] = {}
        # Channels by last activity, oldest first: the next idle deadline is
        # always the first one's, and touching a channel is O(1).
        self._by_activity: OrderedDict[int, _Channel] = OrderedDict()
        self._buf = bytearray(cfg.recv_size_bytes)
        self._view = memoryview(self._buf)
        self._reads_per_event = max(1, _READ_BUDGET_BYTES // cfg.recv_size_bytes)
        self._now_s = time.monotonic()
        server.listener.setblocking(False)
        self._listen_fd = server.listener.fileno()
        # Self-pipe: wake() writes a byte. A signal handler runs when the wait
        # fails with EINTR, before CPython retries it (PEP 475), so the retry
        # returns at once; a signal between two waits leaves a byte that the
        # next wait sees. Either way no stop waits for a timeout.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        self._poller.register(wake_r, True, False)
        self._poller.register(self._listen_fd, True, False)
        self._accepting = True
        try:
            while not server.stopping:
                events = self._poller.wait(self._idle_wait_s())
                self._now_s = time.monotonic()
                for fd, readable, writable in events:
                    if fd == self._listen_fd:
                        self._accept()
                    elif fd == wake_r:
                        _drain_pipe(wake_r)
                    else:
                        self._on_event(fd, readable, writable)
                self._expire_idle()
        finally:
            for channel in list(self._channels.values()):
                self._close(channel, "shutdown")
            self._wake_w = None
            os.close(wake_w)
            os.close(wake_r)
            self._poller.close()

    def wake(self, server: Server) -> None:
        wake_w = self._wake_w
        if wake_w is None:
            return  # not running yet: run() checks server.stopping first
        try:
            os.write(wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so a wakeup is already pending

    def _on_event(self, fd: int, readable: bool, writable: bool) -> None:
        channel = self._channels.get(fd)
        if channel is None:
            return  # closed by an earlier event of this batch
        if readable and channel.reading:
            self._on_readable(channel)
        if writable and self._channels.get(fd) is channel:
            self._flush(channel)

    def _accept(self) -> None:
        server = self._server
        assert server.listener is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            if len(self._channels) >= self._max_connections:
                self._pause_accepting()
                return
            try:
                sock, address = server.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED_ACCEPT_ERRNOS:
                    self._pause_accepting()
                    return
                if exc.errno in _TRANSIENT_ACCEPT_ERRNOS:
                    continue
                raise
            _configure_accepted(sock, server.config, blocking=False)
            channel = _Channel(sock, server.open_connection(address), self._now_s)
            self._channels[channel.fd] = channel
            self._by_activity[channel.fd] = channel
            self._poller.register(channel.fd, True, False)

    def _pause_accepting(self) -> None:
        # Until a connection ends, pending connections wait in the backlog
        # rather than waking this loop for an accept() that cannot succeed.
        if self._accepting:
            self._poller.unregister(self._listen_fd)
            self._accepting = False

    def _on_readable(self, channel: _Channel) -> None:
        conn, sock, buf, view = channel.conn, channel.sock, self._buf, self._view
        recv_size = len(buf)
        received = False
        for _ in range(self._reads_per_event):
            try:
                nbytes = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError:
                self._close(channel, "reset")
                return
            received = True
            if not nbytes:
                channel.eof = True
                channel.out += conn.on_eof()
                break
            reply = conn.on_data(view[:nbytes])
            if reply:
                channel.out += reply
            # A short read means the kernel buffer is empty: skip the EAGAIN call.
            if nbytes < recv_size or len(channel.out) >= _ECHO_HIGH_WATER_BYTES:
                break
        if received:
            self._touch(channel)
        self._flush(channel)

    def _flush(self, channel: _Channel) -> None:
        """Send what is queued (sending at once rather than waiting a loop turn), then
        close after the trailer, or adjust what the channel waits for."""
        if channel.out:
            try:
                sent = channel.sock.send(channel.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(channel, "reset")
                return
            if sent:
                del channel.out[:sent]
                channel.conn.on_sent(sent)
                self._touch(channel)
        if channel.eof and not channel.out:
            self._close(channel, "eof")
            return
        reading = not channel.eof and len(channel.out) < _ECHO_HIGH_WATER_BYTES
        writing = bool(channel.out)
        if (reading, writing) != (channel.reading, channel.writing):
            self._poller.modify(channel.fd, reading, writing)
            channel.reading, channel.writing = reading, writing

    def _touch(self, channel: _Channel) -> None:
        channel.last_active_s = self._now_s
        self._by_activity.move_to_end(channel.fd)

    def _idle_wait_s(self) -> float | None:
        if not self._by_activity:
            return None  # nothing can expire; a stop arrives through the pipe
        oldest = next(iter(self._by_activity.values()))
        return max(0.0, oldest.last_active_s + self._server.config.idle_timeout_s - self._now_s)

    def _expire_idle(self) -> None:
        self._now_s = time.monotonic()
        idle_timeout_s = self._server.config.idle_timeout_s
        while self._by_activity:
            oldest = next(iter(self._by_activity.values()))
            if oldest.last_active_s + idle_timeout_s > self._now_s:
                return
            self._close(oldest, "idle")

    def _close(self, channel: _Channel, closed_by: str) -> None:
        self._poller.unregister(channel.fd)
        del self._channels[channel.fd]
        del self._by_activity[channel.fd]
        channel.sock.close()
        self._server.close_connection(channel.conn, closed_by)
        if (not self._accepting and not self._server.stopping
                and len(self._channels) < self._max_connections):
            self._poller.register(self._listen_fd, True, False)
            self._accepting = True


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


# ---------------------------------------------------------------------------
# asyncio.
#
# Protocols, not streams, and the BufferedProtocol flavour: its transport
# recv_into()s straight into the buffer get_buffer() returns, so every receive
# asks for exactly --recv-size bytes, as in the other modes, with no copy and
# no coroutine switch per chunk. Streams (and plain Protocol) cannot honour
# --recv-size: the transport always reads up to 256 KiB and StreamReader
# re-slices that. Measured on loopback, 136 MB bulk, one connection (server CPU
# includes ~0.1 s of interpreter start-up):
#   recv 64 KiB: BufferedProtocol 0.04 s wall, 0.19 s CPU; streams 0.25 s, 0.37 s.
#   recv 1 KiB:  BufferedProtocol 1.07 s, 1.22 s; streams 0.38 s, 0.50 s, but
#   only because streams made 256 KiB receives instead of the 1 KiB asked for.
# asyncio runs one loop iteration per receive; that cost is what this mode shows.
# ---------------------------------------------------------------------------


class AsyncioStrategy(Strategy):
    """asyncio's event loop with a BufferedProtocol per connection."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def run(self, server: Server) -> None:
        asyncio.run(self._serve(server))

    async def _serve(self, server: Server) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            if server.stopping:
                return
            live: set[_AsyncioConnection] = set()
            view = memoryview(bytearray(server.config.recv_size_bytes))
            aserver = await self._loop.create_server(
                lambda: _AsyncioConnection(server, live, view),
                sock=server.listener, backlog=server.config.backlog)
            try:
                await self._stop.wait()
            finally:
                aserver.close()
                for protocol in list(live):
                    protocol.finish("shutdown")
        finally:
            self._loop = None

    def wake(self, server: Server) -> None:
        # A signal handler may not touch the loop's internals, but
        # call_soon_threadsafe() is only a queue append plus a self-pipe write.
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)


class _AsyncioConnection(asyncio.BufferedProtocol):
    """One connection's asyncio protocol around the shared ``Connection`` logic."""

    def __init__(self, server: Server, live: set[_AsyncioConnection], view: memoryview) -> None:
        self._server = server
        self._live = live
        # Shared by all connections: the transport hands each chunk to
        # buffer_updated() before it reads the next, so nothing is overwritten.
        self._view = view
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._conn: Connection | None = None
        self._done = False
        self._eof = False
        self._written = 0
        self._last_active_s = 0.0
        self._last_buffered = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._conn = self._server.open_connection(transport.get_extra_info("peername"))
        self._live.add(self)
        # Backpressure for echo: pause_writing() above this stops reading.
        transport.set_write_buffer_limits(high=_ECHO_HIGH_WATER_BYTES)
        self._last_active_s = self._loop.time()
        # One timer per idle period that re-arms itself from the last activity,
        # rather than cancelling and re-creating a timer for every chunk.
        self._timer = self._loop.call_at(
            self._last_active_s + self._server.config.idle_timeout_s, self._check_idle)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._conn is not None
        self._last_active_s = self._loop.time()
        reply = self._conn.on_data(self._view[:nbytes])
        if reply:
            # Copied: a transport may keep what it could not send yet, and the
            # view is overwritten by the next receive.
            self._write(bytes(reply))

    def eof_received(self) -> bool:
        assert self._conn is not None
        self._eof = True
        self._write(self._conn.on_eof())
        return False  # the transport closes once the trailer is flushed

    def pause_writing(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("eof" if exc is None and self._eof else "reset")

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._written += len(data)
        self._transport.write(data)

    def _check_idle(self) -> None:
        assert self._transport is not None
        now_s = self._loop.time()
        # The transport drains its buffer without telling the protocol; a
        # change since the last check means bytes moved.
        buffered = self._transport.get_write_buffer_size()
        if buffered != self._last_buffered:
            self._last_buffered = buffered
            self._last_active_s = now_s
        deadline_s = self._last_active_s + self._server.config.idle_timeout_s
        if now_s >= deadline_s:
            self.finish("idle")
        else:
            self._timer = self._loop.call_at(deadline_s, self._check_idle)

    def finish(self, closed_by: str) -> None:
        """Record the connection's end once; cut it unless the transport already closed.

        bytes_sent is what was written minus what the transport still holds.
        After a reset the transport has already dropped its buffer, so up to
        one write buffer (the echo high-water mark) may be counted as sent.
        """
        if self._done or self._conn is None or self._transport is None:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._live.discard(self)
        self._conn.on_sent(self._written - self._transport.get_write_buffer_size())
        if closed_by in ("idle", "shutdown"):
            self._transport.abort()
        self._server.close_connection(self._conn, closed_by)


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "blocking": BlockingStrategy,
    "threaded": ThreadedStrategy,
    "select": lambda: ReactorStrategy(SelectPoller),
    "poll": lambda: ReactorStrategy(PollPoller),
    "epoll": lambda: ReactorStrategy(EpollPoller),
    "asyncio": AsyncioStrategy,
}
MODES = tuple(STRATEGIES)


def _format_peer(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 to 65535 (0 picks a free one)")
    return port


def _positive_size_arg(text: str) -> int:
    size = size_arg(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return size


def _positive_duration_arg(text: str) -> float:
    seconds = duration_arg(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return seconds


def build_parser() -> ArgumentParser:
    """The ``socklab server`` command line."""
    parser = ArgumentParser(
        prog="socklab server",
        description="Serve TCP connections with one I/O model and print one result line when stopped.")
    parser.add_argument("--mode", required=True, choices=MODES, help="the I/O model")
    parser.add_argument("--port", required=True, type=_port_arg,
                        help="TCP port; 0 picks a free one (printed in the listening line)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--recv-size", type=_positive_size_arg, default=1024,
                        help="bytes asked for by each receive (default 1024)")
    parser.add_argument("--max-connections", type=positive_int,
                        help="stop after this many connections have finished (default: run until signalled)")
    parser.add_argument("--workload", choices=WORKLOADS, default="bulk",
                        help="echo sends every byte back; the others discard (default bulk)")
    parser.add_argument("--idle-timeout", type=_positive_duration_arg, default=30.0,
                        help="close a connection that moved no bytes for this long (default 30s)")
    parser.add_argument("--backlog", type=positive_int, default=128, help="listen() backlog (default 128)")
    parser.add_argument("--rcvbuf", type=_positive_size_arg, help="SO_RCVBUF for every connection")
    parser.add_argument("--result-file", help="also write the result line to this file")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[ServerConfig, str | None]:
    """The server's configuration and result file from its command line."""
    args = build_parser().parse_args(list(argv))
    config = ServerConfig(
        mode=args.mode, host=args.host, port=args.port, recv_size_bytes=args.recv_size,
        max_connections=args.max_connections, workload=args.workload,
        idle_timeout_s=args.idle_timeout, backlog=args.backlog, rcvbuf_bytes=args.rcvbuf)
    return config, args.result_file


def main(argv: Sequence[str]) -> int:
    """``python -m socklab server ...``: serve until the stop condition, print the result, return 0."""
    config, result_file = parse_args(argv)
    Server(config, STRATEGIES[config.mode]()).serve(result_file)
    return 0
