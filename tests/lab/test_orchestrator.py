"""lab.py on real containers: a whole run, its run directory, interrupt and resume, doctor, runs side by side."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from labkit.compose import ComposeProject
from labkit.docker_api import DockerAPI
from labkit.engine.compose import (BUILD_CONTEXT, SOURCES_DIGEST_LABEL, ComposeEngine, base_image_ref, lab_image_ref,
                                   sources_digest)
from labkit.engine.swarm import resolve

from .conftest import lab

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.docker

CLIENT_KEYS = {"name", "replica", "mode", "workload", "bytes_requested", "bytes_accepted",
               "bytes_delivered", "send_calls", "eagain", "blocked_s", "wall_s", "cpu_s",
               "goodput_bps", "connect_s", "latency_ms", "tcp", "trace"}
RECORD_KEYS = {"schema", "experiment", "case", "params", "repetition", "status", "error", "wall_s",
               "link", "server", "clients", "expectations"}


def only_run_dir(out: Path) -> Path:
    runs = [p for p in out.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_the_lab_image_is_labelled_with_its_sources_and_not_built_again(lab_image, monkeypatch):
    assert resolve([])["services"]["server"]["image"] == lab_image_ref()  # the name compose.yaml gives it
    api = DockerAPI()
    base_id, _ = api.image(base_image_ref())
    _, labels = api.image(lab_image_ref())
    assert labels[SOURCES_DIGEST_LABEL] == sources_digest(BUILD_CONTEXT, base_id)

    def build(*args, **kwargs):
        raise AssertionError("built again from the same sources")

    monkeypatch.setattr(ComposeProject, "build", build)
    started = time.monotonic()
    ComposeEngine(api).build_image()
    print(f"the lab image's check: {time.monotonic() - started:.3f} s")


def test_seed_demo_run_writes_the_whole_run_directory(lab_image, tmp_path):
    done = lab("run", "configs/seed-demo.yaml", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    run = only_run_dir(tmp_path)
    for name in ("experiment.yaml", "meta.json", "cases.jsonl", "summary.csv", "report.md"):
        assert (run / name).is_file(), name

    experiment = yaml.safe_load((run / "experiment.yaml").read_text())
    assert experiment["clients"][0]["workload"]["bytes"] == 136314880
    meta = json.loads((run / "meta.json").read_text())
    assert meta["shaping_backend"] == "netem" and meta["compose"] and meta["host_kernel"]
    assert meta["schema"] == 1

    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert len(records) == 2 * experiment["repeat"]
    for record in records:
        assert set(record) >= RECORD_KEYS and record["schema"] == 2
        assert record["status"] == "ok" and record["expectations"]
        assert all(e["passed"] for e in record["expectations"])
        (client,) = record["clients"]
        assert set(client) >= CLIENT_KEYS
        assert client["trace"].startswith("traces/") and (run / client["trace"]).is_file()
        assert record["link"]["applied"]["sender"]["up"]["rate_bps"] == 100_000_000
        assert record["server"]["bytes_received"] == client["bytes_accepted"]
        if client["mode"] == "nonblocking":
            assert client["send_calls"] == 1 and 0 < client["bytes_accepted"] < 136314880
        else:
            assert client["bytes_accepted"] == 136314880
            # 100 Mbit/s shaped: goodput near the TCP ceiling of the link.
            assert 0.93 < client["goodput_bps"] / (100e6 * 1448 / 1514) < 1.07

    traces = sorted((run / "traces").iterdir())
    assert len(traces) == len(records)
    with gzip.open(traces[0], "rt") as fh:
        assert fh.readline().strip()
    summary = (run / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "sender.goodput_bps.ci95_high" in summary[0]


def _lab_objects(prefix: str = "socklab-three-short-cases") -> dict[str, list[str]]:
    objects = DockerAPI().labelled()
    return {kind: [n for n in names if n.startswith(prefix)]
            for kind, names in objects.items()}


def test_interrupted_run_leaves_nothing_behind_and_resumes(lab_image, tmp_path):
    proc = subprocess.Popen([sys.executable, "lab.py", "run", "tests/data/three-short-cases.yaml",
                             "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        cases = None
        while time.monotonic() < deadline:
            found = list(tmp_path.glob("*/*/cases.jsonl"))
            if found and found[0].read_text().count("\n") >= 1:
                cases = found[0]
                break
            time.sleep(0.2)
        assert cases is not None, "the first case never finished"
        time.sleep(2.5)  # into the second case: its containers are up
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted by SIGINT" in err and "--resume" in err
    assert _lab_objects() == {"containers": [], "networks": [], "volumes": []}

    run = cases.parent
    finished = cases.read_text().splitlines()
    assert 1 <= len(finished) < 3
    resumed = lab("run", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    records = [json.loads(line) for line in cases.read_text().splitlines()]
    assert sorted(r["case"] for r in records) == sorted(
        f"sender.mode={m}" for m in ("blocking", "select", "asyncio"))
    assert records[: len(finished)] == [json.loads(line) for line in finished]


def test_doctor_names_the_backend_and_what_the_kernel_lacks(lab_image):
    done = lab("doctor", timeout_s=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shaping backend:" in done.stdout
    kernel_has_netem = "netem yes" in done.stdout
    if not kernel_has_netem:
        assert "sch_netem" in done.stdout


def test_bad_experiment_is_one_sentence_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nclients:\n  - name: s\n    mode: blockin\n")
    done = lab("check", str(bad))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "bad.yaml:4" in line and "blockin" in line and "nonblocking" in line


def test_link_show_and_set_on_a_running_lab(project):
    env = {"SERVER_MODE": "threaded", "SERVER_MAX_CONNECTIONS": "1000", "SERVER_LINK_RATE": "50mbit"}
    project.up("server", env=env)
    shown = lab("link", "--project", project.name, "show", "server", "--json")
    assert shown.returncode == 0, shown.stderr
    (link,) = json.loads(shown.stdout).values()
    assert link["applied"]["up"]["rate_bps"] == 50_000_000

    changed = lab("link", "--project", project.name, "set", "server", "rate=20mbit")
    assert changed.returncode == 0, changed.stderr
    (link,) = json.loads(lab("link", "--project", project.name, "show", "--json").stdout).values()
    assert link["applied"]["up"]["rate_bps"] == link["applied"]["down"]["rate_bps"] == 20_000_000
    assert any(q["kind"] == "tbf" and q["options"]["rate"] == 20_000_000 // 8
               for q in link["qdisc"]["eth0"])

    bad = lab("link", "--project", project.name, "set", "server", "rate=fast")
    assert bad.returncode == 2 and "rate" in bad.stderr
    missing = lab("link", "--project", f"{project.name}-none", "show")
    assert missing.returncode == 2 and "no running container" in missing.stderr


def test_clean_removes_what_carries_the_label_and_nothing_else(project):
    project.up("server", env={"SERVER_MAX_CONNECTIONS": "1000"})
    bystander = f"{project.name}-unlabelled"
    subprocess.run(["docker", "run", "-d", "--name", bystander, "--entrypoint", "sleep",
                    lab_image_ref(), "120"], check=True,
                   capture_output=True)
    try:
        done = lab("clean")
        assert done.returncode == 0, done.stderr
        assert f"{project.name}-server-1" in done.stdout
        left = DockerAPI().labelled()
        assert left == {"containers": [], "networks": [], "volumes": []}
        alive = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", bystander],
                               capture_output=True, text=True)
        assert alive.stdout.strip() == "true"
    finally:
        subprocess.run(["docker", "rm", "-f", bystander], capture_output=True)


REUSE_EXPERIMENT = """\
name: reuse
description: cases that share containers, then one whose link differs, then one that fails
timeout: 60s
server:
  mode: epoll
clients:
  - name: load
    mode: blocking
    workload: {kind: bulk, bytes: 2MB}
    link: {rate: 20mbit}
matrix:
  clients.load.mode: [blocking, select, asyncio]
  clients.load.link.rate: [20mbit, 50mbit]
"""


def test_reuse_keeps_containers_while_cases_share_them_and_each_case_starts_afresh(lab_image, tmp_path):
    config = tmp_path / "reuse.yaml"
    config.write_text(REUSE_EXPERIMENT)
    done = lab("run", str(config), "--reuse", "--out", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stdout + done.stderr
    run = only_run_dir(tmp_path / "runs")
    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 6
    # The matrix varies the rate fastest, so every case changes the links: six projects.
    # Sorted by rate (how a user orders a sweep to share containers), two would do.
    assert len(list((run / "compose").glob("*.yaml"))) == 6
    for record in records:
        (client,) = record["clients"]
        assert client["bytes_delivered"] == 2_000_000 == record["server"]["bytes_received"]
        rate = record["link"]["applied"]["load"]["up"]["rate_bps"]
        assert rate == int(record["params"]["clients.load.link.rate"].removesuffix("mbit")) * 1_000_000
        # Fresh qdiscs each case: the counters hold this case's bytes only.
        tbf = next(q for q in record["link"]["qdisc"]["load"]["eth0"] if q["kind"] == "tbf")
        assert 2_000_000 <= tbf["bytes"] < 2_400_000
    assert len(list((run / "traces").glob("*.trace.gz"))) == 6
    assert _lab_objects("socklab-reuse-") == {"containers": [], "networks": [], "volumes": []}


def test_reuse_shares_one_project_across_cases_and_drops_it_after_a_failure(lab_image, tmp_path):
    config = tmp_path / "reuse.yaml"
    # The rate is fixed: the modes' cases share containers. A 1-byte-per-second
    # slow client past a 4 s timeout then fails its case, which must not leave
    # its containers to the next.
    config.write_text(REUSE_EXPERIMENT.replace("  clients.load.link.rate: [20mbit, 50mbit]\n", "")
                      .replace("timeout: 60s", "timeout: 8s"))
    done = lab("run", str(config), "--reuse", "--repeat", "2", "--out", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stdout + done.stderr
    run = only_run_dir(tmp_path / "runs")
    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 6
    assert len(list((run / "compose").glob("*.yaml"))) == 1
    for record in records:
        tbf = next(q for q in record["link"]["qdisc"]["load"]["eth0"] if q["kind"] == "tbf")
        assert 2_000_000 <= tbf["bytes"] < 2_400_000
        assert record["server"]["connections"] == 1

    failing = tmp_path / "failing.yaml"
    failing.write_text(REUSE_EXPERIMENT.replace("  clients.load.link.rate: [20mbit, 50mbit]\n", "")
                       .replace("timeout: 60s", "timeout: 4s")
                       .replace("workload: {kind: bulk, bytes: 2MB}", "workload: {kind: slow, rate: 1, hold: 30s}"))
    done = lab("run", str(failing), "--reuse", "--out", str(tmp_path / "failing"))
    assert done.returncode == 1
    run = only_run_dir(tmp_path / "failing")
    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["timeout"] * 3
    # Each timed-out case took its containers down: the next one made new ones.
    assert len(list((run / "compose").glob("*.yaml"))) == 3
    assert _lab_objects("socklab-reuse-") == {"containers": [], "networks": [], "volumes": []}


# Two short cases of the same containers, with a name of their own.
COEXIST_EXPERIMENT = (REUSE_EXPERIMENT.replace("name: reuse", "name: coexist")
                      .replace("  clients.load.link.rate: [20mbit, 50mbit]\n", "")
                      .replace("[blocking, select, asyncio]", "[blocking, select]"))


def test_two_runs_at_once_both_finish_while_clean_leaves_their_objects_alone(lab_image, tmp_path):
    config = tmp_path / "coexist.yaml"
    config.write_text(COEXIST_EXPERIMENT)
    runs = [subprocess.Popen([sys.executable, "lab.py", "run", str(config), "--out", str(tmp_path / name)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("a", "b")]
    cleans = []
    try:
        deadline = time.monotonic() + 400
        while any(run.poll() is None for run in runs) and time.monotonic() < deadline:
            cleans.append(lab("clean"))
            time.sleep(0.5)
        outputs = [run.communicate(timeout=120) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, out + err
    for name in ("a", "b"):
        records = [json.loads(line) for line in (only_run_dir(tmp_path / name) / "cases.jsonl").read_text().splitlines()]
        assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(c.returncode == 0 for c in cleans), [c.stderr for c in cleans if c.returncode]
    # Clean ran while the runs' containers were up, and said it left them and why.
    left = [line for c in cleans for line in c.stdout.splitlines()
            if line.startswith("left") and "its run is still going" in line and "socklab-coexist-" in line]
    assert left, "\n".join(c.stdout for c in cleans)
    assert not any("socklab-coexist-" in line for c in cleans for line in c.stdout.splitlines()
                   if line.startswith("removed"))
    assert _lab_objects("socklab-coexist-") == {"containers": [], "networks": [], "volumes": []}
