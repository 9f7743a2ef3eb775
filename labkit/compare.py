"""Several run directories side by side, for before/after studies: compare.md and plots.

Like the report, it reads only the run directories' files. Runs are labelled A,
B, ... in the order given; each later run's change is measured against A, and
called out when the two 95 % confidence intervals do not even overlap.
"""

from __future__ import annotations

import datetime as dt
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from socklab.errors import UsageError

from . import plots, records
from .config import Experiment, load_experiment
from .matrix import Case, expand_cases
from .rundir import RunDir

# One line style and hatch per run; more runs than that would not stay readable.
MAX_RUNS = len(plots.RUN_LINESTYLES)

# (label, metric, scale, unit) compared per client group, then the server's and the case's.
GROUP_METRICS = (
    ("goodput", "goodput_bps", 1e-6, "Mbit/s"),
    ("time in send()", "send_s", 1, "s"),
    ("time blocked", "blocked_s", 1, "s"),
    ("client CPU time", "cpu_s", 1, "s"),
    ("send() calls", "send_calls", 1, ""),
    ("EAGAIN", "eagain", 1, ""),
    ("p50 latency", "latency_ms.p50", 1, "ms"),
    ("p99 latency", "latency_ms.p99", 1, "ms"),
    ("bytes delivered", "bytes_delivered", 1, "B"),
)
OTHER_METRICS = (
    ("server CPU time", "server.cpu_s", 1, "s"),
    ("case wall time", "case.wall_s", 1, "s"),
)


@dataclass(frozen=True)
class LoadedRun:
    """One run directory as the comparison sees it."""

    label: str
    path: Path
    experiment: Experiment
    cases: Sequence[Case]
    records: Sequence[Mapping[str, Any]]
    meta: Mapping[str, Any]
    traces_dir: Path

    def summary(self) -> dict[str, dict[str, str]]:
        """summary.csv's rows, by case id."""
        return {row["case"]: row for row in records.summary_rows(self.cases, self.records)}


def load_run(path: Path, label: str) -> LoadedRun:
    """Read a run directory (bad input if it is not one)."""
    rundir = RunDir.open_existing(path)
    experiment = load_experiment(rundir.path / "experiment.yaml")
    return LoadedRun(label, Path(path), experiment, expand_cases(experiment), rundir.read_cases(),
                     rundir.read_meta(), rundir.traces)


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


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


MeanCI = tuple[float, float | None, float | None]


def _mean_ci(row: Mapping[str, str] | None, name: str, scale: float) -> MeanCI | None:
    if row is None or row.get(f"{name}.mean", "") == "":
        return None
    low, high = row.get(f"{name}.ci95_low", ""), row.get(f"{name}.ci95_high", "")
    return (float(row[f"{name}.mean"]) * scale, float(low) * scale if low else None,
            float(high) * scale if high else None)


def cell_text(row: Mapping[str, str] | None, name: str, scale: float) -> str:
    """A metric's mean ± half its 95 % CI, or "–" where the run has no value."""
    found = _mean_ci(row, name, scale)
    if found is None:
        return "–"
    mean, low, high = found
    if low is None or high is None:
        return _number(mean)
    half = (high - low) / 2
    return f"{_number(mean)} ± {_number(half) if half >= 1000 else f'{half:.2g}'}"


def change_text(base: Mapping[str, str] | None, other: Mapping[str, str] | None, name: str) -> str:
    """``other``'s change against ``base`` in percent; bold when their 95 % CIs do not overlap."""
    a, b = _mean_ci(base, name, 1), _mean_ci(other, name, 1)
    if a is None or b is None:
        return "–"
    if a[0] == 0:
        return "same" if b[0] == 0 else "from 0"
    ratio = b[0] / a[0]
    # Past a doubling, a factor reads better than a percentage in the thousands.
    text = f"×{ratio:.3g}" if ratio >= 2 else f"{(b[0] - a[0]) / abs(a[0]) * 100:+.1f} %"
    apart = None not in (a[1], a[2], b[1], b[2]) and (b[1] > a[2] or b[2] < a[1])
    return f"**{text}**" if apart else text


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value_text(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, str) and not value.isprintable():
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def render(runs: Sequence[LoadedRun], plot_files: Sequence[plots.PlotFile]) -> str:
    """compare.md's Markdown; ``plot_files`` are embedded from plots/ by relative path."""
    names = " vs ".join(f"{run.experiment.name} ({run.label})" for run in runs)
    lines = [f"# Comparison: {names}", "",
             "| run | run directory | experiment | started | revision | kernel | Docker | shaping | "
             "cases that ran | checks held |", "|" + "---|" * 10]
    for run in runs:
        meta = run.meta
        ok = sum(r["status"] == "ok" for r in run.records)
        checks = [e for r in run.records for e in r.get("expectations") or ()]
        cells = [f"**{run.label}**", f"`{run.path}`", run.experiment.name, str(meta.get("started_at", "?")),
                 str(meta.get("git_revision", "?")), str(meta.get("host_kernel", "?")),
                 str(meta.get("docker", {}).get("engine", "?")), str(meta.get("shaping_backend", "?")),
                 f"{ok} of {len(run.records)}", f"{sum(e['passed'] for e in checks)} of {len(checks)}"]
        lines.append("| " + " | ".join(_table_cell(c) for c in cells) + " |")
    lines += ["", "## What differs", ""]
    differences = [(k, v) for k, v in setting_differences(runs) if k not in ("name", "description")]
    if differences:
        lines += ["| setting | " + " | ".join(run.label for run in runs) + " |", "|" + "---|" * (len(runs) + 1)]
        lines += ["| " + " | ".join(_table_cell(c) for c in [f"`{key}`", *map(_value_text, values)]) + " |"
                  for key, values in differences]
    else:
        lines.append("The experiments are the same setting for setting; what changed is the code "
                     "(revision), the engine or chance.")

    summaries = [run.summary() for run in runs]
    case_ids = list(dict.fromkeys(c.id for run in runs for c in run.cases))
    groups = list(dict.fromkeys(g.name for run in runs for g in run.experiment.clients))
    lines += ["", "## Results", "",
              "Means over the repetitions that ran to the end, ± half the 95 % confidence interval. "
              f"Changes are against run {runs[0].label}; **bold** where the two confidence intervals do "
              "not overlap (with few repetitions the intervals are wide, so a change that is not bold "
              "may still be real).", ""]
    metrics = [(f"{label}, group `{group}`" if len(groups) > 1 else label, f"{group}.{metric}", scale, unit)
               for group in groups for label, metric, scale, unit in GROUP_METRICS]
    metrics += list(OTHER_METRICS)
    for label, name, scale, unit in metrics:
        if not any(row.get(f"{name}.mean", "") != "" for summary in summaries for row in summary.values()):
            continue
        header = ["case", *[run.label for run in runs],
                  *[f"{run.label} vs {runs[0].label}" for run in runs[1:]]]
        lines += [f"### {label}" + (f" ({unit})" if unit else ""), "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case_id in case_ids:
            rows = [summary.get(case_id) for summary in summaries]
            cells = [f"`{case_id}`", *[cell_text(row, name, scale) for row in rows],
                     *[change_text(rows[0], row, name) for row in rows[1:]]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if plot_files:
        lines += ["## Plots", "", "Colour is the I/O mode, as in every report; "
                  + "; ".join(f"run {run.label}: {style}" for run, style in zip(runs, plots.RUN_STYLE_NAMES))
                  + ".", ""]
        for plot in plot_files:
            lines += [f"### {plot.title}", "", f"![{plot.title}](plots/{plot.name})", "", plot.caption, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_comparison(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Compare 2 to MAX_RUNS run directories into ``out_dir``: compare.md and plots/*.png.

    Returns the path of compare.md.
    """
    if not 2 <= len(run_dirs) <= MAX_RUNS:
        raise UsageError(f"lab.py compare: give 2 to {MAX_RUNS} run directories, not {len(run_dirs)}")
    runs = [load_run(Path(path), label) for path, label in zip(run_dirs, string.ascii_uppercase)]
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = plots.draw_plots([plots.PlotRun(run.label, run.cases, run.records, run.traces_dir) for run in runs],
                             out_dir / "plots")
    path = out_dir / "compare.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(runs, drawn), encoding="utf-8")
    tmp.replace(path)
    return path
