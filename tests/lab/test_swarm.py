"""seed-demo on a single-node swarm (`--engine swarm`): the tutorial's facts, and nothing left afterwards.

The host's engine is put into swarm mode only if it is not in one, and left
as it was found.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from labkit import cli, proc
from labkit.engine.swarm import SwarmEngine

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.docker
TUTORIAL_BYTES = 136_314_880


def _swarm_state() -> str:
    return proc.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"], timeout_s=30).stdout.strip()


@pytest.fixture(scope="module")
def swarm(lab_image):
    """A swarm on the host's engine: the one it is in, or a single node made here and left afterwards."""
    made = _swarm_state() == "inactive"
    if made:
        proc.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], timeout_s=60)
    yield
    if made:
        proc.run(["docker", "swarm", "leave", "--force"], timeout_s=60)


def _lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "lab.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def _labelled(kind: str, *filters: str) -> list[str]:
    argv = ["docker", kind, "ls", "-aq" if kind == "container" else "-q", "--filter", "label=io.socklab.lab"]
    for flt in filters:
        argv += ["--filter", flt]
    return proc.run(argv, timeout_s=30).stdout.split()


def test_seed_demo_on_a_single_node_swarm(swarm, tmp_path):
    node = proc.run(["docker", "info", "--format", "{{.Name}}"], timeout_s=30).stdout.strip()
    # Placed where the experiment says (one node meets both constraints here).
    done = _lab("run", "configs/seed-demo.yaml", "--engine", "swarm", "--repeat", "1", "--out", str(tmp_path),
                "--set", "server.placement=node.role == manager",
                "--set", f"clients.sender.placement=node.hostname == {node}",
                # The server's packets: a capture comes back from a task as a trace does.
                "--set", "server.capture=true")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    (cases,) = tmp_path.glob("*/*/cases.jsonl")
    by_mode = {}
    for line in cases.read_text().splitlines():
        record = json.loads(line)
        assert record["status"] == "ok", record["error"]
        assert all(e["passed"] for e in record["expectations"])
        # The overlay's device: VXLAN takes 50 of Ethernet's 1500 bytes.
        assert record["link"]["mtu"] == 1450
        (sender,) = record["clients"]
        # Which node ran each role: on one node, this host's engine.
        assert record["nodes"] == {"server": node, "sender": node}
        by_mode[sender["mode"]] = (sender, record["server"])
    blocking, server = by_mode["blocking"]
    assert blocking["send_calls"] == 1 and blocking["bytes_accepted"] == TUTORIAL_BYTES
    assert server["bytes_received"] == TUTORIAL_BYTES
    nonblocking, server = by_mode["nonblocking"]
    assert nonblocking["send_calls"] == 1 and 0 < nonblocking["bytes_accepted"] < TUTORIAL_BYTES
    assert server["bytes_received"] == nonblocking["bytes_accepted"]
    # What send() accepted reached the server, and the FIN after it, in the server's capture.
    for sender, server in by_mode.values():
        tcp = server["capture"]["tcp"]
        assert tcp["payload_bytes"]["to_server"] == sender["bytes_accepted"] and tcp["fin"]["to_server"], tcp
    # Each case's stack file is kept with its override, and a trace came back from the task.
    run = cases.parent
    stacks = sorted((run / "compose").glob("*.stack.yaml"))
    assert len(stacks) == 2
    for path in stacks:
        services = yaml.safe_load(path.read_text())["services"]
        assert services["server"]["deploy"]["placement"] == {"constraints": ["node.role == manager"]}
        assert services["client-sender"]["deploy"]["placement"] == {"constraints": [f"node.hostname == {node}"]}
    assert len(list((run / "traces").glob("*.trace.gz"))) == 2
    assert len(list((run / "captures").glob("*.server.pcap"))) == 2

    cleaned = _lab("clean", "--engine", "swarm")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "removed 0 services" in cleaned.stdout and "removed 0 networks" in cleaned.stdout, cleaned.stdout
    # Overlays only: Compose runs of other tests may have bridge networks of the lab meanwhile.
    _nothing_of_the_lab_left()
    assert proc.run(["docker", "stack", "ls", "--format", "{{.Name}}"], timeout_s=30).stdout.strip() == ""


def test_doctor_lists_the_node(swarm):
    done = _lab("doctor", "--engine", "swarm")
    assert done.returncode == 0, done.stdout + done.stderr
    node_lines = [line for line in done.stdout.splitlines() if line.startswith("node ")]
    assert len(node_lines) == 1 and "kernel" in node_lines[0] and "backend" in node_lines[0], done.stdout


def _nothing_of_the_lab_left() -> None:
    assert _labelled("service") == [] and _labelled("network", "driver=overlay") == []
    assert _labelled("container", "label=com.docker.stack.namespace") == []


def test_an_interrupted_swarm_run_removes_its_stack_and_resumes(swarm, tmp_path):
    argv = [sys.executable, "lab.py", "run", "configs/seed-demo.yaml", "--engine", "swarm", "--repeat", "1",
            "--out", str(tmp_path)]
    run = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupted while the first case's tasks run (its blocking send() takes ~11 s on the link).
    deadline = time.monotonic() + 120
    while not _labelled("service") and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=180)
    assert run.returncode == 130, out[-2000:] + err[-2000:]
    _nothing_of_the_lab_left()
    (rundir,) = tmp_path.glob("*/*")
    done = _lab("run", "--resume", str(rundir), "--engine", "swarm")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    records = [json.loads(line) for line in (rundir / "cases.jsonl").read_text().splitlines()]
    assert sorted(r["params"]["clients.sender.mode"] for r in records) == ["blocking", "nonblocking"]
    _nothing_of_the_lab_left()


def test_tasks_on_another_node_are_reached_through_the_swarm(swarm, tmp_path, monkeypatch):
    """The path a multi-node swarm takes, on this one node: the engine is told that no task runs on
    the manager's node, so nothing goes through the SDK of the engine the tasks run on. Output and
    exit status come from the task (its log, relayed by the manager), the trace in that log, and the
    server's stop and the schedule step's `shape set` by one-shot tasks placed on the node
    (`socklab node` with the node's engine socket)."""
    monkeypatch.setattr(SwarmEngine, "local_node_id", lambda self: "a node other than this one")
    node = proc.run(["docker", "info", "--format", "{{.Name}}"], timeout_s=30).stdout.strip()
    seed = tmp_path / "seed"
    assert cli.main(["run", str(ROOT / "configs/seed-demo.yaml"), "--engine", "swarm", "--repeat", "1",
                     "--out", str(seed), "--set", "clients.sender.mode=blocking"]) == 0
    (cases,) = seed.glob("*/*/cases.jsonl")
    (record,) = [json.loads(line) for line in cases.read_text().splitlines()]
    assert record["status"] == "ok" and all(e["passed"] for e in record["expectations"]), record
    assert record["nodes"] == {"server": node, "sender": node}
    # The server's figures exist only once it was stopped (by a task) and printed them.
    assert record["server"]["bytes_received"] == TUTORIAL_BYTES
    assert len(list((cases.parent / "traces").glob("*.trace.gz"))) == 1
    # 200 round trips of 40-80 ms: a step made a second or two late by the task that makes it
    # still leaves most of them behind the new delay.
    step = tmp_path / "step"
    assert cli.main(["run", str(ROOT / "tests/link-step.yaml"), "--engine", "swarm", "--out", str(step),
                     "--set", "clients.pinger.workload.requests=200"]) == 0
    (cases,) = step.glob("*/*/cases.jsonl")
    (record,) = [json.loads(line) for line in cases.read_text().splitlines()]
    assert record["status"] == "ok" and all(e["passed"] for e in record["expectations"]), record
    assert record["clients"][0]["latency_ms"]["p90"] > 55, record["clients"][0]["latency_ms"]
    _nothing_of_the_lab_left()
