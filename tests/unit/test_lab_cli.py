"""lab.py's commands on the fake engine: errors named once, doctor, clean, a run and its interruption."""

from __future__ import annotations

import json
import os
import signal

import pytest

from labkit import cli, owner
from labkit.engine import Finding, LabObject
from labkit.engine.compose import build_failure_reason

from .fake_engine import FakeEngine, real_like

CAPS = {"qdiscs": {"netem": False, "tbf": True, "htb": True}, "ifb": True, "u32": True, "mirred": True,
        "nfqueue": True}


def test_a_bad_argument_is_one_line_naming_the_program_once(capsys):
    assert cli.main(["run", "--bogus"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "lab.py: unrecognized arguments: --bogus"


def test_an_error_of_a_command_is_prefixed_with_the_program(capsys, tmp_path):
    assert cli.main(["check", str(tmp_path / "missing.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lab.py: ") and not line.startswith("lab.py: lab.py") and "missing.yaml" in line


@pytest.fixture
def engine(monkeypatch):
    """The fake engine, as the one lab.py opens."""
    fake = FakeEngine(caps=CAPS)
    monkeypatch.setattr("labkit.engine.open_engine", lambda *args, **kwargs: fake)
    return fake


# ------------------------------------------------------------------ doctor

def test_doctor_reports_the_engine_image_and_kernel(engine, capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "Docker daemon:   ok (engine 27.0-fake, API 1.46)" in out
    assert "Compose v2:      ok (2.29-fake)" in out
    assert "lab image:       ok" in out and engine.builds == 1
    assert "kernel qdiscs:   netem no, tbf yes, htb yes (kernel module sch_netem is missing)" in out
    assert "shaping backend: userspace" in out


def test_doctor_reports_every_check_after_a_failed_build_and_exits_3(engine, capsys):
    engine.build_error = build_failure_reason(
        "failed to solve: python:3.12-slim: failed to resolve source metadata for docker.io/library/python:"
        "3.12-slim: dial tcp: lookup registry: no such host", "python:3.12-slim")
    assert cli.main(["doctor"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["Docker daemon:   ok (engine 27.0-fake, API 1.46)", "Compose v2:      ok (2.29-fake)"]
    (failed,) = [line for line in out if "FAILED" in line]
    assert failed.startswith("lab image:       FAILED — the lab image cannot be built: its base image "
                             "python:3.12-slim is not on this engine") and "set BASE_IMAGE" in failed
    assert out[-1] == "kernel:          not checked: it needs the lab image"


def test_doctor_without_a_daemon_says_what_it_could_not_check(engine, capsys):
    engine.findings = [Finding("Docker daemon", False, "cannot reach the Docker daemon; start Docker"),
                       Finding("Compose v2", True, "2.29-fake")]
    assert cli.main(["doctor"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out == ["Docker daemon:   FAILED — cannot reach the Docker daemon; start Docker",
                   "Compose v2:      ok (2.29-fake)", "lab image:       not checked: it needs the engine",
                   "kernel:          not checked: it needs the lab image"]
    assert engine.builds == 0


def test_doctor_names_a_kernel_that_cannot_shape_rates(engine, capsys):
    engine.caps = {**CAPS, "ifb": False}
    assert cli.main(["doctor"]) == 3
    assert "problem:         this kernel lacks tbf, ifb or mirred" in capsys.readouterr().out


@pytest.mark.parametrize("output, names_base_image", [
    ("#3 ERROR: failed to do request: Head \"https://r.example/v2/library/python/manifests/3.12-slim\": dial tcp: "
     "lookup r.example: i/o timeout", True),
    ("ERROR: Service 'server' failed to build: Get https://r.example/v2/: dial tcp: lookup r.example: no such "
     "host", True),
    ("pull access denied for socklab-base, repository does not exist or may require 'docker login'", True),
    ("#7 [3/4] RUN python3 -m compileall /opt/socklab\n#7 ERROR: process \"/bin/sh -c python3 -m compileall\" "
     "did not complete successfully: exit code: 1", False),
])
def test_a_build_failure_says_why(output, names_base_image):
    reason = build_failure_reason(output, "python:3.12-slim")
    assert ("set BASE_IMAGE" in reason) is names_base_image
    if not names_base_image:
        assert reason.startswith("the lab image cannot be built:\n") and "exit code: 1" in reason


# ------------------------------------------------------------------- clean

def _labels(**extra: str) -> dict[str, str]:
    return {"io.socklab.lab": "true", **extra}


def test_clean_leaves_the_objects_of_live_runs_and_says_why(engine, capsys):
    alive = owner.current_owner().labels()
    dead = {**alive, owner.OWNER_STARTED: "another-boot:1"}
    far = {**alive, owner.OWNER_HOST: "elsewhere"}
    engine.stored = [
        LabObject("containers", "live-server-1", _labels(**alive)),
        LabObject("containers", "dead-server-1", _labels(**dead)),
        LabObject("containers", "demo-server-1", _labels()),
        LabObject("containers", "far-server-1", _labels(**far)),
        LabObject("networks", "live_lab", _labels(**alive)),
        LabObject("networks", "dead_lab", _labels(**dead)),
        LabObject("volumes", "live_results", _labels(**alive)),
    ]
    assert cli.main(["clean"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [o.name for o in engine.removed] == ["dead-server-1", "demo-server-1", "dead_lab"]
    assert out == [
        "removed 2 containers: dead-server-1, demo-server-1",
        "removed 1 networks: dead_lab",
        "removed 0 volumes",
        f"left 1 containers, 1 networks, 1 volumes, because its run is still going (lab.py pid {os.getpid()} on "
        "this host): live-server-1, live_lab, live_results",
        "left 1 containers, because its run's lab.py runs on host elsewhere, whose processes this host cannot "
        "check: far-server-1",
        "(`lab.py clean --force` removes those too)",
    ]

    assert cli.main(["clean", "--force"]) == 0
    assert engine.stored == []
    assert capsys.readouterr().out.splitlines()[0] == "removed 2 containers: live-server-1, far-server-1"


# --------------------------------------------------------------------- run

EXPERIMENT = """\
name: fake
timeout: 5s
server: {mode: epoll}
clients:
  - name: sender
    mode: blocking
    workload: {kind: bulk, bytes: 1000}
    link: {rate: 10mbit}
matrix:
  clients.sender.mode: [blocking, select, asyncio]
expect:
  - name: everything arrives
    check: "sender.bytes_delivered == sender.bytes_requested"
"""


def _run_dir(out):
    (run,) = [p for p in out.glob("fake/*") if p.is_dir()]
    return run


def test_a_run_on_the_engine_writes_its_run_directory(engine, tmp_path, capsys):
    config = tmp_path / "fake.yaml"
    config.write_text(EXPERIMENT)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out"), "--no-trace"]) == 0
    run = _run_dir(tmp_path / "out")
    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 3
    meta = json.loads((run / "meta.json").read_text())
    assert meta["compose"] == "2.29-fake" and meta["host_kernel"] == "6.1.0-fake"
    assert meta["docker"]["engine"] == "27.0-fake" and meta["shaping_backend"] == "netem"
    assert engine.builds == 1 and engine.downs == [lab.name for lab in engine.labs] and len(engine.labs) == 3
    # The run's objects carry their owner: this process.
    definition = json.loads(next((run / "compose").iterdir()).read_text())
    assert definition["services"]["server"]["labels"][owner.OWNER_PID] == str(os.getpid())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_tears_down_keeps_what_finished_and_exits_130(engine, tmp_path, capsys, signum):
    started = []

    def interrupt_the_second_case(container, argv):
        if argv[0] == "server":
            started.append(argv)
            if len(started) == 2:
                os.kill(os.getpid(), signum)
        return real_like(container, argv)

    engine.behave = interrupt_the_second_case
    config = tmp_path / "fake.yaml"
    config.write_text(EXPERIMENT)
    previous = signal.getsignal(signum)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out"), "--no-trace"]) == 130
    assert signal.getsignal(signum) is previous
    err = capsys.readouterr().err
    run = _run_dir(tmp_path / "out")
    assert f"interrupted by {signal.Signals(signum).name}: the lab's containers are removed" in err
    assert f"--resume {run}" in err
    assert len((run / "cases.jsonl").read_text().splitlines()) == 1
    assert len(engine.labs) == 2 and engine.downs == [lab.name for lab in engine.labs]
    assert (run / "report.md").is_file() and json.loads((run / "meta.json").read_text())["ended_at"]


def test_commands_run_in_a_session_of_their_own_so_a_terminal_ctrl_c_reaches_lab_py_alone():
    from labkit import proc

    done = proc.run(["sh", "-c", "cut -d' ' -f6 /proc/$$/stat"])
    assert int(done.stdout) != os.getsid(0)


def test_a_run_without_git_records_no_revision_rather_than_failing(monkeypatch):
    from labkit import proc
    from labkit.commands import run

    def no_git(argv, **kwargs):
        raise proc.CommandError(argv, None, "", "No such file or directory: 'git'")

    monkeypatch.setattr(proc, "run", no_git)
    assert run._git_revision() is None
