"""What the socket-call tracer (socklab.usertrace) adds to each call, on loopback.

    python3 tracer_overhead.py [--calls N] [--repeats R] [--runs K]

Runs itself as two programs, untraced and traced the way a user's program is
traced (the environment of socklab.usertrace.child_env, so the tracer is
installed by its sitecustomize). Each times tight loops of N calls of each
kind: non-blocking send() and recv() of 1 byte on a loopback TCP connection
(32 sends, then the 32 receives), and setblocking(False), a call that costs
the kernel little, so that the tracer's share shows most; a kind's time per
call is the best of R repeats. The pair of programs runs K times, alternately;
the best of each is kept. Prints one JSON object:
``{"send": {"untraced_us", "traced_us", "added_us"}, "recv": {..}, "setblocking": {..},
"calls": N, "repeats": R, "runs": K}``. Stdlib only; needs the repository's
services/ directory (this file's ../../services).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"
KINDS = ("send", "recv", "setblocking")
BATCH = 32  # 1-byte sends queued before they are received: far below any socket buffer


def measure(calls: int, repeats: int) -> dict[str, float]:
    """Microseconds per call of each kind, best of ``repeats`` (run inside the program measured)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each byte delivered at once
    sender.setblocking(False)
    receiver.setblocking(False)
    send, recv, setblocking, clock = sender.send, receiver.recv, sender.setblocking, time.perf_counter
    byte = b"x"
    batches = range(max(1, calls // BATCH))
    batch = range(BATCH)
    best = {kind: float("inf") for kind in KINDS}
    for _ in range(repeats):
        sent_s = received_s = 0.0
        for _ in batches:
            t0 = clock()
            for _ in batch:
                send(byte)
            t1 = clock()
            for _ in batch:
                recv(1)
            sent_s += t1 - t0
            received_s += clock() - t1
        t0 = clock()
        for _ in range(calls):
            setblocking(False)
        blocking_s = clock() - t0
        done = len(batches) * BATCH
        for kind, seconds, count in (("send", sent_s, done), ("recv", received_s, done),
                                     ("setblocking", blocking_s, calls)):
            best[kind] = min(best[kind], seconds / count * 1e6)
    return best


def run_program(calls: int, repeats: int, trace_dir: str | None) -> dict[str, float]:
    """This file run as the program measured, traced into ``trace_dir`` or untraced."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "SOCKLAB_TRACE_FILE")}
    if trace_dir is not None:
        sys.path.insert(0, str(SERVICES))
        from socklab.usertrace import child_env

        env = child_env(env, os.path.join(trace_dir, "trace.gz"))
    done = subprocess.run([sys.executable, __file__, "--measure", "--calls", str(calls), "--repeats", str(repeats)],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or done.stderr:
        raise RuntimeError(f"the {'traced' if trace_dir else 'untraced'} program failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.calls, args.repeats)), flush=True)
        # Not the trace's writing (which happens at exit): only the calls are measured.
        os._exit(0)
    best: dict[str, dict[str, float]] = {"untraced": {}, "traced": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.runs):
            for how, trace_dir in (("untraced", None), ("traced", scratch)):
                for kind, us in run_program(args.calls, args.repeats, trace_dir).items():
                    best[how][kind] = min(best[how].get(kind, us), us)
    result = {kind: {"untraced_us": round(best["untraced"][kind], 4), "traced_us": round(best["traced"][kind], 4),
                     "added_us": round(best["traced"][kind] - best["untraced"][kind], 4)} for kind in KINDS}
    print(json.dumps({**result, "calls": args.calls, "repeats": args.repeats, "runs": args.runs}))


if __name__ == "__main__":
    main()
