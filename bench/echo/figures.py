"""The echo benchmark's figures: each server mode against the reference, and the best non-blocking one."""

from __future__ import annotations

import statistics

from common import failed_figure, figure

from .measurement import median, ok
from .roles import CLIENT_BUSY_SHARE, CLIENT_MODE, CLIENT_PROCESSES, REQUEST_SIZE

NONBLOCKING = ("select", "poll", "epoll", "asyncio")
REFERENCE_LABEL = "reference asyncio echo server"
# What the best non-blocking server must reach against the reference, by connection count (issue 17).
BEST_TARGETS = {1: {"min": 1.0}, 10: {"min": 1.0}, 100: {"min": 1.2}, 1000: {"min": 1.2}}
# Its server CPU per round trip against the reference's, where one turn of its loop serves many connections.
CPU_TARGETS = {100: {"max": 0.83}, 1000: {"max": 0.83}}


LOAD_NOTE = (f"Load: `socklab client --mode {CLIENT_MODE}` processes, {REQUEST_SIZE} requests, in their own "
             f"container: the connections split over up to {CLIENT_PROCESSES} processes started together (one "
             "per connection below that), the same for both servers in the same repetition, so each ratio is a "
             "fair comparison; requests/s is all their round trips over the longest one's wall time. Each "
             f"figure's note says how busy each client process was (at {CLIENT_BUSY_SHARE:.0%} of its wall time "
             "or more it may have set the pace, which pulls the ratio towards 1).")


def client_load_note(points: list[dict]) -> str:
    """How busy the client processes were in ``points`` (both sides), and whether one was the bottleneck."""
    runs = [p[side] for p in points for side in ("lab", "reference") if p[side].get("client_cpu_shares")]
    if not runs:
        return ""
    shares = [share for run in runs for share in run["client_cpu_shares"]]
    processes = sorted({run.get("client_processes", len(run["client_cpu_shares"])) for run in runs})
    busy = [share for share in shares if share >= CLIENT_BUSY_SHARE]
    verdict = (f"{len(busy)} of {len(shares)} client runs at {CLIENT_BUSY_SHARE:.0%} or more: a client was the "
               "bottleneck there" if busy else f"every client under {CLIENT_BUSY_SHARE:.0%}: no client was the "
               "bottleneck")
    return (f"{'/'.join(map(str, processes))} client process{'es' if processes != [1] else ''} per run, each busy "
            f"{min(shares):.0%}-{max(shares):.0%} of its wall time (median {median(shares):.0%}): {verdict}.")



def mode_figure(mode: str, connections: int, points: list[dict]) -> dict:
    """``echo.<mode>.<connections>``: the lab server's req/s against the reference's, pairwise."""
    fid = f"echo.{mode}.{connections}"
    label = f"echo req/s, {mode} server, {connections:,} connection{'s' if connections > 1 else ''}"
    good = [p for p in points if ok(p)]
    if not good:
        errors = {p[side]["error"] for p in points for side in ("lab", "reference") if "error" in p[side]}
        return failed_figure(fid, label, "req/s", "; ".join(sorted(errors)) or "not measured",
                             reference=REFERENCE_LABEL)
    note = client_load_note(good)
    if mode == "blocking" and connections > 1:
        note += " The blocking server serves one connection at a time; the others wait in its backlog."
    if len(good) < len(points):
        note += f" {len(points) - len(good)} of {len(points)} repetitions failed and are left out."
    return figure(fid, label, "req/s", [p["lab"]["req_per_s"] for p in good], reference=REFERENCE_LABEL,
                  reference_samples=[p["reference"]["req_per_s"] for p in good], note=note)


def best_nonblocking_figure(connections: int, points: list[dict]) -> tuple[dict, str | None]:
    """``echo.best_nonblocking.<connections>``: the non-blocking mode with the best median ratio, and that mode."""
    fid = f"echo.best_nonblocking.{connections}"
    label = f"echo req/s, best non-blocking server (select/poll/epoll/asyncio), {connections:,} connection" + \
            ("s" if connections > 1 else "")
    ratios = {}
    for mode in NONBLOCKING:
        good = [p for p in points if p["mode"] == mode and p["connections"] == connections and ok(p)]
        if good:
            ratios[mode] = statistics.median(p["lab"]["req_per_s"] / p["reference"]["req_per_s"] for p in good)
    target = BEST_TARGETS.get(connections, {"min": 1.0})
    if not ratios:
        return failed_figure(fid, label, "req/s", "no non-blocking mode was measured", reference=REFERENCE_LABEL,
                             target=target), None
    best = max(ratios, key=ratios.get)
    good = [p for p in points if p["mode"] == best and p["connections"] == connections and ok(p)]
    others = ", ".join(f"{m} {r:.2f}x" for m, r in sorted(ratios.items(), key=lambda kv: -kv[1]))
    note = (f"best mode {best}, by median pairwise ratio (all: {others}); picking the best of four favours "
            f"the lab a little when they are close; " + client_load_note(good))
    return figure(fid, label, "req/s", [p["lab"]["req_per_s"] for p in good], reference=REFERENCE_LABEL,
                  reference_samples=[p["reference"]["req_per_s"] for p in good], target=target,
                  note=note), best


def cpu_per_round_trip_figure(connections: int, points: list[dict], best: str | None) -> dict:
    """``echo.best_nonblocking.cpu_per_rt.<connections>``: the best mode's server CPU per round trip ÷ the reference's.

    ``best``: the mode best_nonblocking_figure picked at this count. Each
    server's CPU is read from its container's /proc around the same load.
    """
    fid = f"echo.best_nonblocking.cpu_per_rt.{connections}"
    label = (f"server CPU per round trip, best non-blocking server ({best or 'none'}), {connections:,} connection"
             + ("s" if connections > 1 else ""))
    unit, target = "µs/round trip", CPU_TARGETS.get(connections)
    good = [p for p in points if p["mode"] == best and p["connections"] == connections and ok(p)
            and p["lab"].get("server_cpu_us_per_round_trip") and p["reference"].get("server_cpu_us_per_round_trip")]
    if not good:
        return failed_figure(fid, label, unit, "no point measured both servers' CPU", reference=REFERENCE_LABEL,
                             target=target)
    note = ("CPU time of every process in each server's container (/proc/PID/stat utime + stime) over the load, "
            "divided by its round trips; lower is better. " + client_load_note(good))
    return figure(fid, label, unit, [p["lab"]["server_cpu_us_per_round_trip"] for p in good],
                  reference=REFERENCE_LABEL, target=target,
                  reference_samples=[p["reference"]["server_cpu_us_per_round_trip"] for p in good], note=note)

