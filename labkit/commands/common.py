"""What the commands share: printing, loading an experiment, the cases a lab can run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from socklab.errors import UsageError

from .. import scenario
from ..compose import REPO_ROOT
from ..config import load_experiment
from ..matrix import Case, expand_cases

CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_OUT = REPO_ROOT / "results"


def say(text: str = "") -> None:
    """A line of the command's output (stdout)."""
    print(text, flush=True)


def progress_line(text: str) -> None:
    """A line of progress (stderr), so that stdout stays the command's result."""
    print(text, file=sys.stderr, flush=True)


def load(config: str, overrides: Sequence[str]):
    """The experiment in file ``config`` with ``--set`` overrides; bad input raises UsageError."""
    path = Path(config)
    if not path.is_file():
        raise UsageError(f"{config}: no such experiment file")
    return load_experiment(path, overrides=tuple(overrides))


def print_cases(cases: Sequence[Case]) -> None:
    """The numbered list of cases, with their repetitions."""
    total = sum(c.repetitions for c in cases)
    say(f"{len(cases)} case(s), {total} run(s) with repetitions:")
    for case in cases:
        say(f"  {case.index + 1:>3}. {case.id}  (x{case.repetitions})")


def checked_cases(experiment) -> list[Case]:
    """The experiment's cases, each one a lab can run (bad input raises UsageError)."""
    cases = expand_cases(experiment)
    for case in cases:
        scenario.server_workload(case.experiment)
    return cases
