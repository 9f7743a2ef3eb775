"""Running cases on an engine: containers per case, or kept between cases.

The lifecycle of a case: bring its lab up from the service definitions
``scenario`` builds (the server listens before the clients start), apply the
schedule's link changes on time, wait for the clients (up to the case's
timeout), stop the server with SIGTERM so it prints its result, collect every
result line, link report and trace, and take the lab down — always, whatever
happened.

With ``reuse``, consecutive cases whose containers would be the same (same
services, replicas and links; only the roles' arguments differ) share one lab:
its containers run ``entry hold`` and each case starts every role in them
through the entrypoint, which shapes the link afresh, flushes the TCP metrics
cache and removes the link again afterwards (see entry.py). Each role is a
:class:`~labkit.engine.RoleHandle` (a container's main process, or a role
started in a kept container), so the lifecycle above is written once, and
everything engine-specific is behind :class:`~labkit.engine.Engine`. A case
that does not end ok takes its lab down: nothing is reused after a failure.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from socklab.entry import ENV_KEEP
from socklab.errors import EngineError, SocklabError
from socklab.linkprobe import ENV_PROBE
from socklab.results import find_results
from socklab.servers.lifecycle import LISTENING_LINE

from . import linkcheck, pcap, records, scenario
from .engine import ContainerGone, Engine, Lab, LabContainer, RoleHandle, StartFailed
from .headline import RoleOutcome, cause_alone, headline, last_line, last_words, needs_last_words
from .config import ClientGroup, Program, ServerConfig
from .matrix import Case
from .rundir import RunDir

POLL_S = 0.2
SERVER_STOP_S = 15.0
SERVER_LISTEN_S = 60.0
# Engine round trips made side by side (polling the clients, collecting): below the Docker SDK's
# connection pool (10), so no request waits for a connection.
COLLECT_WORKERS = 8
Progress = Callable[[str], None]


@dataclass
class _KeptLab:
    """A lab whose containers outlive a case, and what they were made for."""

    lab: Lab
    key: str
    # Each client container's link as the lab's first case measured it, and that case: the
    # containers, and so their links, are the same for every case the lab is kept for (the
    # key says so), so later cases do not probe again but carry this measurement.
    measured: dict = field(default_factory=dict)
    measured_in: str | None = None


@dataclass(frozen=True)
class _Outcome:
    """How a case's drive ended: status, and the error if the roles alone cannot say it.

    ``server_explains``: the server's headline follows ``error`` (the server
    did not start: why); with no ``error`` the roles' headline is the whole error.
    """

    status: str
    error: str | None = None
    server_explains: bool = False


def _group_of(container: LabContainer) -> str:
    return "server" if container.service == scenario.SERVER_SERVICE else container.service.removeprefix("client-")


def _is_server(role: RoleHandle) -> bool:
    return role.container.service == scenario.SERVER_SERVICE


def _config_of(case: Case, role: RoleHandle) -> ServerConfig | ClientGroup | None:
    """What ``case`` says of ``role``: the server, or its client group (None if it has none)."""
    if _is_server(role):
        return case.experiment.server
    group = _group_of(role.container)
    return next((g for g in case.experiment.clients if g.name == group), None)




class CaseRunner:
    """Runs (case, repetition) pairs on an engine and records each in a run directory."""

    def __init__(self, engine: Engine, rundir: RunDir, progress: Progress, *, trace: bool = True,
                 reuse: bool = False, owner: Mapping[str, str] | None = None):
        self.engine = engine
        self.rundir = rundir
        self.progress = progress
        self.trace = trace
        self.reuse = reuse
        # Labels naming this run as the owner of what it creates (see labkit.owner).
        self.owner = dict(owner or {})
        self.kept: _KeptLab | None = None
        self._digests: dict[str, str] = {}  # a kept program's sha256, by its path

    def _definition(self, case: Case) -> dict:
        programs = self.rundir.programs if case.experiment.programs else None
        return scenario.compose_override(case.experiment, case.id, trace=self.trace, owner=self.owner,
                                         programs_dir=programs)

    def _create(self, case: Case, repetition: int, definition: dict) -> Lab:
        record = self.rundir.definition_record(case.id, repetition)
        return self.engine.create(definition, name_hint=case.experiment.name, record=record)

    def run(self, case: Case, repetition: int) -> dict:
        """Run one repetition of ``case`` and return its record (not yet written)."""
        if self.reuse:
            return self._run_kept(case, repetition)
        lab = self._create(case, repetition, self._definition(case))
        try:
            return self._run_case(lab, case, repetition, self._start_containers)
        finally:
            self.progress("tearing down")
            lab.down()

    def close(self) -> None:
        """Take down a lab kept for later cases (call when the run ends, however)."""
        if self.kept is not None:
            self.progress("tearing down")
            self.kept.lab.down()
            self.kept = None

    def _run_kept(self, case: Case, repetition: int) -> dict:
        definition = self._definition(case)
        key = json.dumps(scenario.containers_key(definition), sort_keys=True)
        if self.kept is not None and self.kept.key != key:
            self.close()
        if self.kept is None:
            # The kept services, with the rest of the definition (networks, volumes) as it was.
            lab = self._create(case, repetition, {**definition, **scenario.kept_override(definition)})
            self.progress("starting the containers, kept for the cases that can share them")
            try:
                lab.start([scenario.SERVER_SERVICE, *scenario.client_services(case.experiment)])
            except BaseException:
                lab.down()
                raise
            self.kept = _KeptLab(lab, key)
        try:
            record = self._run_case(self.kept.lab, case, repetition, self._start_roles)
        except BaseException:
            self.close()
            raise
        if record["status"] != "ok":
            self.close()
        return record

    def _run_case(self, lab: Lab, case: Case, repetition: int, start) -> dict:
        started = time.monotonic()
        roles: list[RoleHandle] = []
        try:
            outcome = self._drive(lab, case, started, start, roles)
        except EngineError:
            raise  # the engine itself failed: no later case could run either
        except SocklabError as exc:  # a container vanished, a link change failed
            outcome = _Outcome("failed", str(exc))
        wall_s = time.monotonic() - started
        if not roles:  # it failed before its roles were known: collect what there is
            roles = [lab.main_role(c) for c in lab.containers()]
        return self._collect(lab, case, repetition, roles, outcome, wall_s)

    def _start_containers(self, lab: Lab, case: Case, roles: list[RoleHandle]) -> _Outcome | None:
        """Start the case's containers, each role its main process; how it failed, if it did."""
        services = scenario.client_services(case.experiment)
        self.progress(f"starting the server, then {', '.join(services)}")
        try:
            lab.start([scenario.SERVER_SERVICE, *services])
        except StartFailed as exc:
            server = lab.containers(scenario.SERVER_SERVICE)
            if not server:
                return _Outcome("failed", f"the server did not start: it was not created: {exc}")
            if not lab.running(server[0]):
                return _Outcome("failed", "the server did not start", server_explains=True)
            return _Outcome("failed", str(exc))
        roles += [lab.main_role(c) for c in lab.containers()]
        return None

    def _start_roles(self, lab: Lab, case: Case, roles: list[RoleHandle]) -> _Outcome | None:
        """Start the case's roles in the kept containers, the server's first."""
        experiment = case.experiment
        containers = lab.containers()
        keep = {ENV_KEEP: "1"}
        self.progress("starting the server")
        (server_container,) = [c for c in containers if c.service == scenario.SERVER_SERVICE]
        server = lab.start_role(server_container, scenario.server_argv(experiment), keep,
                                remove_first=scenario.role_files(experiment.server.program))
        roles.append(server)
        deadline = time.monotonic() + SERVER_LISTEN_S
        # The server says so on stderr once it listens: no need to ask ss in another exec.
        while LISTENING_LINE not in server.output():
            if not server.running() or time.monotonic() > deadline:
                lab.running(server.container)  # ContainerGone, if that is why
                server.stop()
                return _Outcome("failed", "the server did not start", server_explains=True)
            time.sleep(POLL_S / 20)
        self.progress(f"starting {', '.join(scenario.client_services(experiment))}")
        if self.kept is not None and self.kept.measured_in is not None:
            keep = {**keep, ENV_PROBE: ""}  # measured once for the kept lab (see _KeptLab)
        for group in experiment.clients:
            argv = scenario.client_argv(group, trace=self.trace, lab_server=experiment.server.program is None)
            for container in (c for c in containers if c.service == scenario.client_service(group)):
                # A trace left by the previous case must not pass for this one's.
                roles.append(lab.start_role(container, argv, keep, remove_first=scenario.role_files(group.program)))
        return None

    def _drive(self, lab: Lab, case: Case, started: float, start, roles: list[RoleHandle]) -> _Outcome:
        experiment = case.experiment
        deadline = started + experiment.timeout_s
        not_started = start(lab, case, roles)
        if not_started is not None:
            return not_started
        clients = [r for r in roles if not _is_server(r)]
        steps = sorted(experiment.schedule, key=lambda s: s.at_s)
        if steps:
            # A change must not race the entrypoint's own shaping, and `at` counts
            # from when the workload starts, which is once the links are in place.
            self._wait_shaped(lab, clients, deadline)
        workload_started = time.monotonic()
        self.progress(f"running {len(clients)} client container(s)")
        running = clients
        with ThreadPoolExecutor(max_workers=COLLECT_WORKERS) as pool:
            while True:
                now = time.monotonic()
                while steps and now - workload_started >= steps[0].at_s:
                    self._apply_step(lab, steps.pop(0))
                # A role that ended stays ended: only the others are asked again, side by side (one
                # round trip each: fifty in a row after a `compose up` of fifty clients add up).
                running = [r for r, alive in zip(running, pool.map(lambda r: r.running(), running)) if alive]
                if not running:
                    break
                if now >= deadline:
                    for role in running:
                        role.stop()
                    # A stopped client prints what it did as it ends: it is collected once it has.
                    stopped_by = time.monotonic() + SERVER_STOP_S
                    for role in running:
                        role.wait(max(0.0, stopped_by - time.monotonic()))
                    return _Outcome("timeout", f"the case ran past its timeout of {experiment.timeout_s:g} s; "
                                               f"still running: {', '.join(r.container.name for r in running)}")
                # Wakes as soon as that role ends, not at the next poll.
                running[0].wait(min(POLL_S, max(0.01, deadline - now)))
        return _Outcome("ok")

    def _wait_shaped(self, lab: Lab, roles: list[RoleHandle], deadline: float) -> None:
        """Wait until every running role's entrypoint has applied its link."""
        pending = list(roles)
        while pending and time.monotonic() < deadline:
            pending = [r for r in pending if r.running()
                       and lab.exec(r.container, ["test", "-e", scenario.LINK_STATE_PATH])[0] != 0]
            if pending:
                time.sleep(POLL_S / 4)

    def _apply_step(self, lab: Lab, step) -> None:
        group = step.group
        service = scenario.SERVER_SERVICE if group is None else scenario.client_service(group)
        words = scenario.link_assignments(step.link)
        self.progress(f"at {step.at_s:g} s: link of {service} -> {' '.join(words)}")
        for container in lab.containers(service):
            if lab.running(container):
                code, out = lab.exec(container, ["python3", "-m", "socklab", "shape", "set", *words])
                if code != 0:
                    raise SocklabError(f"changing the link of {container.name} failed: "
                                       f"{last_line(out) or f'exit status {code}'}")

    def _collect(self, lab: Lab, case: Case, repetition: int, roles: list[RoleHandle],
                 outcome: _Outcome, wall_s: float) -> dict:
        self.progress("collecting results")
        # delay_line: the userspace backend's counters per container (null under netem);
        # mtu: the lab device's, from the server's link report.
        link = {"backend": None, "applied": {}, "qdisc": {}, "delay_line": {}, "mtu": None}
        nodes = {}  # which host ran each role, where the engine spans several
        server_result = None
        clients = []

        def fetch(role: RoleHandle) -> tuple[RoleOutcome, Program | None, bytes | None, bytes | None,
                                             dict[str, bytes]]:
            if _is_server(role):
                # Stopped here, while the clients' files are fetched: it prints its result as it ends.
                try:
                    role.stop()
                    role.wait(SERVER_STOP_S)
                except ContainerGone:
                    pass  # nothing left to stop; the case says why it failed
            config = _config_of(case, role)
            program = config.program if config is not None else None
            trace = lab.read_file(role.container, scenario.TRACE_PATH) \
                if self.trace and (program is not None or not _is_server(role)) else None
            captured = config is not None and case.experiment.capture_of(config) is not None
            capture = lab.read_file(role.container, scenario.CAPTURE_PATH) if captured else None
            outputs = {}
            if program is not None:
                for stream in scenario.PROGRAM_OUTPUTS:
                    data = lab.read_file(role.container, f"{scenario.PROGRAM_OUTPUT_DIR}/{stream}")
                    if data is not None:
                        outputs[stream] = data
            gone = False
            try:
                code = role.exit_code()
            except ContainerGone:
                code, gone = None, True
            is_server = _is_server(role)
            ended = RoleOutcome(who="the server" if is_server else role.container.service,
                                kind="server" if is_server else "client", exit_code=code,
                                results=tuple(find_results(role.stdout())), gone=gone)
            if needs_last_words(ended):  # only then is stderr worth another round trip
                ended = replace(ended, last_words=last_words(role.output()))
            return ended, program, trace, capture, outputs

        # One engine round trip per container and file: fetched side by side, so
        # that collecting fifty containers does not take fifty times as long. The
        # server's first, as its stop takes longest.
        with ThreadPoolExecutor(max_workers=COLLECT_WORKERS) as pool:
            order = sorted(range(len(roles)), key=lambda i: not _is_server(roles[i]))
            pending = {i: pool.submit(fetch, roles[i]) for i in order}
            fetched = [pending[i].result() for i in range(len(roles))]
        self.progress("writing the results into the run directory")
        outcomes = [ended for ended, *_ in fetched]
        measured = {}  # each probing client container's link, judged (see labkit.linkcheck)
        for role, (ended, program, trace, capture_data, outputs) in zip(roles, fetched):
            container = role.container
            by_role = {r.get("role"): r for r in ended.results}
            group = _group_of(container)
            replica = container.number - 1
            key = group if replica == 0 else f"{group}#{replica}"
            is_server = _is_server(role)
            if container.node:
                nodes[key] = container.node
            if "link" in by_role:
                shown = by_role["link"]
                if shown.get("backend") not in (None, "none"):
                    link["backend"] = shown["backend"]
                link["applied"].setdefault(group, shown.get("applied"))
                link["qdisc"][key] = shown.get("qdisc")
                link["delay_line"][key] = shown.get("delay_line")
                # The server's device names the link's MTU (the TCP ceiling follows from it).
                if is_server or link["mtu"] is None:
                    link["mtu"] = shown.get("mtu")
            if "probe" in by_role:
                measured[key] = linkcheck.judge(by_role["probe"])
            trace_file = self.rundir.write_trace(case.id, repetition, key, trace) if trace else None
            capture = self._capture(case, repetition, key, by_role.get("capture"), capture_data)
            result = by_role.get("server" if is_server else "client")
            if program is not None and result is not None:
                kept = {stream: self.rundir.write_output(case.id, repetition, key, stream, data)
                        for stream, data in outputs.items()}
                result = records.with_program(result, program, self._program_digest(program), kept)
            if capture is not None:
                result = {**(result or {"role": "server" if is_server else "client"}), "capture": capture}
            if is_server:
                # A server that printed no result (killed before it could) still leaves no record of its own.
                server_result = result if trace_file is None or result is None else {**result, "trace": trace_file}
                continue
            clients.append(records.client_record(group, replica, result, trace=trace_file))
        status, error = self._judge(outcome, outcomes)
        link["backend"] = link["backend"] or "none"
        measured = self._kept_measurement(case, repetition, measured)
        if measured:
            link["measured"] = measured
            if case.experiment.verify == "strict" and status == "ok":
                error = linkcheck.strict_failure(measured)
                status = "failed" if error else status
        clients = records.with_deliveries(clients, server_result)
        record = records.case_record(
            case=case, repetition=repetition, status=status, error=error, wall_s=wall_s,
            link=link, server=records.server_record(server_result),
            clients=sorted(clients, key=lambda c: (c["name"], c["replica"])))
        if measured:
            record["link_ok"] = linkcheck.case_link_ok(measured)
        if nodes:
            record["nodes"] = nodes
        return record

    def _kept_measurement(self, case: Case, repetition: int, measured: dict) -> dict:
        """The links of a case in kept containers: the first case's measurement keeps for the
        lab, and each later case carries it, saying which case measured it."""
        kept = self.kept  # set only with reuse
        if kept is None:
            return measured
        if kept.measured_in is None:
            if measured:
                kept.measured, kept.measured_in = measured, f"{case.id} r{repetition}"
            return measured
        return measured or {key: {**judged, "measured_in": kept.measured_in}
                            for key, judged in kept.measured.items()}

    def _capture(self, case: Case, repetition: int, key: str, said: Mapping | None,
                 data: bytes | None) -> dict | None:
        """A role's capture as its record holds it: the entrypoint's counts, the file kept in
        the run directory, and what the packets say of TCP (None when the role captured nothing)."""
        if said is None and data is None:
            return None
        capture = {k: v for k, v in (said or {}).items() if k not in ("socklab_result", "role")}
        capture["file"] = None
        capture["tcp"] = None
        if data is not None:
            capture["file"] = self.rundir.write_capture(case.id, repetition, key, data)
            try:
                capture["tcp"] = pcap.summarize(self.rundir.path / capture["file"], scenario.SERVER_PORT)
            except SocklabError as exc:  # a capture cut short still leaves the case its record
                capture["error"] = str(exc)
        return capture

    def _program_digest(self, program: Program) -> str | None:
        """The sha256 of the run directory's copy of ``program`` (None for a command)."""
        if program.path is None:
            return None
        if program.path not in self._digests:
            self._digests[program.path] = self.rundir.program_digest(program.path)
        return self._digests[program.path]

    @staticmethod
    def _judge(outcome: _Outcome, outcomes: list[RoleOutcome]) -> tuple[str, str | None]:
        """The case's status and error, from how its drive ended and how each role did.

        The server first in the headline: a server that died is usually why its
        clients failed. A timeout's own sentence stands alone: the roles it
        stopped were stopped by it.
        """
        if outcome.status == "timeout":
            return outcome.status, outcome.error
        ordered = sorted(outcomes, key=lambda o: o.kind != "server")
        said = headline(ordered)
        if outcome.status == "ok":
            return ("ok", None) if said is None else ("failed", said)
        if outcome.error is None:
            return outcome.status, said or "the case failed and no role says why"
        server = next((o for o in ordered if o.kind == "server"), None)
        why = cause_alone(server) if outcome.server_explains and server is not None else None
        return outcome.status, f"{outcome.error}: {why}" if why else outcome.error
