"""Fixtures for lab tests: a built image and a fresh Compose project per test."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import proc
from labkit.compose import ComposeProject
from labkit.engine.compose import ComposeEngine
from socklab.results import find_results


def _engine_problem() -> str | None:
    try:
        proc.run(["docker", "info"], timeout_s=20)
        proc.run(["docker", "compose", "version"], timeout_s=20)
    except proc.CommandError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def lab_image() -> None:
    """The lab image, built once per test session from the working tree."""
    problem = _engine_problem()
    if problem:
        pytest.skip(f"no Docker engine with Compose v2: {problem}")
    ComposeEngine().build_image()


@pytest.fixture
def project(lab_image, request):
    """A Compose project with a unique name, removed with everything in it afterwards."""
    lab = ComposeProject(f"socklab-t-{secrets.token_hex(4)}")
    yield lab
    # Printed output is shown by pytest only when the test fails.
    print(lab.logs())
    lab.down()


ROOT = Path(__file__).resolve().parents[2]


def lab(*argv: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``python lab.py ARGV`` from the repository's root, as a user runs it; its output captured."""
    return subprocess.run([sys.executable, "lab.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)


def records_of(out: Path) -> tuple[Path, list[dict]]:
    """The one run directory under ``out`` (a --out of one run) and its records."""
    (cases,) = out.glob("*/*/cases.jsonl")
    return cases.parent, [json.loads(line) for line in cases.read_text().splitlines()]


def result_of(completed: proc.Completed) -> dict:
    """The single result line a role printed."""
    found = find_results(completed.stdout)
    assert len(found) == 1, f"expected one result line, got:\n{completed.stdout}\n{completed.stderr}"
    return found[0]


def iperf3_bps(completed: proc.Completed) -> float:
    """Receiver-side goodput from `iperf3 -J` output."""
    report = json.loads(completed.stdout)
    return float(report["end"]["sum_received"]["bits_per_second"])
