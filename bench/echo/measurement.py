"""The echo benchmark's measurements: a client run against a server, pairs of them, a server's block.

A point is one client run against the lab server and one against the
reference, back to back; every point of one server mode and repetition is
served by one lab server container, whose result line must account for
exactly what the clients sent it.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping

from common import Log
from labkit.compose import ComposeProject
from socklab.results import find_results
from socklab.servers import MODES

from .containers import ClientContainer, ServerContainer
from .roles import client_split, lab_server_command, load_command

CONNECTIONS = (1, 10, 100, 1000)
QUICK_CONNECTIONS = (1, 100)
# Round trips per point, by connection count: about 1 s of load each on a quiet
# host (at 1 connection 25-35 k req/s, from 10 on, the split load, 40-80 k), long
# enough that the connects, the interpreter's start and the few milliseconds
# between the client processes' starts are a small part of it, short enough for
# the suite's time budget (on a busy host a point takes longer, not fewer).
ROUND_TRIPS = {1: 30_000, 10: 40_000, 100: 60_000, 1000: 60_000}
QUICK_ROUND_TRIPS = {1: 20_000, 100: 40_000}
# One client process per run when the client modes are compared (calibration).
CALIBRATION_ROUND_TRIPS = 24_000
REPETITIONS = 3


def client_measurement(result: dict | None, connections: int, requests: int) -> dict:
    """Requests/s and what else a client's result line says, or an error when the run was not complete."""
    expected = connections * requests
    if result is None:
        return {"error": "the client printed no result"}
    latency = result.get("latency_ms") or {}
    done = latency.get("count", 0)
    measured = {
        "req_per_s": round(done / result["wall_s"], 1) if result.get("wall_s") else None,
        "round_trips": done, "wall_s": result.get("wall_s"), "client_cpu_s": result.get("cpu_s"),
        "client_cpu_share": round(result["cpu_s"] / result["wall_s"], 3) if result.get("wall_s") else None,
        # The client's own figure: round trips over first send to last reply (no connects, no EOF).
        "client_requests_per_s": result.get("requests_per_s"),
        "latency_ms": {k: latency.get(k) for k in ("p50", "p99", "max")},
        "bytes_accepted": result.get("bytes_accepted"),
    }
    if result.get("errors"):
        measured["error"] = "; ".join(result["errors"])[:400]
    elif done != expected:
        measured["error"] = f"{done} round trips of {expected}"
    elif result.get("bytes_delivered") != result.get("bytes_accepted"):
        measured["error"] = (f"the server confirmed {result.get('bytes_delivered')} bytes "
                             f"of {result.get('bytes_accepted')}")
    return measured


def load_measurement(results: list[dict], split: list[int], requests: int) -> dict:
    """The client processes of a split load (``split``: each one's connections) as one run.

    Requests/s is every process's round trips over the longest one's wall time
    (they start together); ``client_cpu_share`` is the busiest process's share
    of its own wall time, each one's in ``client_cpu_shares``. An error when a
    process printed no result or did not complete its run.
    """
    each = [client_measurement(r, n, requests) for r, n in zip(results, split)]
    each += [client_measurement(None, n, requests) for n in split[len(results):]]
    measured = [m for m in each if m.get("wall_s")]
    shares = [m["client_cpu_share"] for m in measured if m.get("client_cpu_share") is not None]
    round_trips = sum(m.get("round_trips") or 0 for m in each)
    wall_s = max((m["wall_s"] for m in measured), default=None)
    combined = {
        "req_per_s": round(round_trips / wall_s, 1) if wall_s else None,
        "round_trips": round_trips, "wall_s": wall_s, "client_processes": len(split),
        "client_cpu_s": round(sum(m.get("client_cpu_s") or 0 for m in each), 3),
        "client_cpu_share": max(shares, default=None), "client_cpu_shares": shares,
        "client_requests_per_s": round(sum(m.get("client_requests_per_s") or 0 for m in each), 1),
        "latency_ms_by_client": [m.get("latency_ms") for m in each],
        "bytes_accepted": sum(m.get("bytes_accepted") or 0 for m in each),
    }
    errors = [f"client {i + 1} of {len(split)}: {m['error']}" for i, m in enumerate(each) if "error" in m]
    if errors:
        combined["error"] = "; ".join(errors)[:400]
    return combined


def server_cpu_per_round_trip_us(cpu_s: float, round_trips: int) -> float | None:
    """Microseconds of server CPU per round trip (None without round trips)."""
    return round(cpu_s / round_trips * 1e6, 1) if round_trips else None


def measure(client: ClientContainer, server: ServerContainer, connections: int, requests: int) -> dict:
    """One split load (roles.load_command) against ``server``: what the clients measured and the server's CPU.

    The server's CPU is read from its container's /proc before and after the
    load, so it covers the clients' connects, round trips and EOFs.
    """
    split = client_split(connections)
    before = server.cpu_s()
    results, output = client.clients(load_command(server.name, connections, requests))
    cpu = server.cpu_s() - before
    m = load_measurement(results, split, requests)
    if len(results) < len(split):
        m["error"] += f": {output}"
    m["server_cpu_s"] = round(cpu, 2)
    if m.get("round_trips"):
        m["server_cpu_us_per_round_trip"] = server_cpu_per_round_trip_us(cpu, m["round_trips"])
    return m


def measure_pair(client: ClientContainer, reference: ServerContainer, server: ServerContainer, connections: int,
                 requests: int, lab_first: bool) -> dict[str, dict]:
    """One point: the same client run against the lab server and the reference, back to back."""
    order = [("lab", server), ("reference", reference)]
    if not lab_first:
        order.reverse()
    return {tag: measure(client, target, connections, requests) for tag, target in order}


def check_server(result: dict | None, points: list[dict]) -> str | None:
    """Why the lab server's result does not account for exactly ``points``' clients (None when it does)."""
    if result is None:
        return "the lab server printed no result"
    connections = sum(p["connections"] for p in points)
    sent = sum(p["lab"].get("bytes_accepted") or 0 for p in points)
    if result["connections"] != connections or result["bytes_received"] != sent:
        return (f"the lab server saw {result['connections']} connections and {result['bytes_received']} bytes, "
                f"its clients made {connections} and sent {sent}")
    return None


def serve_block(lab: ComposeProject, client: ClientContainer, reference: ServerContainer, mode: str,
                repetition: int, connections_list: tuple[int, ...], round_trips: Mapping[int, int],
                first_flip: bool,
                log: Log) -> tuple[list, dict]:
    """Every point of one server mode in one repetition, on one lab server container."""
    server = ServerContainer(lab, f"{lab.name}-{mode}-r{repetition}", lab_server_command(mode))
    points = []
    try:
        for i, connections in enumerate(connections_list):
            requests = math.ceil(round_trips[connections] / connections)
            pair = measure_pair(client, reference, server, connections, requests, lab_first=(i % 2 == 0) != first_flip)
            point = {"mode": mode, "connections": connections, "repetition": repetition,
                     "requests_per_connection": requests, **pair}
            points.append(point)
            log(f"echo {mode:>8} server, {connections:>4} connections, repetition {repetition}: "
                f"{_show(pair['lab'])} vs reference {_show(pair['reference'])}")
    finally:
        stdout = server.stop()
    result = next((r for r in find_results(stdout) if r.get("role") == "server"), None)
    problem = check_server(result, points)
    if problem:
        for point in points:
            point["lab"].setdefault("error", problem)
    summary = {"mode": mode, "repetition": repetition, "verified": problem is None, "problem": problem}
    if result:
        summary.update({k: result.get(k) for k in ("connections", "bytes_received", "cpu_s", "max_concurrent",
                                                   "threads_max", "peak_rss_kib", "idle_timeouts", "wall_s",
                                                   "stopped_by")})
    return points, summary


def _show(m: dict) -> str:
    if "error" in m:
        return f"FAILED ({m['error'][:120]})"
    return (f"{m['req_per_s']:8.0f} req/s (busiest of {m['client_processes']} clients' CPU "
            f"{m['client_cpu_share']:.0%}, "
            f"server {m.get('server_cpu_us_per_round_trip', float('nan')):.1f} µs CPU/round trip)")


def ok(point: dict) -> bool:
    """Whether both sides of a point were measured without an error."""
    return "error" not in point["lab"] and "error" not in point["reference"]


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def measure_all(lab: ComposeProject, client: ClientContainer, reference: ServerContainer,
                connections_list: tuple[int, ...], round_trips: Mapping[int, int], repetitions: int,
                log: Log) -> tuple[list[dict], list[dict]]:
    """Every point of every server mode and repetition, and each lab server's own account."""
    points, servers = [], []
    for repetition in range(1, repetitions + 1):
        # Each repetition starts at another mode, so no mode always meets the same moment.
        shift = (repetition - 1) * 2 % len(MODES)
        for j, mode in enumerate(MODES[shift:] + MODES[:shift]):
            block, summary = serve_block(lab, client, reference, mode, repetition, connections_list, round_trips,
                                         first_flip=(j + repetition) % 2 == 1, log=log)
            points += block
            servers.append(summary)
    return points, servers

