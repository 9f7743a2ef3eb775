"""What every benchmark shares: figures with their reference, the machine, the results files.

A *figure* is one measured quantity over repetitions, kept beside its
*reference* measured in the same run (iperf3, a bare `docker compose`, a
minimal asyncio server, or a configured value), because absolute numbers drift
between machines and the ratio is what a reader can carry to theirs. Figures
are plain dicts so the results file is plain JSON; :func:`figure` is the one
place they are made.

Importing this module puts the orchestrator and the image's package on the
path. How a benchmark builds its roles and links is :mod:`experiments`; how it
reaches the engine, :mod:`benchlab`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "services")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from labkit.compose import ComposeProject  # noqa: E402
from labkit.docker_api import DockerAPI  # noqa: E402
from socklab.errors import SocklabError  # noqa: E402

Log = Callable[[str], None]
RESULTS_DIR = ROOT / "bench" / "results"
RESULTS_SCHEMA = "socklab-bench/1"


def log_to_stderr(text: str) -> None:
    """The progress log of a benchmark run on its own (bench/run.py stamps the time too)."""
    print(text, file=sys.stderr, flush=True)


def spread(samples: Sequence[float]) -> dict:
    """Median and min–max of ``samples`` (rounded for reading, not for computing)."""
    values = [float(v) for v in samples]
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "samples": []}
    return {"n": len(values), "median": _round(statistics.median(values)), "min": _round(min(values)),
            "max": _round(max(values)), "samples": [_round(v) for v in values]}


def _round(value: float) -> float:
    """Four significant digits (more than any benchmark here resolves), but whole counts kept whole."""
    if abs(value) >= 1000:
        return round(value, 1)
    return float(f"{value:.4g}")


def figure(fid: str, label: str, unit: str, samples: Sequence[float], *,
           reference: str, reference_samples: Sequence[float], target: Mapping | None = None,
           note: str | None = None) -> dict:
    """One figure: ``samples`` against ``reference_samples`` taken in the same run, pairwise.

    The ratio of each pair (sample i over reference i) is what the target is
    judged on, by its median. ``target`` is ``{"min": r}``, ``{"max": r}`` or
    ``{"within": e}`` (|ratio - 1| <= e); without one the figure only reports.
    """
    if len(samples) != len(reference_samples):
        raise ValueError(f"{fid}: {len(samples)} samples but {len(reference_samples)} references")
    ratios = [s / r for s, r in zip(samples, reference_samples) if r]
    result = {"id": fid, "label": label, "unit": unit, **{"value": spread(samples)},
              "reference": {"label": reference, **spread(reference_samples)},
              "ratio": spread(ratios), "target": dict(target) if target else None, "met": None}
    if target and ratios:
        result["met"] = target_met(dict(target), statistics.median(ratios))
    if note:
        result["note"] = note
    return result


def target_met(target: Mapping, ratio: float) -> bool:
    """Whether ``ratio`` meets ``target`` (see :func:`figure`)."""
    if "min" in target:
        return ratio >= target["min"]
    if "max" in target:
        return ratio <= target["max"]
    if "within" in target:
        return abs(ratio - 1) <= target["within"]
    raise ValueError(f"unknown target {dict(target)!r}")


def failed_figure(fid: str, label: str, unit: str, error: str, *, reference: str,
                  target: Mapping | None = None) -> dict:
    """A figure that could not be measured, with the reason (counts as a missed target)."""
    empty = spread([])
    return {"id": fid, "label": label, "unit": unit, "value": empty, "reference": {"label": reference, **empty},
            "ratio": empty, "target": dict(target) if target else None, "met": False if target else None,
            "error": error}


def _text(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _engine_versions() -> dict:
    """The Docker engine's and Compose's versions (None where one cannot be asked)."""
    try:
        docker = DockerAPI().versions()["engine"] or None
    except SocklabError:
        docker = None
    try:
        compose = ComposeProject("socklab-version").compose("version", "--short", timeout_s=30).stdout.strip()
    except SocklabError:
        compose = ""
    return {"docker": docker, "compose": compose or None}


def environment() -> dict:
    """The machine and versions a result was measured on."""
    meminfo = Path("/proc/meminfo").read_text().split()
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.machine())
    return {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": _text(["git", "rev-parse", "--short", "HEAD"]),
        "host_kernel": platform.release(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        # Anything else running competes for the two cores every benchmark shares.
        "load_average_1min": round(os.getloadavg()[0], 2),
        **_engine_versions(),
        "python_host": platform.python_version(),
    }


def standalone_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The command line of a measurement run on its own, writing bench/results/NAME.json by default."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json")
    return parser


def write_standalone(out: Path, name: str, findings: Mapping) -> None:
    """A standalone measurement's results file: its name, the machine, what it found."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, **environment(), **findings}, indent=1) + "\n")
