"""The poller family (socklab.pollers): select, poll and epoll behave as one interface.

Real sockets (socketpairs), real kernel calls; timings with generous bounds.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time

import pytest

from socklab import pollers
from socklab.pollers import EVENT_READ, EVENT_WRITE, FD_SETSIZE, POLLERS, DescriptorLimitError

NAMES = ("select", "poll", "epoll")


@pytest.fixture(params=NAMES)
def poller(request):
    made = POLLERS[request.param]()
    yield made
    made.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def ready_events(poller: pollers.Poller, timeout_s: float | None = 0.0) -> dict[int, int]:
    """fd -> the events reported for it (select reports a fd once per set it is in)."""
    merged: dict[int, int] = {}
    for fd, events in poller.poll(timeout_s):
        merged[fd] = merged.get(fd, 0) | events
    return merged


def fill(sock: socket.socket) -> int:
    """Send until the kernel takes no more; bytes sent."""
    sent = 0
    while True:
        try:
            sent += sock.send(bytes(65536))
        except BlockingIOError:
            return sent


def drain(sock: socket.socket) -> int:
    received = 0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return received
        if not chunk:
            return received
        received += len(chunk)


def descriptor_at(number: int, like: socket.socket) -> int:
    """A duplicate of ``like`` at exactly descriptor ``number`` (the limit raised if needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= number:
        assert hard == resource.RLIM_INFINITY or hard > number, f"RLIMIT_NOFILE hard limit {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (number + 1 if hard == resource.RLIM_INFINITY
                                                    else min(hard, number + 64), hard))
    return os.dup2(like.fileno(), number)


def test_the_family_is_select_poll_epoll_with_one_set_of_event_constants():
    assert tuple(POLLERS) == NAMES
    assert {EVENT_READ, EVENT_WRITE} == {1, 2}
    for name, cls in POLLERS.items():
        assert issubclass(cls, pollers.Poller)
        assert cls.name == name
        # The interface is the base class's; a backend adds constants, no methods.
        own = {key for key, value in vars(cls).items() if callable(value) and not key.startswith("_")}
        assert own == set(), (name, own)
    assert POLLERS["select"].fd_limit == FD_SETSIZE == 1024
    assert POLLERS["poll"].fd_limit is None and POLLERS["epoll"].fd_limit is None


def test_read_readiness_is_level_triggered(poller, pair):
    a, b = pair
    poller.register(a.fileno(), EVENT_READ)
    assert ready_events(poller) == {}
    b.send(b"ping")
    assert ready_events(poller, 1.0) == {a.fileno(): EVENT_READ}
    # Not read yet: reported again (no EPOLLET), and again.
    assert ready_events(poller, 1.0) == {a.fileno(): EVENT_READ}
    assert ready_events(poller, 1.0) == {a.fileno(): EVENT_READ}
    assert a.recv(64) == b"ping"
    assert ready_events(poller) == {}


def test_write_readiness_follows_the_send_buffer(poller, pair):
    a, b = pair
    poller.register(a.fileno(), EVENT_WRITE)
    assert ready_events(poller) == {a.fileno(): EVENT_WRITE}
    assert fill(a) > 0
    assert ready_events(poller) == {}
    assert drain(b) > 0
    assert ready_events(poller, 1.0) == {a.fileno(): EVENT_WRITE}


def test_modify_changes_what_is_watched(poller, pair):
    a, b = pair
    fd = a.fileno()
    poller.register(fd, EVENT_READ)
    assert ready_events(poller) == {}  # writable, but not watched for it
    poller.modify(fd, EVENT_WRITE)
    assert ready_events(poller) == {fd: EVENT_WRITE}
    b.send(b"x")
    poller.modify(fd, EVENT_READ | EVENT_WRITE)
    assert ready_events(poller) == {fd: EVENT_READ | EVENT_WRITE}
    poller.modify(fd, EVENT_READ)
    assert ready_events(poller) == {fd: EVENT_READ}


def test_unregister_stops_the_reports(poller, pair):
    a, b = pair
    other_a, other_b = socket.socketpair()
    try:
        poller.register(a.fileno(), EVENT_READ)
        poller.register(other_a.fileno(), EVENT_READ)
        b.send(b"x")
        other_b.send(b"y")
        assert set(ready_events(poller, 1.0)) == {a.fileno(), other_a.fileno()}
        poller.unregister(a.fileno())
        assert ready_events(poller, 1.0) == {other_a.fileno(): EVENT_READ}
        poller.unregister(other_a.fileno())
        assert ready_events(poller) == {}
    finally:
        other_a.close()
        other_b.close()


def test_a_hang_up_is_reported_to_a_reader(poller, pair):
    a, b = pair
    poller.register(a.fileno(), EVENT_READ)
    b.close()
    events = ready_events(poller, 1.0)
    assert events[a.fileno()] & EVENT_READ
    assert a.recv(64) == b""  # the reader's next recv() sees the EOF


@pytest.mark.parametrize("name", NAMES)
def test_an_error_or_hang_up_is_reported_as_both_where_the_kernel_says_so(name, pair):
    a, b = pair
    poller = POLLERS[name]()
    try:
        poller.register(a.fileno(), EVENT_READ)
        a.shutdown(socket.SHUT_RDWR)  # POLLHUP / EPOLLHUP on a
        events = ready_events(poller, 1.0)[a.fileno()]
        # poll and epoll report the hang-up itself, so the writer's handler runs
        # too; select has no such bit and reports only what it watches.
        assert events == (EVENT_READ if name == "select" else EVENT_READ | EVENT_WRITE)
    finally:
        poller.close()


def test_timeout_waits_and_returns_nothing(poller, pair):
    a, _ = pair
    poller.register(a.fileno(), EVENT_READ)
    started = time.monotonic()
    assert poller.poll(0.1) == []
    assert 0.09 <= time.monotonic() - started < 2.0


def test_a_fraction_of_a_millisecond_is_rounded_up_not_to_zero(poller, pair):
    # A loop waiting until a deadline 0.4 ms away must not get an immediate
    # return (poll's unit is the millisecond), or it would spin until then.
    a, _ = pair
    poller.register(a.fileno(), EVENT_READ)
    started = time.perf_counter()
    assert poller.poll(0.0004) == []
    assert time.perf_counter() - started >= 0.0004


def test_no_timeout_waits_until_ready(poller, pair):
    a, b = pair
    poller.register(a.fileno(), EVENT_READ)
    timer = threading.Timer(0.1, b.send, (b"late",))
    started = time.monotonic()
    timer.start()
    try:
        assert ready_events(poller, None) == {a.fileno(): EVENT_READ}
    finally:
        timer.join()
    assert time.monotonic() - started >= 0.09


def test_close_releases_the_kernel_object():
    for name in NAMES:
        before = len(os.listdir("/proc/self/fd"))
        poller = POLLERS[name]()
        held = len(os.listdir("/proc/self/fd")) - before
        poller.close()
        assert held == (1 if name == "epoll" else 0), name
        assert len(os.listdir("/proc/self/fd")) == before, name


def test_select_refuses_a_descriptor_at_fd_setsize_with_a_sentence(pair):
    a, _ = pair
    poller = POLLERS["select"]()
    below = descriptor_at(FD_SETSIZE - 1, a)
    at_limit = descriptor_at(FD_SETSIZE, a)
    try:
        # The constant is the real one: CPython's select() itself draws the line there.
        assert select.select([below], [below], [], 0)[1] == [below]
        with pytest.raises(ValueError):
            select.select([at_limit], [], [], 0)
        poller.register(below, EVENT_WRITE)
        assert ready_events(poller) == {below: EVENT_WRITE}
        with pytest.raises(DescriptorLimitError) as caught:
            poller.register(at_limit, EVENT_WRITE)
        assert str(caught.value) == ("select() cannot watch descriptor 1024: it takes descriptors "
                                     "below FD_SETSIZE (1024); poll and epoll have no such limit")
        assert ready_events(poller) == {below: EVENT_WRITE}  # the refusal changed nothing
    finally:
        os.close(below)
        os.close(at_limit)


@pytest.mark.parametrize("name", ["poll", "epoll"])
def test_poll_and_epoll_watch_descriptors_past_fd_setsize(name, pair):
    a, _ = pair
    high = descriptor_at(FD_SETSIZE + 10, a)
    poller = POLLERS[name]()
    try:
        poller.register(high, EVENT_WRITE)
        assert ready_events(poller) == {high: EVENT_WRITE}
    finally:
        poller.close()
        os.close(high)


def test_poll_masks_are_the_kernels_own_and_events_of_translates_them(poller, pair):
    a, b = pair
    poller.register(a.fileno(), EVENT_READ)
    b.send(b"x")
    # Readable and nothing else is read_mask, whatever the backend.
    assert poller.poll_masks(1.0) == [(a.fileno(), poller.read_mask)]
    poller.modify(a.fileno(), EVENT_READ | EVENT_WRITE)
    merged = 0
    for fd, mask in poller.poll_masks(1.0):
        assert fd == a.fileno()
        merged |= poller.events_of[mask]
    assert merged == EVENT_READ | EVENT_WRITE
