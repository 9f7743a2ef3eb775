"""What tracing a program's socket calls adds to each call, on loopback: strace vs untraced.

    python3 bench/probes/strace_overhead.py [CALLS] [RUNS]

A worker process connects to a sink on 127.0.0.1 (a thread here that reads
everything) and makes CALLS blocking ``send()`` calls of 64 bytes, timing its
own loop; each run starts it untraced, under strace exactly as the ``program``
role runs it (socklab.program.strace_command, seccomp-filtered), under strace
without the seccomp filter (every system call stops the program), and with the
Python tracer (socklab.usertrace) when it is there, in alternation, RUNS times.
Prints one JSON line: the median time per call of each way, in microseconds,
and what each adds to the untraced one. Stdlib only; needs strace.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"
sys.path.insert(0, str(SERVICES))

from socklab.program import strace_command  # noqa: E402

PAYLOAD_BYTES = 64


def worker(port: int, calls: int) -> None:
    """Make ``calls`` send() calls to 127.0.0.1:``port``; print the loop's seconds."""
    sock = socket.create_connection(("127.0.0.1", port))
    data = b"x" * PAYLOAD_BYTES
    send = sock.send
    start = time.perf_counter()
    for _ in range(calls):
        send(data)
    spent = time.perf_counter() - start
    sock.close()
    print(json.dumps({"calls": calls, "s": spent}), flush=True)


def sink() -> tuple[socket.socket, threading.Thread]:
    """A listener on an ephemeral loopback port whose connections are read to the end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while conn.recv(1 << 20):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def run_once(prefix: list[str], port: int, calls: int, env: dict[str, str]) -> float:
    """Seconds per call of one worker run under ``prefix`` (empty: untraced)."""
    argv = [*prefix, sys.executable, __file__, "worker", str(port), str(calls)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=True)
    last = [line for line in done.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)["s"] / calls


def main(calls: int, runs: int) -> dict:
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("strace_overhead: needs strace")
    listener, _ = sink()
    port = listener.getsockname()[1]
    base_env = {**os.environ, "PYTHONPATH": str(SERVICES)}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.strace")
        seccomp = strace_command(strace, out, [])[:-1]  # without the trailing "--"
        full = [w for w in seccomp if w != "--seccomp-bpf"]
        ways: dict[str, tuple[list[str], dict[str, str]]] = {
            "untraced": ([], base_env),
            "strace": (seccomp + ["--"], base_env),
            "strace_no_seccomp": (full + ["--"], base_env),
        }
        try:
            from socklab.usertrace import child_env
            ways["python_tracer"] = ([], child_env(base_env, os.path.join(tmp, "trace.gz")))
        except ImportError:
            pass
        per_call: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(runs):
            for name, (prefix, env) in ways.items():
                per_call[name].append(run_once(prefix, port, calls, env))
    listener.close()
    median_us = {name: statistics.median(v) * 1e6 for name, v in per_call.items()}
    return {
        "calls": calls, "runs": runs, "payload_bytes": PAYLOAD_BYTES,
        "us_per_call": {name: round(v, 3) for name, v in median_us.items()},
        "added_us_per_call": {name: round(v - median_us["untraced"], 3)
                              for name, v in median_us.items() if name != "untraced"},
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
        runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
        print(json.dumps(main(calls, runs)))
