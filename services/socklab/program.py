"""python -m socklab program: run a program of the user's as a lab role, reported like a built-in one.

    python -m socklab program --role client|server [--trace-with python|strace|none]
        [--trace FILE] [--output-dir DIR] [--drain-wait DURATION] [--name NAME]
        [--port PORT] -- ARGV ...

ARGV runs as a child process, in its own process group, with stdin from
/dev/null. Its stdout and stderr pass through here line by line (so the
container's log shows them; a line that would read as a socklab result line is
prefixed with ``program: ``), are kept whole in DIR/stdout and DIR/stderr, and
their last lines go into the result. SIGTERM, SIGINT and SIGHUP (and SIGUSR1,
SIGUSR2) are forwarded to the child's process group; one that arrives after the
program has ended cuts the drain wait short. Python programs get
PYTHONUNBUFFERED=1 (unless it is set already), so that their lines reach the
log as they are printed.

Socket calls are traced (``--trace-with``):

* ``python`` (default): socklab.usertrace injects a tracer into the program's
  Python (a sitecustomize on PYTHONPATH), which writes FILE when it exits;
* ``strace``: the program runs under strace (seccomp-filtered, so only the
  traced system calls stop it), whose output (FILE.strace, kept) is converted
  into the same records (read/write on a TCP socket are recv/send) and written
  to FILE. Each traced call then costs about 0.1 ms more (ptrace stops; see
  bench/probes/strace_overhead.py), and strace's own CPU time counts in cpu_s;
* ``none``: nothing is traced; every field made from the trace is null.

Without ``--trace`` the trace goes to DIR/trace.gz. With ``--role server
--port PORT`` this role prints the built-in server's "listening" line on
stderr as soon as something listens on PORT in this network namespace.

When the program has exited, this role waits (at most ``--drain-wait``,
default 60s) until no TCP socket here still holds unsent or unacknowledged
data or an unacknowledged FIN: a container's network dies with its last
process, and the kernel of a normal host would have delivered those bytes.

Then it prints one result line, with the fields of a built-in client or server
(see :func:`build_result`), and exits with the program's status (128+N for a
program killed by signal N), except a server that a forwarded SIGTERM or
SIGINT stopped: 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

from . import RESULT_KEY
from .cli import ArgumentParser, duration_arg, port_arg
from .errors import SocklabError, UsageError
from .results import FILE_END, FILE_LINE, emit_result, find_results
from .servers.lifecycle import LISTENING_LINE
from .trace import Tracer, read_trace

DEFAULT_OUTPUT_DIR = "/tmp/socklab-program"
DEFAULT_DRAIN_WAIT_S = 60.0
TRACE_CHOICES = ("python", "strace", "none")
# Those the entrypoint forwards here: they are meant for the program.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# A forwarded signal that stops a server: its end is then the expected one.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# What the result keeps of each output stream.
TAIL_LINES = 20
TAIL_CHARS = 2000
# The longest piece of a line read at once; a longer line passes in pieces.
LINE_LIMIT_BYTES = 64 * 1024
# Put before a child's line that would read as one of socklab's own lines.
GUARD_PREFIX = b"program: "
# How long the output threads may take to finish once the program has exited
# (a process it left behind may hold the pipes open for ever).
PUMP_JOIN_S = 2.0
POLL_S = 0.02

# Record names (socklab.trace) by what they do.
SEND_CALLS = frozenset({"send", "sendall", "sendto", "sendmsg"})
RECV_CALLS = frozenset({"recv", "recv_into", "recvfrom", "recvfrom_into"})
CONNECT_CALLS = frozenset({"connect", "connect_ex"})
WAIT_CALLS = frozenset({"select", "poll", "epoll"})
# Calls whose success says nothing about a pending connect having completed.
_NOT_CONNECT_EVIDENCE = frozenset({"outq", "close", "setblocking", "settimeout", "listen", "accept"})
_IN_PROGRESS = frozenset({"EINPROGRESS", "EALREADY", "EAGAIN", "EWOULDBLOCK"})
_CONNECT_FAILURES = frozenset({"ECONNREFUSED", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "ECONNRESET",
                               "ECONNABORTED", "timeout"})
_EAGAIN = frozenset({"EAGAIN", "EWOULDBLOCK"})
_RESET = frozenset({"ECONNRESET", "EPIPE"})


# --------------------------------------------------------------------------
# The command line


def _drain_arg(text: str) -> float:
    value = duration_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def build_parser() -> ArgumentParser:
    """The role's options (the program's ARGV follows ``--``)."""
    p = ArgumentParser(prog="socklab program", description=__doc__.splitlines()[0],
                       usage="socklab program --role client|server [options] -- ARGV ...")
    p.add_argument("--role", required=True, choices=("client", "server"),
                   help="what the program is in the lab, and so which result it gets")
    p.add_argument("--trace-with", choices=TRACE_CHOICES, default="python",
                   help="how its socket calls are traced (default python)")
    p.add_argument("--trace", metavar="FILE", help="where the socket-call trace is written "
                   "(gzip JSON lines; default OUTPUT_DIR/trace.gz)")
    p.add_argument("--output-dir", metavar="DIR", default=DEFAULT_OUTPUT_DIR,
                   help=f"where the program's whole stdout and stderr are kept (default {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--drain-wait", type=_drain_arg, default=DEFAULT_DRAIN_WAIT_S, metavar="DURATION",
                   help="bound on waiting for the sockets' send queues to empty after the program "
                        "exits (default 60s)")
    p.add_argument("--name", help="what the result calls the program (default: its script's or "
                                  "command's file name)")
    p.add_argument("--port", type=port_arg,
                   help="server only: say 'listening' on stderr once something listens on PORT")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options and the program's ARGV (UsageError on any mistake)."""
    argv = list(argv)
    parser = build_parser()
    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            parser.print_help()
            raise SystemExit(0)
        parser.error("give the program to run after --, e.g. -- python3 client.py")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("give the program to run after --, e.g. -- python3 client.py")
    if args.port is not None and args.role != "server":
        parser.error("--port applies to --role server only")
    return args, command


_PYTHON = re.compile(r"python[0-9.]*")
_PYTHON_OPTIONS_WITH_VALUE = frozenset({"-W", "-X", "-Q"})


def program_name(argv: Sequence[str]) -> str:
    """What a program is called by default: its script's file name under Python (the module
    of ``-m``), else its command's."""
    base = os.path.basename(argv[0])
    if not _PYTHON.fullmatch(base):
        return base
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" and i + 1 < len(argv):
            return argv[i + 1]
        if arg == "-c":
            return base
        if arg in _PYTHON_OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-") and arg != "-":
            i += 1
            continue
        return os.path.basename(arg)
    return base


# --------------------------------------------------------------------------
# The program's output


def needs_guard(piece: bytes, whole_line: bool) -> bool:
    """Whether a child's line (or the first piece of a long one) must not pass verbatim:
    it would read as a socklab result line, or a line of a file sent through the log."""
    stripped = piece.strip()
    if stripped.startswith((FILE_LINE.encode(), FILE_END.encode())):
        return True
    if not stripped.startswith(b"{"):
        return False
    if not whole_line:  # the rest is unseen: a result line cannot be ruled out
        return True
    return RESULT_KEY.encode() in stripped and bool(find_results(stripped.decode("utf-8", "replace")))


def tail_text(lines: Iterable[str], max_lines: int = TAIL_LINES, max_chars: int = TAIL_CHARS) -> str:
    """The last ``max_lines`` lines, joined, cut to their last ``max_chars`` characters."""
    kept = list(lines)[-max_lines:] if max_lines > 0 else []
    text = "\n".join(kept)
    return text[-max_chars:] if len(text) > max_chars else text


def last_nonempty_line(lines: Iterable[str]) -> str | None:
    """The last line with something other than white space in it, stripped."""
    for line in reversed(list(lines)):
        if line.strip():
            return line.strip()
    return None


class OutputPump(threading.Thread):
    """Reads one of the child's streams: passes it on line by line, keeps it whole, keeps its tail.

    ``sink`` is this process's stream (binary); ``lock`` serializes writes to it
    with the result line. ``silence()`` stops the passing on (the saving goes on).
    """

    def __init__(self, source: BinaryIO, sink: BinaryIO | None, save_path: str,
                 lock: threading.Lock, name: str) -> None:
        super().__init__(name=f"socklab-{name}", daemon=True)
        self.source = source
        self.sink = sink
        self.save_path = save_path
        self.lock = lock
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._passing = True
        self.error: str | None = None

    def silence(self) -> None:
        self._passing = False

    def run(self) -> None:
        at_line_start = True
        try:
            saved = open(self.save_path, "wb")
        except OSError as exc:
            self.error = f"cannot keep the program's output in {self.save_path}: {exc.strerror or exc}"
            saved = None
        try:
            while True:
                piece = self.source.readline(LINE_LIMIT_BYTES)
                if not piece:
                    break
                whole = piece.endswith(b"\n")
                if saved is not None:
                    saved.write(piece)
                    saved.flush()
                out = GUARD_PREFIX + piece if at_line_start and needs_guard(piece, whole) else piece
                self._keep(piece.decode("utf-8", "replace").rstrip("\r\n"), at_line_start)
                if self.sink is not None and self._passing:
                    with self.lock:
                        if self._passing:
                            try:
                                self.sink.write(out)
                                self.sink.flush()
                            except (OSError, ValueError):  # our own output is gone: keep saving
                                self.sink = None
                at_line_start = whole
        finally:
            if saved is not None:
                saved.close()

    def _keep(self, text: str, new_line: bool) -> None:
        if new_line or not self.lines:
            self.lines.append(text[-TAIL_CHARS:])
        else:
            self.lines[-1] = (self.lines[-1] + text)[-TAIL_CHARS:]

    def tail(self) -> str:
        return tail_text(list(self.lines))

    def last_line(self) -> str | None:
        return last_nonempty_line(list(self.lines))


# --------------------------------------------------------------------------
# The kernel's TCP socket tables

SOCKET_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
LISTEN = 0x0A
ESTABLISHED = 0x01
# States holding a FIN of ours that the peer has not acknowledged yet.
FIN_UNACKED = frozenset({0x04, 0x0B, 0x09})  # FIN_WAIT1, CLOSING, LAST_ACK


@dataclass(frozen=True)
class TcpRow:
    """One socket of /proc/net/tcp{,6}."""

    local: str
    remote: str
    state: int
    tx_queue: int


def _hex_address(text: str) -> str:
    """``0100007F:1F90`` -> ``127.0.0.1:8080``; IPv6 as ``[::1]:8080`` (the kernel prints
    the address as 32-bit words in host order)."""
    addr, _, port = text.rpartition(":")
    raw = bytes.fromhex(addr)
    port_n = int(port, 16)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw)}:{port_n}"
    words = raw
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{port_n}"


def parse_tcp_table(text: str) -> list[TcpRow]:
    """The sockets of /proc/net/tcp or tcp6 text (header lines and garbage skipped)."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0].endswith(":") or ":" not in fields[4]:
            continue
        try:
            rows.append(TcpRow(local=_hex_address(fields[1]), remote=_hex_address(fields[2]),
                               state=int(fields[3], 16), tx_queue=int(fields[4].split(":")[0], 16)))
        except ValueError:
            continue
    return rows


def pending_sends(text: str) -> tuple[int, int]:
    """(sockets, bytes) still to be delivered: established sockets with a send queue, and sockets
    whose FIN is unacknowledged (FIN_WAIT1, CLOSING, LAST_ACK). ``bytes`` sums their tx_queue
    (sent but unacknowledged, or not sent yet; a queued FIN may count as one)."""
    sockets = unsent = 0
    for row in parse_tcp_table(text):
        if row.state in FIN_UNACKED or (row.state == ESTABLISHED and row.tx_queue > 0):
            sockets += 1
            unsent += row.tx_queue
    return sockets, unsent


# Closed, as far as a capture is concerned: nothing more will cross the wire (TIME_WAIT only
# answers a retransmitted FIN), or nothing ever did (a listener).
_QUIET_STATES = frozenset({0x06, 0x07, LISTEN})  # TIME_WAIT, CLOSE, LISTEN


def open_connections(text: str) -> tuple[int, int]:
    """(sockets, bytes) of connections not yet closed at both ends: established, closing or
    half-closed, waiting for the peer's FIN; ``bytes`` as in :func:`pending_sends`."""
    rows = [row for row in parse_tcp_table(text) if row.state not in _QUIET_STATES]
    return len(rows), sum(row.tx_queue for row in rows)


def read_tables(paths: Sequence[str] = SOCKET_TABLES) -> str:
    """The text of every socket table there is (no IPv6 in this kernel: no tcp6)."""
    parts = []
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                parts.append(fh.read())
        except OSError:
            continue
    return "\n".join(parts)


def drain_wait(read: Callable[[], str], bound_s: float, *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep, poll_s: float = POLL_S,
               stop: Callable[[], bool] = lambda: False,
               pending: Callable[[str], tuple[int, int]] = pending_sends) -> dict[str, Any]:
    """Wait until no socket has anything left to deliver, at most ``bound_s`` (or until ``stop()``).

    ``pending``: what still counts, from the tables' text (:func:`pending_sends`; a capture
    waits for :func:`open_connections`, so that the peer's FIN is in it too).

    ``{"s": seconds waited, "unsent_bytes": bytes still queued when it gave up (0 when
    complete), "complete": whether everything was delivered}``.
    """
    start = clock()
    deadline = start + bound_s
    while True:
        sockets, unsent = pending(read())
        now = clock()
        if sockets == 0:
            return {"s": round(now - start, 3), "unsent_bytes": 0, "complete": True}
        if now >= deadline - 1e-9 or stop():
            return {"s": round(now - start, 3), "unsent_bytes": unsent, "complete": False}
        sleep(min(poll_s, deadline - now))


def listening_address(text: str, port: int) -> str | None:
    """The address something listens on at ``port``, from socket-table text, or None."""
    for row in parse_tcp_table(text):
        if row.state == LISTEN and row.local.rsplit(":", 1)[1] == str(port):
            return row.local
    return None


# --------------------------------------------------------------------------
# The result line


@dataclass(frozen=True)
class ProgramRun:
    """How the program ran: what the result says beside what its trace shows."""

    name: str
    argv: Sequence[str]
    traced: str                 # python, strace or none: what was asked
    returncode: int             # as subprocess says it: -N when signal N killed it
    status: int                 # this role's exit status
    wall_s: float
    cpu_s: float | None
    stdout_tail: str = ""
    stderr_tail: str = ""
    last_error_line: str | None = None  # the last non-empty line on stderr
    peak_rss_kib: int | None = None
    stopped_by_signal: bool = False     # a stop signal was forwarded to it
    trace_error: str | None = None      # why a trace that was asked for is missing


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def role_status(role: str, returncode: int, forwarded: Iterable[int]) -> int:
    """This role's exit status: the program's (128+N for signal N), but 0 for a server that a
    stop signal (SIGTERM, SIGINT) we forwarded ended: killed by it, exiting with 128+it or 0."""
    code = returncode if returncode >= 0 else 128 - returncode
    if role == "server":
        stops = set(forwarded) & set(STOP_SIGNALS)
        if any(returncode in (0, -s, 128 + s) for s in stops):
            return 0
    return code


def _errors(run: ProgramRun) -> list[str]:
    if run.status == 0:
        return []
    if run.returncode < 0:
        return [f"killed by {signal_name(-run.returncode)}"]
    return [run.last_error_line or f"exited {run.returncode}"]


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _ok(record: Mapping[str, Any]) -> bool:
    return record["returned"] >= 0 and not record["errno"]


def _normal_peer(address: str | None) -> str | None:
    """``[::ffff:10.0.0.2]:5000`` -> ``10.0.0.2:5000`` (an IPv4 peer of a dual-stack socket),
    so that it matches the address the client itself reports."""
    if address and address.startswith("[::ffff:") and "." in address:
        host, _, port = address[len("[::ffff:"):].partition("]:")
        return f"{host}:{port}"
    return address


class _Sock:
    """What the trace says of one socket."""

    __slots__ = ("sent", "received", "send_calls", "last_send", "connect_tried",
                 "pending_since", "ready_at", "connected", "connect_s", "closed_at",
                 "first_at", "eof", "reset")

    def __init__(self) -> None:
        self.sent = self.received = self.send_calls = 0  # bytes send calls accepted, recv calls returned
        self.last_send: tuple[int, int] | None = None  # (asked, returned) of the last send-family call
        self.connect_tried = False
        self.pending_since: float | None = None  # start of a non-blocking connect in progress
        self.ready_at: float | None = None       # end of the first ready wait after it
        self.connected = False
        self.connect_s: float | None = None
        self.closed_at: float | None = None
        self.first_at: float | None = None
        self.eof = self.reset = False


@dataclass
class TraceSummary:
    """Totals over a trace's records (see :func:`summarize_trace`)."""

    socks: dict[int, _Sock]
    calls: dict[str, int]
    send_calls: int
    bytes_accepted: int
    bytes_requested: int
    eagain: int
    timeouts: int
    send_s: float
    blocked_s: float
    accepts: list[tuple[float, int]]  # (end, conn) of each successful accept, in order


def summarize_trace(records: Iterable[Mapping[str, Any]]) -> TraceSummary:
    """One pass over the records (in time order), per socket and in total.

    A connect's time (``connect_s`` of its socket): a successful blocking
    connect's duration; for a non-blocking one (EINPROGRESS), from the start of
    that call to the end of whichever comes first, the first later wait that
    returned ready (on that socket, or shared: conn -1) or the first later
    successful call on the socket (a connect_ex saying EISCONN included). It
    counts as connected only once a successful call on it follows; a connect
    failure (ECONNREFUSED, ...) on it clears it.
    """
    socks: dict[int, _Sock] = {}
    pending: dict[int, _Sock] = {}  # sockets with a non-blocking connect in progress
    calls: collections.Counter[str] = collections.Counter()
    send_calls = accepted = eagain = timeouts = 0
    send_s = blocked_s = 0.0
    accepts: list[tuple[float, int]] = []
    for r in records:
        call, conn, n = r["call"], r["conn"], r.get("n", 1) or 1
        t, dur, err = r["t_s"], r["dur_s"], r["errno"] or ""
        if call == "outq":
            continue
        calls[call] += n
        blocked_s += dur
        if err.lower() == "timeout":
            timeouts += n
        if call in WAIT_CALLS:
            if r["returned"] > 0:
                for c, s in pending.items():
                    if (conn < 0 or conn == c) and s.ready_at is None and t >= s.pending_since:
                        s.ready_at = t + dur
            continue
        if conn < 0:
            continue
        s = socks.get(conn)
        if s is None:
            s = socks[conn] = _Sock()
            s.first_at = t
        end = t + dur
        if call in SEND_CALLS:
            send_calls += n
            send_s += dur
            s.send_calls += n
            returned = r["returned"]
            if returned > 0:
                s.sent += returned * n
                accepted += returned * n
            s.last_send = (r["asked"], returned)
            if err in _EAGAIN:
                eagain += n
        elif call in RECV_CALLS:
            if r["returned"] > 0:
                s.received += r["returned"] * n
            elif r["returned"] == 0 and not err:
                s.eof = True
        elif call == "accept" and _ok(r):
            accepts.append((end, conn))
        elif call == "close" and _ok(r):
            s.closed_at = t  # the last close: a forked server's parent closes its copy first
        if err in _RESET:
            s.reset = True
        if call in CONNECT_CALLS:
            s.connect_tried = True
            if _ok(r) or err == "EISCONN":
                if not s.connected:
                    if s.pending_since is not None:
                        s.connect_s = (s.ready_at or end) - s.pending_since
                    else:
                        s.connect_s = dur
                    s.connected = True
                pending.pop(conn, None)
            elif err in _IN_PROGRESS:
                if s.pending_since is None and not s.connected:
                    s.pending_since, s.ready_at = t, None
                    pending[conn] = s
            else:
                s.pending_since = None
                pending.pop(conn, None)
            continue
        if conn in pending:
            if err in _CONNECT_FAILURES:
                s.pending_since = None
                del pending[conn]
            elif _ok(r) and call not in _NOT_CONNECT_EVIDENCE:
                s.connect_s = (s.ready_at or end) - s.pending_since
                s.connected = True
                s.pending_since = None
                del pending[conn]
    requested = 0
    for s in socks.values():
        if s.last_send is not None:
            asked, returned = s.last_send
            requested += s.sent + (asked - returned if returned >= 0 else asked)
    return TraceSummary(socks=socks, calls=dict(calls), send_calls=send_calls, bytes_accepted=accepted,
                        bytes_requested=requested, eagain=eagain, timeouts=timeouts, send_s=send_s,
                        blocked_s=blocked_s, accepts=sorted(accepts))


def _max_concurrent(spans: Iterable[tuple[float, float | None]]) -> int:
    events = []
    for opened, closed in spans:
        events.append((opened, 1))
        if closed is not None:
            events.append((closed, -1))
    events.sort()  # a close before an open at the same instant
    current = most = 0
    for _, delta in events:
        current += delta
        most = max(most, current)
    return most


def build_result(role: str, header: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]] | None,
                 run: ProgramRun, drain: Mapping[str, Any]) -> dict[str, Any]:
    """The role's result line (without the result key): pure, from the trace and how the program ran.

    ``header``/``records``: the trace (socklab.trace format); None when there is
    none, and then every field made from it is null. A client has the fields of
    a built-in client: ``connections`` (sockets that connected),
    ``bytes_requested`` (per socket: what its send calls had accepted plus what
    its last send call left unaccepted), ``bytes_accepted`` (bytes send calls
    returned), ``send_calls`` and ``eagain`` (send, sendall, sendto, sendmsg),
    ``timeouts`` (calls that timed out), ``send_s``, ``blocked_s`` (time inside
    every traced call and wait), ``connect_s`` (mean over the sockets that
    connected; see :func:`summarize_trace`); ``bytes_delivered``,
    ``goodput_bps``, ``latency_ms``, ``tcp``, ``sndbuf_bytes`` and
    ``rcvbuf_bytes`` are null (a program reads no trailer: the orchestrator
    fills ``bytes_delivered`` from the server's side). A server has
    ``connections`` (accepted sockets), ``bytes_received`` and ``bytes_sent``
    on them, ``max_concurrent`` (most open at once, from accept to close) and
    ``per_connection``. Both have ``program`` (name, argv, exit_code, signal,
    traced, output tails, sockets, calls), ``drain`` and ``errors`` ([] when the
    role's status is 0, else why: "killed by SIGNAL", or the program's last
    stderr line, or "exited N").
    """
    traced = header is not None and records is not None
    summary = summarize_trace(records) if traced else None
    sockets = list(header.get("sockets") or []) if traced and header.get("sockets") is not None else None
    kinds = {s.get("conn"): s.get("kind") for s in sockets or ()}
    signum = -run.returncode if run.returncode < 0 else None
    program = {
        "name": run.name,
        "argv": list(run.argv),
        "exit_code": None if signum else run.returncode,
        "signal": signal_name(signum) if signum else None,
        "traced": run.traced,
        "stdout_tail": run.stdout_tail,
        "stderr_tail": run.stderr_tail,
        "sockets": sockets,
        "calls": dict(sorted(summary.calls.items())) if summary else None,
        "peak_rss_kib": run.peak_rss_kib,
        "trace_error": run.trace_error,
    }
    if role == "client":
        result = _client_fields(summary, kinds, run)
    else:
        result = _server_fields(summary, sockets, run)
    result["program"] = program
    result["drain"] = dict(drain)
    result["errors"] = _errors(run)
    return result


def _client_fields(summary: TraceSummary | None, kinds: Mapping[Any, Any], run: ProgramRun) -> dict[str, Any]:
    connections = connect_s = None
    if summary is not None:
        connected = [s for c, s in summary.socks.items() if s.connected or (
            kinds.get(c) == "connect" and not s.connect_tried and s.pending_since is None
            and (s.sent or s.received or s.eof))]
        connections = len(connected)
        times = [s.connect_s for s in connected if s.connect_s is not None]
        connect_s = sum(times) / len(times) if times else None
    def traced(field: str) -> Any:
        return None if summary is None else getattr(summary, field)
    return {
        "role": "client",
        "mode": "program",
        "workload": "program",
        "connections": connections,
        "bytes_requested": traced("bytes_requested"),
        "bytes_accepted": traced("bytes_accepted"),
        "bytes_delivered": None,
        "send_calls": traced("send_calls"),
        "eagain": traced("eagain"),
        "timeouts": traced("timeouts"),
        "send_s": _round(summary.send_s) if summary else None,
        "blocked_s": _round(summary.blocked_s) if summary else None,
        "wall_s": _round(run.wall_s),
        "cpu_s": _round(run.cpu_s),
        "goodput_bps": None,
        "connect_s": _round(connect_s),
        "latency_ms": None,
        "tcp": None,
        "sndbuf_bytes": None,
        "rcvbuf_bytes": None,
    }


def _carried_data(s: _Sock) -> bool:
    return bool(s.send_calls or s.received or s.eof)


def _accept_times(summary: TraceSummary, accepted: Sequence[int]) -> dict[int, float | None]:
    """When each accepted socket opened: the end of the accept that returned it.

    An accept is recorded on the socket it returned (strace) or on the listener
    (the Python tracer, which numbers sockets in order of first sight, an accepted
    one right after its accept): then the k-th accepted socket is paired with the
    k-th accept of a listener. A socket left without one opened at its first record.
    """
    wanted = set(accepted)
    times: dict[int, float | None] = {}
    on_listeners = []
    for end, conn in summary.accepts:
        if conn in wanted and conn not in times:
            times[conn] = end
        elif conn not in wanted:
            on_listeners.append(end)
    unpaired = sorted(c for c in accepted if c not in times)
    for conn, end in zip(unpaired, on_listeners):
        times[conn] = end
    for conn in accepted:
        if times.get(conn) is None:
            s = summary.socks.get(conn)
            times[conn] = s.first_at if s is not None else None
    return times


def _server_fields(summary: TraceSummary | None, sockets: list[dict] | None,
                   run: ProgramRun) -> dict[str, Any]:
    result: dict[str, Any] = {"role": "server", "mode": "program", "workload": "program"}
    per_connection = None
    if summary is not None:
        if sockets is not None:
            accepted = [s.get("conn") for s in sockets if s.get("kind") == "accept"]
            peers = {s.get("conn"): s.get("peer") for s in sockets}
        else:  # a trace without its sockets: accept records on sockets that carried data
            accepted = sorted({conn for _, conn in summary.accepts if _carried_data(summary.socks[conn])})
            peers = {}
        opened = _accept_times(summary, accepted)
        per_connection = []
        spans = []
        for conn in accepted:
            s = summary.socks.get(conn) or _Sock()
            start = opened.get(conn)
            if start is not None:
                spans.append((start, s.closed_at))
            closed_by = "reset" if s.reset else "eof" if s.eof else "close" if s.closed_at is not None else None
            per_connection.append({
                "peer": _normal_peer(peers.get(conn)),
                "bytes_received": s.received,
                "bytes_sent": s.sent,
                "start_s": _round(start),
                "end_s": _round(s.closed_at),
                "closed_by": closed_by,
            })
        result.update({
            "connections": len(accepted),
            "bytes_received": sum(c["bytes_received"] for c in per_connection),
            "bytes_sent": sum(c["bytes_sent"] for c in per_connection),
            "cpu_s": _round(run.cpu_s),
            "max_concurrent": _max_concurrent(spans),
        })
    else:
        result.update({"connections": None, "bytes_received": None, "bytes_sent": None,
                       "cpu_s": _round(run.cpu_s), "max_concurrent": None})
    result.update({
        "threads_max": None,
        "peak_rss_kib": run.peak_rss_kib,
        "idle_timeouts": None,
        "wall_s": _round(run.wall_s),
        "stopped_by": "signal" if run.stopped_by_signal else "exit",
        "per_connection": per_connection,
    })
    return result


# --------------------------------------------------------------------------
# strace

# The system calls traced: every way a socket is connected, accepted, written,
# read, waited for, made non-blocking (Python's setblocking is ioctl FIONBIO)
# and closed. read/write/close also see files; only TCP sockets become records.
STRACE_SYSCALLS = (
    "connect", "accept", "accept4", "listen", "shutdown", "close",
    "sendto", "sendmsg", "write", "writev", "recvfrom", "recvmsg", "read", "readv",
    "select", "pselect6", "poll", "ppoll", "epoll_wait", "epoll_pwait",
    "ioctl", "fcntl",
)
STRACE_MISSING = "trace: strace needs strace in the image; it has none"


def strace_command(strace: str, output: str, argv: Sequence[str]) -> list[str]:
    """``argv`` under strace, writing to ``output``: every thread and child (-f), no
    attach/exit messages (-qq), epoch times (-ttt), durations (-T), sockets' addresses
    (-yy), and a seccomp filter so that untraced system calls do not stop the program."""
    return [strace, "-f", "-qq", "-ttt", "-T", "-yy", "--seccomp-bpf", "-o", output,
            "-e", "trace=" + ",".join(STRACE_SYSCALLS), "--", *argv]


_LINE = re.compile(r"(\d+)\s+(\d+(?:\.\d+)?)\s+(.*)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"(?:\.\.\.)?')
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)")
_CALL = re.compile(r"(\w+)\((.*)\)\s+=\s+(.*?)(?:\s+<(\d+(?:\.\d+)?)>)?\s*")
_RETURN = re.compile(r"(-?\d+|0x[0-9a-fA-F]+|\?)(?:<.*?\]>)?(?:\s+(E[A-Z0-9_]+))?")
_TCP_FD = re.compile(r"(\d+)<(TCPv6|TCP):\[(.*?)\]>")
_ANY_FD = re.compile(r"\d+<")
_COUNT_ARG = re.compile(r'\s*,\s*(?:""|NULL|0x[0-9a-fA-F]+)\s*,\s*(\d+)')
_IOV_LEN = re.compile(r"iov_len=(\d+)")
_RESTART = ("ERESTARTSYS", "ERESTARTNOINTR", "ERESTARTNOHAND", "ERESTART_RESTARTBLOCK")
_STRACE_CALLS = {
    "sendto": "send", "write": "send", "writev": "send", "sendmsg": "sendmsg",
    "recvfrom": "recv", "read": "recv", "readv": "recv", "recvmsg": "recv",
    "select": "select", "pselect6": "select", "poll": "poll", "ppoll": "poll",
    "epoll_wait": "epoll", "epoll_pwait": "epoll", "epoll_pwait2": "epoll",
    "accept": "accept", "accept4": "accept", "connect": "connect", "listen": "listen",
    "shutdown": "shutdown", "close": "close",
}
_SHUT = {"SHUT_RD": 0, "SHUT_WR": 1, "SHUT_RDWR": 2}


def _endpoints(text: str) -> tuple[str | None, str | None]:
    """-yy's ``127.0.0.1:5->10.0.0.2:6`` -> (local, peer); ``[::]:5`` -> (local, None);
    an inode number alone (not bound yet) -> (None, None)."""
    if "->" in text:
        local, _, peer = text.partition("->")
        return local, peer
    if ":" in text:
        return text, None
    return None, None


class _StraceSockets:
    """Sockets as descriptors show them. A connected socket is known by its addresses (so a
    forked child's descriptor is its parent's socket); before that by its descriptor, until
    it is closed. accept's descriptor is always a new socket."""

    def __init__(self) -> None:
        self.by_fd: dict[int, int] = {}
        self.by_addr: dict[tuple[str | None, str], int] = {}
        self.info: list[dict[str, Any]] = []

    def get(self, fd: int, annotation: str, *, new: bool = False) -> int:
        local, peer = _endpoints(annotation)
        key = (local, peer) if peer is not None else None
        conn = None
        if not new:
            if key is not None and key in self.by_addr:  # the same connection, whichever process
                conn = self.by_addr[key]
            else:
                conn = self.by_fd.get(fd)
                if conn is not None and key is not None and self.info[conn]["peer"] is not None:
                    conn = None  # another connection under this descriptor
        if conn is None:
            conn = len(self.info)
            self.info.append({"conn": conn, "kind": "other", "local": None, "peer": None})
        self.by_fd[fd] = conn
        if key is not None:
            self.by_addr[key] = conn
        entry = self.info[conn]
        if local is not None:
            entry["local"] = local
        if peer is not None:
            entry["peer"] = peer
        return conn

    def mark(self, conn: int, kind: str) -> None:
        if self.info[conn]["kind"] == "other":
            self.info[conn]["kind"] = kind

    def close(self, fd: int) -> None:
        self.by_fd.pop(fd, None)


def _strace_return(text: str) -> tuple[int, str]:
    """``= 5``, ``= 4<TCP:[...]>``, ``= -1 EAGAIN (...)``, ``= ? ERESTARTSYS (...)`` ->
    (returned, errno name); a call interrupted or cut short by the program's end is EINTR."""
    m = _RETURN.match(text)
    if not m:
        return -1, "EINTR"
    value, err = m.group(1), m.group(2) or ""
    if value == "?" or err in _RESTART:
        return -1, "EINTR"
    returned = int(value, 0)
    if returned < 0:
        return -1, err or "EIO"
    return returned, ""


def parse_strace(text: str, start_epoch: float) -> tuple[list[tuple], list[dict[str, Any]], int | None]:
    """strace output (see :func:`strace_command`) -> (records in socklab.trace's FIELDS order,
    sockets as a trace header lists them, the program's pid).

    ``t_s`` counts from ``start_epoch`` (when the program was started). Only TCP
    sockets (and epoll waits, which name no socket) become records; identical
    failed retries of one call on one socket in a row are merged (``n``), as a
    built-in client merges a busy loop's. ``setblocking``'s ``asked`` is the
    blocking flag set (0: non-blocking).
    """
    socks = _StraceSockets()
    records: list[list] = []
    last_of_conn: dict[int, int] = {}
    unfinished: dict[int, tuple[float, str]] = {}
    first_pid: int | None = None
    last_ts = start_epoch

    def add(ts: float, conn: int, call: str, asked: int, returned: int, err: str, dur: float) -> None:
        index = last_of_conn.get(conn)
        if index is not None and returned == -1:
            prev = records[index]
            if prev[2] == call and prev[3] == asked and prev[4] == -1 and prev[5] == err:
                prev[6] += dur
                prev[7] += 1
                return
        last_of_conn[conn] = len(records)
        records.append([ts - start_epoch, conn, call, asked, returned, err, dur, 1])

    def handle(ts: float, body: str) -> None:
        m = _CALL.fullmatch(body)
        if not m:
            return
        name, args, ret_text, dur_text = m.groups()
        call = _STRACE_CALLS.get(name)
        dur = float(dur_text) if dur_text else max(0.0, last_ts - ts)
        returned, err = _strace_return(ret_text)
        if call in ("select", "poll", "epoll"):
            tcp = [socks.get(int(fd), ann) for fd, _, ann in _TCP_FD.findall(args)]
            if call == "epoll":
                asked = 0
            elif not tcp:
                return  # a wait on files or pipes only
            else:
                asked = len(_ANY_FD.findall(args)) if call == "select" else args.count("fd=")
            conn = tcp[0] if tcp and len(set(tcp)) == 1 else -1
            add(ts, conn, call, asked, returned, err, dur)
            return
        first = _TCP_FD.match(args)
        if first is None:
            return
        fd, annotation, rest = int(first.group(1)), first.group(3), args[first.end():]
        if name in ("ioctl", "fcntl"):
            if name == "ioctl" and "FIONBIO" in rest:
                flag = re.search(r"\[(\d+)\]", rest)
                asked = 0 if flag and flag.group(1) != "0" else 1
            elif name == "fcntl" and "F_SETFL" in rest:
                asked = 0 if "O_NONBLOCK" in rest else 1
            else:
                return
            add(ts, socks.get(fd, annotation), "setblocking", asked, returned, err, dur)
            return
        if call is None:
            return
        if call == "accept":
            listener = socks.get(fd, annotation)
            made = _TCP_FD.match(ret_text)
            if returned >= 0 and made:
                conn = socks.get(int(made.group(1)), made.group(3), new=True)
                socks.mark(conn, "accept")
                add(ts, conn, "accept", 0, 0, "", dur)
            else:
                add(ts, listener, "accept", 0, returned, err, dur)
            return
        conn = socks.get(fd, annotation)
        if call in ("send", "recv", "sendmsg"):
            if name in ("sendto", "write", "recvfrom", "read"):
                count = _COUNT_ARG.match(rest)
                asked = int(count.group(1)) if count else max(returned, 0)
            else:
                asked = sum(int(v) for v in _IOV_LEN.findall(rest)) or max(returned, 0)
            add(ts, conn, call, asked, returned, err, dur)
        elif call == "shutdown":
            how = rest.strip(" ,")
            add(ts, conn, call, _SHUT.get(how, 0), returned, err, dur)
        else:
            if call == "connect":
                socks.mark(conn, "connect")
            elif call == "listen":
                socks.mark(conn, "listen")
            add(ts, conn, call, 0, max(returned, 0) if not err else -1, err, dur)
            if call == "close":
                socks.close(fd)

    for raw in text.splitlines():
        m = _LINE.fullmatch(raw.rstrip())
        if not m:
            continue
        pid, ts, body = int(m.group(1)), float(m.group(2)), m.group(3)
        if first_pid is None:
            first_pid = pid
        last_ts = max(last_ts, ts)
        if body.startswith(("---", "+++")):
            continue
        body = _QUOTED.sub('""', body)
        resumed = _RESUMED.match(body)
        if resumed:
            started = unfinished.pop(pid, None)
            if started is None:
                continue
            ts, body = started[0], started[1] + resumed.group(2)
        if body.endswith("<unfinished ...>"):
            unfinished[pid] = (ts, body[:-len("<unfinished ...>")].rstrip())
            continue
        handle(ts, body)
    for ts, body in unfinished.values():  # cut short by the program's end
        handle(ts, body + ") = ?")
    return [tuple(r) for r in records], socks.info, first_pid


def convert_strace(strace_path: str, trace_path: str, start_epoch: float, name: str) -> None:
    """Write strace's output at ``strace_path`` as a socklab trace at ``trace_path``."""
    with open(strace_path, encoding="utf-8", errors="replace") as fh:
        records, sockets, pid = parse_strace(fh.read(), start_epoch)
    tracer = Tracer(trace_path, lambda: 0.0, 0.0, {
        "mode": "program", "workload": "program", "program": name, "pid": pid, "sockets": sockets,
        "traced": "strace"})
    tracer.header["start_epoch"] = round(start_epoch, 6)
    tracer.records.extend(records)
    tracer.write()


# --------------------------------------------------------------------------
# Running it


class _Forwarder:
    """Signal handlers: forward to the child's process group; once it has ended, a signal
    cuts the drain wait short instead."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.forwarded: list[int] = []
        self.child_done = False
        self.stop_drain = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in FORWARDED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def started(self, pid: int) -> None:
        self.pid = pid
        for signum in list(self.forwarded):  # arrived while it was starting
            self._send(signum)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.child_done:
            self.stop_drain = True
            return
        self.forwarded.append(signum)
        if self.pid is not None:
            self._send(signum)

    def _send(self, signum: int) -> None:
        assert self.pid is not None
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def _child_env(traced: str, trace_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if traced == "python":
        try:
            from .usertrace import child_env
        except ImportError:
            raise UsageError("trace: --trace-with python needs socklab.usertrace, which this "
                             "installation lacks") from None
        env = dict(child_env(os.environ, trace_path))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _watch_listening(port: int, done: threading.Event, say: Callable[[bytes], None]) -> None:
    while not done.is_set():
        address = listening_address(read_tables(), port)
        if address is not None:
            say(f"{LISTENING_LINE} {address} mode=program\n".encode())
            return
        done.wait(POLL_S)


def _read_trace(args: argparse.Namespace, trace_path: str | None, strace_out: str | None,
                start_epoch: float, name: str) -> tuple[dict | None, list | None, str | None]:
    """The trace's header and records, or why there are none."""
    if args.trace_with == "none" or trace_path is None:
        return None, None, None
    try:
        if strace_out is not None:
            if not os.path.exists(strace_out):
                return None, None, f"strace wrote nothing to {strace_out}"
            convert_strace(strace_out, trace_path, start_epoch, name)
        elif not os.path.exists(trace_path):
            return None, None, f"the program wrote no trace to {trace_path} (not Python, or killed before it exited)"
        header, records = read_trace(trace_path)
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        return None, None, f"cannot read the trace {trace_path}: {exc}"
    return header, records, None


def run(args: argparse.Namespace, command: list[str]) -> int:
    """Run the program, wait for its sockets to drain, print the result line; the role's status."""
    name = args.name or program_name(command)
    out_dir = args.output_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise SocklabError(f"cannot make the output directory {out_dir}: {exc.strerror or exc}") from None
    trace_path = args.trace or (os.path.join(out_dir, "trace.gz") if args.trace_with != "none" else None)
    if trace_path is not None:  # a trace left by an earlier run must not pass for this one's
        try:
            os.unlink(trace_path)
        except FileNotFoundError:
            pass
    strace_out = None
    argv = list(command)
    if args.trace_with == "strace":
        strace = shutil.which("strace")
        if strace is None:
            raise UsageError(STRACE_MISSING)
        strace_out = f"{trace_path}.strace"
        argv = strace_command(strace, strace_out, command)
    env = _child_env(args.trace_with, trace_path)

    forwarder = _Forwarder()
    forwarder.install()
    out_lock = threading.Lock()
    stdout = getattr(sys.stdout, "buffer", None)
    stderr = getattr(sys.stderr, "buffer", None)
    start_epoch = time.time()
    started = time.monotonic()
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env, process_group=0)
    except OSError as exc:
        forwarder.restore()
        error = SocklabError(f"cannot run {argv[0]}: {exc.strerror or exc}")
        error.exit_code = 127
        raise error from None
    forwarder.started(child.pid)
    pumps = [OutputPump(child.stdout, stdout, os.path.join(out_dir, "stdout"), out_lock, "stdout"),
             OutputPump(child.stderr, stderr, os.path.join(out_dir, "stderr"), out_lock, "stderr")]
    threads: list[threading.Thread] = list(pumps)
    child_done = threading.Event()
    if args.role == "server" and args.port is not None:
        def say(line: bytes) -> None:
            with out_lock:
                if stderr is not None:
                    stderr.write(line)
                    stderr.flush()
        threads.append(threading.Thread(target=_watch_listening, args=(args.port, child_done, say),
                                        name="socklab-listening", daemon=True))
    # The threads start with the forwarded signals blocked (they inherit the mask): the
    # kernel then delivers them to the main thread, whose wait4 they interrupt so that the
    # handler runs. Delivered to another thread, they would wait for the program's end.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        for thread in threads:
            thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    _, status, usage = os.wait4(child.pid, 0)  # retried across the signals forwarded
    wall_s = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    forwarder.child_done = True
    child_done.set()
    for pump in pumps:
        pump.join(PUMP_JOIN_S)

    drain = drain_wait(read_tables, args.drain_wait, stop=lambda: forwarder.stop_drain)
    header, records, trace_error = _read_trace(args, trace_path, strace_out, start_epoch, name)
    trace_error = trace_error or pumps[0].error or pumps[1].error
    code = role_status(args.role, child.returncode, forwarder.forwarded)
    outcome = ProgramRun(
        name=name, argv=command, traced=args.trace_with, returncode=child.returncode, status=code,
        wall_s=wall_s, cpu_s=usage.ru_utime + usage.ru_stime, stdout_tail=pumps[0].tail(),
        stderr_tail=pumps[1].tail(), last_error_line=pumps[1].last_line(), peak_rss_kib=usage.ru_maxrss,
        stopped_by_signal=any(s in STOP_SIGNALS for s in forwarder.forwarded), trace_error=trace_error)
    result = build_result(args.role, header, records, outcome, drain)
    with out_lock:
        for pump in pumps:
            pump.silence()
        emit_result(result)
    forwarder.restore()
    return code


def main(argv: Sequence[str]) -> int:
    """Run one program as the command line says; print its result line."""
    args, command = parse_args(argv)
    return run(args, command)
