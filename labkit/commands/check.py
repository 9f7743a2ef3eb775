"""`lab.py check` and `lab.py list`: experiments validated, without an engine."""

from __future__ import annotations

from socklab.errors import UsageError

from ..config import load_experiment
from .common import CONFIG_DIR, checked_cases, load, print_cases, say


def cmd_check(args) -> int:
    """Validate an experiment and print its cases."""
    experiment = load(args.config, args.set)
    cases = checked_cases(experiment)
    say(f"{args.config}: experiment {experiment.name} is valid")
    print_cases(cases)
    return 0


def cmd_list(args) -> int:
    """One line per experiment in configs/."""
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            experiment = load_experiment(path)
            say(f"{experiment.name:<16} {experiment.description}")
        except UsageError as exc:
            say(f"{path.stem:<16} (invalid: {exc})")
    return 0
