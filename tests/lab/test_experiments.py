"""The experiment library, each in its fast variant: every expectation must hold.

The fast variants are the same files with `--set`/`--repeat`: fewer repetitions,
smaller payloads, a narrower sweep. seed-demo runs in full in
test_orchestrator.py, which also checks its run directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.docker

FAST_VARIANTS = {
    "stop-connect": [],
    "slow-client": [],
    "busy-poll": ["--set", "clients.sender.workload.bytes=2MB"],
    "send-buffer": ["--set", "clients.sender.sndbuf=1MiB"],
    # 200 round trips each, not the configured 50: a threaded server's first
    # connections could end before a container's last one was accepted, which the
    # overlap expectation does not allow (94 of 100 at once with 20 round trips,
    # 99 of 100 with 50 once the server's healthcheck no longer took CPU, both in CI).
    "concurrency": ["--set", "clients.load.connections=100", "--set", "clients.load.workload.requests=200"],
    "link-change": [],
    "lossy-link": ["--set", "clients.big.workload.requests=20"],
}


def test_every_experiment_has_a_fast_variant_here():
    names = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    # seed-demo runs in full in test_orchestrator.py, tutorial-programs in test_programs.py.
    assert names == set(FAST_VARIANTS) | {"seed-demo", "tutorial-programs"}


@pytest.mark.parametrize("name", sorted(FAST_VARIANTS))
def test_fast_variant_holds_every_expectation(lab_image, tmp_path, name):
    done = subprocess.run(
        [sys.executable, "lab.py", "run", f"configs/{name}.yaml", "--repeat", "1", "--out", str(tmp_path),
         *FAST_VARIANTS[name]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    (cases,) = tmp_path.glob("*/*/cases.jsonl")
    records = [json.loads(line) for line in cases.read_text().splitlines()]
    assert records and all(r["status"] == "ok" for r in records)
    assert all(r["expectations"] for r in records), "every case has something to prove"
    assert all(e["passed"] for r in records for e in r["expectations"])
    assert (cases.parent / "report.md").is_file()
