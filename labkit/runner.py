"""Running cases on real containers: one Compose project per case, or kept between cases.

The lifecycle of a case: write its override file, start the server and wait
until it listens, start the client groups, apply the schedule's link changes
on time, wait for the clients (up to the case's timeout), stop the server with
SIGTERM so it prints its result, collect every result line, link report and
trace, and tear the project down — always, whatever happened.

With ``reuse``, consecutive cases whose containers would be the same (same
services, replicas and links; only the roles' arguments differ) share one
project: its containers run ``entry hold`` and each case runs every role
through ``docker exec ... entry ROLE``, which shapes the link afresh, flushes
the TCP metrics cache and removes the link again afterwards (see entry.py).
Each role is a *handle* (a container's main process, or an exec in a kept
container) behind one small interface, so the lifecycle above is written once.
A case that does not end ok takes its project down: nothing is reused after a
failure.
"""

from __future__ import annotations

import json
import posixpath
import secrets
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import yaml

from socklab.errors import EngineError, SocklabError
from socklab.entry import ENV_KEEP
from socklab.results import find_results

from . import records, scenario
from .compose import COMPOSE_FILE, ComposeProject
from .docker_api import DockerAPI, ExecJob, LabContainer
from .matrix import Case
from .rundir import RunDir, trace_name

POLL_S = 0.2
SERVER_STOP_S = 15.0
# Below the Docker SDK's connection pool (10), so no request waits for a connection.
COLLECT_WORKERS = 8
Progress = Callable[[str], None]
# Where a kept server container's role writes its process id, so it can be stopped.
SERVER_PID_PATH = "/run/socklab/server.pid"
SERVER_LISTENING = "socklab server listening on"


class RoleHandle(Protocol):
    """A role of a case as the lifecycle sees it, wherever it runs."""

    container: LabContainer

    def running(self) -> bool: ...
    def exit_code(self) -> int | None: ...
    def stop(self) -> None: ...
    def wait(self, timeout_s: float) -> None: ...
    def stdout(self) -> str: ...
    def output(self) -> str: ...


@dataclass
class ContainerRole:
    """A role that is its container's main process (a container per case)."""

    api: DockerAPI
    container: LabContainer

    def running(self) -> bool:
        return bool(self.api.state(self.container).get("Running"))

    def exit_code(self) -> int | None:
        return self.api.state(self.container).get("ExitCode")

    def stop(self) -> None:
        self.api.kill(self.container, "SIGTERM")

    def wait(self, timeout_s: float) -> None:
        self.api.wait(self.container, timeout_s)

    def stdout(self) -> str:
        return self.api.logs(self.container, stderr=False)

    def output(self) -> str:
        return self.api.logs(self.container)


@dataclass
class ExecRole:
    """A role run by `docker exec` in a kept container."""

    api: DockerAPI
    job: ExecJob
    stop_argv: list[str] | None = None

    @property
    def container(self) -> LabContainer:
        return self.job.container

    def running(self) -> bool:
        return self.job.running()

    def exit_code(self) -> int | None:
        return self.job.wait(0)

    def stop(self) -> None:
        # Only the server has a way to be signalled (its pid file). A client
        # past the timeout is left running: a case that does not end ok takes
        # its kept project down, and that stops it.
        if self.stop_argv and self.job.running():
            self.api.exec(self.container, self.stop_argv)

    def wait(self, timeout_s: float) -> None:
        self.job.wait(timeout_s)

    def stdout(self) -> str:
        return self.job.stdout

    def output(self) -> str:
        return self.job.output


@dataclass
class _KeptProject:
    """A project whose containers outlive a case, and what they were made for."""

    project: ComposeProject
    key: str


@dataclass(frozen=True)
class _Outcome:
    status: str
    error: str | None


def _entry_command(role_argv: list[str]) -> str:
    """The shell words that run a role through the image's entrypoint (what a kept container execs)."""
    return shlex.join(["python3", "-m", "socklab", "entry", *role_argv])


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("{")]
    return lines[-1].strip() if lines else "no output"


class CaseRunner:
    """Runs (case, repetition) pairs against the engine and records each in a run directory."""

    def __init__(self, api: DockerAPI, rundir: RunDir, progress: Progress, *, trace: bool = True,
                 reuse: bool = False):
        self.api = api
        self.rundir = rundir
        self.progress = progress
        self.trace = trace
        self.reuse = reuse
        self.current: ComposeProject | None = None
        self.kept: _KeptProject | None = None

    def _write_override(self, case: Case, repetition: int, override: dict) -> ComposeProject:
        path = self.rundir.compose / trace_name(case.id, repetition, "compose").replace(".trace.gz", ".yaml")
        path.write_text(yaml.safe_dump(override, sort_keys=False), encoding="utf-8")
        return ComposeProject(f"socklab-{case.experiment.name}-{secrets.token_hex(3)}",
                              files=(COMPOSE_FILE, path))

    def run(self, case: Case, repetition: int) -> dict:
        """Run one repetition of ``case`` and return its record (not yet written)."""
        if self.reuse:
            return self._run_kept(case, repetition)
        project = self._write_override(case, repetition,
                                       scenario.compose_override(case.experiment, case.id, trace=self.trace))
        self.current = project
        try:
            return self._run_case(project, case, repetition, self._start_containers)
        finally:
            self.progress("tearing down")
            project.down()
            self.current = None

    def close(self) -> None:
        """Take down a project kept for later cases (call when the run ends, however)."""
        if self.kept is not None:
            self.progress("tearing down")
            self.kept.project.down()
            self.kept = None
            self.current = None

    def _run_kept(self, case: Case, repetition: int) -> dict:
        override = scenario.compose_override(case.experiment, case.id, trace=self.trace)
        key = json.dumps(scenario.containers_key(override), sort_keys=True)
        if self.kept is not None and self.kept.key != key:
            self.close()
        if self.kept is None:
            project = self._write_override(case, repetition, scenario.kept_override(override))
            self.progress("starting the containers, kept for the cases that can share them")
            try:
                project.up(scenario.SERVER_SERVICE, *scenario.client_services(case.experiment), wait=False)
            except SocklabError:
                project.down()
                raise
            self.kept = _KeptProject(project, key)
            self.current = project
        try:
            record = self._run_case(self.kept.project, case, repetition, self._start_execs)
        except BaseException:
            self.close()
            raise
        if record["status"] != "ok":
            self.close()
        return record

    def _run_case(self, project: ComposeProject, case: Case, repetition: int, start) -> dict:
        started = time.monotonic()
        roles: list[RoleHandle] = []
        try:
            outcome = self._drive(project, case, started, start, roles)
        except EngineError:
            raise  # the engine itself failed: no later case could run either
        except SocklabError as exc:
            outcome = _Outcome("failed", str(exc))
        wall_s = time.monotonic() - started
        if not roles:  # it failed before its roles were known: collect what there is
            roles = [ContainerRole(self.api, c) for c in self.api.containers(project.name)]
        return self._collect(case, repetition, roles, outcome, wall_s)

    def _start_containers(self, project: ComposeProject, case: Case, roles: list[RoleHandle]) -> str | None:
        """Start the case's containers, the server's first; why the server did not start, if not.

        One `compose up` for all: the clients' depends_on holds them until the
        server is healthy (listening), and one invocation costs less than two.
        """
        services = scenario.client_services(case.experiment)
        self.progress(f"starting the server, then {', '.join(services)}")
        try:
            project.up(scenario.SERVER_SERVICE, *services, wait=False)
        except SocklabError:
            server = self.api.containers(project.name, scenario.SERVER_SERVICE)
            if not server or not self.api.state(server[0]).get("Running"):
                return _last_line(self.api.logs(server[0])) if server else "it was not created"
            raise
        roles += [ContainerRole(self.api, c) for c in self.api.containers(project.name)]
        return None

    def _start_execs(self, project: ComposeProject, case: Case, roles: list[RoleHandle]) -> str | None:
        """Start the case's roles in the kept containers, the server's first."""
        experiment = case.experiment
        containers = self.api.containers(project.name)
        keep = {ENV_KEEP: "1"}
        self.progress("starting the server")
        (server_container,) = [c for c in containers if c.service == scenario.SERVER_SERVICE]
        server = ExecRole(self.api, self.api.start_exec(server_container, [
            "sh", "-c", f"mkdir -p {posixpath.dirname(SERVER_PID_PATH)} && echo $$ > {SERVER_PID_PATH} && "
                        f"exec {_entry_command(scenario.server_argv(experiment))}"], keep),
                          stop_argv=["sh", "-c", f"kill -TERM $(cat {SERVER_PID_PATH})"])
        roles.append(server)
        deadline = time.monotonic() + 60
        # The server says so on stderr once it listens: no need to ask ss in another exec.
        while SERVER_LISTENING not in server.output():
            if not server.running() or time.monotonic() > deadline:
                server.stop()
                return _last_line(server.output())
            time.sleep(POLL_S / 20)
        self.progress(f"starting {', '.join(scenario.client_services(experiment))}")
        for group in experiment.clients:
            command = _entry_command(scenario.client_argv(group, trace=self.trace))
            for container in (c for c in containers if c.service == scenario.client_service(group)):
                # A trace left by the previous case must not pass for this one's.
                roles.append(ExecRole(self.api, self.api.start_exec(container, [
                    "sh", "-c", f"rm -f {scenario.TRACE_PATH} && exec {command}"], keep)))
        return None

    def _drive(self, project: ComposeProject, case: Case, started: float, start,
               roles: list[RoleHandle]) -> _Outcome:
        experiment = case.experiment
        deadline = started + experiment.timeout_s
        not_started = start(project, case, roles)
        if not_started is not None:
            return _Outcome("failed", f"the server did not start: {not_started}")
        clients = [r for r in roles if r.container.service != scenario.SERVER_SERVICE]
        steps = sorted(experiment.schedule, key=lambda s: s.at_s)
        if steps:
            # A change must not race the entrypoint's own shaping, and `at` counts
            # from when the workload starts, which is once the links are in place.
            self._wait_shaped(clients, deadline)
        workload_started = time.monotonic()
        self.progress(f"running {len(clients)} client container(s)")
        while True:
            now = time.monotonic()
            while steps and now - workload_started >= steps[0].at_s:
                self._apply_step(project, steps.pop(0))
            running = [r for r in clients if r.running()]
            if not running:
                break
            if now >= deadline:
                for role in running:
                    role.stop()
                return _Outcome("timeout", f"the case ran past its timeout of {experiment.timeout_s:g} s; "
                                           f"still running: {', '.join(r.container.name for r in running)}")
            # Wakes as soon as that role ends, not at the next poll.
            running[0].wait(min(POLL_S, max(0.01, deadline - now)))
        failed = [(r, code) for r, code in ((r, r.exit_code()) for r in clients) if code]
        if failed:
            first, code = failed[0]
            return _Outcome("failed", f"{first.container.service} exited with status {code}: "
                                      f"{_last_line(first.output())}")
        return _Outcome("ok", None)

    def _wait_shaped(self, roles: list[RoleHandle], deadline: float) -> None:
        """Wait until every running role's entrypoint has applied its link."""
        pending = list(roles)
        while pending and time.monotonic() < deadline:
            pending = [r for r in pending if r.running()
                       and self.api.exec(r.container, ["test", "-e", scenario.LINK_STATE_PATH])[0] != 0]
            if pending:
                time.sleep(POLL_S / 4)

    def _apply_step(self, project: ComposeProject, step) -> None:
        group = step.group
        service = scenario.SERVER_SERVICE if group is None else scenario.client_service(group)
        words = scenario.link_assignments(step.link)
        self.progress(f"at {step.at_s:g} s: link of {service} -> {' '.join(words)}")
        for container in self.api.containers(project.name, service):
            if self.api.state(container).get("Running"):
                code, out = self.api.exec(container, ["python3", "-m", "socklab", "shape", "set", *words])
                if code != 0:
                    raise SocklabError(f"changing the link of {container.name} failed: {_last_line(out)}")

    def _collect(self, case: Case, repetition: int, roles: list[RoleHandle],
                 outcome: _Outcome, wall_s: float) -> dict:
        self.progress("collecting results")
        server_result = None
        servers = [r for r in roles if r.container.service == scenario.SERVER_SERVICE]
        for role in servers:
            role.stop()
            role.wait(SERVER_STOP_S)
        # delay_line: the userspace backend's counters per container (null under netem).
        link = {"backend": None, "applied": {}, "qdisc": {}, "delay_line": {}}
        clients = []
        status, error = outcome.status, outcome.error

        def fetch(role: RoleHandle) -> tuple[str, bytes | None]:
            is_client = role.container.service != scenario.SERVER_SERVICE
            trace = self.api.read_file(role.container, scenario.TRACE_PATH) if self.trace and is_client else None
            return role.stdout(), trace

        # One engine round trip per container and file: fetched side by side, so
        # that collecting fifty containers does not take fifty times as long.
        with ThreadPoolExecutor(max_workers=COLLECT_WORKERS) as pool:
            fetched = list(pool.map(fetch, roles))
        for role, (stdout, trace) in zip(roles, fetched):
            container = role.container
            found = find_results(stdout)
            by_role = {r.get("role"): r for r in found}
            group = "server" if container.service == scenario.SERVER_SERVICE else \
                container.service.removeprefix("client-")
            replica = container.number - 1
            key = group if replica == 0 else f"{group}#{replica}"
            if "link" in by_role:
                shown = by_role["link"]
                if shown.get("backend") not in (None, "none"):
                    link["backend"] = shown["backend"]
                link["applied"].setdefault(group, shown.get("applied"))
                link["qdisc"][key] = shown.get("qdisc")
                link["delay_line"][key] = shown.get("delay_line")
            if group == "server":
                server_result = by_role.get("server")
                continue
            clients.append(records.client_record(group, replica, by_role.get("client")))
            if trace:
                (self.rundir.traces / trace_name(case.id, repetition, key)).write_bytes(trace)
            if status == "ok" and "client" not in by_role:
                status, error = "failed", f"{container.name} printed no result"
        if status == "ok" and server_result is None:
            status, error = "failed", "the server printed no result"
        link["backend"] = link["backend"] or "none"
        return records.case_record(
            case=case, repetition=repetition, status=status, error=error, wall_s=wall_s,
            link=link, server=records.server_record(server_result),
            clients=sorted(clients, key=lambda c: (c["name"], c["replica"])))
