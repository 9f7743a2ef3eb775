"""The echo benchmark's figures: each server mode against the reference, and the best non-blocking one."""

from __future__ import annotations

import statistics

from common import failed_figure, figure

from .measurement import median, ok
from .roles import CLIENT_MODE, REQUEST_SIZE

NONBLOCKING = ("select", "poll", "epoll", "asyncio")
REFERENCE_LABEL = "reference asyncio echo server"


LOAD_NOTE = (f"Load: one `socklab client --mode {CLIENT_MODE}` process, {REQUEST_SIZE} requests, in its own "
             "container, the same for both servers in the same repetition, so each ratio is a fair comparison; "
             "each figure's note says how busy that client was (at 85 % or more it was the bottleneck, which "
             "pulls the ratio towards 1).")


def _load_note(points: list[dict]) -> str:
    shares = [p[side]["client_cpu_share"] for p in points for side in ("lab", "reference")
              if p[side].get("client_cpu_share") is not None]
    share = median(shares)
    if share is None:
        return ""
    verdict = "client-bound" if share >= 0.85 else "neither process saturated"
    return f"client CPU busy {share:.0%} of its wall time (median): {verdict}."


def mode_figure(mode: str, connections: int, points: list[dict]) -> dict:
    """``echo.<mode>.<connections>``: the lab server's req/s against the reference's, pairwise."""
    fid = f"echo.{mode}.{connections}"
    label = f"echo req/s, {mode} server, {connections:,} connection{'s' if connections > 1 else ''}"
    good = [p for p in points if ok(p)]
    if not good:
        errors = {p[side]["error"] for p in points for side in ("lab", "reference") if "error" in p[side]}
        return failed_figure(fid, label, "req/s", "; ".join(sorted(errors)) or "not measured",
                             reference=REFERENCE_LABEL)
    note = _load_note(good)
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
    if not ratios:
        return failed_figure(fid, label, "req/s", "no non-blocking mode was measured", reference=REFERENCE_LABEL,
                             target={"min": 1.0}), None
    best = max(ratios, key=ratios.get)
    good = [p for p in points if p["mode"] == best and p["connections"] == connections and ok(p)]
    others = ", ".join(f"{m} {r:.2f}x" for m, r in sorted(ratios.items(), key=lambda kv: -kv[1]))
    note = (f"best mode {best}, by median pairwise ratio (all: {others}); picking the best of four favours "
            f"the lab a little when they are close; " + _load_note(good))
    return figure(fid, label, "req/s", [p["lab"]["req_per_s"] for p in good], reference=REFERENCE_LABEL,
                  reference_samples=[p["reference"]["req_per_s"] for p in good], target={"min": 1.0},
                  note=note), best

