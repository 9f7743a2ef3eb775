"""Case expansion: an experiment's matrix becomes an ordered list of cases.

Every combination of the matrix's values is one case, in file order: the first
matrix key varies slowest (``itertools.product``). A case's id joins
``KEY=VALUE`` pairs with commas, keys as in the matrix without the ``clients.``
prefix and values as written::

    sender.mode=nonblocking,sender.link.rate=10mbit

An experiment without a matrix has one case, ``default``. Ids depend only on the
matrix as written, so they are stable across runs and usable for ``--resume``.

Repetitions are not cases: ``Case.repetitions`` says how many each case gets,
and :func:`expand_runs` lists the (case, repetition) pairs to run, case by case
(all repetitions of a case before the next, so a compose project set up for a
case can be reused by its repetitions).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from .config import Experiment, build_experiment, substitute

DEFAULT_CASE_ID = "default"


@dataclass(frozen=True)
class Case:
    """One point of the matrix.

    ``params`` maps each full matrix key (``clients.sender.mode``) to its value as
    written, read-only (``dict(case.params)`` to serialise it); ``experiment`` is
    the experiment resolved for this case, its matrix values in place and no
    matrix of its own.
    """

    index: int
    id: str
    # Left out of equality and hashing: a read-only mapping cannot be hashed, and
    # the id already spells the same values.
    params: Mapping[str, Any] = field(compare=False)
    experiment: Experiment

    @property
    def repetitions(self) -> int:
        """How many times the case runs (the experiment's ``repeat``)."""
        return self.experiment.repeat


def format_value(value: Any) -> str:
    """A matrix value as it appears in a case id (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def case_id(params: Mapping[str, Any]) -> str:
    """The id of the case with these matrix values (in matrix order)."""
    if not params:
        return DEFAULT_CASE_ID
    return ",".join(f"{key.removeprefix('clients.')}={format_value(value)}" for key, value in params.items())


def expand_cases(experiment: Experiment) -> list[Case]:
    """Every case of ``experiment``, in matrix order, each validated.

    A combination that is invalid although each value is valid on its own (a
    swept workload key with a swept kind, say) raises ConfigError pointing at
    the matrix.
    """
    axes = experiment.matrix
    if not axes:
        return [Case(0, DEFAULT_CASE_ID, MappingProxyType({}), experiment)]
    cases = []
    for index, choice in enumerate(itertools.product(*(range(len(axis.values)) for axis in axes))):
        params = {axis.key: axis.values[i] for axis, i in zip(axes, choice)}
        resolved = build_experiment(substitute(experiment, list(zip(axes, choice))))
        cases.append(Case(index, case_id(params), MappingProxyType(params), resolved))
    return cases


def expand_runs(cases: Sequence[Case]) -> list[tuple[Case, int]]:
    """(case, repetition) pairs in run order: repetitions 0..n-1 of each case in turn."""
    return [(case, repetition) for case in cases for repetition in range(case.repetitions)]
