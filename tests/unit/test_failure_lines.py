"""The container side says which role failed and why: a failure line under the entrypoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from socklab import entry
from socklab.results import ENV_FAILURE_LINE, find_results

SERVICES = Path(__file__).resolve().parents[2] / "services"


def socklab(*args: str, failure_line: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SERVICES)}
    env.pop(ENV_FAILURE_LINE, None)
    if failure_line:
        env[ENV_FAILURE_LINE] = "1"
    return subprocess.run([sys.executable, "-m", "socklab", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_under_the_entrypoint_a_failing_role_prints_its_failure_line():
    done = socklab("client", "--mode", "blocking", "--bytes", "lots", failure_line=True)
    assert done.returncode == 2
    (sentence,) = done.stderr.strip().splitlines()
    (failure,) = find_results(done.stdout)
    assert failure["role"] == "error" and failure["failed"] == "client" and failure["exit_code"] == 2
    assert sentence == f"socklab: {failure['error']}" and "--bytes" in failure["error"]


def test_run_by_hand_a_failing_role_prints_only_its_sentence():
    done = socklab("client", "--mode", "blocking", "--bytes", "lots", failure_line=False)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_bug_prints_its_traceback_and_a_failure_line_naming_it(tmp_path):
    # A role module that raises an unexpected exception, dispatched like any role.
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from socklab.cli import run_main\n"
         "def main(argv): raise KeyError('bytes')\n"
         "run_main(main, ['client'])"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SERVICES), ENV_FAILURE_LINE: "1"},
        timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr
    (failure,) = find_results(done.stdout)
    assert failure["error"] == "KeyError: 'bytes'" and failure["failed"] == "client"


def test_a_workload_killed_by_a_signal_is_reported_by_the_entrypoint(capsys, monkeypatch):
    monkeypatch.setenv(ENV_FAILURE_LINE, "1")
    entry.report_killed("client", 137)
    (failure,) = find_results(capsys.readouterr().out)
    assert failure == {**failure, "failed": "client", "error": "the client was killed by SIGKILL", "exit_code": 137}
