"""Benchmark: the fastest traffic the userspace delay line carries at 20 ms before its accuracy breaks.

    BASE_IMAGE=... python3 bench/delayline.py [--out bench/results/delayline.json]
    BASE_IMAGE=... python3 bench/run.py --only delayline [--quick]     # as the `delayline` section

One implementation, two entry points. Run on its own (below) it searches from
25 Mbit/s with three tries per rate and writes every try to a JSON file. As a
section of bench/run.py (``run``) it repeats a shorter search (from 250 Mbit/s,
one try per rate, two halvings of the gap) three times, once with --quick,
and its figure is the highest rate each repetition sustained, against the
1 Gbit/s target line.

On real containers of a project of its own (removed afterwards): the client's
link has 20 ms of delay each way by the userspace backend, and no rate limit,
so no bottleneck queue stands between what is measured and the delay line.
For each offered rate, iperf3 pushes TCP at that rate from the client to the
server (paced by iperf3, through the delay line's copy path up and its verdict
path down) while, on a second connection from the same container, a ping-pong
of 64-byte requests measures the round trip. Both ends' TCP buffers may grow
to 32 MiB (net.ipv4.tcp_rmem / tcp_wmem, set for the lab's containers): with
Linux's defaults (6 MiB to receive, 4 MiB to send) TCP's window alone holds one
flow under about 600 Mbit/s over a 40 ms round trip, whatever the link. The
rate is sustained when

* goodput (iperf3's receiver, the first second omitted) is at least 90 % of the
  offered rate, and
* the ping-pong's median round trip is within 5 % of the configured 40 ms.

Each rate is tried three times and counts as sustained when two tries are
(the delay line shares two cores with everything else, and one try can meet a
busy moment). Rates double until one fails, then the gap is halved a few times.
Past that, rates keep doubling (one try each) until goodput alone falls under
90 %: the most the delay line carries at all, accuracy aside. Every try, with
the delay line's own counters and CPU time, goes to the JSON file.
"""

from __future__ import annotations

import math
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import bench_lab, build_image, json_after, run_in_client  # noqa: E402
from common import Log, figure, log_to_stderr, standalone_parser, write_standalone  # noqa: E402
from experiments import SOCKLAB, client_argv, link_env, server_argv  # noqa: E402
from labkit.compose import ComposeProject  # noqa: E402
from socklab.errors import SocklabError  # noqa: E402

DELAY_MS = 20
ROUND_TRIP_MS = 2 * DELAY_MS
RTT_TOLERANCE = 0.05
GOODPUT_FLOOR = 0.90
SECONDS = 6  # iperf3's run; its first second is omitted from its figures
FIRST_MBIT = 25
REFINE_STEPS = 3
TRIES = 3
# The section of bench/run.py: a shorter search, repeated (about a minute each).
SECTION_FIRST_MBIT = 250
SECTION_REFINE_STEPS = 2
SECTION_REPETITIONS = 3
TARGET_MBIT = 1000
# Room for a 1 Gbit/s flow's window over 40 ms (5 MB) with TCP's overhead; the
# kernel's defaults cap one flow near 600 Mbit/s there (see the docstring).
TCP_BUFFER_SYSCTLS = {"net.ipv4.tcp_rmem": "4096 131072 33554432", "net.ipv4.tcp_wmem": "4096 16384 33554432"}
FRAME_BYTES = 1514
# The server runs the lab's echo server for the ping-pong and iperf3 beside it.
PING = {"mode": "blocking", "workload": {"kind": "echo", "size": 64, "think": "20ms"}}
SERVER_ARGV = server_argv({"mode": "threaded"}, {"name": "ping", **PING},
                          options={"--max-connections": 1000, "--idle-timeout": "600"})
SERVER_COMMAND = ["exec", "sh", "-c", f"iperf3 -s -D && exec {shlex.join([*SOCKLAB, *SERVER_ARGV])}"]


def client_script(rate_mbit: float) -> str:
    """iperf3 at ``rate_mbit`` and, a second in, the ping-pong; both results printed one line each."""
    requests = int((SECONDS - 2) / (ROUND_TRIP_MS / 1000 + 0.02))
    ping = client_argv({**PING, "workload": {**PING["workload"], "requests": requests}})
    return (
        f"iperf3 -c server -b {rate_mbit:g}M -t {SECONDS} -O 1 -J > /tmp/iperf.json & "
        f"sleep 1; {shlex.join([*SOCKLAB, *ping])}; wait; printf 'iperf3 '; "
        "python3 -c 'import json; print(json.dumps(json.load(open(\"/tmp/iperf.json\"))))'"
    )


def limit_pkts(rate_mbit: float) -> int:
    """The delay line's queue: room for four times what the rate puts in flight over the delay,
    so that iperf3's and TCP's bursts do not overflow it: this measures speed, not queue size."""
    in_flight = rate_mbit * 1e6 / 8 * DELAY_MS / 1000 / FRAME_BYTES
    return math.ceil(4 * in_flight) + 1000


def measure(lab: ComposeProject, rate_mbit: float) -> dict:
    """One rate: goodput, round trips and the delay line's counters."""
    env = {**link_env(delay=f"{DELAY_MS}ms", limit=limit_pkts(rate_mbit), backend="userspace"),
           "SOCKLAB_REPORT_LINK": "1"}
    results, stdout = run_in_client(lab, client_script(rate_mbit), env, timeout_s=180)
    iperf = json_after("iperf3 ", stdout)
    if "client" not in results or "link" not in results or iperf is None:
        failed = results.get("error") or {"returncode": 0, "output": stdout[-600:]}
        return {"rate_mbit": rate_mbit, "sustained": False,
                "error": f"no complete result (exit {failed['returncode']}): {failed['output'][-600:]}"}
    if "error" in iperf:
        return {"rate_mbit": rate_mbit, "sustained": False, "error": f"iperf3: {iperf['error']}"}
    goodput_bps = iperf["end"]["sum_received"]["bits_per_second"]
    latency = results["client"]["latency_ms"]
    line = results["link"]["delay_line"]
    rtt_error = abs(latency["p50"] - ROUND_TRIP_MS) / ROUND_TRIP_MS
    goodput_ratio = goodput_bps / (rate_mbit * 1e6)
    packets = sum(line[d]["packets"] for d in ("up", "down"))
    return {
        "rate_mbit": rate_mbit,
        "sustained": goodput_ratio >= GOODPUT_FLOOR and rtt_error <= RTT_TOLERANCE,
        "goodput_mbit": round(goodput_bps / 1e6, 3),
        "goodput_ratio": round(goodput_ratio, 4),
        "rtt_ms": {k: latency[k] for k in ("p50", "p90", "p99", "max", "mean")},
        "rtt_error": round(rtt_error, 4),
        "tcp_retrans": iperf["end"]["sum_sent"].get("retransmits"),
        "delay_line": {
            "limit_pkts": line["up"]["limit_pkts"],
            "cpu_s": line["cpu_s"],
            "uptime_s": line["uptime_s"],
            "packets": packets,
            "cpu_us_per_packet": round(line["cpu_s"] / packets * 1e6, 2) if packets else None,
            # packets: what crossed into the delay line, a GSO aggregate (gso_packets of them) as one.
            **{d: {k: line[d].get(k) for k in ("packets", "gso_packets", "bytes", "overflow", "lost", "send_errors",
                                                "held_max", "late_ms_mean", "late_ms_max")} for d in ("up", "down")},
        },
    }


def describe(m: dict) -> str:
    if "error" in m:
        return f"{m['rate_mbit']:8.1f} Mbit/s: FAILED TO MEASURE: {m['error']}"
    return (f"{m['rate_mbit']:8.1f} Mbit/s: goodput {m['goodput_mbit']:8.2f} ({m['goodput_ratio']:.3f}), "
            f"RTT p50 {m['rtt_ms']['p50']:7.2f} ms (error {m['rtt_error'] * 100:5.2f} %), p90 "
            f"{m['rtt_ms']['p90']:7.2f} ms; delay line {m['delay_line']['cpu_us_per_packet']} µs CPU per packet, "
            f"overflow {m['delay_line']['up']['overflow'] + m['delay_line']['down']['overflow']} -> "
            f"{'sustained' if m['sustained'] else 'BROKEN'}")


@contextmanager
def delay_lab() -> Iterator[ComposeProject]:
    """A lab of its own: the server (iperf3 and the echo server) up on an unshaped link; both ends' TCP
    buffers as TCP_BUFFER_SYSCTLS allows (the client's link is set per try, by ``measure``)."""
    services = {"server": {"command": SERVER_COMMAND, "environment": link_env(), "sysctls": TCP_BUFFER_SYSCTLS},
                "client": {"sysctls": TCP_BUFFER_SYSCTLS}}
    with bench_lab(services) as lab:
        lab.up("server")
        yield lab


def search(lab: ComposeProject, log: Log, *, first_mbit: float = FIRST_MBIT, tries: int = TRIES,
           refine_steps: int = REFINE_STEPS) -> list[dict]:
    """Double the rate from ``first_mbit`` until the line breaks, then halve the gap ``refine_steps`` times.

    A rate is sustained when most of its ``tries`` are. Should ``first_mbit``
    break, the rate is halved instead until one holds (down to an eighth of it).
    """
    measurements = []

    def probe(rate_mbit: float) -> bool:
        done = []
        for _ in range(tries):
            done.append(measure(lab, rate_mbit))
            log(describe(done[-1]))
        sustained = sum(t["sustained"] for t in done) * 2 > tries
        measurements.append({"rate_mbit": rate_mbit, "sustained": sustained, "tries": done})
        return sustained

    good, bad = None, None
    rate = first_mbit
    while bad is None:
        if probe(rate):
            good, rate = rate, rate * 2
        else:
            bad = rate
    while good is None and rate / 2 >= first_mbit / 8:
        rate /= 2
        if probe(rate):
            good = rate
        else:
            bad = rate
    if good is None:
        return measurements
    for _ in range(refine_steps):
        middle = round((good + bad) / 2, 1)
        if probe(middle):
            good = middle
        else:
            bad = middle
    return measurements


def highest_sustained_mbit(measurements: list[dict]) -> float:
    """The highest rate a search sustained (0 when not even its first)."""
    return max((m["rate_mbit"] for m in measurements if m["sustained"]), default=0.0)


def carried(lab: ComposeProject, from_mbit: float, log: Log) -> list[dict]:
    """Double the rate from ``from_mbit`` until goodput falls under GOODPUT_FLOOR (one try each)."""
    tries = []
    rate = from_mbit
    while True:
        m = measure(lab, rate)
        tries.append(m)
        log(describe(m))
        if "error" in m or m["goodput_ratio"] < GOODPUT_FLOOR:
            return tries
        rate *= 2


def criteria(tries: int) -> dict:
    """What the figures mean, for the results file."""
    return {"delay_ms_each_way": DELAY_MS, "round_trip_ms": ROUND_TRIP_MS, "rtt_error_max": RTT_TOLERANCE,
            "goodput_ratio_min": GOODPUT_FLOOR, "iperf3_seconds": SECONDS, "tcp_buffers": TCP_BUFFER_SYSCTLS,
            "tries_per_rate": tries, "sustained_when": "most tries meet both"}


def run(quick: bool, log: Log) -> dict:
    """bench/run.py's section: the highest rate sustained at 20 ms each way, per repetition of a short search."""
    repetitions = 1 if quick else SECTION_REPETITIONS
    refine_steps = 1 if quick else SECTION_REFINE_STEPS
    build_image()
    searches = []
    with delay_lab() as lab:
        for i in range(repetitions):
            log(f"delay line, repetition {i + 1}/{repetitions}: from {SECTION_FIRST_MBIT} Mbit/s, one try per rate")
            searches.append(search(lab, log, first_mbit=SECTION_FIRST_MBIT, tries=1, refine_steps=refine_steps))
    highest = [highest_sustained_mbit(s) for s in searches]
    note = (f"Each repetition doubles iperf3's offered rate from {SECTION_FIRST_MBIT} Mbit/s until a try breaks "
            f"(or halves it until one holds), then halves the gap {refine_steps} time(s); one try per rate. "
            "A try is sustained when goodput is at "
            f"least {GOODPUT_FLOOR:.0%} of the offered rate and a ping-pong's median round trip beside it is "
            f"within {RTT_TOLERANCE:.0%} of {ROUND_TRIP_MS} ms (no rate limit on the link; TCP buffers up to "
            "32 MiB at both ends). `bench/delayline.py` alone runs the longer search, three tries per rate.")
    fig = figure("delayline.rate.20ms", f"userspace delay line: highest rate sustained at {DELAY_MS} ms each way",
                 "Mbit/s", highest, reference="1 Gbit/s target line",
                 reference_samples=[TARGET_MBIT] * len(highest), target={"min": 1.0}, note=note)
    return {"figures": [fig], "details": {"criteria": criteria(1), "searches": searches}}


def main() -> int:
    args = standalone_parser(__doc__, "delayline").parse_args()
    build_image()
    with delay_lab() as lab:
        measurements = search(lab, log_to_stderr)
        sustained = [m["rate_mbit"] for m in measurements if m["sustained"]]
        broken = [m["rate_mbit"] for m in measurements
                  if not m["sustained"] and m["rate_mbit"] > max(sustained, default=0)]
        throughput = carried(lab, 2 * max(broken, default=FIRST_MBIT), log_to_stderr)
    every_try = [t for m in measurements for t in m["tries"]] + throughput
    measured = [t for t in every_try if "error" not in t]
    summary = {
        "highest_sustained_mbit": max(sustained, default=None),
        "lowest_broken_mbit": min(broken, default=None),
        "most_carried_mbit": max((t["goodput_mbit"] for t in measured), default=None),
        "highest_rate_carried_mbit": max((t["rate_mbit"] for t in measured if t["goodput_ratio"] >= GOODPUT_FLOOR),
                                         default=None),
        "criteria": criteria(TRIES),
    }
    write_standalone(args.out, "delayline", {**summary, "measurements": measurements, "throughput": throughput})
    print(f"highest rate sustained at {DELAY_MS} ms each way: {summary['highest_sustained_mbit']} Mbit/s "
          f"(broken at {summary['lowest_broken_mbit']} Mbit/s); most carried at all: "
          f"{summary['most_carried_mbit']} Mbit/s; written to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SocklabError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(3)
