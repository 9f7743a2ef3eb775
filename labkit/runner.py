"""Running cases on real containers, one Compose project per case.

The lifecycle of a case: write its override file, start the server and wait
until it listens, start the client groups, apply the schedule's link changes
on time, wait for the clients (up to the case's timeout), stop the server with
SIGTERM so it prints its result, collect every result line, link report and
trace, and tear the project down — always, whatever happened.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable

import yaml

from socklab.errors import EngineError, SocklabError
from socklab.results import find_results

from . import records, scenario
from .compose import COMPOSE_FILE, ComposeProject
from .docker_api import DockerAPI, LabContainer
from .matrix import Case
from .rundir import RunDir, trace_name

POLL_S = 0.2
SERVER_STOP_S = 15.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class _Outcome:
    status: str
    error: str | None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("{")]
    return lines[-1].strip() if lines else "no output"


class CaseRunner:
    """Runs (case, repetition) pairs against the engine and records each in a run directory."""

    def __init__(self, api: DockerAPI, rundir: RunDir, progress: Progress, *, trace: bool = True):
        self.api = api
        self.rundir = rundir
        self.progress = progress
        self.trace = trace
        self.current: ComposeProject | None = None

    def run(self, case: Case, repetition: int) -> dict:
        """Run one repetition of ``case`` and return its record (not yet written)."""
        experiment = case.experiment
        override = scenario.compose_override(experiment, case.id, trace=self.trace)
        override_path = self.rundir.compose / trace_name(case.id, repetition, "compose").replace(
            ".trace.gz", ".yaml")
        override_path.write_text(yaml.safe_dump(override, sort_keys=False), encoding="utf-8")
        project = ComposeProject(f"socklab-{experiment.name}-{secrets.token_hex(3)}",
                                 files=(COMPOSE_FILE, override_path))
        self.current = project
        started = time.monotonic()
        containers: list[LabContainer] = []
        try:
            try:
                outcome = self._drive(project, case, started)
            except EngineError:
                raise  # the engine itself failed: no later case could run either
            except SocklabError as exc:
                outcome = _Outcome("failed", str(exc))
            containers = self.api.containers(project.name)
            wall_s = time.monotonic() - started
            return self._collect(case, repetition, containers, outcome, wall_s)
        finally:
            self.progress("tearing down")
            project.down()
            self.current = None

    def _drive(self, project: ComposeProject, case: Case, started: float) -> _Outcome:
        experiment = case.experiment
        deadline = started + experiment.timeout_s
        self.progress("starting the server")
        try:
            project.up(scenario.SERVER_SERVICE)
        except SocklabError:
            server = self.api.containers(project.name, scenario.SERVER_SERVICE)
            detail = _last_line(self.api.logs(server[0])) if server else "it was not created"
            return _Outcome("failed", f"the server did not start: {detail}")
        services = [scenario.client_service(g) for g in experiment.clients]
        self.progress(f"starting {', '.join(services)}")
        project.compose("up", "-d", "--no-build", "--no-deps", *services, timeout_s=120)
        clients = [c for c in self.api.containers(project.name) if c.service in services]
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
            running = [c for c in clients if self.api.state(c).get("Running")]
            if not running:
                break
            if now >= deadline:
                for container in running:
                    self.api.kill(container, "SIGTERM")
                return _Outcome("timeout", f"the case ran past its timeout of {experiment.timeout_s:g} s; "
                                           f"still running: {', '.join(c.name for c in running)}")
            time.sleep(POLL_S)
        failed = [c for c in clients if self.api.state(c).get("ExitCode")]
        if failed:
            first = failed[0]
            return _Outcome("failed", f"{first.service} exited with status "
                                      f"{self.api.state(first).get('ExitCode')}: "
                                      f"{_last_line(self.api.logs(first))}")
        return _Outcome("ok", None)

    def _wait_shaped(self, containers: list[LabContainer], deadline: float) -> None:
        """Wait until every running container's entrypoint has applied its link."""
        pending = list(containers)
        while pending and time.monotonic() < deadline:
            pending = [c for c in pending if self.api.state(c).get("Running")
                       and self.api.exec(c, ["test", "-e", scenario.LINK_STATE_PATH])[0] != 0]
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

    def _collect(self, case: Case, repetition: int, containers: list[LabContainer],
                 outcome: _Outcome, wall_s: float) -> dict:
        self.progress("collecting results")
        server_result = None
        servers = [c for c in containers if c.service == scenario.SERVER_SERVICE]
        for container in servers:
            self.api.kill(container, "SIGTERM")
            self.api.wait(container, SERVER_STOP_S)
        # delay_line: the userspace backend's counters per container (null under netem).
        link = {"backend": None, "applied": {}, "qdisc": {}, "delay_line": {}}
        clients = []
        status, error = outcome.status, outcome.error
        for container in containers:
            found = find_results(self.api.logs(container, stderr=False))
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
            if self.trace:
                data = self.api.read_file(container, scenario.TRACE_PATH)
                if data:
                    (self.rundir.traces / trace_name(case.id, repetition, key)).write_bytes(data)
            if status == "ok" and "client" not in by_role:
                status, error = "failed", f"{container.name} printed no result"
        if status == "ok" and server_result is None:
            status, error = "failed", "the server printed no result"
        link["backend"] = link["backend"] or "none"
        return records.case_record(
            case=case, repetition=repetition, status=status, error=error, wall_s=wall_s,
            link=link, server=records.server_record(server_result),
            clients=sorted(clients, key=lambda c: (c["name"], c["replica"])))
