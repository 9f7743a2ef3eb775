"""Several run directories side by side, for before/after studies: compare.md and plots.

Like the report, it reads only the run directories' files. Runs are labelled A,
B, ... in the order given; each later run's change is measured against A, and
called out when the two 95 % confidence intervals do not even overlap.
"""

from __future__ import annotations

import datetime as dt
import json
import string
from pathlib import Path
from typing import Any, Mapping, Sequence

from socklab.atomic import write_atomic
from socklab.errors import UsageError

from . import markdown, plots
from .rundir import LoadedRun, RunDir
from .summary import CaseSummary

MAX_RUNS = plots.MAX_RUNS

# The metrics compared per client group, then the server's and the case's.
GROUP_METRICS = ("goodput_bps", "send_s", "blocked_s", "cpu_s", "send_calls", "eagain", "latency_ms.p50",
                 "latency_ms.p99", "bytes_delivered")
OTHER_METRICS = ("server.cpu_s", "case.wall_s")


def load_run(path: Path, label: str) -> LoadedRun:
    """Read a run directory (bad input if it is not one), labelled for the comparison."""
    return RunDir.open_existing(path).load(label)


def default_out(results_root: Path, now: dt.datetime | None = None) -> Path:
    """Where a comparison goes unless told: ``results_root/compare/<YYYYmmdd-HHMMSS>``."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    path, n = results_root / "compare" / stamp, 1
    while path.exists():
        n += 1
        path = results_root / "compare" / f"{stamp}-{n}"
    return path


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Config data as dotted keys; client groups by name, as the matrix names them."""
    if isinstance(data, Mapping):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(data, list) and data and all(isinstance(d, Mapping) and "name" in d for d in data):
        flat = {}
        for item in data:
            flat.update(_flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}{item['name']}."))
        return flat
    return {prefix.rstrip("."): data}


def setting_differences(runs: Sequence[LoadedRun]) -> list[tuple[str, list[Any]]]:
    """The experiment settings whose values are not the same in every run: (key, value per run)."""
    flat = [_flatten(run.experiment.to_dict()) for run in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [(k, [f.get(k) for f in flat]) for k in keys if len({repr(f.get(k)) for f in flat}) > 1]


def _summary(case: CaseSummary | None, name: str):
    found = case.metric(name) if case is not None else None
    return found.summary if found is not None else None


def change_text(base: CaseSummary | None, other: CaseSummary | None, name: str) -> str:
    """``other``'s change against ``base`` in percent; bold when their 95 % CIs do not overlap."""
    a, b = _summary(base, name), _summary(other, name)
    if a is None or b is None:
        return markdown.MISSING
    if a.mean == 0:
        return "same" if b.mean == 0 else "from 0"
    ratio = b.mean / a.mean
    # Past a doubling, a factor reads better than a percentage in the thousands.
    text = f"×{ratio:.3g}" if ratio >= 2 else f"{(b.mean - a.mean) / abs(a.mean) * 100:+.1f} %"
    apart = None not in (a.ci95_low, a.ci95_high, b.ci95_low, b.ci95_high) and (
        b.ci95_low > a.ci95_high or b.ci95_high < a.ci95_low)
    return f"**{text}**" if apart else text


def _value_text(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, str) and not value.isprintable():
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def render(runs: Sequence[LoadedRun], plot_files: Sequence[plots.PlotFile]) -> str:
    """compare.md's Markdown; ``plot_files`` are embedded from plots/ by relative path."""
    names = " vs ".join(f"{run.experiment.name} ({run.label})" for run in runs)
    rows = []
    for run in runs:
        meta = run.meta
        ok = sum(r["status"] == "ok" for r in run.records)
        checks = [e for r in run.records for e in r.get("expectations") or ()]
        rows.append([f"**{run.label}**", f"`{run.path}`", run.experiment.name, str(meta.get("started_at", "?")),
                     str(meta.get("git_revision", "?")), str(meta.get("host_kernel", "?")),
                     str(meta.get("docker", {}).get("engine", "?")),
                     markdown.shaping_text(meta.get("shaping_backend")),
                     f"{ok} of {len(run.records)}", f"{sum(e['passed'] for e in checks)} of {len(checks)}"])
    lines = [f"# Comparison: {names}", "",
             *markdown.table(["run", "run directory", "experiment", "started", "revision", "kernel", "Docker",
                              "shaping", "cases that ran", "checks held"], rows)]
    lines += ["", "## What differs", ""]
    differences = [(k, v) for k, v in setting_differences(runs) if k not in ("name", "description")]
    if differences:
        lines += markdown.table(["setting", *(run.label for run in runs)],
                                ([f"`{key}`", *map(_value_text, values)] for key, values in differences))
    else:
        lines.append("The experiments are the same setting for setting; what changed is the code "
                     "(revision), the engine or chance.")

    summaries = [run.summary for run in runs]
    case_ids = list(dict.fromkeys(c.id for run in runs for c in run.cases))
    groups = list(dict.fromkeys(g.name for run in runs for g in run.experiment.clients))
    lines += ["", "## Results", "",
              "Means over the repetitions that ran to the end, ± half the 95 % confidence interval. "
              f"Changes are against run {runs[0].label}; **bold** where the two confidence intervals do "
              "not overlap (with few repetitions the intervals are wide, so a change that is not bold "
              "may still be real).", ""]
    metrics = [(markdown.SHOWN[m], f"{group}.{m}", f", group `{group}`" if len(groups) > 1 else "")
               for group in groups for m in GROUP_METRICS]
    metrics += [(markdown.SHOWN[m], m, "") for m in OTHER_METRICS]
    for shown, name, of_group in metrics:
        if not any(summary.has(name) for summary in summaries):
            continue
        header = ["case", *[run.label for run in runs],
                  *[f"{run.label} vs {runs[0].label}" for run in runs[1:]]]
        rows = []
        for case_id in case_ids:
            cases = [summary.get(case_id) for summary in summaries]
            rows.append([f"`{case_id}`", *[markdown.mean_ci(_summary(case, name), shown.scale) for case in cases],
                         *[change_text(cases[0], case, name) for case in cases[1:]]])
        lines += [f"### {shown.title(shown.heading + of_group)}", "", *markdown.table(header, rows), ""]
    lines += markdown.plots_section(plot_files, "Colour is the I/O mode, as in every report; " + "; ".join(
        f"run {run.label}: {style}" for run, style in zip(runs, plots.RUN_STYLE_NAMES)) + ".")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_comparison(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Compare 2 to MAX_RUNS run directories into ``out_dir``: compare.md and plots/*.png.

    Returns the path of compare.md.
    """
    if not 2 <= len(run_dirs) <= MAX_RUNS:
        raise UsageError(f"lab.py compare: give 2 to {MAX_RUNS} run directories, not {len(run_dirs)}")
    runs = [load_run(Path(path), label) for path, label in zip(run_dirs, string.ascii_uppercase)]
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = plots.draw_plots(runs, out_dir / "plots")
    path = out_dir / "compare.md"
    write_atomic(path, render(runs, drawn))
    return path
