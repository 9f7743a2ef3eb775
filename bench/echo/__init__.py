"""Benchmark: echo requests/s at 1 KiB, every server mode, against a minimal asyncio echo server.

    python3 bench/echo [--quick]      (or: python3 bench/run.py --only echo)

Capacity: for 1, 10, 100 and 1,000 connections, the lab's own client (poll
mode, the one that spends the least CPU per round trip, in a client container
on an unshaped link; the connections split over up to four processes started
together, so that no client process is what sets the pace) runs 1 KiB round
trips against each server mode of the lab and, back to back, against the
reference: a minimal
asyncio echo server written for the benchmark (bench/reference_echo.py, run in
a server container of the same image). Which of the two goes first alternates
from point to point, so drift on a shared host hits both; each figure's ratio
is taken pairwise. Requests/s is the clients' completed round trips over the
longest one's wall time (connects and the closing EOF included, as a user
waits for them too). The lab's servers receive 64 KiB at a time, as the reference's
transport does 256 KiB (see roles.SERVER_RECV_SIZE).

Every point of one server mode and repetition is served by one lab server
container, stopped afterwards; its result line must account for exactly the
connections and bytes the clients sent it, so no point can have been answered
by another server. Clients reach each server by its container's unique name.
Both servers' CPU time per round trip is read from their containers' /proc
around every run: it depends less than requests/s on what else the host is
doing. When the best non-blocking mode falls short of the reference, it and the
reference are profiled (cProfile, CPU time) under the same load.

The package, by concept: roles (the servers' and client's arguments, built by
labkit.scenario), containers, measurement (points and their checks),
calibration (which client mode drives the load), figures, profiling and
explanations (why a target is missed).
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from benchlab import bench_lab, build_image
from common import Log
from socklab.servers import MODES

from .calibration import calibration_details
from .containers import ClientContainer, ServerContainer
from .explanations import shortfall_details
from .figures import LOAD_NOTE, best_nonblocking_figure, cpu_per_round_trip_figure, mode_figure
from .measurement import CONNECTIONS, QUICK_CONNECTIONS, QUICK_ROUND_TRIPS, REPETITIONS, ROUND_TRIPS, measure_all
from .roles import (CLIENT_MODE, CLIENT_MODE_WHY, CLIENT_PROCESSES, REQUEST_SIZE, lab_server_options,
                    reference_command)


def run(quick: bool, log: Log) -> dict:
    """Every echo figure; ``quick`` measures fewer connection counts, once, with fewer round trips."""
    build_image()
    connections_list = QUICK_CONNECTIONS if quick else CONNECTIONS
    round_trips = QUICK_ROUND_TRIPS if quick else ROUND_TRIPS
    repetitions = 1 if quick else REPETITIONS
    started = time.monotonic()
    details: dict = {"notes": [LOAD_NOTE], "client_mode": CLIENT_MODE, "client_mode_why": CLIENT_MODE_WHY,
                     "client_processes_at_most": CLIENT_PROCESSES,
                     "request_size": REQUEST_SIZE,
                     "round_trips_per_point": {str(n): round_trips[n] for n in connections_list},
                     "repetitions": repetitions,
                     "lab_server_options": lab_server_options(), "reference_source": "bench/reference_echo.py"}
    # The containers go before the project does (the stack unwinds first).
    with bench_lab(prefix="socklab-bench-echo") as lab, ExitStack() as cleanup:
        client = ClientContainer(lab, f"{lab.name}-client")
        cleanup.callback(client.remove)
        reference = ServerContainer(lab, f"{lab.name}-reference", reference_command())
        cleanup.callback(reference.remove)
        if not quick:
            details.update(calibration_details(client, reference, log))
        points, servers = measure_all(lab, client, reference, connections_list, round_trips, repetitions, log)
        figures = [mode_figure(mode, n, [p for p in points if p["mode"] == mode and p["connections"] == n])
                   for mode in MODES for n in connections_list]
        best_modes = {}
        for n in connections_list:
            fig, best_modes[n] = best_nonblocking_figure(n, points)
            figures.append(fig)
        figures += [cpu_per_round_trip_figure(n, points, best_modes[n]) for n in connections_list]
        details["best_nonblocking_mode"] = best_modes
        details.update(shortfall_details(lab, client, figures, best_modes, points, round_trips, log))
    details["points"] = points
    details["lab_servers"] = servers
    details["seconds"] = round(time.monotonic() - started, 1)
    return {"figures": figures, "details": details}
