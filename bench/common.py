"""What every benchmark shares: figures with their reference, the machine, a lab of its own.

A *figure* is one measured quantity over repetitions, kept beside its
*reference* measured in the same run (iperf3, a bare `docker compose`, a
minimal asyncio server, or a configured value), because absolute numbers drift
between machines and the ratio is what a reader can carry to theirs. Figures
are plain dicts so the results file is plain JSON; :func:`figure` is the one
place they are made.

Benchmarks reach the engine only through the orchestrator's boundary
(:class:`~labkit.compose.ComposeProject` and :class:`~labkit.docker_api.DockerAPI`),
and build every role's arguments and link environment the way ``lab.py`` does:
an :class:`~labkit.config.Experiment` loaded by :func:`experiment`, rendered by
:mod:`labkit.scenario`, with the options a benchmark needs beyond what an
experiment can say set on top by :func:`with_options`. What the boundary does
not offer yet (a detached container of one's own, reached by name; removing
one container; an exec with a time limit) is written once here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
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

from labkit import scenario  # noqa: E402
from labkit.compose import COMPOSE_FILE, ComposeProject  # noqa: E402
from labkit.config import Experiment, load_experiment_text  # noqa: E402
from labkit.docker_api import DockerAPI, LabContainer  # noqa: E402
from labkit.rundir import RunDir  # noqa: E402
from labkit.runner import CaseRunner  # noqa: E402
from socklab.errors import SocklabError  # noqa: E402
from socklab.results import find_results  # noqa: E402

Log = Callable[[str], None]
RESULTS_DIR = ROOT / "bench" / "results"
RESULTS_SCHEMA = "socklab-bench/1"
# TCP payload per Ethernet frame with timestamps (1448 of 1514 bytes on the wire):
# the most goodput a shaped rate can give.
TCP_PAYLOAD_PER_FRAME = 1448 / 1514
# A role started as a program in a running container (`docker exec`), without
# the entrypoint (which would shape the link again and drop privileges itself).
SOCKLAB = ("python3", "-m", "socklab")
PROBES = Path(__file__).resolve().parent / "probes"
# Carried by every container a benchmark starts with `compose run -d`, with the
# container's name, so that exactly that one can be removed.
CONTAINER_LABEL = "io.socklab.bench.container"


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
        docker = engine().versions()["engine"] or None
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


def experiment(server: Mapping | None = None, *clients: Mapping, name: str = "bench") -> Experiment:
    """An experiment from settings written as in lab.py's YAML, loaded and checked as lab.py loads it.

    ``clients`` are client groups (``{"name": "load", "mode": "poll", ...}``);
    without one, a single default group.
    """
    document = {"name": name, "server": dict(server or {}),
                "clients": [dict(group) for group in clients] or [{"name": "load"}]}
    # JSON is YAML: the loader reads it with its line numbers, for its messages.
    return load_experiment_text(json.dumps(document, indent=1), f"bench/{name}.yaml")


def with_options(argv: Sequence[str], options: Mapping[str, object]) -> list[str]:
    """``argv`` with each ``--flag value`` of ``options``: replaced where argv has the flag, else appended.

    For what a benchmark needs beyond what an experiment can say (a listen
    backlog, another port or host, a longer idle timeout).
    """
    result = list(argv)
    for flag, value in options.items():
        if flag in result:
            result[result.index(flag) + 1] = str(value)
        else:
            result += [flag, str(value)]
    return result


def server_argv(server: Mapping, *clients: Mapping, options: Mapping[str, object] | None = None) -> list[str]:
    """The server role's arguments as lab.py gives them for ``server`` and ``clients``, with ``options`` set."""
    return with_options(scenario.server_argv(experiment(server, *clients)), options or {})


def client_argv(group: Mapping, options: Mapping[str, object] | None = None, *, trace: bool = False) -> list[str]:
    """A client group's role arguments as lab.py gives them (no trace unless asked), with ``options`` set."""
    (built,) = experiment(None, {"name": "load", **group}).clients
    return with_options(scenario.client_argv(built, trace=trace), options or {})


@contextmanager
def server_lab(command: Sequence[str], *, prefix: str = "socklab-bench") -> Iterator[ComposeProject]:
    """A lab of its own whose server runs ``command`` on an unshaped link, up and healthy."""
    with bench_lab({"server": {"command": list(command), "environment": link_env()}}, prefix=prefix) as lab:
        lab.up("server")
        yield lab


def standalone_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The command line of a measurement run on its own, writing bench/results/NAME.json by default."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json")
    return parser


def write_standalone(out: Path, name: str, findings: Mapping) -> None:
    """A standalone measurement's results file: its name, the machine, what it found."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, **environment(), **findings}, indent=1) + "\n")


def link_env(**link: object) -> dict[str, str]:
    """The ``SOCKLAB_LINK_*`` variables of a container whose link is ``link`` (lab.py's link keys).

    ``link_env()`` is an unshaped link; every variable is present, so nothing
    of compose.yaml's defaults leaks into a benchmark's link.
    """
    (group,) = experiment(None, {"name": "load", "link": link}).clients
    return scenario.link_env(group.link)


def probe_command(name: str, *args: object) -> list[str]:
    """``python3 -c SOURCE ARGS``: the program bench/probes/NAME.py, run where the image has none of it."""
    return ["python3", "-c", (PROBES / f"{name}.py").read_text(encoding="utf-8"), *map(str, args)]


@functools.cache
def engine() -> DockerAPI:
    """The engine as the orchestrator reaches it (one client for the whole process)."""
    return DockerAPI()


def case_runner(rundir: RunDir, progress: Log, **options: bool) -> CaseRunner:
    """The case runner `lab.py run` uses, on the engine, writing into ``rundir``."""
    return CaseRunner(engine(), rundir, progress, **options)


def _env_flags(env: Mapping[str, str]) -> list[str]:
    return [flag for key, value in env.items() for flag in ("-e", f"{key}={value}")]


def start_container(lab: ComposeProject, service: str, name: str, command: Sequence[str],
                    env: Mapping[str, str], *, aliases: bool = False) -> LabContainer:
    """A container of ``service`` running ``command`` detached (`compose run -d`), called ``name``.

    Without ``aliases`` the name is the only way to reach it, so a client
    cannot meet another container under the service's alias.
    """
    lab.compose("run", "-d", "--name", name, "--label", f"{CONTAINER_LABEL}={name}",
                *(["--use-aliases"] if aliases else []), *_env_flags(env), service, *command, timeout_s=120)
    (container,) = [c for c in engine().containers(lab.name, service) if c.name == name]
    return container


def remove_container(container: LabContainer) -> None:
    """Remove one container started by :func:`start_container`, whatever its state."""
    engine().remove_labelled(f"{CONTAINER_LABEL}={container.name}")


def exec_in(container: LabContainer, argv: Sequence[str], *, user: str = "",
            timeout_s: float | None = None) -> tuple[int, str]:
    """Run ``argv`` in a running container; its exit code and output (stdout, then stderr).

    With ``timeout_s`` the command is killed when it outlives it (exit 124,
    as coreutils' timeout reports it), so a hung client cannot hang a benchmark.
    """
    if timeout_s is not None:
        argv = ["timeout", "-k", "10", f"{timeout_s:g}", *argv]
    return engine().exec(container, argv, user=user)


def run_in_client(lab: ComposeProject, script: str, env: Mapping[str, str], *, timeout_s: float = 300) -> tuple[dict, str]:
    """Run ``sh -c script`` in a fresh client container; its result lines by role, and its stdout."""
    done = lab.compose("run", "--rm", "--use-aliases", *_env_flags(env), "client", "exec", "sh", "-c", script,
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
