"""Benchmark: does the link do what it was told, and can the lab's client fill it?

    python3 bench/fidelity.py [--quick]

Link fidelity, goodput: the client container's link is shaped to 1, 10, 100
Mbit/s and 1 Gbit/s (both directions, tbf); in the same container, one after
the other, iperf3 and the lab's blocking bulk client push TCP to the server.
iperf3's goodput is judged against the TCP ceiling (rate x 1448/1514), the
lab client's against iperf3's, measured in the same repetition.

Link fidelity, round trip: the client's link gets 1, 10, 50 and 200 ms of delay
each way; the lab's echo client measures 64-byte round trips (median) against
the configured round trip plus the unshaped one, measured in the same
repetition (the veth pair and two Python processes are not part of the
configured delay). Every backend the kernel has is measured; one it lacks is
recorded with the sentence the lab gives for it.

Link fidelity, rate and delay together: 10 Mbit/s with 20 ms each way, on every
backend the kernel has; iperf3 against the TCP ceiling, the lab client against
iperf3, as above.

Load generation: on an unshaped link, the lab's blocking bulk client (with and
without its per-call trace) against iperf3 between the same containers.

Every point runs in a client container through a :data:`ClientRun` (a fresh
container here; a kept one in the VM benchmark, bench/vm.py), so the same
points measure the host's kernel and a VM's.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Mapping, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import build_image, iperf3_json_script, json_after, run_in_client, server_lab  # noqa: E402
from common import Log, figure, log_to_stderr  # noqa: E402
from experiments import SOCKLAB, client_argv, link_env, server_argv  # noqa: E402
from labkit.scenario import SERVER_PORT  # noqa: E402
from socklab.errors import EngineError  # noqa: E402
from socklab.results import FAILURE_ROLE  # noqa: E402
from socklab.shaping.plan import tcp_ceiling_bps  # noqa: E402

BULK_PORT = SERVER_PORT
ECHO_PORT = SERVER_PORT + 1
# Set on top of lab.py's server roles: they serve every point of the run.
LONG_LIVED = {"--max-connections": 1_000_000, "--idle-timeout": 3600}


class ClientRun(Protocol):
    """One point's client, as :func:`benchlab.run_in_client` runs it on a lab."""

    def __call__(self, script: str, env: Mapping[str, str], *, timeout_s: float = 300) -> tuple[dict, str]:
        """``sh -c script`` in a client container whose link is made from ``env`` (SOCKLAB_LINK_*);
        its result lines by role (an "error" entry when it failed) and its stdout."""


def _server(port: int, workload: str, mode: str, **server: object) -> str:
    """A lab server of ``mode`` on ``port`` for clients of ``workload``, as a shell command."""
    argv = server_argv({"mode": mode, **server}, {"name": "load", "workload": {"kind": workload}},
                       options={"--port": port, **LONG_LIVED})
    return shlex.join([*SOCKLAB, *argv])


def server_command(mode: str = "threaded") -> list[str]:
    """The server container's command: iperf3's server and both lab servers (``mode``).

    All in one container, so each point costs one client container, not a
    project. A 256 KiB recv keeps the bulk server off the critical path at
    1 Gbit/s (its default 1 KiB is the tutorial's, not a benchmark's).
    """
    return ["exec", "sh", "-c", f"iperf3 -s -D && {_server(ECHO_PORT, 'echo', mode)} & "
                                f"exec {_server(BULK_PORT, 'bulk', mode, recv_size='256KiB')}"]


# Threaded servers serve the concurrent iperf3/ping-pong of a point.
SERVER_COMMAND = server_command("threaded")
RATES_MBIT = (1, 10, 100, 1000)
DELAYS_MS = (1, 10, 50, 200)
BACKENDS = ("userspace", "netem")
# Rate and delay together: the seed demo's link (10 Mbit/s, 20 ms each way).
RATE_DELAY = (10, 20)
GOODPUT_TOLERANCE = 0.05
RTT_TOLERANCE = 0.05
PING_BYTES = 64
LOADGEN_SECONDS = 5
# A cap on the transfer; at the fastest veth speeds seen here (~20 Gbit/s) that
# is still over a second of sending. (Not on memory: a payload this large is
# tiled, see socklab.payload.)
LOADGEN_MAX_BYTES = 4 * 2**30
LOADGEN_MODES = ("blocking", "epoll")
# What the lab client must reach against iperf3, by mode. Blocking: its one
# send() of a tiled payload copies from the cache, as iperf3's writes do.
LOADGEN_MIN_RATIO = {"blocking": 0.9, "epoll": 0.8}


def _label_rate(mbit: float) -> str:
    return f"{mbit / 1000:g} Gbit/s" if mbit >= 1000 else f"{mbit:g} Mbit/s"


def _lab_client(port: int, workload: dict, mode: str = "blocking", trace: bool = False) -> str:
    """The lab's client of ``mode`` with ``workload`` (lab.py's workload keys) against ``port``, as a shell command."""
    return shlex.join([*SOCKLAB, *client_argv({"mode": mode, "workload": workload}, {"--port": port},
                                              trace=trace)])


def _goodput_point(client: ClientRun, rate_mbit: float, seconds: int, **link: str) -> dict:
    """iperf3 then the lab client through one link shaped to ``rate_mbit`` (and ``link``'s other
    keys); both goodputs in bit/s. A link the kernel cannot shape raises :class:`Unavailable`."""
    ceiling_bps = tcp_ceiling_bps(rate_mbit * 1e6)
    payload = int(ceiling_bps / 8 * (seconds - 1))
    script = (iperf3_json_script(f"-c server -t {seconds} -O 1") + "; "
              + _lab_client(BULK_PORT, {"kind": "bulk", "bytes": payload}))
    results, stdout = client(script, link_env(rate=f"{rate_mbit:g}mbit", **link), timeout_s=seconds * 4 + 120)
    _raise_if_refused(results)
    iperf = json_after("iperf3 ", stdout)
    if not iperf or "error" in iperf or "client" not in results:
        raise RuntimeError(f"goodput at {rate_mbit} Mbit/s: {results.get('error') or (iperf or {}).get('error')}")
    return {"rate_mbit": rate_mbit, **link, "ceiling_bps": ceiling_bps,
            "iperf3_bps": iperf["end"]["sum_received"]["bits_per_second"],
            "iperf3_retransmits": iperf["end"]["sum_sent"].get("retransmits"),
            "lab_bps": results["client"]["goodput_bps"], "lab_bytes": results["client"]["bytes_delivered"]}


class Unavailable(RuntimeError):
    """The kernel cannot shape the link asked for (the lab's sentence says why)."""


def _raise_if_refused(results: dict) -> None:
    """:class:`Unavailable` with the entrypoint's sentence if it could not shape the link
    (its failure line: an engine error, before any command of the point ran)."""
    failure = results.get(FAILURE_ROLE) or {}
    if failure.get("failed") == "entry" and failure.get("exit_code") == EngineError.exit_code:
        raise Unavailable(failure["error"])


def _goodput_figures(fid: str, name: str, rows: list[dict]) -> list[dict]:
    """iperf3's goodput against the TCP ceiling, the lab client's against iperf3's."""
    return [figure(f"{fid}.iperf3", f"iperf3 goodput through {name}", "Mbit/s", [r["iperf3_bps"] / 1e6 for r in rows],
                   reference="TCP ceiling (rate x 1448/1514)", reference_samples=[r["ceiling_bps"] / 1e6 for r in rows],
                   target={"within": GOODPUT_TOLERANCE}),
            figure(f"{fid}.lab", f"lab client goodput through {name}", "Mbit/s", [r["lab_bps"] / 1e6 for r in rows],
                   reference="iperf3, same link and run", reference_samples=[r["iperf3_bps"] / 1e6 for r in rows],
                   target={"within": GOODPUT_TOLERANCE})]


def _log_goodput(log: Log, what: str, row: dict) -> None:
    log(f"goodput {what}: iperf3 {row['iperf3_bps'] / 1e6:.3f}, lab {row['lab_bps'] / 1e6:.3f} Mbit/s "
        f"(ceiling {row['ceiling_bps'] / 1e6:.3f})")


def goodput(client: ClientRun, quick: bool, log: Log) -> tuple[list[dict], list[dict]]:
    """The goodput figures at every rate."""
    repetitions, seconds = (1, 4) if quick else (3, 6)
    figures, points = [], []
    for rate in RATES_MBIT:
        rows = []
        for _ in range(repetitions):
            rows.append(_goodput_point(client, rate, seconds))
            _log_goodput(log, f"at {_label_rate(rate)}", rows[-1])
        points += rows
        figures += _goodput_figures(f"link.goodput.{rate:g}mbit", f"a {_label_rate(rate)} link", rows)
    return figures, points


def rate_delay_goodput(client: ClientRun, quick: bool, log: Log) -> tuple[list[dict], list[dict], dict]:
    """The goodput figures through rate and delay together, for every backend the kernel has."""
    (rate, delay), repetitions, seconds = RATE_DELAY, (1 if quick else 3), (4 if quick else 6)
    figures, points, unavailable = [], [], {}
    for backend in BACKENDS:
        link = {"delay": f"{delay}ms", "backend": backend}
        try:
            rows = [_goodput_point(client, rate, seconds, **link) for _ in range(repetitions)]
        except Unavailable as exc:
            unavailable[backend] = str(exc)
            log(f"goodput through rate + delay, {backend}: not measured: {unavailable[backend]}")
            continue
        for row in rows:
            _log_goodput(log, f"at {_label_rate(rate)}, {delay} ms each way ({backend})", row)
        points += rows
        figures += _goodput_figures(f"link.goodput.{backend}.{rate:g}mbit_{delay}ms",
                                    f"a {_label_rate(rate)} link with {delay} ms each way ({backend})", rows)
    return figures, points, unavailable


def _ping_pong(client: ClientRun, env: dict, round_trip_ms: float) -> dict:
    """The lab's echo client's round trips over a link made by ``env`` (and the delay line's
    own lateness, where there is one). A link the kernel cannot shape raises :class:`Unavailable`."""
    requests = int(min(200, max(10, 3000 / max(round_trip_ms, 1))))
    results, _ = client(_lab_client(ECHO_PORT, {"kind": "echo", "size": PING_BYTES, "requests": requests}),
                        {**env, "SOCKLAB_REPORT_LINK": "1"})
    _raise_if_refused(results)
    if "client" not in results:
        raise RuntimeError(f"round trip over {env}: {results.get(FAILURE_ROLE) or 'no result'}")
    line = (results.get("link") or {}).get("delay_line") or {}
    return {"p50_ms": results["client"]["latency_ms"]["p50"],
            "late_ms_mean": {d: line[d].get("late_ms_mean") for d in ("up", "down") if d in line}}


def round_trip(client: ClientRun, quick: bool, log: Log) -> tuple[list[dict], list[dict], dict]:
    """The round-trip figures for every delay and every backend the kernel has."""
    repetitions = 1 if quick else 3
    figures, points, unavailable = [], [], {}
    for backend in BACKENDS:
        try:
            for delay in DELAYS_MS:
                rows = []
                for _ in range(repetitions):
                    base = _ping_pong(client, link_env(), 1.0)
                    shaped = _ping_pong(client, link_env(delay=f"{delay}ms", backend=backend), 2 * delay)
                    base_ms, shaped_ms = base["p50_ms"], shaped["p50_ms"]
                    rows.append({"backend": backend, "delay_ms": delay, "unshaped_ms": base_ms,
                                 "rtt_ms": shaped_ms, "expected_ms": 2 * delay + base_ms,
                                 "delay_line_late_ms_mean": shaped["late_ms_mean"]})
                    log(f"round trip, {backend}, {delay} ms each way: {shaped_ms:.3f} ms "
                        f"(expected {2 * delay} + unshaped {base_ms:.3f})")
                points += rows
                figures.append(figure(
                    f"link.rtt.{backend}.{delay}ms", f"round trip, {delay} ms each way ({backend})", "ms",
                    [r["rtt_ms"] for r in rows], reference="2 x delay + unshaped round trip, same run",
                    reference_samples=[r["expected_ms"] for r in rows], target={"within": RTT_TOLERANCE}))
        except Unavailable as exc:
            # The first delay tells whether this kernel has the backend at all.
            unavailable[backend] = str(exc)
            log(f"round trip, {backend}: not measured: {exc}")
    return figures, points, unavailable


def loadgen(client: ClientRun, quick: bool, log: Log) -> tuple[list[dict], list[dict]]:
    """The lab client's bulk goodput on an unshaped link, traced and not, against iperf3.

    Two modes: blocking (the whole payload in a few send() calls, so tracing
    has almost nothing to record) and epoll (a send() per writable event, each
    one traced), which shows what the trace costs per call.
    """
    repetitions = 1 if quick else 3
    rows = []
    for repetition in range(repetitions):
        script = iperf3_json_script(f"-c server -t {LOADGEN_SECONDS} -O 1")
        results, stdout = client(script, link_env())
        iperf = json_after("iperf3 ", stdout)
        if not iperf or "error" in iperf:
            raise RuntimeError(f"iperf3 on an unshaped link: {results.get('error') or (iperf or {}).get('error')}")
        iperf_bps = iperf["end"]["sum_received"]["bits_per_second"]
        payload = min(LOADGEN_MAX_BYTES, int(iperf_bps / 8 * (LOADGEN_SECONDS - 1)))
        row = {"iperf3_bps": iperf_bps, "payload_bytes": payload}
        for mode in LOADGEN_MODES:
            # Alternated, so that whatever favours the first or second run of a pair
            # does not pass for the cost of tracing.
            for traced in ((False, True) if repetition % 2 == 0 else (True, False)):
                results, _ = client(_lab_client(BULK_PORT, {"kind": "bulk", "bytes": payload}, mode, trace=traced),
                                    link_env())
                if "client" not in results:
                    raise RuntimeError(f"lab bulk client ({mode}) on an unshaped link: {results.get('error')}")
                key = f"{mode}.trace_{'on' if traced else 'off'}"
                row[key] = {"bps": results["client"]["goodput_bps"], "send_calls": results["client"]["send_calls"],
                            "cpu_s": results["client"]["cpu_s"]}
        rows.append(row)
        log("load generation, unshaped: iperf3 " + f"{iperf_bps / 1e9:.2f} Gbit/s; lab " +
            ", ".join(f"{k} {v['bps'] / 1e9:.2f} ({v['send_calls']} calls)" for k, v in row.items()
                      if isinstance(v, dict)))
    figures = [
        figure(f"loadgen.bulk.{mode}.trace_{kind}", f"lab bulk client ({mode}) goodput, unshaped link, "
               f"trace {kind}", "Gbit/s", [r[f"{mode}.trace_{kind}"]["bps"] / 1e9 for r in rows],
               reference="iperf3, same containers and run", reference_samples=[r["iperf3_bps"] / 1e9 for r in rows],
               target={"min": LOADGEN_MIN_RATIO[mode]})
        for mode in LOADGEN_MODES for kind in ("off", "on")
    ]
    return figures, rows


def run(quick: bool, log: Log) -> dict:
    """Every fidelity and bulk load-generation figure."""
    build_image()
    with server_lab(SERVER_COMMAND) as lab:
        client = functools.partial(run_in_client, lab)
        goodput_figures, goodput_points = goodput(client, quick, log)
        rate_delay_figures, rate_delay_points, unavailable = rate_delay_goodput(client, quick, log)
        rtt_figures, rtt_points, rtt_unavailable = round_trip(client, quick, log)
        loadgen_figures, loadgen_points = loadgen(client, quick, log)
    held = [f for f in goodput_figures if f["id"].endswith(".iperf3") and f["met"]]
    return {
        "figures": goodput_figures + rate_delay_figures + rtt_figures + loadgen_figures,
        "details": {"goodput": goodput_points, "rate_delay": rate_delay_points, "round_trip": rtt_points,
                    "loadgen": loadgen_points, "backends_unavailable": {**unavailable, **rtt_unavailable},
                    "goodput_holds_up_to": held[-1]["id"].split(".")[2] if held else None},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, log_to_stderr), indent=1))
