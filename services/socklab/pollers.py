"""select, poll and epoll: one readiness poller that differs by constants.

The servers' readiness loop (servers/reactor.py) and the clients' event loop
(sockcall.py) both wait through a ``Poller``. As in CPython's ``selectors``
(its ``_PollLikeSelector``), the three backends are one class over a kernel
object with ``register``/``modify``/``unregister``/``poll``; a subclass only
names that object and its event bits. select(2) is emulated behind the same
interface, so it is the same program with other constants, not a second one.

Events are ``EVENT_READ`` and ``EVENT_WRITE``, or both. An error or hang-up
is reported as both, so that whichever handler runs next makes the recv() or
send() that raises the error (or reads the final EOF). All backends are used
level-triggered: a descriptor that is still ready is reported again at every
``poll`` (why, for the servers: see servers/reactor.py).
"""

from __future__ import annotations

import select
from typing import Any, Callable

from .errors import SocklabError

EVENT_READ = 1
EVENT_WRITE = 2

# select() cannot watch a descriptor number at or above FD_SETSIZE: the fd_set
# it passes is a bitmap of that many bits (1024 with glibc; CPython raises
# "filedescriptor out of range" past it). Python does not expose the value.
FD_SETSIZE = 1024


class DescriptorLimitError(SocklabError):
    """A descriptor the poller cannot watch (select and FD_SETSIZE)."""


class _SelectObject:
    """select(2) behind poll's interface: register/modify/unregister/poll/close.

    It speaks the family's own constants and unit (seconds), so the Poller
    over it has nothing to translate and calls it directly. The whole
    interest set is passed to the kernel on every call: what makes select
    cost more per wait the more descriptors it watches.
    """

    IN = EVENT_READ
    OUT = EVENT_WRITE

    def __init__(self) -> None:
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def register(self, fd: int, mask: int) -> None:
        if fd >= FD_SETSIZE:
            raise DescriptorLimitError(
                f"select() cannot watch descriptor {fd}: it takes descriptors below "
                f"FD_SETSIZE ({FD_SETSIZE}); poll and epoll have no such limit")
        if mask & EVENT_READ:
            self._readers.add(fd)
        if mask & EVENT_WRITE:
            self._writers.add(fd)

    def modify(self, fd: int, mask: int) -> None:
        (self._readers.add if mask & EVENT_READ else self._readers.discard)(fd)
        (self._writers.add if mask & EVENT_WRITE else self._writers.discard)(fd)

    def unregister(self, fd: int) -> None:
        self._readers.discard(fd)
        self._writers.discard(fd)

    def poll(self, timeout_s: float | None) -> list[tuple[int, int]]:
        readable, writable, _ = select.select(self._readers, self._writers, (), timeout_s)
        return [(fd, EVENT_READ) for fd in readable] + [(fd, EVENT_WRITE) for fd in writable]

    def close(self) -> None:
        pass  # select keeps no kernel state


class _EventsOf(dict):
    """Kernel event mask -> EVENT_READ | EVENT_WRITE, filled in as masks are seen."""

    def __init__(self, ready_read: int, ready_write: int) -> None:
        super().__init__()
        self._ready_read = ready_read
        self._ready_write = ready_write

    def __missing__(self, mask: int) -> int:
        events = ((EVENT_READ if mask & self._ready_read else 0)
                  | (EVENT_WRITE if mask & self._ready_write else 0))
        self[mask] = events
        return events


class Poller:
    """Waits for readiness of registered descriptors; subclasses set only constants.

    ``name`` is the system call (a traced wait is recorded under it);
    ``fd_limit`` the first descriptor number it cannot watch (None: none).
    """

    name: str
    fd_limit: int | None = None
    # The kernel object: register(fd, mask), modify, unregister, poll(timeout), close.
    _new: Callable[[], Any] | None
    _IN: int           # readable
    _OUT: int          # writable
    _TROUBLE: int = 0  # error and hang-up: reported as both readable and writable
    _UNITS_PER_S: float = 1.0  # the kernel object's timeout unit

    def __init__(self) -> None:
        if self._new is None:
            raise SocklabError(f"{self.name} is not available on this system")
        self._obj = self._new()
        # Both translations are table lookups: the clients' loop registers and
        # unregisters a descriptor around every wait, so this is its hot path.
        self._masks = (0, self._IN, self._OUT, self._IN | self._OUT)  # indexed by events
        self._events_of = _EventsOf(self._IN | self._TROUBLE, self._OUT | self._TROUBLE)
        self._obj_register = self._obj.register
        self._obj_modify = self._obj.modify
        # For poll_masks(): the kernel's mask of "readable, nothing else", and
        # the translation of any mask (a dict: indexing it is the whole cost).
        self.read_mask = self._IN
        self.events_of: dict[int, int] = self._events_of
        # Where nothing needs translating, the object's own methods are used
        # directly, without a call through this class.
        self.unregister = self._obj.unregister
        if self._masks == (0, EVENT_READ, EVENT_WRITE, EVENT_READ | EVENT_WRITE) and not self._TROUBLE \
                and self._UNITS_PER_S == 1.0:
            self.register, self.modify, self.poll = self._obj.register, self._obj.modify, self._obj.poll

    def register(self, fd: int, events: int) -> None:
        """Watch ``fd`` for ``events`` (EVENT_READ, EVENT_WRITE or both) until unregistered."""
        self._obj_register(fd, self._masks[events])

    def modify(self, fd: int, events: int) -> None:
        """Change what a registered ``fd`` is watched for."""
        self._obj_modify(fd, self._masks[events])

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; done before its socket may be closed."""
        self._obj.unregister(fd)

    def poll(self, timeout_s: float | None) -> list[tuple[int, int]]:
        """Wait at most ``timeout_s`` (None: until something is ready); (fd, events) per ready fd.

        A fractional timeout is rounded up by CPython for all three calls, so
        a loop that waits until a deadline never wakes just before it and spins.
        """
        events_of = self._events_of
        return [(fd, events_of[mask]) for fd, mask in
                self._obj.poll(None if timeout_s is None else timeout_s * self._UNITS_PER_S)]

    def poll_masks(self, timeout_s: float | None) -> list[tuple[int, int]]:
        """As ``poll``, but each ready descriptor with the kernel's own mask, untranslated.

        For a loop that handles most events one way: it compares a mask with
        ``read_mask`` and translates only the others through ``events_of``,
        instead of having a second list built for every wait.
        """
        return self._obj.poll(None if timeout_s is None else timeout_s * self._UNITS_PER_S)

    def close(self) -> None:
        """Release what the poller holds in the kernel (epoll's descriptor)."""
        self._obj.close()


class SelectPoller(Poller):
    """select(2): interest passed whole on every call; descriptors below FD_SETSIZE only."""

    name = "select"
    fd_limit = FD_SETSIZE
    _new = _SelectObject
    _IN = _SelectObject.IN
    _OUT = _SelectObject.OUT


class _PollObject:
    """select.poll() with the close() the other kernel objects have."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self.register = self._poll.register
        self.modify = self._poll.modify
        self.unregister = self._poll.unregister
        self.poll = self._poll.poll

    def close(self) -> None:
        pass  # poll keeps no kernel state between calls


class PollPoller(Poller):
    """poll(2): interest kept in the call's array, results per descriptor."""

    name = "poll"
    _new = _PollObject
    _IN = select.POLLIN
    _OUT = select.POLLOUT
    _TROUBLE = select.POLLERR | select.POLLHUP
    _UNITS_PER_S = 1000.0  # milliseconds


class EpollPoller(Poller):
    """epoll(7), level-triggered (no EPOLLET): interest in the kernel, only ready fds come back."""

    name = "epoll"
    # Linux only; elsewhere this module still imports for the other two.
    _new = getattr(select, "epoll", None)
    _IN = getattr(select, "EPOLLIN", 0)
    _OUT = getattr(select, "EPOLLOUT", 0)
    _TROUBLE = getattr(select, "EPOLLERR", 0) | getattr(select, "EPOLLHUP", 0)


POLLERS: dict[str, type[Poller]] = {cls.name: cls for cls in (SelectPoller, PollPoller, EpollPoller)}
