"""The clients, run as the lab runs them: subprocesses against a server on loopback.

Every socket here is on 127.0.0.1. Servers whose behaviour a test needs to
control (a slow reader, a reader that stalls, a peer that never answers) are
built in the test; plain protocol servers are the lab's own (socklab.servers)
once it exists, else a small in-test server that speaks the same protocol.
Assertions compare ratios and bounds, not absolute timings of this machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from socklab import clients
from socklab.protocol import encode_trailer
from socklab.results import find_results
from socklab.tcpinfo import combine_tcp_info, read_tcp_info, send_queue_bytes
from socklab.trace import Tracer, read_trace
from socklab.workloads import make_payload

SERVICES = Path(__file__).resolve().parents[2] / "services"
ENV = {**os.environ, "PYTHONPATH": str(SERVICES)}
LOOPBACK = "127.0.0.1"
ALL_MODES = list(clients.MODES)
NONBLOCKING_MODES = ["nonblocking", "nonblocking-spin", "select", "poll", "epoll", "asyncio"]
HAVE_LAB_SERVERS = importlib.util.find_spec("socklab.servers") is not None


def run_client(*args: str, timeout_s: float = 60) -> tuple[int, dict | None, str]:
    """Run ``python -m socklab client ARGS``: exit status, result line (or None), stderr."""
    done = subprocess.run([sys.executable, "-m", "socklab", "client", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout_s)
    found = find_results(done.stdout)
    assert len(found) <= 1, done.stdout
    return done.returncode, (found[0] if found else None), done.stderr


def client_args(mode: str, port: int, workload: str, *extra: str) -> list[str]:
    return ["--mode", mode, "--host", LOOPBACK, "--port", str(port), "--workload", workload, *extra]


class ProtocolServer:
    """A threaded server speaking socklab's protocol on loopback, with knobs for tests.

    ``read_bps`` paces its reading (a slow receiver); ``stall_s`` delays the
    first read (a receiver that stops for a while); ``echo`` sends every byte
    back. ``received`` lists bytes per connection as each one ends.
    """

    def __init__(self, *, echo: bool = False, read_bps: float | None = None,
                 stall_s: float = 0.0, rcvbuf_bytes: int | None = None) -> None:
        self.echo, self.read_bps, self.stall_s = echo, read_bps, stall_s
        self.received: list[int] = []
        self.listener = socket.socket()
        if rcvbuf_bytes:
            # Set on the listener so that accepted sockets inherit it from the start.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            time.sleep(self.stall_s)
            total, start = 0, time.monotonic()
            while data := conn.recv(65536 if self.read_bps is None else 4096):
                total += len(data)
                if self.echo:
                    conn.sendall(data)
                if self.read_bps:
                    ahead_s = start + total / self.read_bps - time.monotonic()
                    if ahead_s > 0:
                        time.sleep(ahead_s)
            self.received.append(total)
            conn.sendall(encode_trailer(total))

    def close(self) -> None:
        self.listener.close()


def _start_lab_server(workload: str, mode: str = "threaded") -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "socklab", "server", "--mode", mode,
                             "--host", LOOPBACK, "--port", "0", "--workload", workload],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
        line = proc.stderr.readline() if ready else ""
        seen.append(line)
        match = re.search(r"listening on \S+:(\d+)", line)
        if match:
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"socklab server did not say where it listens: {''.join(seen)}")


@pytest.fixture
def protocol_server():
    """Start a plain protocol server for a workload; returns its port."""
    procs: list[subprocess.Popen] = []
    servers: list[ProtocolServer] = []

    def start(workload: str) -> int:
        if HAVE_LAB_SERVERS:
            proc, port = _start_lab_server(workload)
            procs.append(proc)
            return port
        server = ProtocolServer(echo=workload == "echo")
        servers.append(server)
        return server.port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
    for server in servers:
        server.close()


@pytest.fixture
def slow_server():
    """A receiver that reads 2 MB/s through a small receive buffer."""
    server = ProtocolServer(read_bps=2e6, rcvbuf_bytes=64 * 1024)
    yield server
    server.close()


@pytest.fixture(scope="module")
def silent_peer():
    """A loopback port whose SYNs go unanswered: a listener with a full accept queue.

    With listen(0) Linux queues one connection; once that queue is full it
    drops further SYNs (no SYN-ACK, no RST), so a connect() there hangs as if
    the peer were unreachable, with no packet leaving loopback.
    """
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(16):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex((LOOPBACK, port))
        fillers.append(filler)
        _, writable, _ = select.select([], [filler], [], 0.3)
        if not writable:
            break
    else:
        pytest.fail("could not fill the accept queue: SYNs are still answered")
    yield port
    for sock in fillers:
        sock.close()
    listener.close()


# -- the tutorial's claims ---------------------------------------------------


def test_blocking_send_waits_for_the_link_nonblocking_send_returns_at_once(slow_server, tmp_path):
    payload = 6_000_000
    common = ["--bytes", str(payload), "--sndbuf", "64KiB"]
    code, blocking, _ = run_client(*client_args("blocking", slow_server.port, "bulk", *common))
    assert code == 0, blocking
    result_file = tmp_path / "nonblocking.json"
    code, nonblocking, _ = run_client(*client_args("nonblocking", slow_server.port, "bulk", *common,
                                                   "--result-file", str(result_file)))
    assert code == 0, nonblocking
    assert json.loads(result_file.read_text()) == nonblocking

    # Blocking: one send() took everything, and held the program for most of the run.
    assert blocking["send_calls"] == 1
    assert blocking["bytes_accepted"] == blocking["bytes_delivered"] == payload
    assert blocking["send_s"] > 0.7 * blocking["wall_s"]
    # Non-blocking: one send(), a partial count, returned at once.
    assert nonblocking["send_calls"] == 1
    assert 0 < nonblocking["bytes_accepted"] < payload
    assert nonblocking["send_s"] < 0.05 * nonblocking["wall_s"]
    assert blocking["send_s"] > 100 * nonblocking["send_s"]
    # shutdown() and the wait for EOF delivered exactly what send() accepted.
    assert nonblocking["bytes_delivered"] == nonblocking["bytes_accepted"]
    assert slow_server.received == [payload, nonblocking["bytes_accepted"]]


def test_busy_loop_burns_cpu_while_blocking_and_select_sleep(slow_server):
    ratios = {}
    for mode in ("nonblocking-spin", "blocking", "select"):
        code, result, _ = run_client(*client_args(mode, slow_server.port, "bulk",
                                                  "--bytes", "3MB", "--sndbuf", "64KiB"))
        assert code == 0 and result["bytes_delivered"] == 3_000_000, result
        ratios[mode] = result["cpu_s"] / result["wall_s"]
        if mode == "nonblocking-spin":
            assert result["eagain"] > 1000
            assert result["send_calls"] > result["eagain"]
    assert ratios["nonblocking-spin"] > 0.5, ratios
    assert ratios["blocking"] < 0.2, ratios
    assert ratios["select"] < 0.2, ratios


CANCEL_MS = 200
CANCEL_SLACK_MS = 50


@pytest.mark.parametrize("mode", NONBLOCKING_MODES)
def test_cancel_regains_control_at_the_deadline_when_the_peer_never_answers(silent_peer, mode):
    code, result, _ = run_client(*client_args(mode, silent_peer, "connect", "--attempts", "2",
                                              "--cancel-after", f"{CANCEL_MS}ms"))
    assert code == 0, result
    attempts = result["connect"]
    assert attempts["attempts"] == attempts["cancelled"] == 2, attempts
    for away_ms in attempts["control_away_ms"]:
        assert CANCEL_MS <= away_ms < CANCEL_MS + CANCEL_SLACK_MS, attempts
    assert result["connect_s"] is None and result["errors"] == []


def test_blocking_connect_cannot_be_cancelled_before_it_returns(silent_peer):
    code, result, _ = run_client(*client_args("blocking", silent_peer, "connect", "--attempts", "1",
                                              "--cancel-after", f"{CANCEL_MS}ms",
                                              "--connect-timeout", "600ms"))
    assert code == 0, result
    attempts = result["connect"]
    assert attempts["timed_out"] == 1 and attempts["cancelled"] == 0, attempts
    # The stop was due at 200 ms; a blocking connect() kept control until its timeout.
    assert attempts["control_away_max_ms"] >= 600 - 5, attempts


def test_connect_workload_against_a_server_finishes_each_connection(protocol_server):
    port = protocol_server("connect")
    code, result, _ = run_client(*client_args("select", port, "connect", "--attempts", "3",
                                              "--connections", "2", "--cancel-after", "5s"))
    assert code == 0, result
    assert result["connect"]["succeeded"] == 6 and result["connect"]["cancelled"] == 0
    assert result["bytes_delivered"] == 0 and result["connect_s"] > 0


# -- every mode does the workloads --------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_bulk_in_every_mode_delivers_what_send_accepted(protocol_server, mode):
    port = protocol_server("bulk")
    code, result, _ = run_client(*client_args(mode, port, "bulk", "--bytes", "2MiB",
                                              "--connections", "2"))
    assert code == 0, result
    requested = 2 * 2 * 1024 * 1024
    assert result["bytes_requested"] == requested
    assert result["bytes_delivered"] == result["bytes_accepted"]
    if mode == "nonblocking":
        assert result["send_calls"] == 2 and 0 < result["bytes_accepted"] <= requested
    else:
        assert result["bytes_accepted"] == requested
    assert result["goodput_bps"] > 0 and result["connect_s"] > 0
    assert result["tcp"]["snd_cwnd"] > 0 and result["tcp"]["rtt_ms"] >= 0
    assert result["latency_ms"] is None and result["errors"] == []
    spec_fields = {"role", "mode", "workload", "connections", "bytes_requested", "bytes_accepted",
                   "bytes_delivered", "send_calls", "eagain", "timeouts", "blocked_s", "wall_s",
                   "cpu_s", "goodput_bps", "connect_s", "latency_ms", "tcp", "errors", "send_s"}
    assert spec_fields <= set(result)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_echo_in_every_mode_measures_each_round_trip(protocol_server, mode):
    port = protocol_server("echo")
    code, result, _ = run_client(*client_args(mode, port, "echo", "--requests", "150",
                                              "--size", "512", "--connections", "2"))
    assert code == 0, result
    latency = result["latency_ms"]
    assert latency["count"] == 300
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert result["bytes_requested"] == result["bytes_accepted"] == result["bytes_delivered"] == 300 * 512
    assert result["requests_per_s"] > 0


def test_slow_peer_trickles_at_its_rate_and_holds_the_connection(protocol_server):
    port = protocol_server("slow")
    code, result, _ = run_client(*client_args("select", port, "slow", "--rate", "2000",
                                              "--hold", "600ms"))
    assert code == 0, result
    # 200-byte pieces every 100 ms for 600 ms.
    assert result["bytes_delivered"] == result["bytes_requested"] == 1200
    assert result["send_calls"] == 6
    assert result["wall_s"] >= 0.6


# -- limits, failures, arguments ----------------------------------------------


def bulk_against_a_stalled_reader(stall_s: float, mode: str, *extra: str) -> tuple[int, dict | None]:
    """A bulk client (64 KiB send buffer) against a server that starts reading after ``stall_s``."""
    server = ProtocolServer(stall_s=stall_s, rcvbuf_bytes=64 * 1024)
    try:
        code, result, _ = run_client(*client_args(mode, server.port, "bulk", "--sndbuf", "64KiB", *extra))
    finally:
        server.close()
    return code, result


def test_timeout_mode_counts_timeouts_and_keeps_going():
    code, result = bulk_against_a_stalled_reader(0.6, "timeout", "--bytes", "2MB", "--timeout", "100ms")
    assert code == 0, result
    assert result["timeouts"] >= 3
    assert result["bytes_delivered"] == result["bytes_accepted"] == 2_000_000


def test_deadline_stops_the_workload_but_still_delivers_what_was_accepted():
    code, result = bulk_against_a_stalled_reader(0.8, "epoll", "--bytes", "8MB", "--deadline", "300ms")
    assert code == 1
    assert any("deadline" in e for e in result["errors"]), result["errors"]
    assert 0 < result["bytes_accepted"] < 8_000_000
    assert result["bytes_delivered"] == result["bytes_accepted"]


@pytest.mark.parametrize("mode", ["blocking", "select", "asyncio"])
def test_eof_wait_is_bounded_when_the_server_never_answers(mode):
    # Connections complete into the accept queue, but nobody ever reads or replies.
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(8)
    try:
        started = time.monotonic()
        code, result, _ = run_client(*client_args(mode, listener.getsockname()[1], "bulk",
                                                  "--bytes", "1000", "--eof-wait", "300ms"))
        elapsed_s = time.monotonic() - started
    finally:
        listener.close()
    assert code == 1
    assert result["errors"] == ["no EOF from the server within 0.3s after shutdown"]
    assert result["bytes_accepted"] == 1000 and result["bytes_delivered"] is None
    assert elapsed_s < 5


def test_refused_connection_exits_1_with_the_reason():
    # Bound but not listening: connecting is refused at once, on loopback.
    closed = socket.socket()
    closed.bind((LOOPBACK, 0))
    try:
        code, result, _ = run_client(*client_args("blocking", closed.getsockname()[1], "bulk",
                                                  "--bytes", "10"))
    finally:
        closed.close()
    assert code == 1
    assert result["errors"] == ["connect() failed: ECONNREFUSED (Connection refused)"]
    assert result["bytes_delivered"] is None


@pytest.mark.parametrize("args,message", [
    (["--mode", "bogus", "--workload", "bulk"], "invalid choice: 'bogus'"),
    (["--mode", "blocking", "--workload", "bulk", "--bytes", "-5"], "'-5' is not a size"),
    (["--mode", "blocking", "--workload", "echo", "--size", "0"], "'0' must be above zero"),
    (["--mode", "blocking", "--workload", "bulk", "--requests", "3"], "--requests applies to --workload echo"),
    (["--mode", "select", "--workload", "bulk", "--timeout", "1s"], "--timeout applies to --mode timeout"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    code, result, stderr = run_client("--host", LOOPBACK, "--port", "9", *args)
    assert code == 2 and result is None
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr


# -- traces --------------------------------------------------------------------


def traced_bulk(port: int, tmp_path: Path, mode: str, *extra: str) -> tuple[dict, dict, list[dict]]:
    """A 1 MB bulk client run with --trace: its result, the trace's header and records."""
    trace_path = tmp_path / "trace.jsonl.gz"
    code, result, _ = run_client(*client_args(mode, port, "bulk", "--bytes", "1MB", "--sndbuf", "64KiB",
                                              *extra, "--trace", str(trace_path)))
    assert code == 0, result
    header, records = read_trace(str(trace_path))
    return result, header, records


@pytest.mark.parametrize("mode", ["select", "nonblocking-spin", "blocking"])
def test_trace_records_every_send_call(slow_server, tmp_path, mode):
    result, header, records = traced_bulk(slow_server.port, tmp_path, mode, "--chunk", "64KiB")
    assert header["mode"] == mode and header["workload"] == "bulk"
    assert abs(header["start_epoch"] - time.time()) < 60
    sends = [r for r in records if r["call"] == "send"]
    # Merged busy-loop retries count as many calls as they stand for.
    assert sum(r["n"] for r in sends) == result["send_calls"]
    assert sum(r["returned"] for r in sends if r["returned"] > 0) == result["bytes_accepted"]
    assert sum(r["n"] for r in sends if r["errno"] == "EAGAIN") == result["eagain"]
    assert all(r["asked"] <= 64 * 1024 for r in sends)
    times = [r["t_s"] for r in records]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= result["wall_s"]
    assert {"connect", "shutdown", "recv"} <= {r["call"] for r in records}
    if mode == "select":
        assert any(r["call"] == "select" and r["conn"] == -1 for r in records)
    queued = [r["returned"] for r in records if r["call"] == "outq"]
    assert queued and max(queued) > 0


@pytest.mark.parametrize("mode", ["select", "poll", "epoll"])
def test_each_shared_wait_is_traced_under_its_call_name(slow_server, tmp_path, mode):
    result, _, records = traced_bulk(slow_server.port, tmp_path, mode, "--connections", "2")
    waits = [r for r in records if r["conn"] == -1]
    assert waits and {r["call"] for r in waits} == {mode}
    # Each wait records how many descriptors it watched and how many were ready.
    assert all(1 <= r["asked"] <= 2 and 0 <= r["returned"] <= r["asked"] for r in waits)
    assert sum(r["dur_s"] for r in waits) <= result["blocked_s"]


def test_select_refuses_a_descriptor_past_fd_setsize_in_one_sentence():
    # 1100 connections in one select loop: descriptor 1024 cannot be watched.
    # poll and epoll serve the same load.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        assert hard == resource.RLIM_INFINITY or hard >= 1400, f"RLIMIT_NOFILE hard limit {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))  # inherited by both processes
    proc, port = _start_lab_server("bulk", mode="epoll")
    try:
        results = {}
        for mode in ("select", "poll", "epoll"):
            results[mode] = run_client(*client_args(mode, port, "bulk", "--bytes", "1KiB",
                                                    "--connections", "1100"))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)  # its result line lists 3300 connections: read it
    code, result, _ = results["select"]
    assert code == 1
    assert result["errors"] == ["DescriptorLimitError: select() cannot watch descriptor 1024: it takes "
                                "descriptors below FD_SETSIZE (1024); poll and epoll have no such limit"]
    for mode in ("poll", "epoll"):
        code, result, _ = results[mode]
        assert code == 0 and result["errors"] == [], result
        assert result["bytes_delivered"] == 1100 * 1024


def test_tracer_round_trip_and_header(tmp_path):
    path = str(tmp_path / "t.gz")
    clock = iter([10.0, 10.0]).__next__
    tracer = Tracer(path, clock, 10.0, {"mode": "select", "workload": "bulk"})
    tracer.add((0.5, 0, "send", 100, -1, "EAGAIN", 0.001, 3))
    tracer.add((0.25, -1, "select", 1, 1, "", 0.2, 1))
    tracer.write()
    header, records = read_trace(path)
    assert header["socklab_trace"] == 1 and header["fields"][0] == "t_s"
    assert [r["call"] for r in records] == ["select", "send"]
    assert records[1] == {"t_s": 0.5, "conn": 0, "call": "send", "asked": 100, "returned": -1,
                          "errno": "EAGAIN", "dur_s": 0.001, "n": 3}


# -- pieces --------------------------------------------------------------------


def test_payload_is_the_pattern_repeated_to_the_exact_size():
    assert make_payload(30, b"Hello Python\n") == (b"Hello Python\n" * 3)[:30]
    assert len(make_payload(136314880, b"Hello Python\n")) == len("Hello Python\n" * 10 * 1024 * 1024)


@pytest.mark.parametrize("mode", ["blocking", "epoll", "asyncio"])
def test_bulk_sends_the_pattern_repeated_to_the_exact_size_from_its_tiled_payload(mode):
    """Every mode sends from the one payload builder (socklab.payload), whose large payloads are tiled."""
    pattern, nbytes = b"odd pattern!", 3 * 2**20 + 7
    listener = socket.create_server((LOOPBACK, 0))
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                received.extend(data)
            conn.sendall(encode_trailer(len(received)))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        code, result, _ = run_client(*client_args(mode, listener.getsockname()[1], "bulk", "--bytes", str(nbytes),
                                                  "--pattern", pattern.decode()))
        server.join(30)
    finally:
        listener.close()
    assert code == 0 and result["bytes_delivered"] == nbytes, result
    assert received == make_payload(nbytes, pattern)


def test_latency_percentiles_are_measured_values():
    summary = clients.latency_summary([i / 1000 for i in range(1, 101)])
    assert summary == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0, "mean": 50.5, "count": 100}
    assert clients.latency_summary([]) is None


def test_tcp_info_and_send_queue_of_a_loopback_connection():
    listener = socket.create_server((LOOPBACK, 0))
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    try:
        info = read_tcp_info(client)
        assert info is not None and info["snd_cwnd"] > 0 and info["retrans"] == 0
        assert send_queue_bytes(client.fileno()) == 0
        assert combine_tcp_info([info, None, {"rtt_ms": 3.0, "retrans": 2, "snd_cwnd": 20}])["retrans"] == 2
        assert combine_tcp_info([None]) is None
    finally:
        for sock in (client, peer, listener):
            sock.close()
