"""Blocking calls: the tutorial's iterative server and thread-per-connection."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Callable

from .accepting import EXHAUSTED_ACCEPT_ERRNOS, EXHAUSTED_RETRY_S, TRANSIENT_ACCEPT_ERRNOS, configure_accepted
from .lifecycle import STOP_SIGNALS, Server, Strategy

# Stopping: Python runs signal handlers in the main thread only, and after
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


def _shutdown_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing left to unblock


def _accept_blocking(server: Server) -> tuple[socket.socket, int] | None:
    """The next connection from the blocking listener, set up and opened; None once the server stops."""
    assert server.listener is not None
    while not server.stopping:
        try:
            sock, address = server.listener.accept()
        except OSError as exc:
            if server.stopping:
                return None
            if exc.errno in EXHAUSTED_ACCEPT_ERRNOS:
                time.sleep(EXHAUSTED_RETRY_S)
            elif exc.errno not in TRANSIENT_ACCEPT_ERRNOS:
                raise
            continue
        configure_accepted(sock, server.config, blocking=True)
        return sock, server.open_connection(address)
    return None


def _send_counted(sock: socket.socket, data: memoryview | bytes, server: Server, cid: int) -> None:
    # sendall() would lose the count of what went out before an error.
    view = memoryview(data)
    while view:
        sent = sock.send(view)
        server.connections.on_sent(cid, sent)
        view = view[sent:]


def _blocking_exchange(server: Server, sock: socket.socket, cid: int, buf: bytearray) -> str:
    """Serve connection ``cid`` with blocking calls until it ends; return its closed_by."""
    view = memoryview(buf)
    conns = server.connections
    try:
        while True:
            nbytes = sock.recv_into(buf)
            if nbytes:
                reply = conns.on_data(cid, view[:nbytes])
                if reply:
                    _send_counted(sock, reply, server, cid)
            if server.stopping:
                return "shutdown"
            if not nbytes:
                break
        _send_counted(sock, conns.on_eof(cid), server, cid)
        return "eof"
    except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO expired
        return "shutdown" if server.stopping else "idle"
    except OSError:
        return "shutdown" if server.stopping else "reset"


def _serve_to_the_end(server: Server, sock: socket.socket, cid: int, buf: bytearray,
                      release: Callable[[socket.socket], None]) -> None:
    """Serve one connection until it ends; ``release`` closes the socket, then the end is recorded."""
    closed_by = "reset"  # unless the exchange says otherwise
    try:
        closed_by = _blocking_exchange(server, sock, cid, buf)
    finally:
        release(sock)
        server.close_connection(cid, closed_by)


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
            sock, cid = accepted
            self._current = sock
            _serve_to_the_end(server, sock, cid, buf, self._release)

    def _release(self, sock: socket.socket) -> None:
        # Cleared before close so that wake() never touches a closed socket.
        self._current = None
        sock.close()

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
            sock, cid = accepted
            thread = threading.Thread(target=self._work, args=(server, sock, cid),
                                      name=f"conn-{server.connections.peer(cid)}", daemon=True)
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
                server.close_connection(cid, "reset")
                time.sleep(EXHAUSTED_RETRY_S)
        with self._lock:
            for sock in self._workers:
                _shutdown_quietly(sock)
            threads = list(self._workers.values())
        deadline = time.monotonic() + self._JOIN_DEADLINE_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self, server: Server, sock: socket.socket, cid: int) -> None:
        # Stop signals go to the main thread, whose accept() they must
        # interrupt; Linux would pick any thread that does not block them.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        _serve_to_the_end(server, sock, cid, bytearray(server.config.recv_size_bytes), self._release)

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            del self._workers[sock]
            sock.close()

    def wake(self, server: Server) -> None:
        # Only the main thread's accept() needs waking here (a worker calls
        # this at --max-connections; the signal handler runs in the main
        # thread). run() then shuts down the workers' sockets itself, outside
        # any signal handler, under the lock.
        _shutdown_quietly(server.listener)
