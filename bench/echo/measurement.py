"""The echo benchmark's measurements: a client run against a server, pairs of them, a server's block.

A point is one client run against the lab server and one against the
reference, back to back; every point of one server mode and repetition is
served by one lab server container, whose result line must account for
exactly what the clients sent it.
"""

from __future__ import annotations

import math
import statistics

from common import Log
from labkit.compose import ComposeProject
from socklab.results import find_results
from socklab.servers import MODES

from .containers import ClientContainer, ServerContainer
from .roles import client_command, lab_server_command

CONNECTIONS = (1, 10, 100, 1000)
QUICK_CONNECTIONS = (1, 100)
# Round trips per point, whatever the connection count: at the 15-30 k req/s
# measured here about 2 s of load (1 s in --quick), long enough that the
# connects and the interpreter's start are a small part of it, short enough
# for the suite's time budget (on a busy host a point takes longer, not fewer).
ROUND_TRIPS = 40_000
QUICK_ROUND_TRIPS = 24_000
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


def measure(client: ClientContainer, server: ServerContainer, connections: int, requests: int) -> dict:
    """One client run against ``server``: what the client measured and the server's CPU for it."""
    before = server.cpu_s()
    result, output = client.client(client_command(server.name, connections, requests))
    cpu = server.cpu_s() - before
    m = client_measurement(result, connections, requests)
    if result is None:
        m["error"] += f": {output}"
    m["server_cpu_s"] = round(cpu, 2)
    if m.get("round_trips"):
        m["server_cpu_us_per_round_trip"] = round(cpu / m["round_trips"] * 1e6, 1)
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
                repetition: int, connections_list: tuple[int, ...], round_trips: int, first_flip: bool,
                log: Log) -> tuple[list, dict]:
    """Every point of one server mode in one repetition, on one lab server container."""
    server = ServerContainer(lab, f"{lab.name}-{mode}-r{repetition}", lab_server_command(mode))
    points = []
    try:
        for i, connections in enumerate(connections_list):
            requests = math.ceil(round_trips / connections)
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
    return (f"{m['req_per_s']:8.0f} req/s (client CPU {m['client_cpu_share']:.0%}, "
            f"server {m.get('server_cpu_us_per_round_trip', float('nan')):.1f} µs CPU/round trip)")


def ok(point: dict) -> bool:
    """Whether both sides of a point were measured without an error."""
    return "error" not in point["lab"] and "error" not in point["reference"]


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def measure_all(lab: ComposeProject, client: ClientContainer, reference: ServerContainer,
                connections_list: tuple[int, ...], round_trips: int, repetitions: int,
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

