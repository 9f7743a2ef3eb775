"""A benchmark's way to the engine: its own Compose project, containers, execs, the case runner.

Only through the orchestrator's boundary (:class:`~labkit.compose.ComposeProject`
and :class:`~labkit.docker_api.DockerAPI`), never a `docker` command line. What
the boundary does not offer yet (a detached container of one's own reached by
name, removing one container, an exec with a time limit) is written once here,
on top of it.
"""

from __future__ import annotations

import functools
import json
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from common import Log
from experiments import link_env
from labkit.compose import COMPOSE_FILE, ComposeProject
from labkit.docker_api import DockerAPI, LabContainer
from labkit.engine import Engine
from labkit.engine.compose import ComposeEngine
from labkit.owner import current_owner
from labkit.rundir import RunDir
from labkit.runner import CaseRunner
from labkit.scenario import owned
from socklab.results import find_results

# Carried by every container a benchmark starts with `compose run -d`, with the
# container's name, so that exactly that one can be removed.
CONTAINER_LABEL = "io.socklab.bench.container"

# The services of compose.yaml that benchmarks start (by `up` or `compose run`).
BENCH_SERVICES = ("server", "client")


def build_image() -> None:
    """Build (or confirm cached) the lab image; benchmarks never time a build."""
    ComposeEngine().build_image()


@contextmanager
def bench_lab(services: Mapping[str, Mapping] | None = None, *, prefix: str = "socklab-bench") -> Iterator[ComposeProject]:
    """A Compose project of its own (the lab's compose.yaml plus ``services`` overrides), removed afterwards.

    Its objects carry this process as their owner, as a run's do, so that a `lab.py clean`
    meanwhile leaves the benchmark alone.
    """
    with tempfile.TemporaryDirectory() as tmp:
        definition = {"services": {**dict.fromkeys(BENCH_SERVICES, {}), **(services or {})}}
        override = Path(tmp) / "bench.json"
        override.write_text(json.dumps(owned(definition, current_owner().labels())))
        lab = ComposeProject(f"{prefix}-{secrets.token_hex(3)}", files=(COMPOSE_FILE, override))
        try:
            yield lab
        finally:
            lab.down()


@contextmanager
def server_lab(command: Sequence[str], *, prefix: str = "socklab-bench") -> Iterator[ComposeProject]:
    """A lab of its own whose server runs ``command`` on an unshaped link, up and listening."""
    with bench_lab({"server": {"command": list(command), "environment": link_env()}}, prefix=prefix) as lab:
        lab.up("server")
        yield lab


@functools.cache
def engine() -> DockerAPI:
    """The engine as the orchestrator reaches it (one client for the whole process)."""
    return DockerAPI()


def case_runner(rundir: RunDir, progress: Log, lab_engine: Engine | None = None, **options: bool) -> CaseRunner:
    """The case runner `lab.py run` uses, on ``lab_engine`` (Compose by default), writing into ``rundir``."""
    return CaseRunner(lab_engine or ComposeEngine(engine()), rundir, progress, owner=current_owner().labels(),
                      **options)


def env_flags(env: Mapping[str, str]) -> list[str]:
    """``-e KEY=VALUE`` flags (docker run/exec, compose run) for ``env``."""
    return [flag for key, value in env.items() for flag in ("-e", f"{key}={value}")]


def start_container(lab: ComposeProject, service: str, name: str, command: Sequence[str],
                    env: Mapping[str, str], *, aliases: bool = False) -> LabContainer:
    """A container of ``service`` running ``command`` detached (`compose run -d`), called ``name``.

    Without ``aliases`` the name is the only way to reach it, so a client
    cannot meet another container under the service's alias.
    """
    lab.compose("run", "-d", "--name", name, "--label", f"{CONTAINER_LABEL}={name}",
                *(["--use-aliases"] if aliases else []), *env_flags(env), service, *command, timeout_s=120)
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
    done = lab.compose("run", "--rm", "--use-aliases", *env_flags(env), "client", "exec", "sh", "-c", script,
                       timeout_s=timeout_s, check=False)
    return client_results(done.stdout, done.stderr, done.returncode), done.stdout


def client_results(stdout: str, stderr: str, returncode: int) -> dict:
    """A point's result lines by role; unless it exited 0, an "error" entry with its exit
    status and the end of its output (a role's own failure line, if it printed one, stays)."""
    results = {r["role"]: r for r in find_results(stdout)}
    if returncode != 0:
        results.setdefault("error", {"returncode": returncode, "output": (stdout + stderr)[-800:]})
    return results


def json_after(prefix: str, stdout: str) -> dict | None:
    """The JSON document printed on the line starting with ``prefix`` (how scripts here return iperf3's)."""
    line = next((line for line in stdout.splitlines() if line.startswith(prefix)), None)
    return json.loads(line[len(prefix):]) if line else None


def iperf3_json_script(args: str, tag: str = "iperf3 ") -> str:
    """Shell that runs ``iperf3 ARGS -J`` and prints its JSON on one line after ``tag``."""
    return (f"iperf3 {args} -J > /tmp/iperf.json; printf '{tag}'; "
            "python3 -c 'import json; print(json.dumps(json.load(open(\"/tmp/iperf.json\"))))'")
