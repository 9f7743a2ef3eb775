"""What every benchmark shares: figures with their reference, the machine, a lab of its own.

A *figure* is one measured quantity over repetitions, kept beside its
*reference* measured in the same run (iperf3, a bare `docker compose`, a
minimal asyncio server, or a configured value), because absolute numbers drift
between machines and the ratio is what a reader can carry to theirs. Figures
are plain dicts so the results file is plain JSON; :func:`figure` is the one
place they are made.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "services")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from labkit.compose import COMPOSE_FILE, ComposeProject  # noqa: E402
from socklab.results import find_results  # noqa: E402

Log = Callable[[str], None]
RESULTS_SCHEMA = "socklab-bench/1"
# TCP payload per Ethernet frame with timestamps (1448 of 1514 bytes on the wire):
# the most goodput a shaped rate can give.
TCP_PAYLOAD_PER_FRAME = 1448 / 1514


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
        "docker": _text(["docker", "version", "--format", "{{.Server.Version}}"]),
        "compose": _text(["docker", "compose", "version", "--short"]),
        "python_host": platform.python_version(),
    }


def build_image() -> None:
    """Build (or confirm cached) the lab image; benchmarks never time a build."""
    ComposeProject("socklab-build").build("server")


@contextmanager
def bench_lab(services: Mapping[str, Mapping] | None = None, *, prefix: str = "socklab-bench") -> Iterator[ComposeProject]:
    """A Compose project of its own (the lab's compose.yaml plus ``services`` overrides), removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        files: tuple[Path, ...] = (COMPOSE_FILE,)
        if services:
            override = Path(tmp) / "bench.json"
            override.write_text(json.dumps({"services": services}))
            files += (override,)
        lab = ComposeProject(f"{prefix}-{secrets.token_hex(3)}", files=files)
        try:
            yield lab
        finally:
            lab.down()


def link_env(**settings: str) -> dict[str, str]:
    """SOCKLAB_LINK_* variables for a container's entrypoint: every setting named, the rest cleared."""
    names = ("rate", "delay", "jitter", "loss", "limit", "up_rate", "down_rate", "backend")
    unknown = set(settings) - set(names)
    if unknown:
        raise ValueError(f"unknown link settings {sorted(unknown)}")
    settings = {"backend": "auto", **settings}
    return {f"SOCKLAB_LINK_{n.upper()}": str(settings.get(n, "")) for n in names}


def run_in_client(lab: ComposeProject, script: str, env: Mapping[str, str], *, timeout_s: float = 300) -> tuple[dict, str]:
    """Run ``sh -c script`` in a fresh client container; its result lines by role, and its stdout."""
    flags = [flag for key, value in env.items() for flag in ("-e", f"{key}={value}")]
    done = lab.compose("run", "--rm", "--use-aliases", *flags, "client", "exec", "sh", "-c", script,
                       timeout_s=timeout_s, check=False)
    results = {r["role"]: r for r in find_results(done.stdout)}
    if done.returncode != 0:
        results.setdefault("error", {"returncode": done.returncode,
                                     "output": (done.stdout + done.stderr)[-800:]})
    return results, done.stdout


def json_after(prefix: str, stdout: str) -> dict | None:
    """The JSON document printed on the line starting with ``prefix`` (how scripts here return iperf3's)."""
    line = next((line for line in stdout.splitlines() if line.startswith(prefix)), None)
    return json.loads(line[len(prefix):]) if line else None


def iperf3_json_script(args: str, tag: str = "iperf3 ") -> str:
    """Shell that runs ``iperf3 ARGS -J`` and prints its JSON on one line after ``tag``."""
    return (f"iperf3 {args} -J > /tmp/iperf.json; printf '{tag}'; "
            "python3 -c 'import json; print(json.dumps(json.load(open(\"/tmp/iperf.json\"))))'")
