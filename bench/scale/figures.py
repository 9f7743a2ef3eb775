"""The scale benchmark's figures: connections held against the C10K line, memory per connection."""

from __future__ import annotations

import statistics

from common import failed_figure, figure

from .plan import C100K, C10K, REFERENCE, Plan
from .steps import at

# Resident memory per connection over the minimal holder of the same idiom (issue 17).
MEMORY_TARGETS = {"epoll": {"max": 1.5}, "asyncio": {"max": 1.2}}


def held_line(mode: str) -> tuple[int, str]:
    """The line ``mode``'s held count is compared with: C100K for the two that must reach it, else C10K."""
    if mode in REFERENCE:
        return C100K, "C100K line"
    return C10K, "C10K line"


def held_figure(mode: str, reps: list[list[dict]], plan: Plan, limit: str = "") -> dict:
    """The most connections ``mode`` held at once, per repetition, against its line (see held_line).

    ``limit``: where and why it stopped (limits.limit_sentence), carried in the note.
    """
    fid, label = f"scale.{mode}.held", f"most concurrent idle connections the {mode} server held"
    target = {"min": 1.0} if mode in REFERENCE else None
    line, reference = held_line(mode)
    held = [max(s["held"] for s in steps) for steps in reps if any("error" not in s for s in steps)]
    if not held:
        errors = [s["error"] for steps in reps for s in steps if "error" in s]
        return failed_figure(fid, label, "connections", "; ".join(errors) or "nothing measured",
                             reference=reference, target=target)
    # Exact counts in the note: the figure's four significant digits show 19,996 as 20,000.
    note = (f"held exactly {', '.join(str(n) for n in held)}; steps tried: "
            f"{', '.join(str(n) for n in plan.ramps[mode])}" + (f". {limit}" if limit else ""))
    return figure(fid, label, "connections", held, reference=reference, reference_samples=[line] * len(held),
                  target=target, note=note)


def memory_figure(mode: str, steps: list[dict | None], references: list[dict | None], *,
                  reference_label: str | None = None) -> dict:
    """KiB of server memory per held connection at the C10K step, against a reference at the same count."""
    fid, unit = f"scale.{mode}.memory_per_conn", "KiB/connection"
    label = f"resident memory per idle connection, {mode} server, {C10K} connections"
    reference_label = reference_label or f"minimal stdlib {mode} server that only accepts and keeps each socket"
    pairs = [(s, r) for s, r in zip(steps, references)
             if s and r and s.get("kib_per_connection") is not None and r.get("kib_per_connection") is not None]
    if not pairs:
        return failed_figure(fid, label, unit, "no step at the C10K line measured both", reference=reference_label,
                             target=MEMORY_TARGETS.get(mode))
    samples = [s["kib_per_connection"] for s, _ in pairs]
    total_mib = statistics.median(s["rss_held_kib"] - s["rss_idle_kib"] for s, _ in pairs) / 1024
    idle_mib = statistics.median(s["rss_idle_kib"] for s, _ in pairs) / 1024
    return figure(fid, label, unit, samples, reference=reference_label,
                  reference_samples=[r["kib_per_connection"] for _, r in pairs], target=MEMORY_TARGETS.get(mode),
                  note=(f"{round(statistics.median(samples) * 1024)} bytes per connection, "
                        f"{total_mib:.1f} MiB for all {C10K} over the idle server's {idle_mib:.1f} MiB (medians)"))


def memory_summary(reps: list[list[dict]]) -> dict:
    """Bytes per connection and total memory at the C10K step and at the most held, medians over repetitions."""
    summary = {}
    for name, pick in (("at_c10k", lambda steps: at(steps, C10K)),
                       ("at_most_held", lambda steps: max(steps, key=lambda s: s.get("held", 0)))):
        # Below a hundred connections the difference is the noise of a first allocation.
        steps = [s for s in map(pick, reps) if s and s.get("kib_per_connection") is not None and s["held"] >= 100]
        if steps:
            summary[name] = {
                "held": statistics.median(s["held"] for s in steps),
                "bytes_per_connection": round(statistics.median(s["kib_per_connection"] for s in steps) * 1024),
                "total_mib": round(statistics.median(s["rss_held_kib"] - s["rss_idle_kib"] for s in steps) / 1024, 1),
                "idle_mib": round(statistics.median(s["rss_idle_kib"] for s in steps) / 1024, 1),
            }
    return summary
