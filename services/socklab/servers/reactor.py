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
from collections import OrderedDict

from ..pollers import EVENT_READ, EVENT_WRITE, Poller, SelectPoller
from .accepting import EXHAUSTED_ACCEPT_ERRNOS, TRANSIENT_ACCEPT_ERRNOS, configure_accepted
from .connection import ECHO_HIGH_WATER_BYTES, Connection
from .lifecycle import Server, Strategy

# What one readiness event may read from one connection before the event loop
# turns to the others, so that one fast sender cannot starve slow ones.
_READ_BUDGET_BYTES = 64 * 1024
_ACCEPTS_PER_WAKEUP = 64
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


class _Channel:
    """A non-blocking connection in the readiness loop: socket, workload, queued output."""

    __slots__ = ("sock", "fd", "conn", "out", "eof", "last_active_s", "events")

    def __init__(self, sock: socket.socket, conn: Connection, now_s: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.out = bytearray()  # owed to the peer, not yet taken by the kernel
        self.eof = False
        self.last_active_s = now_s
        self.events = EVENT_READ  # what the poller watches it for


class ReactorStrategy(Strategy):
    """One thread, non-blocking sockets, woken by a poller (select, poll or epoll)."""

    def __init__(self, poller_class: type[Poller]) -> None:
        self._poller_class = poller_class
        self._wake_w: int | None = None

    def run(self, server: Server) -> None:
        cfg = server.config
        assert server.listener is not None
        self._server = server
        self._poller = self._poller_class()
        self._max_connections = max_connections(self._poller_class)
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
        self._poller.register(wake_r, EVENT_READ)
        self._poller.register(self._listen_fd, EVENT_READ)
        self._accepting = True
        try:
            while not server.stopping:
                ready = self._poller.poll(self._idle_wait_s())
                self._now_s = time.monotonic()
                for fd, events in ready:
                    if fd == self._listen_fd:
                        self._accept()
                    elif fd == wake_r:
                        _drain_pipe(wake_r)
                    else:
                        self._on_event(fd, events)
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

    def _on_event(self, fd: int, events: int) -> None:
        channel = self._channels.get(fd)
        if channel is None:
            return  # closed by an earlier event of this batch
        if events & EVENT_READ and channel.events & EVENT_READ:
            self._on_readable(channel)
        if events & EVENT_WRITE and self._channels.get(fd) is channel:
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
                if exc.errno in EXHAUSTED_ACCEPT_ERRNOS:
                    self._pause_accepting()
                    return
                if exc.errno in TRANSIENT_ACCEPT_ERRNOS:
                    continue
                raise
            configure_accepted(sock, server.config, blocking=False)
            channel = _Channel(sock, server.open_connection(address), self._now_s)
            self._channels[channel.fd] = channel
            self._by_activity[channel.fd] = channel
            self._poller.register(channel.fd, EVENT_READ)

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
            if nbytes < recv_size or len(channel.out) >= ECHO_HIGH_WATER_BYTES:
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
        events = EVENT_WRITE if channel.out else 0
        if not channel.eof and len(channel.out) < ECHO_HIGH_WATER_BYTES:
            events |= EVENT_READ
        if events != channel.events:
            self._poller.modify(channel.fd, events)
            channel.events = events

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
            self._poller.register(self._listen_fd, EVENT_READ)
            self._accepting = True


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
