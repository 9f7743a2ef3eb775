"""The connection driven by plain socket calls (every mode but asyncio), and its runners."""

from __future__ import annotations

import errno
import socket
import threading
from functools import partial
from typing import Any, Callable

from ..pollers import POLLERS
from ..sockcall import CallFailed, EventLoop, Expired, Limit, Step, Task, Wait, earliest
from .base import RECV_BYTES, ConnBase, errno_name

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
                    self._record(start, call, asked, -1, errno_name(exc), spent_s)
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
                    self._record(start, call, asked, -1, errno_name(exc), spent_s)
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
