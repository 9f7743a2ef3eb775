"""How a socket call is waited for: limits, wait requests and the event loop.

A connection's work is a generator. Whenever a non-blocking call meets EAGAIN,
the generator yields ``Wait(fd, want_write, until_s)`` and is resumed with True
(ready) or False (the limit passed); ``Sleep(until_s)`` pauses it (think time,
a trickle's pacing). ``EventLoop`` drives any number of such generators with one
poller call per round (pollers.py): that is the select/poll/epoll client, and, with a single
generator, the thread of a non-blocking client. Blocking sockets never yield a
``Wait``: the kernel does their waiting inside the call.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import time
from collections import deque
from typing import Any, Callable, Generator, Iterable, NamedTuple

from .pollers import EVENT_READ, EVENT_WRITE, Poller


class Limit(NamedTuple):
    """A point in time (``clock()`` seconds) past which a call is abandoned, and why.

    ``reason`` is one of: ``cancel`` (the user's stop), ``timeout`` (a connect
    timeout), ``deadline`` (the whole workload's), ``reply`` (an echo reply),
    ``eof`` (the server's EOF after shutdown).
    """

    at_s: float
    reason: str


def earliest(*limits: Limit | None) -> Limit | None:
    """The limit that comes first, ignoring absent ones."""
    present = [limit for limit in limits if limit is not None]
    return min(present) if present else None


class Expired(Exception):
    """A call was abandoned because its limit passed."""

    def __init__(self, limit: Limit) -> None:
        super().__init__(limit.reason)
        self.limit = limit


class CallFailed(Exception):
    """A socket call failed with an OS error; the message names the call and errno."""

    def __init__(self, call: str, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "error")
        super().__init__(f"{call}() failed: {name} ({exc.strerror or exc})")
        self.call = call
        self.errno = exc.errno


class Wait(NamedTuple):
    """Request: resume me when ``fd`` is writable (or readable), or at ``until_s``."""

    fd: int
    want_write: bool
    until_s: float | None


class Sleep(NamedTuple):
    """Request: resume me at ``until_s``."""

    until_s: float


Step = Generator[Any, Any, Any]


class Task:
    """A connection's generator and what to do when it raises."""

    def __init__(self, steps: Step, on_error: Callable[[Exception], None]) -> None:
        self.steps = steps
        self.on_error = on_error

    def step(self, value: Any) -> Wait | Sleep | None:
        """Resume with ``value``; the next request, or None once finished."""
        try:
            return self.steps.send(value)
        except StopIteration:
            return None
        except Exception as exc:  # one connection's failure must not stop the others
            self.on_error(exc)
            return None


class EventLoop:
    """Drives tasks until all have finished; their waits share one poller call per round.

    ``blocked_s`` accumulates the time spent inside the poller; each wait is
    traced as one record of connection ``conn`` (-1 when shared by several).
    """

    def __init__(self, poller: Poller, clock: Callable[[], float],
                 trace: Callable[[tuple], None] | None, origin_s: float, conn: int) -> None:
        self.poller = poller
        self.clock = clock
        self.trace = trace
        self.origin_s = origin_s
        self.conn = conn
        self.blocked_s = 0.0

    def run(self, tasks: Iterable[Task]) -> None:
        """Run every task to completion."""
        clock, poller = self.clock, self.poller
        runnable: deque[tuple[Task, Any]] = deque((task, None) for task in tasks)
        waiting: dict[int, tuple[Task, float | None]] = {}
        timers: list[tuple[float, int, Task]] = []
        order = itertools.count()  # ties in a heap must never compare two Tasks
        while True:
            while runnable:
                task, value = runnable.popleft()
                request = task.step(value)
                if request is None:
                    continue
                if isinstance(request, Sleep):
                    heapq.heappush(timers, (request.until_s, next(order), task))
                else:
                    poller.register(request.fd, EVENT_WRITE if request.want_write else EVENT_READ)
                    waiting[request.fd] = (task, request.until_s)
            if not waiting and not timers:
                return
            now = clock()
            wake_s = min((until for _, until in waiting.values() if until is not None), default=None)
            if timers and (wake_s is None or timers[0][0] < wake_s):
                wake_s = timers[0][0]
            timeout_s = None if wake_s is None else max(0.0, wake_s - now)
            if waiting:
                ready = self._wait(timeout_s, len(waiting))
            else:
                # Only sleepers: a pause in the workload, not a wait on a socket.
                time.sleep(timeout_s or 0.0)
                ready = []
            for fd, _ in ready:
                entry = waiting.pop(fd, None)
                if entry is not None:
                    poller.unregister(fd)
                    runnable.append((entry[0], True))
            now = clock()
            for fd, (task, until) in list(waiting.items()):
                if until is not None and until <= now:
                    del waiting[fd]
                    poller.unregister(fd)
                    runnable.append((task, False))
            while timers and timers[0][0] <= now:
                runnable.append((heapq.heappop(timers)[2], None))

    def _wait(self, timeout_s: float | None, fds: int) -> list[tuple[int, int]]:
        start = self.clock()
        ready = self.poller.poll(timeout_s)
        spent = self.clock() - start
        self.blocked_s += spent
        if self.trace is not None:
            self.trace((start - self.origin_s, self.conn, self.poller.name, fds, len(ready), "", spent, 1))
        return ready
