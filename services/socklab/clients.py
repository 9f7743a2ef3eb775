"""python -m socklab client: one client run, in one I/O mode, printing one result line.

    python -m socklab client --mode MODE --host H --port P --workload KIND [options]

Modes: blocking (plain blocking socket, send() in a loop), nonblocking (the
tutorial: one non-blocking send(), whatever it returns), nonblocking-spin
(retry at once on EAGAIN: a busy loop), select / poll / epoll (non-blocking,
one event loop for all connections), asyncio (streams, write + drain), timeout
(settimeout(T): timed calls, timeouts counted, tried again).

Every connection, in every mode, ends with shutdown(SHUT_WR) and reads to the
server's EOF (bounded by --eof-wait): the server's trailer says how many bytes
arrived. Exit status: 0 when the workload ran (a partial non-blocking send is
the expected outcome, not a failure), 1 when a connection failed or a limit
passed (the result's ``errors`` say which), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Sequence

from .cli import ArgumentParser, duration_arg, port_arg, positive_int, size_arg
from .conns import AsyncConn, ConnBase, Mode, Settings, SocketConn, run_asyncio, run_shared_loop, run_threads
from .payload import Payload
from .percentile import latency_summary_ms as latency_summary
from .results import cpu_seconds, emit_result
from .sockcall import EventLoop, Limit, Step
from .tcpinfo import combine_tcp_info
from .trace import Tracer
from .workloads import WORKLOADS, WorkloadOptions

MODES: dict[str, Mode] = {mode.name: mode for mode in (
    Mode("blocking", blocking=True),
    Mode("nonblocking", retries_sends=False),
    Mode("nonblocking-spin", busy_retry=True),
    Mode("select", waiter="select", shared_loop=True),
    Mode("poll", waiter="poll", shared_loop=True),
    Mode("epoll", waiter="epoll", shared_loop=True),
    Mode("asyncio", uses_asyncio=True),
    Mode("timeout", blocking=True),
)}
DEFAULT_CALL_TIMEOUT_S = 1.0

# Workload options and the workloads they belong to: an option given to a
# workload that ignores it is a mistake worth one line, not silence.
_WORKLOAD_OPTIONS = {
    "bytes": ("bulk",), "chunk": ("bulk",), "pattern": ("bulk", "echo", "slow"),
    "requests": ("echo",), "size": ("echo",), "think": ("echo",),
    "attempts": ("connect",), "cancel_after": ("connect",),
    "rate": ("slow",), "hold": ("slow",),
}
_DEFAULTS = WorkloadOptions()


def _positive(parse):
    """An argparse type: ``parse``, then require a value above zero."""
    def parse_positive(text: str):
        value = parse(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above zero")
        return value
    return parse_positive


def _chunk_arg(text: str) -> int | None:
    if text == "all":
        return None
    return _positive(size_arg)(text)


def _pattern_arg(text: str) -> bytes:
    # Taken literally: the orchestrator passes the string its YAML decoded,
    # and escapes interpreted here would change a pattern behind its back.
    data = text.encode("utf-8", "surrogateescape")
    if not data:
        raise argparse.ArgumentTypeError("the pattern must not be empty")
    return data


def build_parser() -> ArgumentParser:
    """The client's command line."""
    p = ArgumentParser(prog="socklab client", description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=list(MODES))
    p.add_argument("--host", required=True, help="server name or address")
    p.add_argument("--port", required=True, type=port_arg)
    p.add_argument("--workload", required=True, choices=list(WORKLOADS))
    p.add_argument("--connections", type=positive_int, default=1,
                   help="concurrent connections in this process (default 1)")
    bulk = p.add_argument_group("bulk")
    bulk.add_argument("--bytes", type=size_arg, help=f"payload size (default {_DEFAULTS.bytes})")
    bulk.add_argument("--pattern", type=_pattern_arg,
                      help="text repeated to make the payload, taken literally (default: Hello Python"
                           " and a newline)")
    bulk.add_argument("--chunk", type=_chunk_arg,
                      help="most bytes offered per send() (default all: everything that is left)")
    echo = p.add_argument_group("echo")
    echo.add_argument("--requests", type=positive_int, help="round trips per connection (default 1000)")
    echo.add_argument("--size", type=_positive(size_arg), help="request size (default 1KiB)")
    echo.add_argument("--think", type=duration_arg, help="pause between round trips (default 0s)")
    conn = p.add_argument_group("connect")
    conn.add_argument("--attempts", type=positive_int, help="attempts per connection (default 5)")
    conn.add_argument("--cancel-after", type=_positive(duration_arg),
                      help="the user's stop: cancel a pending connect after this long")
    conn.add_argument("--connect-timeout", type=_positive(duration_arg),
                      help="give up a connect after this long (any workload)")
    slow = p.add_argument_group("slow")
    slow.add_argument("--rate", type=size_arg, help="bytes per second trickled (default 100; 0: idle)")
    slow.add_argument("--hold", type=duration_arg, help="how long to keep the connection (default 10s)")
    p.add_argument("--timeout", type=_positive(duration_arg),
                   help=f"mode timeout: settimeout(T) per call (default {DEFAULT_CALL_TIMEOUT_S:g}s)")
    p.add_argument("--deadline", type=_positive(duration_arg),
                   help="bound on the whole workload; connections still shut down and wait for EOF")
    p.add_argument("--eof-wait", type=_positive(duration_arg), default=60.0,
                   help="bound on waiting for the server's EOF or an echo reply (default 60s)")
    p.add_argument("--sndbuf", type=_positive(size_arg), help="SO_SNDBUF for each socket")
    p.add_argument("--rcvbuf", type=_positive(size_arg), help="SO_RCVBUF for each socket")
    p.add_argument("--no-trailer", dest="trailer", action="store_false",
                   help="the server is not the lab's (a program of the user's): read to its EOF without "
                        "expecting the trailer that says how many bytes arrived")
    p.add_argument("--trace", metavar="FILE", help="write every socket call here (gzip JSON lines)")
    p.add_argument("--result-file", metavar="PATH", help="also write the result line here")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parsed and cross-checked arguments (UsageError on any mistake)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    for option, kinds in _WORKLOAD_OPTIONS.items():
        if getattr(args, option) is not None and args.workload not in kinds:
            flag = "--" + option.replace("_", "-")
            parser.error(f"{flag} applies to --workload {' or '.join(kinds)}, not {args.workload}")
    if args.timeout is not None and args.mode != "timeout":
        parser.error("--timeout applies to --mode timeout only")
    return args


def workload_options(args: argparse.Namespace) -> WorkloadOptions:
    """The workload options, defaults filled in."""
    given = {
        "bytes": args.bytes, "pattern": args.pattern, "chunk_bytes": args.chunk,
        "requests": args.requests, "size_bytes": args.size, "think_s": args.think,
        "attempts": args.attempts, "cancel_after_s": args.cancel_after,
        "rate_bps": args.rate, "hold_s": args.hold,
    }
    return replace(_DEFAULTS, **{k: v for k, v in given.items() if v is not None})


def _dedupe(messages: list[str]) -> list[str]:
    return [m if n == 1 else f"{m} (x{n})" for m, n in Counter(messages).items()]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def summarize(args: argparse.Namespace, opts: WorkloadOptions, conns: list[ConnBase],
              loops: list[EventLoop], wall_s: float, cpu_s: float,
              errors: list[str]) -> dict[str, Any]:
    """The result line: totals over connections, every SPEC field present.

    Counts and bytes are summed over connections. ``send_s`` is the time
    inside send() (asyncio: write() and drain()); ``blocked_s`` the time
    inside every socket call and wait, summed over the threads or tasks that
    made them (a shared select/poll/epoll wait counts once), so with several
    threaded connections it can exceed ``wall_s``. ``eagain`` counts send()
    calls that met EAGAIN; other calls' EAGAIN show in the trace.
    """
    calls: Counter[str] = Counter()
    call_s: Counter[str] = Counter()
    for conn in conns:
        calls.update(conn.calls)
        call_s.update(conn.call_s)
    confirmed = [c.bytes_delivered for c in conns if c.bytes_delivered is not None]
    delivered = sum(confirmed) if confirmed else None
    first_send = min((c.first_send_at for c in conns if c.first_send_at is not None), default=None)
    last_eof = max((c.eof_at for c in conns if c.eof_at is not None), default=None)
    goodput_bps = None
    if delivered is not None and first_send is not None and last_eof is not None and last_eof > first_send:
        goodput_bps = round(delivered * 8 / (last_eof - first_send), 1)
    connect_times = [s for c in conns for s in c.connect_s]
    latencies = [s for c in conns for s in c.latencies_s]
    send_calls = ("send", "write", "drain")  # asyncio's send is write() + drain()

    result: dict[str, Any] = {
        "role": "client",
        "mode": args.mode,
        "workload": args.workload,
        "connections": args.connections,
        "bytes_requested": sum(c.bytes_requested for c in conns),
        "bytes_accepted": sum(c.bytes_accepted for c in conns),
        "bytes_delivered": delivered,
        "send_calls": calls["send"] + calls["write"],
        "eagain": sum(c.eagain for c in conns),
        "timeouts": sum(c.timeouts for c in conns),
        "send_s": _round(sum(call_s[name] for name in send_calls)),
        "blocked_s": _round(sum(c.blocked_s for c in conns) + sum(loop.blocked_s for loop in loops)),
        "wall_s": _round(wall_s),
        "cpu_s": _round(cpu_s),
        "goodput_bps": goodput_bps,
        "connect_s": _round(_mean(connect_times)),
        "latency_ms": latency_summary(latencies) if args.workload == "echo" else None,
        "tcp": combine_tcp_info([info for c in conns for info in c.tcp_infos]),
        "sndbuf_bytes": max((c.sndbuf_bytes for c in conns if c.sndbuf_bytes is not None), default=None),
        "rcvbuf_bytes": max((c.rcvbuf_bytes for c in conns if c.rcvbuf_bytes is not None), default=None),
    }
    if args.workload == "echo":
        last_reply = max((c.last_reply_at for c in conns if c.last_reply_at is not None), default=None)
        span_s = None if first_send is None or last_reply is None else last_reply - first_send
        result["requests_per_s"] = round(len(latencies) / span_s, 1) if span_s else None
    if args.workload == "connect":
        attempts = [a for c in conns for a in c.attempts]
        outcomes = Counter(outcome for outcome, _ in attempts)
        away_ms = [_ms(s) for _, s in attempts]
        result["connect"] = {
            "attempts": len(attempts),
            "succeeded": outcomes["connected"],
            "cancelled": outcomes["cancelled"],
            "timed_out": outcomes["timed_out"],
            "failed": outcomes["failed"],
            "cancel_after_ms": _ms(opts.cancel_after_s),
            "connect_timeout_ms": _ms(args.connect_timeout),
            "control_away_ms": away_ms,
            "control_away_max_ms": max(away_ms, default=None),
        }
    result["errors"] = _dedupe(errors + [e for c in conns for e in c.errors])
    return result


def _run(mode: Mode, conns: list[ConnBase], steps: list) -> list[EventLoop]:
    if mode.uses_asyncio:
        run_asyncio(conns, steps)
        return []
    if mode.shared_loop:
        return run_shared_loop(conns, steps)
    return run_threads(conns, steps)


def main(argv: Sequence[str]) -> int:
    """Run one client as the command line says; print its result line."""
    args = parse_args(argv)
    opts = workload_options(args)
    mode = MODES[args.mode]
    if mode.name == "timeout":
        mode = replace(mode, call_timeout_s=args.timeout or DEFAULT_CALL_TIMEOUT_S)
    workload, payload_bytes = WORKLOADS[args.workload]
    with Payload(payload_bytes(opts), opts.pattern) as payload:
        result = _run_workload(args, opts, mode, workload, payload.view)
    emit_result(result, args.result_file)
    return 1 if result["errors"] else 0


def _run_workload(args: argparse.Namespace, opts: WorkloadOptions, mode: Mode, workload: Callable[..., Step],
                  payload: memoryview) -> dict[str, Any]:
    """Every connection's run of ``workload`` over ``payload``; the result line."""
    clock = time.perf_counter
    errors: list[str] = []
    try:
        family, _, _, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        family, address = socket.AF_INET, None
        errors.append(f"cannot resolve {args.host!r}: {exc}")

    origin_s = clock()
    cpu_start_s = cpu_seconds()
    tracer = None
    if args.trace:
        tracer = Tracer(args.trace, clock, origin_s, {
            "mode": args.mode, "workload": args.workload, "connections": args.connections,
            "host": args.host, "port": args.port})
        tracer.start_outq_sampling()
    settings = Settings(
        family=family, address=address, sndbuf_bytes=args.sndbuf, rcvbuf_bytes=args.rcvbuf,
        eof_wait_s=args.eof_wait, connect_timeout_s=args.connect_timeout,
        deadline=None if args.deadline is None else Limit(origin_s + args.deadline, "deadline"),
        clock=clock, origin_s=origin_s, tracer=tracer, trailer=args.trailer)
    conn_class = AsyncConn if mode.uses_asyncio else SocketConn
    conns: list[ConnBase] = [conn_class(i, mode, settings) for i in range(args.connections)]
    loops: list[EventLoop] = []
    if address is not None:
        try:
            loops = _run(mode, conns, [workload(c, opts, payload) for c in conns])
        except Exception as exc:  # the shared wait failed (select() past FD_SETSIZE, say)
            errors.append(f"{type(exc).__name__}: {exc}")
    wall_s = clock() - origin_s
    cpu_s = cpu_seconds() - cpu_start_s

    if tracer is not None:
        try:
            tracer.write()
        except OSError as exc:
            errors.append(f"cannot write the trace {args.trace}: {exc.strerror or exc}")
    return summarize(args, opts, conns, loops, wall_s, cpu_s, errors)
