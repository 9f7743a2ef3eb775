"""Where the echo benchmark's time goes: both servers under cProfile (CPU time) and the same client run."""

from __future__ import annotations

import json
import math
import re

from common import Log
from experiments import probe_command
from labkit.compose import ComposeProject
from labkit.scenario import SERVER_PORT as PORT

from .containers import ClientContainer, ServerContainer
from .measurement import load_measurement
from .roles import REFERENCE_SOURCE, client_split, lab_server_command, load_command

PROFILE_TOP = 10
# Calls into the kernel in a profile: socket methods and the pollers' waits.
KERNEL_CALL = re.compile(r"<(method '\w+' of '(_socket\.socket|select\.\w+)' objects|built-in method select\.\w+)>")


def summarize_profile(raw: dict, round_trips: int) -> dict:
    """A profile per round trip: kernel calls against Python, and the heaviest functions."""
    per_rt = 1e6 / round_trips
    rows = raw["rows"]
    kernel_s = sum(tt for fn, _, tt, _ in rows if KERNEL_CALL.fullmatch(fn))

    def top(index: int, candidates: list) -> list[dict]:
        return [{"function": fn, "calls_per_round_trip": round(nc / round_trips, 2),
                 "self_us": round(tt * per_rt, 2), "cumulative_us": round(ct * per_rt, 2)}
                for fn, nc, tt, ct in sorted(candidates, key=lambda r: -r[index])[:PROFILE_TOP]]

    # By cumulative time, only what runs for (nearly) every request: the
    # wrappers around the whole loop would otherwise fill the list.
    per_request = [r for r in rows if r[1] >= round_trips / 2]
    return {"profiled_us_per_round_trip": round(raw["total_s"] * per_rt, 1),
            "kernel_calls_us_per_round_trip": round(kernel_s * per_rt, 1),
            "python_us_per_round_trip": round((raw["total_s"] - kernel_s) * per_rt, 1),
            "by_self_time": top(2, rows), "per_request_by_cumulative_time": top(3, per_request)}


def profile_pair(lab: ComposeProject, client: ClientContainer, mode: str, connections: int, round_trips: int,
                 log: Log) -> dict:
    """cProfile of the lab's ``mode`` server and of the reference, each under the same client run."""
    requests = math.ceil(round_trips / connections)
    summary: dict = {"mode": mode, "connections": connections, "round_trips": connections * requests,
                     "clock": "CPU time (time.process_time), in µs per round trip",
                     "caution": "cProfile adds a cost to every Python call, and asyncio's path makes more calls "
                                "per round trip than the lab's reactor: compare the two servers by their unprofiled "
                                "CPU per round trip (points[].lab/reference.server_cpu_us_per_round_trip), and read "
                                "these for where each one's time goes"}
    for kind, args in (("lab", lab_server_command(mode)[1:]), ("reference", [REFERENCE_SOURCE, str(PORT)])):
        server = ServerContainer(lab, f"{lab.name}-profile-{kind}", ["exec", *probe_command("profile_server", kind, *args)])
        try:
            results, _ = client.clients(load_command(server.name, connections, requests))
        finally:
            out = server.stop()
        m = load_measurement(results, client_split(connections), requests)
        line = next((line for line in out.splitlines() if line.startswith("profile ")), None)
        if line is None or "error" in m:
            summary[kind] = {"error": m.get("error") or "the profiler printed nothing"}
            continue
        summary[kind] = {"req_per_s_under_profiler": m["req_per_s"],
                         **summarize_profile(json.loads(line[len("profile "):]), m["round_trips"])}
        log(f"profiled {kind} ({mode if kind == 'lab' else 'asyncio reference'}), {connections} connections: "
            f"{summary[kind]['profiled_us_per_round_trip']} µs CPU per round trip "
            f"({summary[kind]['python_us_per_round_trip']} µs of it Python)")
    return summary


