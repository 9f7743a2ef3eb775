"""CaseRunner on the fake engine: every way a case can end, the schedule, the collect path, --reuse."""

from __future__ import annotations

import gzip
import json
import threading
import time
from types import SimpleNamespace

import pytest

from labkit.compose import ComposeProject
from labkit.config import load_experiment_text
from labkit.engine import Engine, Lab, LabContainer, LabEngineError, RoleHandle
from labkit.engine.compose import ComposeEngine, ComposeLab, ContainerRole, ExecRole
from labkit.matrix import expand_cases
from labkit.rundir import RunDir
from labkit.runner import CaseRunner
from socklab.entry import ENV_KEEP
from socklab.linkprobe import ENV_PROBE

from .fake_engine import (FakeContainer, FakeEngine, FakeRole, Script, client_line, failure_line, line, link_line,
                          real_like)

EXPERIMENT = """
name: fake
timeout: 5s
server: {mode: epoll}
clients:
  - name: sender
    replicas: 2
    mode: blocking
    workload: {kind: bulk, bytes: 1000}
    link: {rate: 10mbit}
"""


def cases(text: str = EXPERIMENT):
    return expand_cases(load_experiment_text(text, "fake.yaml"))


@pytest.fixture
def rundir(tmp_path):
    return RunDir.create(tmp_path, "fake")


def runner(engine, rundir, **kwargs) -> CaseRunner:
    phases: list[str] = []
    run = CaseRunner(engine, rundir, phases.append, **kwargs)
    run.phases = phases
    return run


def test_both_engines_implement_the_whole_interface(tmp_path):
    assert isinstance(FakeEngine(), Engine) and isinstance(ComposeEngine(api=object()), Engine)
    lab = FakeEngine().create({"services": {}}, name_hint="x", record=tmp_path / "record")
    assert isinstance(lab, Lab) and isinstance(ComposeLab(object(), ComposeProject("p")), Lab)
    container = LabContainer("i", "n", "server", 1)
    assert isinstance(ContainerRole(object(), container), RoleHandle)
    assert isinstance(ExecRole(object(), SimpleNamespace(container=container), "/run/socklab/x.pid"), RoleHandle)
    assert isinstance(FakeRole(lab, FakeContainer(container, ["server"]), ["server"], Script()), RoleHandle)


def test_a_case_that_ends_normally_is_collected_whole(rundir):
    engine = FakeEngine()
    (case,) = cases()
    record = runner(engine, rundir, owner={"io.socklab.owner.pid": "7"}).run(case, 0)

    assert record["status"] == "ok" and record["error"] is None
    assert record["server"]["bytes_received"] == 1000
    assert [(c["name"], c["replica"], c["bytes_delivered"]) for c in record["clients"]] == [
        ("sender", 0, 1000), ("sender", 1, 1000)]
    # The link report: per group as applied, per container its counters.
    assert record["link"]["backend"] == "netem"
    assert record["link"]["applied"] == {"server": {"up": {"rate_bps": 10_000_000}, "down": {"rate_bps": 10_000_000}},
                                         "sender": {"up": {"rate_bps": 10_000_000}, "down": {"rate_bps": 10_000_000}}}
    assert set(record["link"]["qdisc"]) == {"server", "sender", "sender#1"}
    # Every client's trace, as the container wrote it, under its own name, which its record names.
    named = [c["trace"] for c in record["clients"]]
    assert named == ["traces/default.r0.sender.trace.gz", "traces/default.r0.sender%231.trace.gz"]
    assert sorted(f"traces/{p.name}" for p in rundir.traces.iterdir()) == sorted(named)
    assert gzip.decompress((rundir.path / named[0]).read_bytes()) == b'{"mode": "blocking"}\n'
    # The engine's description of the lab is kept in the run directory, owner labels included.
    (kept,) = rundir.compose.iterdir()
    definition = json.loads(kept.read_text())
    assert definition["services"]["server"]["labels"]["io.socklab.owner.pid"] == "7"
    assert definition["networks"]["lab"]["labels"]["io.socklab.owner.pid"] == "7"
    # compose.yaml gives the network and volume the lab's label; Compose would refuse it twice on a volume.
    assert "io.socklab.lab" not in definition["volumes"]["results"]["labels"]
    (lab,) = engine.labs
    assert engine.downs == [lab.name]
    assert all(role.stops == (1 if role.argv[0] == "server" else 0) for role in lab.roles)


def test_a_timeout_stops_what_still_runs_and_says_which(rundir):
    def slow(container, argv):
        script = real_like(container, argv)
        if argv[0] == "client" and container.number == 2:
            script.duration_s = 30
        return script

    engine = FakeEngine(slow)
    (case,) = cases(EXPERIMENT.replace("timeout: 5s", "timeout: 0.4s"))
    started = time.monotonic()
    record = runner(engine, rundir).run(case, 0)
    assert 0.4 <= time.monotonic() - started < 2.0

    (lab,) = engine.labs
    assert record["status"] == "timeout"
    assert record["error"] == (f"the case ran past its timeout of 0.4 s; still running: {lab.name}-client-sender-2")
    slow_role = next(r for r in lab.roles if r.container.number == 2 and r.argv[0] == "client")
    assert slow_role.stops == 1
    # What did finish is still recorded.
    assert [c["bytes_delivered"] for c in record["clients"]] == [1000, None]
    assert engine.downs == [lab.name]


def test_a_role_that_prints_no_result_line_fails_its_case_by_name(rundir):
    def silent(container, argv):
        script = real_like(container, argv)
        if argv[0] == "client" and container.number == 1:
            script.stdout = [link_line()]
        return script

    (case,) = cases()
    record = runner(FakeEngine(silent), rundir).run(case, 0)
    assert record["status"] == "failed"
    assert record["error"] == "client-sender (1 of 2 containers) printed no result"


def test_a_container_that_vanishes_fails_its_case_and_the_lab_still_comes_down(rundir):
    def vanishing(container, argv):
        script = real_like(container, argv)
        if argv[0] == "client" and container.number == 2:
            script.duration_s, script.vanish_after_s = 5, 0.1
        return script

    engine = FakeEngine(vanishing)
    (case,) = cases()
    record = runner(engine, rundir).run(case, 0)
    (lab,) = engine.labs
    assert record["status"] == "failed"
    assert record["error"] == (f"container {lab.name}-client-sender-2 disappeared while its case ran")
    assert engine.downs == [lab.name]
    # The one that vanished left nothing; the other is recorded.
    assert [c["bytes_delivered"] for c in record["clients"]] == [1000, None]


def test_the_server_killed_and_a_client_reset_are_both_in_the_headline(rundir):
    def reset(container, argv):
        script = real_like(container, argv)
        if argv[0] == "server":
            script.on_stop, script.stop_exit_code = [], 137
        else:
            script.stdout = [client_line(argv, ["send() failed: ECONNRESET (Connection reset by peer)"]),
                             link_line()]
            script.exit_code = 1
        return script

    (case,) = cases()
    record = runner(FakeEngine(reset), rundir).run(case, 0)
    assert record["status"] == "failed"
    assert record["error"] == ("the server exited 137 (killed by SIGKILL) and client-sender (2 of 2 containers): "
                               "send() failed: ECONNRESET (Connection reset by peer)")


def test_a_server_that_does_not_start_says_why_not_the_link_banner(rundir):
    def refused(container, argv):
        script = real_like(container, argv)
        if argv[0] == "server":
            script.duration_s, script.exit_code = 0.0, 3
            script.stdout = [failure_line("entry", "the link asks for delay 5ms but this kernel has no netem "
                                                   "qdisc (kernel module sch_netem)", 3)]
        return script

    engine = FakeEngine(refused)
    engine.start_fails = "dependency failed to start: container server is unhealthy"
    (case,) = cases()
    record = runner(engine, rundir).run(case, 0)
    assert record["status"] == "failed"
    assert record["error"] == ("the server did not start: the link asks for delay 5ms but this kernel "
                               "has no netem qdisc (kernel module sch_netem)")


SCHEDULED = EXPERIMENT + """
  - name: other
    mode: blocking
    workload: {kind: bulk, bytes: 1000}
    link: {rate: 10mbit}
schedule:
  - {at: 0.2s, target: clients.sender, link: {rate: 2mbit}}
  - {at: 0.4s, target: server, link: {delay: 5ms}}
"""


def test_schedule_steps_reach_the_right_containers_at_the_right_time(rundir):
    def long(container, argv):
        script = real_like(container, argv)
        if argv[0] == "client":
            script.duration_s = 0.7
        return script

    engine = FakeEngine(long)
    (case,) = cases(SCHEDULED)
    record = runner(engine, rundir).run(case, 0)
    assert record["status"] == "ok", record["error"]
    (lab,) = engine.labs
    changes = [(at - lab.started_at, name, argv[5:]) for at, name, argv in lab.execs if argv[3:5] == ["shape", "set"]]
    assert [(name, words) for _, name, words in changes] == [
        (f"{lab.name}-client-sender-1", ["rate=2mbit"]), (f"{lab.name}-client-sender-2", ["rate=2mbit"]),
        (f"{lab.name}-server-1", ["delay=5ms"])]
    # On time (counted from when the links were in place), within the runner's poll interval.
    for (at, _, _), due in zip(changes, (0.2, 0.2, 0.4)):
        assert due <= at < due + 0.25, changes


def test_a_link_change_the_container_refuses_fails_the_case(rundir):
    engine = FakeEngine(lambda c, argv: Script(**{**real_like(c, argv).__dict__, "duration_s": 0.6})
                        if argv[0] == "client" else real_like(c, argv))
    engine.shape_set = lambda container, words: (2, "socklab: rate: '2mbit' is not allowed here\n")
    (case,) = cases(SCHEDULED)
    record = runner(engine, rundir).run(case, 0)
    assert record["status"] == "failed"
    assert record["error"].startswith("changing the link of ") and "is not allowed here" in record["error"]


def test_an_engine_failure_ends_the_run_not_just_the_case(rundir):
    class Broken(FakeEngine):
        def create(self, *args, **kwargs):
            lab = super().create(*args, **kwargs)

            def containers(service=None):
                raise LabEngineError("Docker could not list the containers: the daemon went away")
            lab.containers = containers
            return lab

    engine = Broken()
    (case,) = cases()
    with pytest.raises(LabEngineError, match="daemon went away"):
        runner(engine, rundir).run(case, 0)
    assert engine.downs == [engine.labs[0].name]


REUSED = EXPERIMENT + """
matrix:
  clients.sender.mode: [blocking, select, asyncio]
"""


def test_reuse_shares_one_lab_while_cases_share_containers_and_starts_roles_afresh(rundir):
    engine = FakeEngine()
    run = runner(engine, rundir, reuse=True)
    try:
        records = [run.run(case, 0) for case in cases(REUSED)]
    finally:
        run.close()
    assert [r["status"] for r in records] == ["ok"] * 3
    (lab,) = engine.labs
    assert engine.downs == [lab.name]
    assert [f.command for f in lab.fakes] == [["hold"]] * 3
    modes = [r.argv[r.argv.index("--mode") + 1] for r in lab.roles if r.argv[0] == "client"]
    assert modes == ["blocking", "blocking", "select", "select", "asyncio", "asyncio"]
    assert all(r.env == {ENV_KEEP: "1"} for r in lab.roles)
    assert len(list(rundir.traces.iterdir())) == 6


def test_reuse_probes_the_kept_links_in_the_first_case_and_later_cases_carry_that_measurement(rundir):
    probe = line("probe", expected={"rtt_ms": 0.0}, rtt_ms={"median": 0.2, "sent": 10, "received": 10})

    started: list[str] = []

    def probing(container, argv):
        # As the entrypoint does with ENV_PROBE empty: the later cases' clients print no probe.
        script = real_like(container, argv)
        if argv[0] == "client":
            started.append(container.name)
            if len(started) <= 2:
                script.stdout = [*script.stdout, probe]
        return script

    engine = FakeEngine(probing)
    run = runner(engine, rundir, reuse=True)
    try:
        first, *later = [run.run(case, 0) for case in cases(REUSED)]
        (lab,) = engine.labs
        clients = [r.env for r in lab.roles if r.argv[0] == "client"]
    finally:
        run.close()
    # Only the first case's clients probe; the later ones are told not to.
    assert clients == [{ENV_KEEP: "1"}] * 2 + [{ENV_KEEP: "1", ENV_PROBE: ""}] * 4
    assert set(first["link"]["measured"]) == {"sender", "sender#1"} and first["link_ok"] is True
    assert all("measured_in" not in judged for judged in first["link"]["measured"].values())
    for record in later:
        assert record["link"]["measured"] == {key: {**judged, "measured_in": f"{first['case']} r0"}
                                              for key, judged in first["link"]["measured"].items()}
        assert record["link_ok"] is True


def test_reuse_takes_a_new_lab_after_a_failure_and_when_the_containers_differ(rundir):
    def failing_select(container, argv):
        script = real_like(container, argv)
        if argv[0] == "client" and "select" in argv:
            script.stdout, script.exit_code = [], 1
        return script

    engine = FakeEngine(failing_select)
    run = runner(engine, rundir, reuse=True)
    text = REUSED.replace("[blocking, select, asyncio]", "[blocking, select, asyncio, poll]")
    try:
        records = [run.run(case, 0) for case in cases(text)]
        other = cases(text.replace("rate: 10mbit", "rate: 20mbit"))[0]
        records.append(run.run(other, 0))
    finally:
        run.close()
    assert [r["status"] for r in records] == ["ok", "failed", "ok", "ok", "ok"]
    # blocking+select in the first lab, which the failure took down; asyncio+poll in a
    # second; the case with another link in a third.
    assert len(engine.labs) == 3 and engine.downs == [lab.name for lab in engine.labs]
    assert [len([r for r in lab.roles if r.argv[0] == "client"]) for lab in engine.labs] == [4, 4, 2]


def test_reuse_drops_a_lab_whose_server_container_vanished(rundir):
    servers = []

    def vanishing_server(container, argv):
        script = real_like(container, argv)
        if argv[0] == "server":
            servers.append(argv)
            if len(servers) == 2:  # the second case's: its container is removed from outside
                script.vanish_after_s = 0.0
        return script

    engine = FakeEngine(vanishing_server)
    run = runner(engine, rundir, reuse=True)
    try:
        records = [run.run(case, 0) for case in cases(REUSED)]
    finally:
        run.close()
    assert [r["status"] for r in records] == ["ok", "failed", "ok"]
    assert "disappeared while its case ran" in records[1]["error"]
    assert len(engine.labs) == 2 and engine.downs == [lab.name for lab in engine.labs]


def test_the_server_is_stopped_while_the_clients_are_collected(rundir):
    """The server's stop takes longest: the clients' files are fetched meanwhile, not after it."""
    client_read = threading.Event()
    waited: list[bool] = []

    class SlowStop(FakeEngine):
        def create(self, *args, **kwargs):
            lab = super().create(*args, **kwargs)
            read_file = lab.read_file

            def reading(container, path):
                if container.service != "server":
                    client_read.set()
                return read_file(container, path)
            lab.read_file = reading
            return lab

    engine = SlowStop()
    (case,) = cases()
    run = runner(engine, rundir)
    real_wait = FakeRole.wait

    def wait(role, timeout_s):
        if role.argv[0] == "server":  # it ends only once a client's files are being fetched (or after 2 s)
            waited.append(client_read.wait(2.0))
        real_wait(role, timeout_s)

    FakeRole.wait = wait
    try:
        record = run.run(case, 0)
    finally:
        FakeRole.wait = real_wait
    assert record["status"] == "ok" and record["server"]["bytes_received"] == 1000
    assert waited == [True]
    assert run.phases[-3:] == ["collecting results", "writing the results into the run directory", "tearing down"]


def test_a_client_that_ended_is_not_asked_again(rundir):
    def one_slow(container, argv):
        script = real_like(container, argv)
        if argv[0] == "client" and container.number == 2:
            script.duration_s = 0.7
        return script

    asked_after_end: dict[str, int] = {}
    real_running = FakeRole.running

    def running(role):
        if role.ended_at is not None:
            asked_after_end[role.container.name] = asked_after_end.get(role.container.name, 0) + 1
        return real_running(role)

    engine = FakeEngine(one_slow)
    (case,) = cases()
    FakeRole.running = running
    try:
        record = runner(engine, rundir).run(case, 0)
    finally:
        FakeRole.running = real_running
    assert record["status"] == "ok"
    (lab,) = engine.labs
    # The slow one keeps the drive polling (every 0.2 s); the quick one is asked no more once it is seen ended.
    assert asked_after_end.get(f"{lab.name}-client-sender-1", 0) <= 1


def test_a_compose_lab_comes_down_through_the_sdk_and_by_compose_when_something_is_left(tmp_path):
    class Api:
        def __init__(self, left=(), error=None):
            self.left, self.error, self.removed = list(left), error, []

        def remove_project(self, name):
            self.removed.append(name)
            if self.error:
                raise LabEngineError(self.error)

        def containers(self, name, service=None):
            return self.left

    class Project(ComposeProject):
        downs = 0

        def down(self):
            self.downs += 1

    for api, by_compose in ((Api(), 0), (Api(left=[LabContainer("i", "p-client-1", "client", 1)]), 1),
                            (Api(error="Docker could not remove p_lab: it has active endpoints"), 1)):
        project = Project("p")
        ComposeLab(api, project).down()
        assert api.removed == ["p"] and project.downs == by_compose
