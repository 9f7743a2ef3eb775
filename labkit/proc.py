"""One way to run a subprocess: log the command, capture its output, raise one error.

Every external command the orchestrator runs (docker, docker compose, git) goes
through :func:`run`, so commands are logged the same way and a failure always
carries the command line, its exit status and the end of what it printed.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

from socklab.errors import SocklabError

log = logging.getLogger("socklab.proc")


class CommandError(SocklabError):
    """A command exited non-zero (or could not start); the message says which and why."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = "\n".join((stderr or stdout).strip().splitlines()[-8:])
        status = "could not start" if returncode is None else f"exited with status {returncode}"
        super().__init__(f"`{shlex.join(argv)}` {status}" + (f":\n{tail}" if tail else ""))


@dataclass(frozen=True)
class Completed:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
    input_text: str | None = None,
) -> Completed:
    """Run ``argv`` to completion and return its output.

    Raises :class:`CommandError` when it exits non-zero (with ``check``), cannot
    be started, or outlives ``timeout_s`` (then it is killed first).
    """
    log.debug("$ %s", shlex.join(argv))
    try:
        # A session of its own: a Ctrl-C at the terminal reaches lab.py alone,
        # which decides what to stop, so a second one cannot cut a teardown short.
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, env=dict(env) if env is not None else None,
            cwd=cwd, timeout=timeout_s, input=input_text, check=False, start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, None, "", str(exc)) from None
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandError(argv, None, out, f"{err}\n(killed after {timeout_s:g} s)") from None
    result = Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return result
