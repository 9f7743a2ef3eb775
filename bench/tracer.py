"""Benchmark: what the socket-call tracer (socklab.usertrace) adds to each call a program makes.

    python3 bench/tracer.py [--quick]

No containers: bench/probes/tracer_overhead.py runs the same tight loops on a
loopback TCP connection in two programs, untraced and traced as `lab.py`
traces a user's program (socklab.usertrace.child_env), and reports each call
kind's time per call in both. One run of the probe (the best of its pairs of
programs) is one sample. Per call kind (a non-blocking 1-byte send() and
recv(), and setblocking(), a call that costs the kernel little) the figure is
the time added per call, against the tracer's budget of 1 µs per call: the
target is a ratio of at most 1. Where the host has strace, what `trace: strace`
adds per call is measured too (bench/probes/strace_overhead.py) and stated in a
note: it has no target.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Log, figure, log_to_stderr  # noqa: E402

PROBE = Path(__file__).resolve().parent / "probes" / "tracer_overhead.py"
STRACE_PROBE = Path(__file__).resolve().parent / "probes" / "strace_overhead.py"
BUDGET_US = 1.0
KINDS = (("send", "non-blocking send() of 1 byte"), ("recv", "non-blocking recv() of 1 byte"),
         ("setblocking", "setblocking()"))


def probe(runs: int) -> dict:
    """One run of the probe: per call kind, µs per call untraced and traced."""
    done = subprocess.run([sys.executable, str(PROBE), "--runs", str(runs)], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{PROBE.name}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return json.loads(done.stdout)


def run(quick: bool, log: Log) -> dict:
    """The tracer's overhead figures; ``quick`` takes two samples of one pair of programs each."""
    samples, pairs = (2, 1) if quick else (5, 3)
    rows = []
    for i in range(samples):
        found = probe(pairs)
        rows.append(found)
        log(f"tracer overhead, sample {i + 1}/{samples}: " + ", ".join(
            f"{kind} {found[kind]['untraced_us']:.3f} -> {found[kind]['traced_us']:.3f} µs" for kind, _ in KINDS))
    figures = [figure(f"tracer.overhead.{kind}", f"tracer overhead per socket call, loopback: {label}", "µs",
                      [row[kind]["added_us"] for row in rows], reference="budget per call",
                      reference_samples=[BUDGET_US] * len(rows), target={"max": 1.0})
               for kind, label in KINDS]
    per_call = "; ".join(
        f"{kind} {statistics.median(r[kind]['untraced_us'] for r in rows):.3g} µs untraced, "
        f"{statistics.median(r[kind]['traced_us'] for r in rows):.3g} traced" for kind, _ in KINDS)
    note = (f"Time per call (medians of the samples, each the best of {pairs} pair(s) of programs x "
            f"{rows[0]['repeats']} repeats of {rows[0]['calls']:,} calls; Python {platform.python_version()}): "
            f"{per_call}.")
    notes = [note]
    details: dict = {"samples": rows}
    if shutil.which("strace"):
        details["strace"] = found = strace_probe(5_000 if quick else 20_000, 3 if quick else 7)
        log(f"strace overhead: {found['added_us_per_call']}")
        notes.append(
            f"`trace: strace` (a program traced by strace, as the program role runs it: seccomp-filtered to "
            f"the traced system calls), blocking send() of {found['payload_bytes']} bytes on loopback, median "
            f"of {found['runs']} alternating runs of {found['calls']:,} calls: "
            f"{found['us_per_call']['untraced']:.3g} µs per call untraced, "
            f"{found['us_per_call']['strace']:.4g} µs under strace: "
            f"+{found['added_us_per_call']['strace']:.4g} µs per call, the ptrace stops "
            f"(the Python tracer on the same loop: +{found['added_us_per_call'].get('python_tracer', 0):.3g} µs). "
            "No target: strace is for programs the Python tracer cannot see into.")
    details["notes"] = notes
    return {"figures": figures, "details": details}


def strace_probe(calls: int, runs: int) -> dict:
    """bench/probes/strace_overhead.py: µs per call untraced, under strace, with the Python tracer."""
    done = subprocess.run([sys.executable, str(STRACE_PROBE), str(calls), str(runs)], capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{STRACE_PROBE.name}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return json.loads(done.stdout)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, log_to_stderr), indent=1))
