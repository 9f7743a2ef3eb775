"""A failed case's headline: which roles failed and why, from how each ended and what it printed.

Pure: the runner gathers one :class:`RoleOutcome` per role (its exit status
and every result line it printed) and :func:`headline` turns them into the
sentence a record's ``error`` carries, e.g. "the server exited 137 (killed by
SIGKILL) and client-sender: send() failed: ECONNRESET (Connection reset by
peer)". A role says why it failed with a result line of its own (``role:
error``, printed by the container's entrypoint and command line), or with the
``errors`` of its result; only a role that said nothing is described by its
exit status and its last plain line of output.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from socklab.results import FAILURE_ROLE

# More than this many failing roles are summed up as "and N more".
MAX_NAMED = 4


@dataclass(frozen=True)
class RoleOutcome:
    """How one role of a case ended."""

    who: str  # "the server", "client-sender": what the headline calls it
    kind: str  # the role its result line carries: "server" or "client"
    exit_code: int | None  # None: it had not ended (or the engine could not say)
    results: Sequence[Mapping[str, Any]] = field(default_factory=tuple)  # every result line it printed
    last_words: str | None = None  # its last line of plain output, for a role that printed no reason
    gone: bool = False  # its container vanished (removed from outside the run)

    def result(self) -> Mapping[str, Any] | None:
        """Its own result line (server or client), if it printed one."""
        return next((r for r in self.results if r.get("role") == self.kind), None)

    def failure(self) -> Mapping[str, Any] | None:
        """The line it printed on failing, if any (the last one: the outermost process's)."""
        return next((r for r in reversed(self.results) if r.get("role") == FAILURE_ROLE), None)


def _signal_name(exit_code: int) -> str | None:
    try:
        return signal.Signals(exit_code - 128).name
    except ValueError:
        return None


def cause(outcome: RoleOutcome) -> str | None:
    """Why this role failed, as words that follow its name; None if it did not fail."""
    failure = outcome.failure()
    result = outcome.result()
    code = outcome.exit_code
    if outcome.gone:
        return "'s container disappeared (removed from outside the run?)"
    if failure is not None:
        return f": {failure.get('error')}"
    if code is not None and code > 128 and _signal_name(code):
        return f" exited {code} (killed by {_signal_name(code)})"
    errors = list(result.get("errors") or []) if result is not None else []
    if errors:
        more = f" (and {len(errors) - 1} more error{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
        return f": {errors[0]}{more}"
    words = f"; its last words: {outcome.last_words}" if outcome.last_words else ""
    if code:
        return f" exited {code}" + (" without a result" if result is None else "") + words
    if result is None:
        return " printed no result" + words
    return None


def cause_alone(outcome: RoleOutcome) -> str | None:
    """:func:`cause` as words that stand alone, after a sentence that named the role already."""
    why = cause(outcome)
    if why is None:
        return None
    if why.startswith(": "):
        return why[2:]
    return "its" + why[2:] if why.startswith("'s") else "it" + why


def needs_last_words(outcome: RoleOutcome) -> bool:
    """Whether the role failed without saying why (then its last plain line of output is worth reading)."""
    result = outcome.result()
    said = outcome.gone or outcome.failure() is not None or bool(result is not None and result.get("errors"))
    return not said and cause(outcome) is not None


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def headline(outcomes: Sequence[RoleOutcome]) -> str | None:
    """One sentence naming every role that failed and why, in the order given; None if none failed.

    Containers of one group that failed alike are named once, with how many of
    the group's containers they are.
    """
    size: dict[str, int] = {}
    for o in outcomes:
        size[o.who] = size.get(o.who, 0) + 1
    alike: dict[tuple[str, str], int] = {}
    for o in outcomes:
        why = cause(o)
        if why is not None:
            alike[(o.who, why)] = alike.get((o.who, why), 0) + 1
    parts = []
    for (who, why), count in alike.items():
        of = f" ({count} of {size[who]} containers)" if size[who] > 1 else ""
        parts.append(f"{who}{of}{why}")
    if not parts:
        return None
    if len(parts) > MAX_NAMED:
        parts = parts[:MAX_NAMED - 1] + [f"{len(parts) - MAX_NAMED + 1} more"]
    return _join(parts)


def last_line(output: str) -> str | None:
    """The last non-empty line of ``output`` that is not a result line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip() and not line.startswith("{")]
    return lines[-1] if lines else None


def last_words(output: str) -> str | None:
    """The last line of plain output a role printed that is not the lab's own (a traceback's last line, say).

    Result lines and the lines socklab itself prints ("socklab: ..." banners,
    "socklab server listening ...") are skipped: a failure socklab knows of comes
    as a result line.
    """
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line and not line.startswith("{") and not line.startswith("socklab"):
            return line
    return None
