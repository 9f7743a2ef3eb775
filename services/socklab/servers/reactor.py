"""One thread, non-blocking sockets, a readiness loop: the select, poll and epoll modes.

The three modes are this one loop over the one poller family of pollers.py,
differing only in the poller's constants, the way selectors' implementations
do. All three are used level-triggered. Edge-triggered epoll saves
epoll_ctl() calls only for a loop that would otherwise toggle write interest
all the time; this loop registers for writability only while output is
queued. And edge-triggering obliges a loop to read until EAGAIN before it may
wait again, which defeats the per-event read budget that keeps one fast
sender from starving the others (or forces a private ready list).
Level-triggered keeps all three modes the same program.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from array import array

from ..pollers import EVENT_READ, EVENT_WRITE, Poller, SelectPoller
from .accepting import (ACCEPTS_PER_WAKEUP, EXHAUSTED_ACCEPT_ERRNOS, TRANSIENT_ACCEPT_ERRNOS,
                        configure_accepted)
from .connection import ECHO_HIGH_WATER_BYTES
from .lifecycle import IDLE_SWEEPS, Server, Strategy

# What one readiness event may read from one connection before the event loop
# turns to the others, so that one fast sender cannot starve slow ones.
_READ_BUDGET_BYTES = 64 * 1024
# Descriptors the process holds besides its connections (stdio, listener,
# self-pipe, what the interpreter opened), with room to spare.
_OWN_DESCRIPTORS = 32


def max_connections(poller_class: type[Poller]) -> int:
    """How many connections a loop over ``poller_class`` may hold at once.

    Past that it stops accepting, so that every connection's descriptor stays
    watchable; the peers beyond it wait, established, in the accept queue.
    """
    if poller_class.fd_limit is None:
        return sys.maxsize
    return poller_class.fd_limit - _OWN_DESCRIPTORS


# 992: select() cannot watch a descriptor at or above FD_SETSIZE (1024).
SELECT_MAX_CONNECTIONS = max_connections(SelectPoller)


class ReactorStrategy(Strategy):
    """One thread, non-blocking sockets, woken by a poller (select, poll or epoll).

    A connection's state is kept in lists indexed by its descriptor (the
    kernel hands out the lowest free one, so they stay dense), not in an
    object per connection: an idle connection costs its socket, a slot in
    each list and its entries in ``server.connections``. Output is sent at
    once from the shared receive buffer; only what the kernel did not take is
    copied into a queue of its own, and only then is the connection watched
    for writability.
    """

    def __init__(self, poller_class: type[Poller]) -> None:
        self._poller_class = poller_class
        self._wake_w: int | None = None

    def run(self, server: Server) -> None:
        cfg = server.config
        assert server.listener is not None
        self._server = server
        self._conns = server.connections
        self._poller = self._poller_class()
        self._max_connections = max_connections(self._poller_class)
        # By descriptor: the socket (None: not a connection), its connection
        # number, and the idle sweeps it has been silent for.
        self._socks: list[socket.socket | None] = []
        self._cids = array("q")
        self._idle = bytearray()
        self._open = 0
        # By descriptor, only for the few connections that need them: output
        # the kernel has not taken yet; connections whose peer has ended and
        # whose trailer is queued; interest other than EVENT_READ.
        self._queued: dict[int, bytearray] = {}
        self._ending: set[int] = set()
        self._interest: dict[int, int] = {}
        self._buf = bytearray(cfg.recv_size_bytes)
        self._view = memoryview(self._buf)
        self._reads_per_event = max(1, _READ_BUDGET_BYTES // cfg.recv_size_bytes)
        server.listener.setblocking(False)
        self._listen_fd = listen_fd = server.listener.fileno()
        # Self-pipe: wake() writes a byte. A signal handler runs when the wait
        # fails with EINTR, before CPython retries it (PEP 475), so the retry
        # returns at once; a signal between two waits leaves a byte that the
        # next wait sees. Either way no stop waits for a timeout.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        self._grow(max(wake_r, listen_fd))
        self._poller.register(wake_r, EVENT_READ)
        self._poller.register(listen_fd, EVENT_READ)
        self._accepting = True
        sweep_s = cfg.idle_sweep_s
        next_sweep_s = time.monotonic() + sweep_s
        # The loop's hot path, bound to locals: readable, nothing owed, one
        # receive whose reply the kernel takes whole. Everything else (EOF,
        # errors, a full buffer, a partial send, writability) goes to methods.
        poller, socks, cids, idle, queued = self._poller, self._socks, self._cids, self._idle, self._queued
        wait, read_mask, events_of = poller.poll_masks, poller.read_mask, poller.events_of
        on_data, on_sent, buf, view = self._conns.on_data, self._conns.on_sent, self._buf, self._view
        recv_size = len(buf)
        monotonic = time.monotonic
        try:
            while not server.stopping:
                for fd, mask in wait(max(0.0, next_sweep_s - monotonic()) if self._open else None):
                    sock = socks[fd]
                    if sock is None:
                        if fd == listen_fd:
                            self._accept()
                        elif fd == wake_r:
                            _drain_pipe(wake_r)
                        # else: closed by an earlier event of this batch
                        continue
                    if mask != read_mask or fd in queued:
                        self._on_event(fd, sock, events_of[mask])
                        continue
                    try:
                        nbytes = sock.recv_into(buf)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._close(fd, "reset")
                        continue
                    idle[fd] = 0
                    if not nbytes:
                        self._on_eof(fd, sock)
                        continue
                    cid = cids[fd]
                    reply = on_data(cid, view[:nbytes])
                    if reply:
                        try:
                            sent = sock.send(reply)
                        except BlockingIOError:
                            sent = 0
                        except OSError:
                            self._close(fd, "reset")
                            continue
                        if sent:
                            on_sent(cid, sent)
                        if sent < len(reply):
                            self._queue(fd, reply[sent:])
                            self._watch(fd)
                            continue
                    if nbytes == recv_size:
                        # A full buffer: more may be waiting, read it within this event's budget.
                        self._on_readable(fd, sock, self._reads_per_event - 1)
                now_s = monotonic()
                if now_s >= next_sweep_s:
                    self._sweep_idle()
                    next_sweep_s = now_s + sweep_s
        finally:
            for fd, sock in enumerate(self._socks):
                if sock is not None:
                    self._close(fd, "shutdown")
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

    def _grow(self, fd: int) -> None:
        # Room for descriptors up to ``fd``, and some more, in every by-descriptor list.
        more = max(fd + 1 - len(self._socks), 64)
        self._socks.extend([None] * more)
        self._cids.frombytes(bytes(more * self._cids.itemsize))
        self._idle.extend(bytes(more))

    def _accept(self) -> None:
        server = self._server
        assert server.listener is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self._open >= self._max_connections:
                self._pause_accepting()
                return
            try:
                sock, address = server.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in EXHAUSTED_ACCEPT_ERRNOS:
                    self._pause_accepting()
                    return
                if exc.errno in TRANSIENT_ACCEPT_ERRNOS:
                    continue
                raise
            configure_accepted(sock, server.config, blocking=False)
            fd = sock.fileno()
            if fd >= len(self._socks):
                self._grow(fd)
            self._socks[fd] = sock
            self._cids[fd] = server.open_connection(address)
            self._idle[fd] = 0
            self._open += 1
            self._poller.register(fd, EVENT_READ)

    def _pause_accepting(self) -> None:
        # Until a connection ends, pending connections wait in the backlog
        # rather than waking this loop for an accept() that cannot succeed.
        if self._accepting:
            self._poller.unregister(self._listen_fd)
            self._accepting = False

    def _on_event(self, fd: int, sock: socket.socket, events: int) -> None:
        # Writability, trouble (reported as both), or data while output is queued.
        if events & EVENT_READ and self._interest.get(fd, EVENT_READ) & EVENT_READ:
            self._on_readable(fd, sock, self._reads_per_event)
        if events & EVENT_WRITE and self._socks[fd] is sock and fd in self._queued:
            self._flush(fd, sock)

    def _on_readable(self, fd: int, sock: socket.socket, reads: int) -> None:
        # At most ``reads`` receives, so that one fast sender cannot starve the others.
        cid = self._cids[fd]
        conns, buf, view, queued = self._conns, self._buf, self._view, self._queued
        for _ in range(reads):
            try:
                nbytes = sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                self._close(fd, "reset")
                return
            self._idle[fd] = 0
            if not nbytes:
                self._on_eof(fd, sock)
                return
            reply = conns.on_data(cid, view[:nbytes])
            if reply:
                self._queue(fd, reply)
                if not self._flush(fd, sock):
                    return
            # A short read means the kernel buffer is empty: skip the EAGAIN call.
            # Queued output at the high-water mark: stop reading (backpressure).
            if nbytes < len(buf) or len(queued.get(fd, b"")) >= ECHO_HIGH_WATER_BYTES:
                return

    def _on_eof(self, fd: int, sock: socket.socket) -> None:
        # The trailer goes after whatever is still queued; the connection closes once it is sent.
        self._ending.add(fd)
        self._queue(fd, self._conns.on_eof(self._cids[fd]))
        self._flush(fd, sock)

    def _queue(self, fd: int, data: memoryview | bytes) -> None:
        """Queue ``data`` for ``fd`` behind what is already queued; the caller flushes or watches."""
        pending = self._queued.get(fd)
        if pending is None:
            # Copied: ``data`` is usually a view of the shared receive buffer.
            self._queued[fd] = bytearray(data)
        else:
            pending += data

    def _flush(self, fd: int, sock: socket.socket) -> bool:
        """Send what is queued; close after the trailer, or adjust what ``fd`` is watched for.

        False once the connection is closed.
        """
        pending = self._queued[fd]
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(fd, "reset")
            return False
        if sent:
            del pending[:sent]
            self._conns.on_sent(self._cids[fd], sent)
            self._idle[fd] = 0
        if not pending:
            del self._queued[fd]
            if fd in self._ending:
                self._close(fd, "eof")
                return False
        self._watch(fd)
        return True

    def _watch(self, fd: int) -> None:
        # Readable unless the peer has ended or the queue is at the high-water
        # mark; writable while output is queued. The kernel is told only of changes.
        pending = self._queued.get(fd)
        if pending is None:
            events = 0 if fd in self._ending else EVENT_READ
        else:
            events = EVENT_WRITE
            if fd not in self._ending and len(pending) < ECHO_HIGH_WATER_BYTES:
                events |= EVENT_READ
        if events != self._interest.get(fd, EVENT_READ):
            self._poller.modify(fd, events)
            if events == EVENT_READ:
                del self._interest[fd]
            else:
                self._interest[fd] = events

    def _sweep_idle(self) -> None:
        # Every connection silent for IDLE_SWEEPS sweeps in a row (more than
        # the idle timeout) is closed; see lifecycle.IDLE_SWEEPS.
        idle = self._idle
        for fd, sock in enumerate(self._socks):
            if sock is not None:
                if idle[fd] >= IDLE_SWEEPS:
                    self._close(fd, "idle")
                else:
                    idle[fd] += 1

    def _close(self, fd: int, closed_by: str) -> None:
        sock = self._socks[fd]
        assert sock is not None
        self._socks[fd] = None
        self._poller.unregister(fd)
        self._queued.pop(fd, None)
        self._ending.discard(fd)
        self._interest.pop(fd, None)
        sock.close()
        self._open -= 1
        self._server.close_connection(self._cids[fd], closed_by)
        if (not self._accepting and not self._server.stopping
                and self._open < self._max_connections):
            self._poller.register(self._listen_fd, EVENT_READ)
            self._accepting = True


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
