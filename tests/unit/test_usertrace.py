"""socklab.usertrace: an unmodified Python program's socket calls, traced from its start.

Every test runs a small real program in a subprocess, as a user's program runs
(``sys.executable``, the environment of ``child_env``), on real loopback
sockets with ephemeral ports, and reads the trace it left with
``socklab.trace.read_trace``.
"""

from __future__ import annotations

import _socket
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from socklab import usertrace
from socklab.trace import FIELDS, read_trace
from socklab.usertrace import ENV_TRACE_FILE, INJECT_DIR, SOCKET_CALLS, child_env

ROOT = Path(__file__).resolve().parents[2]
BASE_ENV = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", ENV_TRACE_FILE)}


def run(source: str, *args: str, trace: Path | None, env: dict | None = None,
        timeout_s: float = 30) -> subprocess.CompletedProcess:
    """Run ``source`` as a program, traced into ``trace`` (untraced without one)."""
    env = env if env is not None else (child_env(BASE_ENV, str(trace)) if trace else dict(BASE_ENV))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source), *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def traced(source: str, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, list[dict]]:
    """Run ``source`` traced; check it succeeded with nothing on stderr; its trace."""
    path = tmp_path / "program.trace.gz"
    done = run(source, *args, trace=path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    header, records = read_trace(str(path))
    return done, header, records


def calls(records: list[dict], call: str, conn: int | None = None) -> list[dict]:
    return [r for r in records if r["call"] == call and (conn is None or r["conn"] == conn)]


def socket_entry(header: dict, kind: str, local: str) -> dict:
    (entry,) = [s for s in header["sockets"] if s["kind"] == kind and s["local"] == local]
    return entry


def hostport(address: list) -> str:
    return f"{address[0]}:{address[1]}"


# ------------------------------------------------------------------ the environment

def test_child_env_puts_the_injector_then_the_package_first_and_names_the_trace():
    env = child_env({"PATH": "/bin", "PYTHONPATH": "/mine"}, "/tmp/t.gz")
    assert env["PYTHONPATH"].split(os.pathsep) == [INJECT_DIR, str(ROOT / "services"), "/mine"]
    assert env[ENV_TRACE_FILE] == "/tmp/t.gz" and env["PATH"] == "/bin"
    assert child_env({}, "t")["PYTHONPATH"].split(os.pathsep) == [INJECT_DIR, str(ROOT / "services")]
    assert Path(INJECT_DIR, "sitecustomize.py").is_file()


# ------------------------------------------------------------------ every call, in each mode

EVERY_CALL = """
    import json, select, socket, sys
    mode = sys.argv[1]

    def prep(s):
        if mode == "blocking":
            s.settimeout(None)
            s.setblocking(True)
        elif mode == "timeout":
            s.setblocking(True)
            s.settimeout(2.0)
        else:
            s.settimeout(0.0)
            s.setblocking(False)
        return s

    def readable(s):
        select.select([s], [], [], 5)

    def writable(s):
        select.select([], [s], [], 5)

    out = {}
    srv = prep(socket.socket()); srv.bind(("127.0.0.1", 0)); srv.listen(8)
    cli = prep(socket.socket())
    try:
        out["connect"] = cli.connect(srv.getsockname())
    except BlockingIOError as exc:
        out["connect"] = [type(exc).__name__, exc.errno]
    writable(cli); readable(srv)
    conn, peer = srv.accept()
    prep(conn)
    cli2 = prep(socket.socket())
    out["connect_ex"] = cli2.connect_ex(srv.getsockname())
    writable(cli2); readable(srv)
    conn2, _ = srv.accept()
    prep(conn2)
    out["send"] = cli.send(b"hello")
    out["sendall"] = cli.sendall(b"world" * 10)
    out["sendmsg"] = cli.sendmsg([b"ab", b"cd"])
    readable(conn)
    out["recv"] = conn.recv(5).decode()
    buf = bytearray(50)
    out["recv_into"] = conn.recv_into(buf, 50)
    data, sender = conn.recvfrom(4)
    out["recvfrom"] = [data.decode(), sender]
    out["shutdown"] = cli.shutdown(socket.SHUT_WR)
    readable(conn)
    out["eof"] = conn.recv(10).decode()
    u1 = prep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)); u1.bind(("127.0.0.1", 0))
    u2 = prep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)); u2.bind(("127.0.0.1", 0))
    out["sendto"] = u2.sendto(b"dgram", u1.getsockname())
    readable(u1)
    data, sender = u1.recvfrom(100)
    out["recvfrom_udp"] = [data.decode(), sender == u2.getsockname()]
    out["sendto_flags"] = u2.sendto(b"dgram2", 0, u1.getsockname())
    readable(u1)
    n, sender = u1.recvfrom_into(buf)
    out["recvfrom_into"] = [n, bytes(buf[:n]).decode()]
    out["addresses"] = {"listen": srv.getsockname(), "cli": [cli.getsockname(), cli.getpeername()],
                        "conn": [conn.getsockname(), peer], "cli2": [cli2.getsockname(), cli2.getpeername()],
                        "conn2": [conn2.getsockname(), conn2.getpeername()],
                        "udp": [u1.getsockname(), u2.getsockname()]}
    out["close"] = [s.close() for s in (cli, cli2, conn, conn2, u1, u2, srv)]
    print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["blocking", "timeout", "nonblocking"])
def test_every_call_is_traced_with_what_it_asked_and_returned(tmp_path, mode):
    done, header, records = traced(EVERY_CALL, tmp_path, mode)
    out = json.loads(done.stdout)
    addresses = out.pop("addresses")
    untraced = json.loads(run(EVERY_CALL, mode, trace=None).stdout)
    del untraced["addresses"]  # the ephemeral ports differ
    assert out == untraced  # the same return values, in a program that behaves the same

    assert header["socklab_trace"] == 1 and header["fields"] == list(FIELDS)
    assert (header["mode"], header["workload"], header["program"]) == ("program", "program", "-c")
    assert isinstance(header["pid"], int) and header["pid"] > 0
    assert {r["call"] for r in records} >= set(SOCKET_CALLS) | {"select"}
    assert all(r["n"] == 1 and r["dur_s"] >= 0 for r in records)

    listen = socket_entry(header, "listen", hostport(addresses["listen"]))
    cli = socket_entry(header, "connect", hostport(addresses["cli"][0]))
    conn = next(s for s in header["sockets"] if s["kind"] == "accept" and s["peer"] == hostport(addresses["conn"][1]))
    cli2 = socket_entry(header, "connect", hostport(addresses["cli2"][0]))
    conn2 = next(s for s in header["sockets"] if s["kind"] == "accept" and s["peer"] == hostport(addresses["cli2"][0]))
    assert listen["peer"] is None
    assert cli["peer"] == hostport(addresses["cli"][1]) == listen["local"]
    assert conn["local"] == hostport(addresses["conn"][0]) and conn["peer"] == cli["local"]
    assert cli2["peer"] == listen["local"] and conn2["local"] == hostport(addresses["conn2"][0])
    u1 = socket_entry(header, "other", hostport(addresses["udp"][0]))
    u2 = socket_entry(header, "other", hostport(addresses["udp"][1]))
    assert u1["peer"] is None and u2["peer"] is None
    assert sorted(s["conn"] for s in header["sockets"]) == list(range(len(header["sockets"])))
    assert len({listen["conn"], cli["conn"], conn["conn"], cli2["conn"], conn2["conn"], u1["conn"], u2["conn"]}) == 7

    def one(call, sock):
        (record,) = calls(records, call, sock["conn"])
        return record["asked"], record["returned"], record["errno"]

    if mode == "nonblocking":
        assert out["connect"] == ["BlockingIOError", 115]
        assert one("connect", cli) == (0, -1, "EINPROGRESS")
        assert out["connect_ex"] == 115 and one("connect_ex", cli2) == (0, -1, "EINPROGRESS")
    else:
        assert one("connect", cli) == (0, 0, "") and one("connect_ex", cli2) == (0, 0, "")
    assert [(r["asked"], r["returned"], r["errno"]) for r in calls(records, "accept", listen["conn"])] == \
        [(0, 0, "")] * 2
    assert one("listen", listen) == (0, 0, "")
    assert one("send", cli) == (5, 5, "")
    assert one("sendall", cli) == (50, 50, "")
    assert one("sendmsg", cli) == (4, 4, "")
    assert [(r["asked"], r["returned"]) for r in calls(records, "recv", conn["conn"])] == [(5, 5), (10, 0)]
    assert one("recv_into", conn) == (50, 50, "")
    assert one("recvfrom", conn) == (4, 4, "")
    assert one("shutdown", cli) == (0, 0, "")
    assert [(r["asked"], r["returned"]) for r in calls(records, "sendto", u2["conn"])] == [(5, 5), (6, 6)]
    assert one("recvfrom", u1) == (100, 5, "")
    assert one("recvfrom_into", u1) == (50, 6, "")
    for sock in (listen, cli, conn, cli2, conn2, u1, u2):
        assert one("close", sock) == (0, 0, "")
    timeout_ms, blocking = {"blocking": (-1, 1), "timeout": (2000, 1), "nonblocking": (0, 0)}[mode]
    for sock in (listen, cli, conn, cli2, conn2, u1, u2):
        assert (timeout_ms, 0, "") == one("settimeout", sock)
        settings = [(r["asked"], r["returned"], r["errno"]) for r in calls(records, "setblocking", sock["conn"])]
        # accept() itself makes the socket it returns blocking when the listener has a timeout.
        assert settings == [(1, 0, "")] * (mode == "timeout" and sock["kind"] == "accept") + [(blocking, 0, "")]
    # The waits the program made, as waits of no one connection.
    assert all(r["conn"] == -1 and r["asked"] == 1 and r["returned"] == 1 for r in calls(records, "select"))
    times = [r["t_s"] for r in records if r["call"] != "outq"]
    assert times == sorted(times) and 0 <= times[0] < 5


# ------------------------------------------------------------------ errors, by name

def test_a_nonblocking_send_into_a_full_buffer_is_partial_then_eagain(tmp_path):
    done, header, records = traced("""
        import json, socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        cli = socket.socket()
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()  # and never reads
        cli.setblocking(False)
        results = []
        while True:
            try:
                results.append(cli.send(b"x" * 1_000_000))
            except BlockingIOError as exc:
                results.append(exc.errno)
                break
        for call in (lambda: cli.recv(10), lambda: cli.recv_into(bytearray(7)), lambda: srv.accept()):
            srv.setblocking(False)
            try:
                call()
            except BlockingIOError as exc:
                results.append(exc.errno)
        print(json.dumps(results))
    """, tmp_path)
    results = json.loads(done.stdout)
    assert results[-4:] == [11, 11, 11, 11]
    cli = next(s for s in header["sockets"] if s["kind"] == "connect")
    sends = calls(records, "send", cli["conn"])
    assert [r["returned"] for r in sends] == results[:-4] + [-1]
    assert all(r["asked"] == 1_000_000 for r in sends)
    assert 0 < sends[0]["returned"] < 1_000_000 and sends[0]["errno"] == ""
    assert (sends[-1]["returned"], sends[-1]["errno"]) == (-1, "EAGAIN")
    assert all(r["returned"] > 0 for r in sends[:-1])
    assert [(r["asked"], r["returned"], r["errno"]) for r in calls(records, "recv", cli["conn"])] == [(10, -1, "EAGAIN")]
    assert [(r["asked"], r["returned"], r["errno"]) for r in calls(records, "recv_into", cli["conn"])] == \
        [(7, -1, "EAGAIN")]
    assert [(r["returned"], r["errno"]) for r in calls(records, "accept")][-1] == (-1, "EAGAIN")
    # The send queue of the connection is sampled as the lab's clients sample it.
    assert all(r["conn"] in (cli["conn"], next(s["conn"] for s in header["sockets"] if s["kind"] == "accept"))
               for r in calls(records, "outq"))


def test_refused_and_in_progress_connects_are_named_and_addresses_come_when_connected(tmp_path):
    done, header, records = traced("""
        import json, select, socket
        out = []
        closed = socket.socket(); closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses
        target = closed.getsockname()
        a = socket.socket()
        try:
            a.connect(target)
        except ConnectionRefusedError as exc:
            out.append(["connect", type(exc).__name__, exc.errno])
        b = socket.socket()
        out.append(["connect_ex", b.connect_ex(target)])
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        c = socket.socket(); c.setblocking(False)
        try:
            c.connect(srv.getsockname())
        except BlockingIOError as exc:
            out.append(["connect", type(exc).__name__, exc.errno])
        select.select([], [c], [], 5)
        out.append(["send", c.send(b"hi")])
        conn, _ = srv.accept()
        out.append(["addresses", c.getsockname(), c.getpeername()])
        print(json.dumps(out))
    """, tmp_path)
    out = json.loads(done.stdout)
    assert out[:4] == [["connect", "ConnectionRefusedError", 111], ["connect_ex", 111],
                       ["connect", "BlockingIOError", 115], ["send", 2]]
    connects = calls(records, "connect")
    assert [(r["returned"], r["errno"]) for r in connects] == [(-1, "ECONNREFUSED"), (-1, "EINPROGRESS")]
    assert [(r["returned"], r["errno"]) for r in calls(records, "connect_ex")] == [(-1, "ECONNREFUSED")]
    # The non-blocking connect's addresses, taken at the send that followed it.
    local, peer = out[4][1:]
    entry = socket_entry(header, "connect", hostport(local))
    assert entry["peer"] == hostport(peer) and entry["conn"] == connects[1]["conn"]
    assert [s["kind"] for s in header["sockets"]].count("connect") == 1  # refused ones are not connections


def test_a_socket_timeout_is_named_timeout_and_lasts_the_timeout(tmp_path):
    done, header, records = traced("""
        import socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()  # silent
        cli.settimeout(0.05)
        try:
            cli.recv(10)
        except TimeoutError as exc:
            print(type(exc).__name__, exc.errno, exc)
    """, tmp_path)
    assert done.stdout == "TimeoutError None timed out\n"
    cli = next(s for s in header["sockets"] if s["kind"] == "connect")
    (settimeout,) = calls(records, "settimeout", cli["conn"])
    (recv,) = calls(records, "recv", cli["conn"])
    assert settimeout["asked"] == 50
    assert (recv["asked"], recv["returned"], recv["errno"]) == (10, -1, "timeout")
    assert 0.04 <= recv["dur_s"] < 2
    assert recv["t_s"] >= settimeout["t_s"] + settimeout["dur_s"]


# ------------------------------------------------------------------ waits

def test_select_poll_epoll_selectors_and_asyncio_waits_are_traced(tmp_path):
    done, header, records = traced("""
        import asyncio, json, select, selectors, socket
        out = {}
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        cli.send(b"x")
        out["select"] = [len(x) for x in select.select([conn], [], [], 5)]
        p = select.poll(); p.register(conn, select.POLLIN); p.register(cli.fileno(), select.POLLIN)
        out["poll"] = len(p.poll(5000))
        e = select.epoll(); e.register(conn.fileno(), select.EPOLLIN)
        out["epoll"] = len(e.poll(5)); e.close()
        with select.epoll.fromfd(select.epoll().fileno()) as e2:
            out["fromfd"] = [type(e2).__name__, e2.closed]
        out["closed"] = e2.closed
        for name in ("DefaultSelector", "SelectSelector", "PollSelector", "EpollSelector"):
            with getattr(selectors, name)() as sel:
                sel.register(conn, selectors.EVENT_READ)
                sel.register(cli, selectors.EVENT_WRITE)
                out[name] = len(sel.select(5))
        socket.socket().settimeout(12.345)  # a mark in the trace: asyncio from here on

        async def handle(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.write(b"ping\\n")
            await writer.drain()
            line = await reader.readline()
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()
            return line.decode()

        out["asyncio"] = asyncio.run(main())
        print(json.dumps(out))
    """, tmp_path)
    out = json.loads(done.stdout)
    assert out == {"select": [1, 0, 0], "poll": 1, "epoll": 1, "fromfd": ["epoll", False], "closed": True,
                   "DefaultSelector": 2, "SelectSelector": 2, "PollSelector": 2, "EpollSelector": 2,
                   "asyncio": "PING\n"}
    (mark,) = [r for r in records if r["call"] == "settimeout" and r["asked"] == 12345]
    before = [r for r in records if r["t_s"] < mark["t_s"] and r["conn"] == -1]
    assert [(r["call"], r["asked"], r["returned"]) for r in before] == [
        ("select", 1, 1), ("poll", 2, 1), ("epoll", 1, 1),
        ("epoll", 2, 2), ("select", 2, 2), ("poll", 2, 2), ("epoll", 2, 2)]  # DefaultSelector is epoll here
    after = [r for r in records if r["t_s"] > mark["t_s"]]
    waits = [r for r in after if r["conn"] == -1]
    assert waits and {r["call"] for r in waits} == {"epoll"} and all(r["asked"] >= 1 for r in waits)
    assert sum(r["returned"] for r in waits) >= 2  # it waited for the connection and for the reply
    by_call = {r["call"] for r in after}
    assert {"listen", "accept", "connect", "send", "recv", "close", "setblocking"} <= by_call
    assert sorted(r["returned"] for r in after if r["call"] == "send") == [5, 5]  # ping\n, PING\n
    accepted = [s for s in header["sockets"] if s["kind"] == "accept"]
    connected = [s for s in header["sockets"] if s["kind"] == "connect"]
    assert len(accepted) == 2 and len(connected) == 2
    assert accepted[-1]["peer"] == connected[-1]["local"] and connected[-1]["peer"] == accepted[-1]["local"]


# ------------------------------------------------------------------ the program, otherwise unchanged

MISUSE = """
    import json, socket
    def show(f):
        try:
            result = f()
            return ["ok", repr(result)]
        except BaseException as exc:
            return [type(exc).__name__, getattr(exc, "errno", None), str(exc), repr(exc.args)]
    s = socket.socket()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    print(json.dumps([
        show(lambda: s.recv(10)), show(lambda: s.send(b"x")), show(lambda: s.recv("x")),
        show(lambda: s.recv_into(bytearray(4), nbytes=9)), show(lambda: s.settimeout(-1)),
        show(lambda: s.shutdown(socket.SHUT_RDWR)), show(lambda: s.sendto(b"x", ("127.0.0.1", 0))),
        show(lambda: u.sendto(b"x", ("no such host.invalid", 9))), show(lambda: s.connect(("127.0.0.1",))),
        show(lambda: s.sendmsg(iter([b"a", b"b"]))), show(lambda: s.setblocking(0)), show(lambda: s.listen()),
        show(lambda: s.close()), show(lambda: s.close()), show(lambda: s.send(b"x")),
    ]))
"""


def test_errors_and_results_reach_the_program_as_without_tracing(tmp_path):
    done, header, records = traced(MISUSE, tmp_path)
    assert done.stdout == run(MISUSE, trace=None).stdout
    named = [(r["call"], r["returned"], r["errno"]) for r in records if r["call"] != "outq"]
    assert ("recv", -1, "ENOTCONN") in named and ("recv", -1, "TypeError") in named
    assert ("recv_into", -1, "ValueError") in named and ("settimeout", -1, "ValueError") in named
    assert ("sendto", -1, "gaierror") in named and ("send", -1, "EBADF") in named


class _Originals:
    """Stand-ins for socket.socket's methods: each returns or raises what a test gave it."""

    outcome: object = None

    def _answer(self, *args, **kwargs):
        if isinstance(_Originals.outcome, BaseException):
            raise _Originals.outcome
        return _Originals.outcome


for _name in (*SOCKET_CALLS, "__init__"):
    setattr(_Originals, _name, _Originals._answer)


def test_the_wrappers_pass_on_the_very_exception_and_result_of_the_call(tmp_path):
    session = usertrace._Session(str(tmp_path / "t.gz"))
    records: list[tuple] = []
    tools = usertrace._instruments(session, time.perf_counter, 0.0, None, None, None)
    tools.record_with(records.append)
    methods = tools.socket_methods(_socket.socket, _Originals)
    with socket.socket() as sock:
        error = ConnectionResetError(104, "reset")
        _Originals.outcome = error
        with pytest.raises(ConnectionResetError) as raised:
            methods["recv"](sock, 10)
        assert raised.value is error
        interrupt = KeyboardInterrupt()
        _Originals.outcome = interrupt
        with pytest.raises(KeyboardInterrupt) as raised:
            methods["accept"](sock)
        assert raised.value is interrupt
        result = (b"abc", ("127.0.0.1", 9))
        _Originals.outcome = result
        assert methods["recvfrom"](sock, 10) is result
        _Originals.outcome = 7
        assert methods["send"](sock, memoryview(b"x" * 40)[::2]) == 7
    assert [(r[2], r[3], r[4], r[5]) for r in records] == [
        ("recv", 10, -1, "ECONNRESET"), ("accept", 0, -1, "KeyboardInterrupt"), ("recvfrom", 10, 3, ""),
        ("send", 20, 7, "")]
    assert len({r[1] for r in records}) == 1


def test_threads_are_traced_call_by_call(tmp_path):
    done, header, records = traced("""
        import socket, threading
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4)
        def client(i):
            with socket.create_connection(srv.getsockname()) as c:
                c.sendall(bytes(100 + i))
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        got = []
        for _ in threads:
            conn, _ = srv.accept()
            with conn:
                data = b""
                while chunk := conn.recv(1000):
                    data += chunk
                got.append(len(data))
        for t in threads:
            t.join()
        print(sorted(got))
    """, tmp_path)
    assert done.stdout == "[100, 101, 102, 103]\n"
    assert sorted(r["asked"] for r in calls(records, "sendall")) == [100, 101, 102, 103]
    assert len(calls(records, "connect")) == 4 and len(calls(records, "accept")) == 4
    assert sum(r["returned"] for r in calls(records, "recv")) == 406
    assert [s["kind"] for s in header["sockets"]].count("connect") == 4


def test_a_forked_child_runs_untraced_and_never_writes_the_parents_trace(tmp_path):
    trace = tmp_path / "program.trace.gz"
    done = run("""
        import os, select, selectors, socket, sys
        a, b = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            a.send(b"x" * 777)
            with selectors.DefaultSelector() as sel:
                sel.register(b, selectors.EVENT_READ)
                print("child", type(select.select).__name__, type(vars(selectors.SelectSelector)["_select"]).__name__,
                      selectors.PollSelector._selector_cls is select.poll, len(sel.select(5)), flush=True)
            sys.exit(0)  # atexit runs in the child too
        os.waitpid(pid, 0)
        print(os.path.exists(sys.argv[1]), len(b.recv(1000)), flush=True)
        a.send(b"y" * 555)
    """, str(trace), trace=trace)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == "child builtin_function_or_method builtin_function_or_method True 1\nFalse 777\n"
    header, records = read_trace(str(trace))
    assert [r["asked"] for r in calls(records, "send")] == [555]
    assert [r["returned"] for r in calls(records, "recv")] == [777]
    assert header["pid"] != 0


def test_a_server_stopped_by_sigterm_still_writes_its_trace(tmp_path):
    trace = tmp_path / "server.trace.gz"
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        print(srv.getsockname()[1], flush=True)
        while True:
            conn, _ = srv.accept()
            conn.recv(100)
            conn.close()
    """)], env=child_env(BASE_ENV, str(trace)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"bye")
            assert client.recv(10) == b""  # the server closed: it goes back to accept()
        time.sleep(0.2)  # and waits there
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        server.kill()
        server.wait()
    assert server.stderr.read() == ""
    header, records = read_trace(str(trace))
    accepts = calls(records, "accept")
    assert [(r["returned"], r["errno"]) for r in accepts] == [(0, ""), (-1, "SystemExit")]
    assert [r["returned"] for r in calls(records, "recv")] == [3]


def test_a_trace_that_cannot_be_written_leaves_the_program_running_untraced(tmp_path):
    program = """
        import socket, sys
        a, b = socket.socketpair()
        a.send(b"abc")
        print(b.recv(10).decode(), end="")
        sys.exit(3)
    """
    nowhere = tmp_path / "missing" / "t.gz"
    done = run(program, trace=nowhere)
    assert (done.returncode, done.stdout) == (3, "abc")
    assert done.stderr == f"socklab: tracing is off: cannot write the trace {nowhere}: {nowhere.parent} is not a directory\n"
    assert not nowhere.parent.exists()
    # The package cannot even be imported: the same one line.
    env = child_env(BASE_ENV, str(tmp_path / "t.gz"))
    env["PYTHONPATH"] = INJECT_DIR
    done = run(program, trace=None, env=env)
    assert (done.returncode, done.stdout) == (3, "abc")
    assert done.stderr == "socklab: tracing is off: No module named 'socklab'\n"
    # Its directory gone by the end: one line at exit.
    gone = tmp_path / "gone"
    gone.mkdir()
    done = run(program.replace('print(', f'import shutil; shutil.rmtree({str(gone)!r}); print('), trace=gone / "t.gz")
    assert (done.returncode, done.stdout) == (3, "abc")
    assert done.stderr.startswith("socklab: trace not written: ") and done.stderr.count("\n") == 1


def test_the_python_programs_a_traced_program_starts_are_not_traced(tmp_path):
    trace = tmp_path / "t.gz"
    env = child_env(BASE_ENV, str(trace))
    done = run("""
        import os, subprocess, sys
        print(os.environ.get("SOCKLAB_TRACE_FILE"), type(__import__("select").select).__name__)
        child = "import os, select; print(os.environ.get('SOCKLAB_TRACE_FILE'), type(select.select).__name__)"
        sys.stdout.flush()
        subprocess.run([sys.executable, "-c", child], check=True)
    """, trace=None, env=env)
    assert done.stderr == ""
    assert done.stdout == "None staticmethod\nNone builtin_function_or_method\n"
    header, records = read_trace(str(trace))  # the parent's, with the child's poll() of its pipes
    assert header["pid"] > 0


def test_the_sitecustomize_it_hides_still_runs(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITE = __name__\n")
    program = tmp_path / "prog.py"
    program.write_text("import builtins, select; print(builtins.OTHER_SITE, type(select.select).__name__)\n")
    env = child_env({**BASE_ENV, "PYTHONPATH": str(other)}, str(tmp_path / "t.gz"))
    done = subprocess.run([sys.executable, str(program)], env=env, capture_output=True, text=True, timeout=30)
    assert (done.stdout, done.stderr) == ("sitecustomize staticmethod\n", "")
    header, _ = read_trace(str(tmp_path / "t.gz"))
    assert header["program"] == str(program)


def test_the_overhead_probe_reports_each_call_kind(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "probes" / "tracer_overhead.py"),
                           "--calls", "2000", "--repeats", "2", "--runs", "1"],
                          capture_output=True, text=True, timeout=60, env=BASE_ENV)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert set(found) >= {"send", "recv", "setblocking"}
    for kind in ("send", "recv", "setblocking"):
        row = found[kind]
        assert row["untraced_us"] > 0 and row["traced_us"] > 0
        assert row["added_us"] == pytest.approx(row["traced_us"] - row["untraced_us"], abs=0.002)
