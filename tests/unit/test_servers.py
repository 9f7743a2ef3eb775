"""The server in every mode, run as a subprocess and driven over loopback with raw sockets."""

from __future__ import annotations

import os
import resource
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from socklab.protocol import encode_trailer
from socklab.results import find_results
from socklab.servers import Connections

SERVICES = Path(__file__).resolve().parents[2] / "services"
LOOPBACK = "127.0.0.1"
MODES = ("blocking", "threaded", "select", "poll", "epoll", "asyncio")
CONCURRENT_MODES = tuple(m for m in MODES if m != "blocking")
WAIT_S = 10.0
PATTERN = b"Hello Python\n"


class RunningServer:
    """``python -m socklab server`` on a free loopback port."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(SERVICES)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "socklab", "server", "--host", LOOPBACK, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        ready, _, _ = select.select([self.proc.stderr], [], [], WAIT_S)
        line = self.proc.stderr.readline().decode() if ready else ""
        match = re.fullmatch(r"socklab server listening on 127\.0\.0\.1:(\d+) mode=(\S+)\n", line)
        assert match, f"no listening line, got {line!r}"
        self.port = int(match.group(1))
        self.mode = match.group(2)

    def connect(self) -> socket.socket:
        return socket.create_connection((LOOPBACK, self.port), timeout=WAIT_S)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def result(self) -> dict:
        """Wait for a clean exit; return its one result line."""
        out, err = self.proc.communicate(timeout=WAIT_S)
        assert self.proc.returncode == 0, err.decode()
        results = find_results(out.decode())
        assert len(results) == 1, out.decode()
        return results[0]


@pytest.fixture
def start():
    servers: list[RunningServer] = []

    def _start(*args: str) -> RunningServer:
        server = RunningServer(*args)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def exchange(sock: socket.socket, payload: bytes, read_delay_s: float = 0.0) -> bytes:
    """Send ``payload``, half-close, and return everything read until the server's EOF.

    Reading runs concurrently (after ``read_delay_s``) so that an echo cannot
    deadlock; the delay lets the server's replies back up first.
    """
    received: list[bytes] = []

    def reader() -> None:
        time.sleep(read_delay_s)
        received.append(read_to_eof(sock))

    thread = threading.Thread(target=reader)
    thread.start()
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the server never closed the connection"
    return received[0]


def peer_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def assert_closed_without_trailer(sock: socket.socket) -> None:
    try:
        assert read_to_eof(sock) == b""
    except ConnectionResetError:
        pass


@pytest.mark.parametrize("mode", MODES)
def test_bulk_counts_every_byte_and_answers_with_the_trailer(start, mode, tmp_path):
    result_file = tmp_path / "server.json"
    server = start("--mode", mode, "--max-connections", "1", "--result-file", str(result_file))
    payload = PATTERN * (256 * 1024) + b"odd"  # 3.25 MiB: the default 1 KiB receives
    with server.connect() as sock:
        reply = exchange(sock, payload)
        peer = peer_of(sock)
    trailer = encode_trailer(len(payload))
    assert reply == trailer
    result = server.result()
    assert find_results(result_file.read_text()) == [result]
    assert result["role"] == "server" and result["mode"] == mode and result["workload"] == "bulk"
    assert result["stopped_by"] == "max-connections"
    assert result["connections"] == 1
    assert result["bytes_received"] == len(payload)
    assert result["bytes_sent"] == len(trailer)
    assert result["max_concurrent"] == 1
    assert result["idle_timeouts"] == 0
    assert result["cpu_s"] > 0
    (conn,) = result["per_connection"]
    assert conn["peer"] == peer
    assert conn["bytes_received"] == len(payload) and conn["bytes_sent"] == len(trailer)
    assert conn["closed_by"] == "eof"
    assert 0 <= conn["start_s"] <= conn["end_s"] <= result["wall_s"]


@pytest.mark.parametrize("mode", MODES)
def test_echo_returns_the_same_bytes_then_the_trailer(start, mode):
    server = start("--mode", mode, "--workload", "echo", "--max-connections", "1",
                   "--recv-size", "4KiB", "--rcvbuf", "128KiB", "--backlog", "16")
    # More than the kernel's largest send buffer (4 MiB by default) plus a
    # small receive window here, read late: the replies back up in the server,
    # which must then cope with partial sends and stop reading for a while.
    payload = os.urandom(8 * 1024 * 1024 + 5)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.settimeout(WAIT_S)
        sock.connect((LOOPBACK, server.port))
        reply = exchange(sock, payload, read_delay_s=0.3)
    trailer = encode_trailer(len(payload))
    assert reply[:len(payload)] == payload
    assert reply[len(payload):] == trailer
    result = server.result()
    assert result["workload"] == "echo"
    assert result["bytes_received"] == len(payload)
    assert result["bytes_sent"] == len(payload) + len(trailer)
    assert result["per_connection"][0]["closed_by"] == "eof"


@pytest.mark.parametrize("mode", CONCURRENT_MODES)
def test_concurrent_connections_are_served_at_once(start, mode):
    count = 5
    server = start("--mode", mode, "--workload", "echo", "--max-connections", str(count))
    socks = [server.connect() for _ in range(count)]
    try:
        # Every connection gets its echo while all are open: served concurrently.
        for i, sock in enumerate(socks):
            message = f"ping {i}".encode()
            sock.sendall(message)
            assert sock.recv(64) == message
        for i, sock in enumerate(socks):
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock) == encode_trailer(len(f"ping {i}"))
    finally:
        for sock in socks:
            sock.close()
    result = server.result()
    assert result["max_concurrent"] == count
    assert result["connections"] == count
    assert result["stopped_by"] == "max-connections"
    assert [c["closed_by"] for c in result["per_connection"]] == ["eof"] * count
    if mode == "threaded":
        assert result["threads_max"] >= count + 1
    else:
        assert result["threads_max"] == 1


def test_blocking_serves_one_connection_at_a_time(start):
    server = start("--mode", "blocking", "--max-connections", "2")
    with server.connect() as first, server.connect() as second:
        first.sendall(b"x" * 100)
        second.sendall(b"y" * 50)
        second.shutdown(socket.SHUT_WR)
        second.settimeout(0.3)
        with pytest.raises(socket.timeout):
            second.recv(64)  # waits in the backlog while the first is served
        second.settimeout(WAIT_S)
        first.shutdown(socket.SHUT_WR)
        assert read_to_eof(first) == encode_trailer(100)
        assert read_to_eof(second) == encode_trailer(50)
        peers = [peer_of(first), peer_of(second)]
    result = server.result()
    assert result["max_concurrent"] == 1
    assert result["threads_max"] == 1
    assert result["connections"] == 2
    conns = result["per_connection"]
    assert [c["peer"] for c in conns] == peers
    assert conns[1]["start_s"] >= conns[0]["end_s"]


def fill_until_stuck(sock: socket.socket) -> int:
    """Send without reading until nothing moves for a while; return bytes sent."""
    sock.setblocking(False)
    chunk = bytes(256 * 1024)
    sent = stalls = 0
    while stalls < 4:
        try:
            sent += sock.send(chunk)
            stalls = 0
        except BlockingIOError:
            stalls += 1
            time.sleep(0.05)
    sock.setblocking(True)
    return sent


@pytest.mark.parametrize("scenario", ["in-accept", "in-recv", "in-send"])
@pytest.mark.parametrize("mode", MODES)
def test_sigterm_stops_cleanly_with_the_result(start, mode, scenario):
    server = start("--mode", mode, "--workload", "echo")
    sock = None
    try:
        if scenario == "in-recv":
            sock = server.connect()
            sock.sendall(b"ping")
            assert sock.recv(64) == b"ping"  # the server holds the connection
        elif scenario == "in-send":
            sock = server.connect()
            assert fill_until_stuck(sock) > 0  # the server's echo is stuck on us
        time.sleep(0.1)  # for the server to be blocked in its call again
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        result = server.result()
        assert time.monotonic() - started < 3.0
        assert result["stopped_by"] == "signal"
        assert result["connections"] == 0
        if sock is None:
            assert result["per_connection"] == []
        else:
            (conn,) = result["per_connection"]
            assert conn["closed_by"] == "shutdown"
            assert conn["bytes_received"] == result["bytes_received"] > 0
            sock.settimeout(WAIT_S)
            if scenario == "in-recv":
                assert_closed_without_trailer(sock)
    finally:
        if sock is not None:
            sock.close()


@pytest.mark.parametrize("mode", MODES)
def test_sigint_stops_like_sigterm(start, mode):
    server = start("--mode", mode)
    server.signal(signal.SIGINT)
    result = server.result()
    assert result["stopped_by"] == "signal"


@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_closes_a_silent_connection(start, mode):
    server = start("--mode", mode, "--idle-timeout", "300ms", "--max-connections", "1")
    with server.connect() as sock:
        # Activity restarts the clock: the close must come a full timeout later.
        time.sleep(0.2)
        sock.sendall(b"abc")
        last_activity = time.monotonic()
        assert_closed_without_trailer(sock)
        silent_s = time.monotonic() - last_activity
    assert 0.25 <= silent_s < 3.0
    result = server.result()
    assert result["stopped_by"] == "max-connections"
    assert result["idle_timeouts"] == 1
    assert result["connections"] == 1
    (conn,) = result["per_connection"]
    assert conn["closed_by"] == "idle"
    assert conn["bytes_received"] == 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SERVICES)}
    return subprocess.run([sys.executable, "-m", "socklab", "server", *args],
                          capture_output=True, env=env, timeout=WAIT_S)


@pytest.mark.parametrize("args", [
    ["--mode", "fork", "--port", "0"],
    ["--mode", "epoll", "--port", "0", "--recv-size", "-5"],
    ["--mode", "select", "--port", "0", "--recv-size", "0"],
    ["--mode", "poll"],
    ["--mode", "poll", "--port", "70000"],
    ["--mode", "asyncio", "--port", "0", "--idle-timeout", "0"],
    ["--mode", "threaded", "--port", "0", "--workload", "stream"],
])
def test_bad_arguments_exit_2_with_one_line(args):
    done = run_cli("--host", LOOPBACK, *args)
    assert done.returncode == 2
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("socklab: "), lines


def test_a_port_in_use_is_one_sentence_and_exit_1():
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        done = run_cli("--host", LOOPBACK, "--mode", "blocking", "--port", str(taken.getsockname()[1]))
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "cannot listen on" in lines[0], lines


def allow_descriptors(count: int) -> None:
    """Raise this process's descriptor limit (inherited by the servers it starts) to ``count``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        assert hard == resource.RLIM_INFINITY or hard >= count, f"RLIMIT_NOFILE hard limit {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def echoes(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` got its one-byte echo within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b"x"
    except socket.timeout:
        return False


@pytest.mark.parametrize(("mode", "held"), [("select", 992), ("poll", 1000)])
def test_the_select_server_stops_accepting_below_fd_setsize(start, mode, held):
    # select() cannot watch a descriptor >= FD_SETSIZE (1024): the select
    # server holds 992 connections and leaves the rest established in the
    # accept queue until one ends; poll (like epoll) has no such limit.
    total = 1000
    allow_descriptors(total + 200)
    server = start("--mode", mode, "--workload", "echo", "--backlog", "64")
    socks = []
    try:
        for _ in range(total):
            sock = server.connect()
            sock.sendall(b"x")
            socks.append(sock)
        assert all(echoes(sock, WAIT_S) for sock in socks[:held])
        assert not any(echoes(sock, 0.3) for sock in socks[held:])
        if held < total:
            socks.pop(0).close()  # one ends: the server takes the next in the queue
            assert echoes(socks[held - 1], WAIT_S)
    finally:
        for sock in socks:
            sock.close()
    server.signal(signal.SIGTERM)
    assert server.result()["max_concurrent"] == held


def test_connections_keep_every_record_without_an_object_per_connection():
    conns = Connections(echo=True)
    first = conns.open(("10.0.0.1", 40000), 0.5)
    second = conns.open(("::1", 65535, 0, 0), 0.75)
    third = conns.open(("10.0.0.1", 1), 0.875)
    view = memoryview(b"hello")
    assert conns.on_data(first, view) is view
    conns.on_sent(first, 5)
    assert conns.on_eof(first) == encode_trailer(5)
    conns.close(first, 1.25, "eof")
    conns.close(third, 2.0, "idle")
    assert conns.open_ones() == [second]
    assert conns.record(first) == {"peer": "10.0.0.1:40000", "bytes_received": 5, "bytes_sent": 5,
                                   "start_s": 0.5, "end_s": 1.25, "closed_by": "eof"}
    assert conns.record(second) == {"peer": "[::1]:65535", "bytes_received": 0, "bytes_sent": 0,
                                    "start_s": 0.75, "end_s": None, "closed_by": None}
    assert conns.record(third)["peer"] == "10.0.0.1:1" and conns.closed_by(third) == "idle"
    assert conns.bytes_received() == conns.bytes_sent() == 5
    counting = Connections(echo=False)
    assert counting.on_data(counting.open(("10.0.0.2", 9), 0.0), view) == b""
