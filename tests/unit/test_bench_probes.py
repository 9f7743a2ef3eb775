"""The programs benchmarks run inside containers (bench/probes/, bench/reference_echo.py), run here on loopback.

Each runs exactly as a benchmark starts it (``python3 -c SOURCE ARGS``, from
experiments.probe_command), against real sockets and processes of this host.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import experiments  # noqa: E402
from socklab.results import find_results  # noqa: E402

SERVICES_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "services")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    argv = [sys.executable if argv[0] == "python3" else argv[0], *argv[1:]]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    argv = [sys.executable if argv[0] == "python3" else argv[0], *argv[1:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


def connect_when_listening(port: int, timeout_s: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(condition, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)


@pytest.mark.parametrize("name", ["hold_epoll", "hold_asyncio"])
def test_reference_holders_keep_every_connection_and_close_it_on_eof(name):
    port = free_port()
    holder = start(experiments.probe_command(name, port, 64, "127.0.0.1"))
    try:
        first = connect_when_listening(port)
        assert wait_for(lambda: open_fds(holder.pid) > 0)
        time.sleep(0.2)
        before = open_fds(holder.pid)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        # One descriptor per accepted connection: all 40 are held at once.
        assert wait_for(lambda: open_fds(holder.pid) == before + 40), open_fds(holder.pid) - before
        for client in clients:
            client.close()
        assert wait_for(lambda: open_fds(holder.pid) == before), open_fds(holder.pid) - before
        first.close()
        assert holder.poll() is None, "the holder must run until it is killed"
    finally:
        stop(holder)


def test_server_probe_counts_accepted_and_queued_connections_and_reads_the_process():
    port = free_port()
    # Accepts exactly 3 connections and holds them; the rest wait in its accept queue.
    server = start(["python3", "-c", (
        "import socket, sys, time\n"
        f"s = socket.create_server(('127.0.0.1', {port}), backlog=16)\n"
        "print('ready', flush=True)\n"
        "held = [s.accept()[0] for _ in range(3)]\n"
        "print('accepted', flush=True)\n"
        "time.sleep(60)\n")])
    clients = []
    try:
        assert server.stdout.readline() == "ready\n"
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        assert server.stdout.readline() == "accepted\n"
        pidfile = Path(f"/tmp/socklab-test-probe-{os.getpid()}.pid")
        pidfile.write_text(f"{server.pid}\n")
        try:
            done = run(experiments.probe_command("server_probe", pidfile, port))
        finally:
            pidfile.unlink()
        assert done.returncode == 0, done.stderr
        probe = json.loads(done.stdout)
        assert (probe["established"], probe["accept_queue"], probe["listening"]) == (5, 2, True)
        assert probe["pid"] == server.pid and probe["threads"] == 1
        # The listener and the three accepted sockets, besides stdin/stdout/stderr.
        assert probe["fds"] == 3 + 1 + 3
        status = Path(f"/proc/{server.pid}/status").read_text()
        rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
        assert probe["rss_kib"] == pytest.approx(rss_kib, rel=0.2)
        assert probe["hwm_kib"] >= probe["rss_kib"] > 0 and probe["vm_kib"] > probe["rss_kib"]
        assert probe["maps"] > 10
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert probe["nofile"] == [str(soft), str(hard)]
        assert set(probe["netstat"]) == {"ListenOverflows", "ListenDrops", "SyncookiesSent", "SyncookiesRecv",
                                         "TCPReqQFullDrop"}
    finally:
        for client in clients:
            client.close()
        stop(server)


def test_server_probe_without_a_server_says_so():
    done = run(experiments.probe_command("server_probe", "/nonexistent/pidfile", free_port()))
    probe = json.loads(done.stdout)
    assert (probe["pid"], probe["listening"], probe["established"], probe["accept_queue"]) == (None, False, 0, 0)


def test_server_probe_reads_the_listen_overflow_counters():
    sys.path.insert(0, str(ROOT / "bench" / "probes"))
    try:
        import server_probe
    finally:
        sys.path.remove(str(ROOT / "bench" / "probes"))
    text = ("TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops Other\n"
            "TcpExt: 1 2 30 31 99\nIpExt: InNoRoutes\nIpExt: 0\n")
    assert server_probe.netstat_counters(text) == {"ListenOverflows": 30, "ListenDrops": 31, "SyncookiesSent": 1,
                                                   "SyncookiesRecv": 2, "TCPReqQFullDrop": 0}


def test_container_limits_reads_the_kernels_files():
    done = run(experiments.probe_command("container_limits"))
    limits = json.loads(done.stdout)
    assert list(limits) == ["somaxconn", "vm.max_map_count", "kernel.threads-max", "kernel.pid_max",
                            "cgroup pids.max", "cgroup memory limit", "fs.nr_open", "ip_local_port_range",
                            "nf_conntrack_max", "RLIMIT_NOFILE"]
    assert limits["RLIMIT_NOFILE"] == list(resource.getrlimit(resource.RLIMIT_NOFILE))
    assert limits["somaxconn"] == Path("/proc/sys/net/core/somaxconn").read_text().strip()
    assert limits["vm.max_map_count"] == Path("/proc/sys/vm/max_map_count").read_text().strip()
    assert int(limits["kernel.pid_max"]) > 0


def _lower_soft_descriptor_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))


# One write, so that two children's lines cannot interleave.
REPORT_LIMIT = ("import os, resource; "
                "os.write(1, ('%d %d %d\\n' % (os.getpid(), *resource.getrlimit(resource.RLIMIT_NOFILE))).encode())")


def test_launch_raises_the_descriptor_limit_and_becomes_the_program_under_the_pid_it_wrote(tmp_path):
    pidfile = tmp_path / "server.pid"
    done = run(experiments.probe_command("launch", pidfile, sys.executable, "-c", REPORT_LIMIT),
               preexec_fn=_lower_soft_descriptor_limit)
    assert done.returncode == 0, done.stderr
    pid, soft, hard = map(int, done.stdout.split())
    assert int(pidfile.read_text()) == pid
    assert soft == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_idle_clients_starts_every_client_with_the_raised_limit_and_reports_the_port_range():
    argvs = [[sys.executable, "-c", REPORT_LIMIT], [sys.executable, "-c", REPORT_LIMIT + "; raise SystemExit(3)"]]
    done = run(experiments.probe_command("idle_clients", json.dumps(argvs)), preexec_fn=_lower_soft_descriptor_limit)
    lines = done.stdout.splitlines()
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert lines[0] == f"ports {low} {high}"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    children = sorted(tuple(map(int, line.split())) for line in lines[1:])
    assert all(len(child) == 3 for child in children), done.stdout
    assert len(children) == 2 and len({pid for pid, _, _ in children}) == 2
    assert all(soft == limit == hard for _, soft, limit in children)
    assert done.returncode == 3


def _echo_round_trip(port: int, payload: bytes) -> tuple[bytes, bytes]:
    """Send ``payload``, read its echo, end the stream; the echo and the trailer after it."""
    with connect_when_listening(port) as sock:
        sock.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            echoed += sock.recv(65536)
        sock.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    return echoed, rest


def test_reference_echo_server_echoes_and_ends_with_the_lab_protocols_trailer():
    port = free_port()
    server = start(["python3", str(ROOT / "bench" / "reference_echo.py"), str(port)])
    try:
        payload = os.urandom(100_000)
        assert _echo_round_trip(port, payload) == (payload, b"SOCKLAB-RCVD 100000\n")
        assert _echo_round_trip(port, b"x") == (b"x", b"SOCKLAB-RCVD 1\n")
    finally:
        stop(server)


def _profiled(argv: list[str], port: int) -> tuple[dict, str]:
    server = start(argv, env=SERVICES_ENV)
    try:
        for _ in range(20):
            assert _echo_round_trip(port, b"ping" * 256)[0] == b"ping" * 256
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=30)
    finally:
        stop(server)
    line = next((line for line in stdout.splitlines() if line.startswith("profile ")), None)
    assert line is not None, stderr
    return json.loads(line[len("profile "):]), stdout


def test_profiler_profiles_the_reference_until_sigterm():
    port = free_port()
    source = (ROOT / "bench" / "reference_echo.py").read_text()
    profile, _ = _profiled(experiments.probe_command("profile_server", "reference", source, port), port)
    calls = {row[0]: row[1] for row in profile["rows"]}
    received = [name for name in calls if name.endswith("(data_received)")]
    line = next(n for n, text in enumerate(source.splitlines(), 1) if "def data_received" in text)
    assert received == [f"reference_echo.py:{line}(data_received)"] and calls[received[0]] >= 20
    assert profile["total_s"] > 0 and all(len(row) == 4 for row in profile["rows"])


def test_profiler_profiles_the_lab_server_which_still_prints_its_result():
    port = free_port()
    argv = ["--mode", "epoll", "--host", "127.0.0.1", "--port", str(port), "--workload", "echo"]
    profile, stdout = _profiled(experiments.probe_command("profile_server", "lab", *argv), port)
    (result,) = [r for r in find_results(stdout) if r["role"] == "server"]
    assert result["connections"] == 20 and result["bytes_received"] == 20 * 1024
    assert any(name.startswith("reactor.py:") for name, *_ in profile["rows"])


@pytest.mark.parametrize(("kind", "expected_bytes"), [("whole", 1_000_000 // 13 * 13),
                                                      ("reused", 1_000_000 // 131066 * 131066)])
def test_bulk_sender_sends_its_buffer_and_waits_for_the_servers_eof(kind, expected_bytes):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = []

    def serve() -> None:
        conn, _ = listener.accept()
        count = 0
        while chunk := conn.recv(65536):
            count += len(chunk)
        conn.sendall(b"SOCKLAB-RCVD %d\n" % count)
        conn.close()
        received.append(count)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        done = run(experiments.probe_command("bulk_sender", "127.0.0.1", port, 1_000_000, kind))
    finally:
        thread.join(30)
        listener.close()
    word, sent_kind, sent, seconds = done.stdout.split()
    assert (word, sent_kind, int(sent)) == ("SENT", kind, expected_bytes)
    assert received == [expected_bytes] and float(seconds) > 0


def _probe_module(name: str):
    sys.path.insert(0, str(ROOT / "bench" / "probes"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench" / "probes"))


def test_delay_line_profile_finds_the_lines_configuration_in_the_plan_a_container_runs():
    from labkit import scenario
    from socklab.shaping import delayline

    probe = _probe_module("delay_line_profile")
    link = {"delay": "1ms", "backend": "userspace", "up": {"loss": "1%"}}
    plan = scenario.shaping_plans(experiments.experiment(None, {"name": "load", "link": link}))["client-load"]
    words = probe.line_words({"commands": plan})
    assert sorted(words) == ["down", "up"]
    configs = {d: delayline.LineConfig.from_word(w) for d, w in words.items()}
    assert configs["up"].delay_ms == configs["down"].delay_ms == 1.0
    assert (configs["up"].loss_pct, configs["down"].loss_pct) == (1.0, 0.0)


def test_delay_line_profile_ranks_functions_by_their_cpu_time_per_packet():
    import cProfile
    import pstats

    probe = _probe_module("delay_line_profile")
    profile = cProfile.Profile()
    profile.runcall(lambda: [sum(range(20_000)) for _ in range(50)])
    rows = probe.top_functions(pstats.Stats(profile), packets=100)
    assert len(rows) <= probe.TOP
    assert [r["own_us_per_packet"] for r in rows] == sorted((r["own_us_per_packet"] for r in rows), reverse=True)
    by_name = {r["function"]: r for r in rows}
    assert by_name["~:0(<built-in method builtins.sum>)"]["calls"] == 50


def test_timer_lateness_sleeps_as_asked_and_reports_the_overshoot():
    started = time.monotonic()
    done = subprocess.run([sys.executable if a == "python3" else a
                           for a in experiments.probe_command("timer_lateness", 2, 50)],
                          capture_output=True, text=True, timeout=60, check=True)
    elapsed = time.monotonic() - started
    found = json.loads(done.stdout)
    assert (found["sleep_ms"], found["count"]) == (2.0, 50)
    late = found["late_ms"]
    assert 0 <= late["p50"] <= late["p90"] <= late["max"]
    # 50 sleeps of 2 ms, and at least half of them late by p50 or more, all inside the wall time.
    assert 0.1 + 25 * late["p50"] / 1000 <= elapsed
