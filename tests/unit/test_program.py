"""The program role: a user's program run as a lab role and reported like a built-in one.

Pure parts (the result line, the drain wait, output tails, strace's output)
are tested on synthetic traces, sample kernel tables and a recorded strace
fixture (tests/data/program/*.strace, made by the programs beside them). The
role itself runs as ``python -m socklab program`` against real programs on
127.0.0.1 only: a crash, a signal, a forwarded SIGTERM and a client and server
that talk to each other, traced by the Python tracer and by strace.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from socklab import program
from socklab.errors import UsageError
from socklab.results import find_results
from socklab.servers.lifecycle import LISTENING_LINE
from socklab.trace import FIELDS, read_trace

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "program"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "services")}
TUTORIAL_BYTES = 136_314_880  # "Hello Python\n" * 10 * 1024 * 1024
HAVE_STRACE = shutil.which("strace") is not None
pytestmark = pytest.mark.timeout(60)
DRAIN = {"s": 0.0, "unsent_bytes": 0, "complete": True}


def rec(t, conn, call, asked=0, returned=0, errno="", dur=0.0001, n=1) -> dict:
    return dict(zip(FIELDS, (t, conn, call, asked, returned, errno, dur, n)))


def header(*sockets) -> dict:
    return {"socklab_trace": 1, "mode": "program", "workload": "program", "program": "p.py", "pid": 1,
            "sockets": [{"conn": c, "kind": k, "local": local, "peer": peer} for c, k, local, peer in sockets]}


def ran(returncode=0, status=None, **kw) -> program.ProgramRun:
    fields = dict(name="p.py", argv=["python3", "p.py"], traced="python", returncode=returncode,
                  status=returncode if status is None else status, wall_s=2.5, cpu_s=0.25)
    fields.update(kw)
    return program.ProgramRun(**fields)


# --------------------------------------------------------------------------
# The result line, from a trace


def test_the_tutorials_nonblocking_send_requested_the_whole_payload():
    records = [
        rec(0.010, 0, "connect", dur=0.0205),
        rec(0.031, 0, "setblocking", asked=0),
        rec(0.032, 0, "send", asked=TUTORIAL_BYTES, returned=78_192, dur=0.00021),
        rec(0.035, 0, "outq", returned=78_192, dur=0.0),
        rec(0.040, 0, "close"),
    ]
    result = program.build_result("client", header((0, "connect", "10.0.0.3:40000", "10.0.0.2:5000")),
                                  records, ran(), DRAIN)
    assert result["role"] == "client" and result["mode"] == "program" and result["workload"] == "program"
    assert result["connections"] == 1
    assert result["bytes_requested"] == TUTORIAL_BYTES
    assert result["bytes_accepted"] == 78_192
    assert result["send_calls"] == 1 and result["eagain"] == 0 and result["timeouts"] == 0
    assert result["send_s"] == pytest.approx(0.00021)
    assert result["blocked_s"] == pytest.approx(0.0205 + 0.0001 + 0.00021 + 0.0001)  # outq is no call
    assert result["connect_s"] == pytest.approx(0.0205)
    assert result["wall_s"] == 2.5 and result["cpu_s"] == 0.25
    for field in ("bytes_delivered", "goodput_bps", "latency_ms", "tcp", "sndbuf_bytes", "rcvbuf_bytes"):
        assert result[field] is None
    assert result["program"]["calls"] == {"close": 1, "connect": 1, "send": 1, "setblocking": 1}
    assert result["program"]["sockets"][0]["local"] == "10.0.0.3:40000"
    assert result["drain"] == DRAIN and result["errors"] == []


def test_a_blocking_sendall_of_the_payload():
    records = [rec(0.0, 0, "connect", dur=0.02),
               rec(0.02, 0, "sendall", asked=TUTORIAL_BYTES, returned=TUTORIAL_BYTES, dur=22.67),
               rec(22.69, 0, "shutdown", asked=1), rec(22.7, 0, "recv", asked=1024, returned=0, dur=0.01),
               rec(22.71, 0, "close")]
    result = program.build_result("client", header((0, "connect", "a:1", "b:2")), records, ran(), DRAIN)
    assert result["bytes_requested"] == result["bytes_accepted"] == TUTORIAL_BYTES
    assert result["send_calls"] == 1
    assert result["send_s"] == pytest.approx(22.67)
    assert result["blocked_s"] == pytest.approx(0.02 + 22.67 + 0.0001 + 0.01 + 0.0001)


def test_a_spinning_client_nonblocking_connect_eagain_and_timeouts():
    records = [
        rec(0.0, 0, "setblocking", asked=0),
        rec(0.001, 0, "connect_ex", returned=-1, errno="EINPROGRESS", dur=0.0001),
        rec(0.002, -1, "select", asked=1, returned=0, dur=0.010),    # not ready yet
        rec(0.012, -1, "select", asked=1, returned=1, dur=0.0389),   # ready: the connect is done at 0.0509
        rec(0.051, 0, "send", asked=1000, returned=400),
        rec(0.052, 0, "send", asked=600, returned=-1, errno="EAGAIN", dur=0.5, n=283),  # merged retries
        rec(0.6, 0, "send", asked=600, returned=600),
        rec(0.7, 0, "recv", asked=100, returned=-1, errno="timeout", dur=1.0),
    ]
    result = program.build_result("client", header((0, "connect", "a:1", "b:2")), records, ran(), DRAIN)
    assert result["connections"] == 1
    assert result["connect_s"] == pytest.approx(0.0509 - 0.001)
    assert result["send_calls"] == 285 and result["eagain"] == 283 and result["timeouts"] == 1
    assert result["bytes_accepted"] == 1000 and result["bytes_requested"] == 1000
    assert result["program"]["calls"]["send"] == 285


def test_a_refused_connect_is_no_connection_and_the_last_send_counts_what_it_left():
    records = [rec(0.0, 0, "connect", returned=-1, errno="ECONNREFUSED"),
               rec(0.1, 1, "connect"), rec(0.2, 1, "send", asked=5000, returned=-1, errno="EPIPE")]
    result = program.build_result("client", header((0, "connect", None, "b:2"), (1, "connect", "a:1", "b:2")),
                                  records, ran(), DRAIN)
    assert result["connections"] == 1
    assert result["bytes_accepted"] == 0 and result["bytes_requested"] == 5000


def test_a_servers_connections_bytes_and_max_concurrent():
    # The Python tracer's way: accept recorded on the listener (conn 0); the k-th accepted
    # socket opens at the end of the k-th accept. Connections 1 and 2 overlap, 3 comes later.
    sockets = header((0, "listen", "0.0.0.0:5000", None),
                     (1, "accept", "10.0.0.2:5000", "10.0.0.3:40000"),
                     (2, "accept", "10.0.0.2:5000", "[::ffff:10.0.0.4]:40001"),
                     (3, "accept", "10.0.0.2:5000", "10.0.0.3:40002"))
    records = [
        rec(0.0, 0, "listen"),
        rec(0.0, 0, "accept", dur=1.0),                        # conn 1 open at 1.0
        rec(1.0, 1, "recv", asked=65536, returned=65536),
        rec(1.0, 0, "accept", dur=0.5),                        # conn 2 open at 1.5
        rec(1.6, 2, "recv", asked=65536, returned=1000),
        rec(1.7, 1, "recv", asked=65536, returned=34464),
        rec(1.8, 1, "recv", asked=65536, returned=0),
        rec(1.81, 1, "send", asked=6, returned=6),
        rec(1.9, 1, "close"),                                  # conn 1 closed at 1.9
        rec(2.0, 2, "recv", asked=65536, returned=-1, errno="ECONNRESET"),
        rec(2.1, 2, "close"),
        rec(2.1, 0, "accept", dur=0.9),                        # conn 3 open at 3.0, never closed
        rec(3.0, 3, "recv", asked=65536, returned=7),
        rec(3.1, 0, "accept", returned=-1, errno="SystemExit", dur=5.0),
    ]
    result = program.build_result("server", sockets, records,
                                  ran(returncode=143, status=0, stopped_by_signal=True), DRAIN)
    assert result["role"] == "server" and result["mode"] == "program"
    assert result["connections"] == 3
    assert result["bytes_received"] == 65536 + 34464 + 1000 + 7
    assert result["bytes_sent"] == 6
    assert result["max_concurrent"] == 2
    assert result["cpu_s"] == 0.25 and result["stopped_by"] == "signal"
    per = result["per_connection"]
    assert [c["peer"] for c in per] == ["10.0.0.3:40000", "10.0.0.4:40001", "10.0.0.3:40002"]
    assert [c["bytes_received"] for c in per] == [100000, 1000, 7]
    assert [c["start_s"] for c in per] == [1.0, 1.5, 3.0]
    assert [c["end_s"] for c in per] == [1.9, 2.1, None]
    assert [c["closed_by"] for c in per] == ["eof", "reset", None]
    assert result["program"]["exit_code"] == 143 and result["program"]["signal"] is None
    assert result["errors"] == []


def test_untraced_programs_get_null_for_everything_the_trace_would_say():
    client = program.build_result("client", None, None, ran(traced="none"), DRAIN)
    for field in ("connections", "bytes_requested", "bytes_accepted", "send_calls", "eagain", "timeouts",
                  "send_s", "blocked_s", "connect_s"):
        assert client[field] is None, field
    assert client["wall_s"] == 2.5 and client["cpu_s"] == 0.25
    assert client["program"]["sockets"] is None and client["program"]["calls"] is None
    assert client["program"]["traced"] == "none"
    server = program.build_result("server", None, None, ran(traced="none"), DRAIN)
    for field in ("connections", "bytes_received", "bytes_sent", "max_concurrent", "per_connection"):
        assert server[field] is None, field
    assert server["cpu_s"] == 0.25


def test_errors_and_exit_status():
    assert program.build_result("client", None, None, ran(1, last_error_line="ValueError: bad input"),
                                DRAIN)["errors"] == ["ValueError: bad input"]
    assert program.build_result("client", None, None, ran(3), DRAIN)["errors"] == ["exited 3"]
    killed = program.build_result("client", None, None, ran(-9, status=137, last_error_line="x"), DRAIN)
    assert killed["errors"] == ["killed by SIGKILL"]
    assert killed["program"]["signal"] == "SIGKILL" and killed["program"]["exit_code"] is None

    assert program.role_status("client", 0, []) == 0
    assert program.role_status("client", 2, []) == 2
    assert program.role_status("client", -9, []) == 137
    assert program.role_status("client", -15, [signal.SIGTERM]) == 143  # a client has no expected stop
    assert program.role_status("server", -15, [signal.SIGTERM]) == 0
    assert program.role_status("server", 143, [signal.SIGTERM]) == 0     # the Python tracer's SystemExit(143)
    assert program.role_status("server", -15, []) == 143                 # nobody here asked it to stop
    assert program.role_status("server", 1, [signal.SIGTERM]) == 1       # a crash on the way out stays one
    assert program.role_status("server", -9, [signal.SIGTERM]) == 137


# --------------------------------------------------------------------------
# The drain wait

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8962516 1 0000000000000000 100 0 0 10 0
   1: 0300000A:9C40 0200000A:1388 01 0000A000:00000000 01:00000014 00000000  1000        0 8962517 1 0000000000000000 20 4 30 10 -1
   2: 0300000A:9C41 0200000A:1388 01 00000000:00000010 00:00000000 00000000  1000        0 8962518 1 0000000000000000 20 4 30 10 -1
   3: 0300000A:9C42 0200000A:1388 04 0039F201:00000000 04:00000014 00000000     0        0 0 2 0000000000000000 20 0 0 15 -1
   4: 0300000A:9C43 0200000A:1388 06 00000000:00000000 03:0000176C 00000000     0        0 0 3 0000000000000000
   5: 0300000A:9C44 0200000A:1388 09 00000001:00000000 01:00000014 00000000     0        0 0 2 0000000000000000 20 0 0 10 -1
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1388 00000000000000000000000001000000:A000 0B 00000010:00000000 01:00000014 00000000     0        0 0 2 0000000000000000 20 0 0 10 -1
"""


def test_the_socket_tables_are_parsed():
    rows = program.parse_tcp_table(PROC_NET_TCP)
    assert len(rows) == 6
    assert rows[0] == program.TcpRow("0.0.0.0:5000", "0.0.0.0:0", 0x0A, 0)
    assert rows[1].local == "10.0.0.3:40000" and rows[1].remote == "10.0.0.2:5000"
    assert rows[1].tx_queue == 0xA000
    six = program.parse_tcp_table(PROC_NET_TCP6)
    assert six[0].local == "[::1]:5000" and six[1].remote == "[::1]:40960" and six[1].state == 0x0B
    assert program.listening_address(PROC_NET_TCP + PROC_NET_TCP6, 5000) == "0.0.0.0:5000"
    assert program.listening_address(PROC_NET_TCP6, 5000) == "[::1]:5000"
    assert program.listening_address(PROC_NET_TCP, 5001) is None


def test_what_is_still_to_be_delivered():
    # established with a send queue (1), FIN_WAIT1 (3), LAST_ACK (5); not: LISTEN, established
    # with an empty send queue (2, bytes received only), TIME_WAIT (4)
    assert program.pending_sends(PROC_NET_TCP) == (3, 0xA000 + 0x39F201 + 1)
    assert program.pending_sends(PROC_NET_TCP6) == (1, 0x10)  # CLOSING
    assert program.pending_sends(PROC_NET_TCP.splitlines()[0] + "\n") == (0, 0)
    assert program.pending_sends("") == (0, 0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_drain_wait_ends_once_everything_is_delivered():
    clock = FakeClock()
    tables = iter([PROC_NET_TCP, PROC_NET_TCP, PROC_NET_TCP6, ""])
    drained = program.drain_wait(lambda: next(tables), 60.0, clock=clock, sleep=clock.sleep)
    assert drained == {"s": 0.06, "unsent_bytes": 0, "complete": True}
    assert clock.sleeps == [0.02, 0.02, 0.02]


def test_the_drain_wait_is_bounded():
    clock = FakeClock()
    drained = program.drain_wait(lambda: PROC_NET_TCP, 0.05, clock=clock, sleep=clock.sleep)
    assert drained == {"s": 0.05, "unsent_bytes": 0xA000 + 0x39F201 + 1, "complete": False}
    assert clock.sleeps == pytest.approx([0.02, 0.02, 0.01])
    nothing = program.drain_wait(lambda: PROC_NET_TCP, 0.0, clock=clock, sleep=clock.sleep)
    assert nothing["s"] == 0.0 and not nothing["complete"]
    stopped = program.drain_wait(lambda: PROC_NET_TCP, 60.0, clock=clock, sleep=clock.sleep, stop=lambda: True)
    assert stopped["s"] == 0.0 and not stopped["complete"]


def test_read_tables_reads_what_there_is(tmp_path):
    (tmp_path / "tcp").write_text(PROC_NET_TCP)
    text = program.read_tables((str(tmp_path / "tcp"), str(tmp_path / "no-tcp6")))
    assert program.pending_sends(text)[0] == 3


# --------------------------------------------------------------------------
# The program's output


def test_tails_keep_the_last_lines_and_characters():
    lines = [f"line {i}" for i in range(100)]
    assert program.tail_text(lines) == "\n".join(f"line {i}" for i in range(80, 100))
    long = ["x" * 1500, "y" * 1500]
    tail = program.tail_text(long)
    assert len(tail) == 2000 and tail.endswith("y" * 1500) and tail.startswith("x" * 499 + "\n")
    assert program.tail_text([]) == ""
    assert program.last_nonempty_line(["a", "ValueError: bad", "  ", ""]) == "ValueError: bad"
    assert program.last_nonempty_line(["", " "]) is None


def test_a_child_line_that_reads_as_a_result_line_is_guarded():
    result_line = b'{"socklab_result":1,"role":"client"}\n'
    assert program.needs_guard(result_line, True)
    assert program.needs_guard(b'  {"socklab_result": 1}\n', True)
    assert not program.needs_guard(b'{"socklab_result": 2}\n', True)  # another schema: not read as ours
    assert not program.needs_guard(b'{"other": 1}\n', True)
    assert not program.needs_guard(b"hello\n", True)
    assert program.needs_guard(b'{"a": "' + b"x" * 100, False)  # the start of a long line: unseen rest
    assert program.needs_guard(b"socklab-file /tmp/x 0 AAAA\n", True)


def test_the_output_pump_passes_saves_and_keeps_the_tail(tmp_path):
    long_line = b"z" * (program.LINE_LIMIT_BYTES * 2 + 10) + b"\n"
    text = b"first\n" + b'{"socklab_result":1,"role":"client"}\n' + long_line + b"".join(
        b"line %d\n" % i for i in range(30)) + b"no newline at the end"
    sink = io.BytesIO()
    pump = program.OutputPump(io.BytesIO(text), sink, str(tmp_path / "stdout"), threading.Lock(), "stdout")
    pump.run()
    assert (tmp_path / "stdout").read_bytes() == text
    passed = sink.getvalue()
    assert passed == text.replace(b'{"socklab_result"', b'program: {"socklab_result"')
    assert find_results(passed.decode()) == []
    assert pump.tail() == "\n".join([f"line {i}" for i in range(11, 30)] + ["no newline at the end"])
    assert pump.last_line() == "no newline at the end"


def test_the_output_pump_keeps_a_long_line_as_one(tmp_path):
    long_line = b"a" * (program.LINE_LIMIT_BYTES + 5000) + b"\n"
    pump = program.OutputPump(io.BytesIO(long_line), None, str(tmp_path / "out"), threading.Lock(), "x")
    pump.run()
    assert list(pump.lines) == ["a" * program.TAIL_CHARS]


# --------------------------------------------------------------------------
# The command line


def test_program_names():
    assert program.program_name(["python3", "/programs/my_client.py", "--port", "5000"]) == "my_client.py"
    assert program.program_name(["/usr/bin/python3.12", "-u", "-X", "dev", "srv.py"]) == "srv.py"
    assert program.program_name(["python3", "-m", "http.server"]) == "http.server"
    assert program.program_name(["python3", "-c", "print(1)"]) == "python3"
    assert program.program_name(["/usr/bin/iperf3", "-c", "server"]) == "iperf3"


def test_arguments():
    args, command = program.parse_args(["--role", "server", "--port", "5000", "--drain-wait", "2s",
                                        "--", "python3", "s.py", "--role", "x"])
    assert args.role == "server" and args.port == 5000 and args.drain_wait == 2.0
    assert args.trace_with == "python" and args.output_dir == "/tmp/socklab-program" and args.trace is None
    assert command == ["python3", "s.py", "--role", "x"]
    assert program.parse_args(["--role", "client", "--", "prog"])[0].drain_wait == 60.0
    for bad in (["--role", "client", "prog"], ["--role", "client", "--"], ["--", "prog"],
                ["--role", "client", "--port", "5000", "--", "prog"],
                ["--role", "client", "--trace-with", "gdb", "--", "prog"],
                ["--role", "client", "--drain-wait", "-1s", "--", "prog"]):
        with pytest.raises(UsageError):
            program.parse_args(bad)


def test_without_strace_the_role_says_so_in_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(program.shutil, "which", lambda name: None)
    with pytest.raises(UsageError) as caught:
        program.main(["--role", "client", "--trace-with", "strace", "--output-dir", str(tmp_path),
                      "--", "true"])
    assert str(caught.value) == "trace: strace needs strace in the image; it has none"
    assert caught.value.exit_code == 2


# --------------------------------------------------------------------------
# strace


def test_the_strace_command():
    argv = program.strace_command("/usr/bin/strace", "/tmp/t.strace", ["python3", "c.py"])
    assert argv[:6] == ["/usr/bin/strace", "-f", "-qq", "-ttt", "-T", "-yy"]
    assert argv[-3:] == ["--", "python3", "c.py"]
    traced = argv[argv.index("-e") + 1].removeprefix("trace=").split(",")
    for needed in ("connect", "accept4", "sendto", "recvfrom", "write", "read", "close", "pselect6", "ioctl"):
        assert needed in traced


def strace_fixture(role: str) -> tuple[list[dict], list[dict], int | None]:
    text = (DATA / f"{role}.strace").read_text()
    records, sockets, pid = program.parse_strace(text, 1796589000.0)
    return [dict(zip(FIELDS, r)) for r in records], sockets, pid


def test_strace_of_a_client():
    records, sockets, pid = strace_fixture("client")
    assert pid == 25975
    assert sockets == [{"conn": 0, "kind": "connect", "local": "127.0.0.1:43308", "peer": "127.0.0.1:47500"},
                       {"conn": 1, "kind": "connect", "local": "127.0.0.1:46794", "peer": "127.0.0.1:47500"}]
    calls = [(r["conn"], r["call"], r["asked"], r["returned"], r["errno"]) for r in records]
    assert calls[:3] == [(0, "connect", 0, 0, ""), (0, "send", 6_000_000, 6_000_000, ""), (0, "shutdown", 1, 0, "")]
    assert (1, "setblocking", 0, 0, "") in calls                # ioctl FIONBIO [1]: non-blocking
    assert (1, "connect", 0, -1, "EINPROGRESS") in calls
    assert (1, "select", 1, 1, "") in calls
    assert (1, "send", 6_000_000, 3_919_467, "") in calls       # the non-blocking send's partial count
    assert (1, "send", 2_080_533, -1, "EAGAIN") in calls
    assert (0, "recv", 100, 0, "") in calls                     # the server's EOF
    assert records[0]["t_s"] == pytest.approx(479.329916, abs=1e-6)
    assert records[1]["dur_s"] == pytest.approx(0.205104)
    result = program.build_result("client", {"sockets": sockets}, records, ran(traced="strace"), DRAIN)
    assert result["connections"] == 2
    assert result["bytes_requested"] == result["bytes_accepted"] == 12_000_000
    assert result["send_calls"] == 4 and result["eagain"] == 1
    # blocking connect 0.000139 s; non-blocking from its start to the end of the ready select
    assert result["connect_s"] == pytest.approx((0.000139 + (0.547569 + 0.000012 - 0.545409)) / 2, abs=1e-5)


def test_strace_of_a_threaded_server():
    records, sockets, pid = strace_fixture("server")
    assert pid == 25967
    assert [(s["kind"], s["peer"]) for s in sockets] == [
        ("listen", None), ("accept", "127.0.0.1:43308"), ("accept", "127.0.0.1:46794")]
    accepts = [r for r in records if r["call"] == "accept"]
    # the second accept4 was unfinished while a worker thread read, then resumed
    assert [(r["conn"], r["returned"]) for r in accepts] == [(1, 0), (2, 0)]
    assert accepts[1]["dur_s"] == pytest.approx(0.210730, abs=1e-6)
    assert accepts[1]["t_s"] == pytest.approx(479.336800, abs=1e-6)
    result = program.build_result("server", {"sockets": sockets}, records, ran(traced="strace"), DRAIN)
    assert result["connections"] == 2
    assert result["bytes_received"] == 12_000_000
    assert [c["bytes_received"] for c in result["per_connection"]] == [6_000_000, 6_000_000]
    assert [c["bytes_sent"] for c in result["per_connection"]] == [7, 7]
    assert result["max_concurrent"] == 1


def test_strace_lines_of_every_kind():
    text = "\n".join([
        "# a comment, skipped",
        '10 1000.000000 socket(AF_INET6, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 3<TCPv6:[77]> <0.000010>',
        '10 1000.100000 connect(3<TCPv6:[77]>, {sa_family=AF_INET6, sin6_port=htons(5000)}, 28) = 0 <0.000100>',
        '10 1000.200000 fcntl(3<TCPv6:[[::1]:40000->[::1]:5000]>, F_SETFL, O_RDWR|O_NONBLOCK) = 0 <0.000001>',
        '10 1000.300000 write(3<TCPv6:[[::1]:40000->[::1]:5000]>, "a) = 5 \\"<0.1>\\""..., 70000) = 65536 <0.000200>',
        *[f'10 1000.{400 + i}000 write(3<TCPv6:[[::1]:40000->[::1]:5000]>, "zz"..., 4464) = -1 EAGAIN '
          '(Resource temporarily unavailable) <0.000002>' for i in range(3)],
        '10 1000.500000 poll([{fd=3<TCPv6:[[::1]:40000->[::1]:5000]>, events=POLLOUT}], 1, 1000) = 1 '
        '([{fd=3, revents=POLLOUT}]) <0.010000>',
        '10 1000.600000 sendmsg(3<TCPv6:[[::1]:40000->[::1]:5000]>, {msg_name=NULL, msg_namelen=0, '
        'msg_iov=[{iov_base="ab", iov_len=2}, {iov_base="cde", iov_len=3}], msg_iovlen=2, msg_controllen=0, '
        'msg_flags=0}, 0) = 5 <0.000010>',
        '10 1000.700000 read(4</etc/hosts>, "127.0.0.1 localhost"..., 4096) = 100 <0.000001>',
        '10 1000.800000 epoll_wait(5<anon_inode:[eventpoll]>, [], 1, 50) = 0 <0.050000>',
        '10 1000.900000 recvfrom(3<TCPv6:[[::1]:40000->[::1]:5000]>,  <unfinished ...>',
        '11 1000.950000 close(6<UNIX:[99]>) = 0 <0.000001>',
        '10 1001.000000 <... recvfrom resumed>"", 65536, 0, NULL, NULL) = -1 ECONNRESET (Connection reset '
        'by peer) <0.100000>',
        '10 1001.100000 close(3<TCPv6:[[::1]:40000->[::1]:5000]>) = 0 <0.000010>',
        '10 1001.200000 --- SIGTERM {si_signo=SIGTERM, si_code=SI_USER, si_pid=1, si_uid=0} ---',
        '10 1001.300000 accept4(7<TCP:[0.0.0.0:5000]>, 0x7ffe, [16], SOCK_CLOEXEC) = ? ERESTARTSYS '
        '(To be restarted if SA_RESTART is set) <0.500000>',
        '10 1001.400000 recvfrom(8<TCP:[10.0.0.2:5000->10.0.0.3:4000]>, ',  # cut short: no <unfinished> marker
        '12 1001.500000 recvfrom(9<TCP:[10.0.0.2:5000->10.0.0.4:4000]>, <unfinished ...>',
        '12 1002.000000 +++ killed by SIGKILL +++',
    ])
    records, sockets, pid = program.parse_strace(text, 1000.0)
    assert pid == 10
    got = [(r[1], r[2], r[3], r[4], r[5], r[7]) for r in records]
    assert got == [
        (0, "connect", 0, 0, "", 1),
        (0, "setblocking", 0, 0, "", 1),
        (0, "send", 70000, 65536, "", 1),
        (0, "send", 4464, -1, "EAGAIN", 3),             # identical failed retries merged
        (0, "poll", 1, 1, "", 1),
        (0, "sendmsg", 5, 5, "", 1),
        (-1, "epoll", 0, 0, "", 1),
        (0, "recv", 65536, -1, "ECONNRESET", 1),
        (0, "close", 0, 0, "", 1),
        (1, "accept", 0, -1, "EINTR", 1),
        (2, "recv", 0, -1, "EINTR", 1),                 # unfinished when the program was killed
    ]
    assert records[3][6] == pytest.approx(0.000006)     # the merged retries' time, summed
    assert records[7][0] == pytest.approx(0.9)          # a resumed call starts when it was called
    assert records[-1][6] == pytest.approx(0.5)         # ... and one never resumed lasts to the end
    assert sockets[0] == {"conn": 0, "kind": "connect", "local": "[::1]:40000", "peer": "[::1]:5000"}
    assert sockets[1]["kind"] == "other" and sockets[1]["local"] == "0.0.0.0:5000"


def test_strace_descriptors_reused_and_shared():
    text = "\n".join([
        '1 10.0 accept4(3<TCP:[0.0.0.0:5000]>, NULL, NULL, SOCK_CLOEXEC) = 4<TCP:[10.0.0.2:5000->10.0.0.3:1]> <0.1>',
        '1 10.2 close(4<TCP:[10.0.0.2:5000->10.0.0.3:1]>) = 0 <0.0>',      # a forking server's parent
        '2 10.3 read(4<TCP:[10.0.0.2:5000->10.0.0.3:1]>, "x", 10) = 10 <0.0>',  # its child: the same socket
        '2 10.4 close(4<TCP:[10.0.0.2:5000->10.0.0.3:1]>) = 0 <0.0>',
        '1 10.5 accept4(3<TCP:[0.0.0.0:5000]>, NULL, NULL, SOCK_CLOEXEC) = 4<TCP:[10.0.0.2:5000->10.0.0.3:2]> <0.1>',
        '1 10.7 read(4<TCP:[10.0.0.2:5000->10.0.0.3:2]>, "x", 10) = 3 <0.0>',
    ])
    records, sockets, _ = program.parse_strace(text, 10.0)
    assert [(s["conn"], s["kind"], s["peer"]) for s in sockets] == [
        (0, "other", None), (1, "accept", "10.0.0.3:1"), (2, "accept", "10.0.0.3:2")]
    result = program.build_result("server", {"sockets": sockets}, [dict(zip(FIELDS, r)) for r in records],
                                  ran(), DRAIN)
    assert [c["bytes_received"] for c in result["per_connection"]] == [10, 3]
    assert result["per_connection"][0]["end_s"] == pytest.approx(0.4)  # the last close


# --------------------------------------------------------------------------
# The role, run for real (loopback only)


def role(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "socklab", "program", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 20) -> tuple[int, str, str, dict]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the role did not end within {timeout} s: {out!r} {err!r}") from None
    results = find_results(out)
    assert len(results) == 1, (out, err)
    return proc.returncode, out, err, results[0]


def test_a_crashing_program_reports_its_last_stderr_line(tmp_path):
    code = ("import sys\nprint('working')\n"
            "print('{\"socklab_result\":1,\"role\":\"client\",\"forged\":true}')\n"
            "raise ValueError('bad input')\n")
    proc = role("--role", "client", "--output-dir", str(tmp_path), "--trace", str(tmp_path / "t.gz"),
                "--drain-wait", "1s", "--name", "crasher", "--", sys.executable, "-c", code)
    status, out, err, result = finish(proc)
    assert status == 1
    assert result["errors"] == ["ValueError: bad input"]
    assert result["program"]["name"] == "crasher" and result["program"]["exit_code"] == 1
    assert "forged" not in result and 'program: {"socklab_result"' in out   # the child's line, guarded
    assert "working" in out and "Traceback" in err                          # passed through
    assert result["program"]["stdout_tail"].startswith("working\n")
    assert result["program"]["stderr_tail"].endswith("ValueError: bad input")
    assert (tmp_path / "stderr").read_text().endswith("ValueError: bad input\n")
    assert (tmp_path / "stdout").read_text().startswith("working\n")


def test_a_program_killed_by_a_signal(tmp_path):
    proc = role("--role", "client", "--trace-with", "none", "--output-dir", str(tmp_path), "--drain-wait", "0",
                "--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    status, _, _, result = finish(proc)
    assert status == 128 + 9
    assert result["program"]["signal"] == "SIGKILL" and result["program"]["exit_code"] is None
    assert result["errors"] == ["killed by SIGKILL"]
    assert result["connections"] is None and result["program"]["traced"] == "none"


def test_sigterm_is_forwarded_and_a_stopped_server_exits_0(tmp_path):
    code = "import time\nprint('ready', flush=True)\ntime.sleep(30)\n"
    proc = role("--role", "server", "--trace-with", "none", "--output-dir", str(tmp_path),
                "--drain-wait", "1s", "--", sys.executable, "-c", code)
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status, _, _, result = finish(proc)
    assert time.monotonic() - started < 10
    assert status == 0
    assert result["program"]["signal"] == "SIGTERM" and result["stopped_by"] == "signal"
    assert result["errors"] == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_line(stream, text: str, timeout_s: float = 15) -> None:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"no {text!r} in {seen!r}")


def run_pair(tmp_path: Path, trace_with: str) -> tuple[dict, dict, Path, Path]:
    port = free_port()
    server = role("--role", "server", "--trace-with", trace_with, "--port", str(port),
                  "--trace", str(tmp_path / "server.gz"), "--output-dir", str(tmp_path / "server"),
                  "--drain-wait", "2s", "--", sys.executable, str(DATA / "count_server.py"), "2", str(port))
    try:
        wait_for_line(server.stderr, LISTENING_LINE)
        client = role("--role", "client", "--trace-with", trace_with, "--trace", str(tmp_path / "client.gz"),
                      "--output-dir", str(tmp_path / "client"), "--drain-wait", "2s",
                      "--", sys.executable, str(DATA / "send_client.py"), str(port), "3000000")
        client_status, client_out, _, client_result = finish(client)
        server_status, _, _, server_result = finish(server)
    finally:
        server.kill()
    assert client_status == 0 and server_status == 0, (client_result, server_result)
    assert client_out.splitlines().count("answer 3000000") == 2
    return client_result, server_result, tmp_path / "client.gz", tmp_path / "server.gz"


def check_pair(client: dict, server: dict, traced: str) -> None:
    assert client["program"]["traced"] == server["program"]["traced"] == traced
    assert client["connections"] == 2 and server["connections"] == 2
    assert client["bytes_requested"] == client["bytes_accepted"] == 6_000_000
    assert server["bytes_received"] == client["bytes_accepted"]
    assert client["connect_s"] is not None and client["connect_s"] > 0
    assert client["send_calls"] >= 3
    locals_ = sorted(s["local"] for s in client["program"]["sockets"] if s["kind"] == "connect")
    assert sorted(c["peer"] for c in server["per_connection"]) == locals_
    assert all(c["bytes_received"] == 3_000_000 for c in server["per_connection"])
    # Loopback shares this host's network namespace: another program's busy socket can
    # keep a drain wait from completing here, never from ending within its bound.
    assert client["drain"]["s"] <= 2.5 and server["drain"]["s"] <= 2.5
    assert client["errors"] == [] and server["errors"] == []


def test_a_client_and_a_server_traced_by_python(tmp_path):
    client, server, client_trace, server_trace = run_pair(tmp_path, "python")
    check_pair(client, server, "python")
    header, records = read_trace(str(client_trace))
    assert header["mode"] == "program" and len(records) > 0
    assert (tmp_path / "server" / "stdout").read_text().startswith("port ")


@pytest.mark.skipif(not HAVE_STRACE, reason="needs strace")
def test_a_client_and_a_server_traced_by_strace(tmp_path):
    client, server, client_trace, _ = run_pair(tmp_path, "strace")
    check_pair(client, server, "strace")
    header, records = read_trace(str(client_trace))
    assert header["mode"] == "program" and header["traced"] == "strace"
    assert {"connect", "send", "recv", "close"} <= {r["call"] for r in records}
