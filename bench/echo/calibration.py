"""Which client mode drives the echo benchmark's load: the candidates measured against the reference.

One client mode drives every point (roles.CLIENT_MODE, and why); the full
run measures every candidate again at the two ends of the range and records
which was cheapest, since a shared host can rank them either way.
"""

from __future__ import annotations

import math

from common import Log

from .containers import ClientContainer, ServerContainer
from .measurement import CALIBRATION_ROUND_TRIPS, client_measurement, median
from .roles import client_command

# Every non-blocking client mode at the two ends of the range; the blocking
# client (a thread per connection) only where it is one.
CALIBRATION = ((1, ("blocking", "select", "poll", "epoll", "asyncio")), (1000, ("select", "poll", "epoll", "asyncio")))
CALIBRATION_ROUNDS = 2


def calibrate_client(client: ClientContainer, reference: ServerContainer, log: Log) -> list[dict]:
    """Candidate client modes against the reference, alternating: CPU per round trip and req/s of each."""
    rows = []
    for connections, modes in CALIBRATION:
        requests = math.ceil(CALIBRATION_ROUND_TRIPS / connections)
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for round_ in range(CALIBRATION_ROUNDS):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                result, _ = client.client(client_command(reference.name, connections, requests, mode))
                runs[mode].append(client_measurement(result, connections, requests))
        for mode, measured in runs.items():
            good = [m for m in measured if "error" not in m]
            row = {"client_mode": mode, "connections": connections, "runs": len(measured),
                   "req_per_s": median([m["req_per_s"] for m in good]),
                   "client_cpu_us_per_round_trip": median([m["client_cpu_s"] / m["round_trips"] * 1e6 for m in good]),
                   "client_cpu_share": median([m["client_cpu_share"] for m in good])}
            row = {k: round(v, 3 if k == "client_cpu_share" else 1) if isinstance(v, float) else v
                   for k, v in row.items()}
            errors = [m["error"] for m in measured if "error" in m]
            if errors:
                row["errors"] = errors
            rows.append(row)
            log(f"client mode {mode:>8}, {connections:>4} connections, against the reference: "
                f"{row['req_per_s']} req/s, {row['client_cpu_us_per_round_trip']} µs client CPU per round trip")
    return rows


def calibration_details(client: ClientContainer, reference: ServerContainer, log: Log) -> dict:
    """The client modes measured against the reference, and the cheapest per connection count."""
    calibration = calibrate_client(client, reference, log)
    cheapest = {}
    for n, _ in CALIBRATION:
        measured = [r for r in calibration if r["connections"] == n and r["client_cpu_us_per_round_trip"]]
        if measured:
            cheapest[n] = min(measured, key=lambda r: r["client_cpu_us_per_round_trip"])["client_mode"]
    return {"client_mode_calibration": calibration, "client_mode_cheapest_measured": cheapest}

