"""The one place where shaping starts processes.

Everything else builds argv lists and hands them to a ``Runner``: a callable
taking argv and returning the command's stdout, or raising ShapingError. Tests
pass a fake that records argv; the netns tests pass one that prefixes
``ip netns exec NS``.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from typing import Callable, Sequence

from ..errors import EngineError

log = logging.getLogger("socklab.shaping")

Runner = Callable[[Sequence[str]], str]

# tc and ip answer in milliseconds; a command that takes this long is hung (a
# wedged netlink socket, an xtables lock held forever), and the container must
# fail loudly rather than start its role unshaped.
COMMAND_TIMEOUT_S = 30.0

# What a missing program means to the user, so the error names the package.
_PACKAGES = {"tc": "iproute2", "ip": "iproute2", "iptables": "iptables"}


class ShapingError(EngineError):
    """A shaping command failed; carries its argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        command = shlex.join(self.argv)
        if returncode is None:
            message = f"`{command}` could not run: {self.stderr}"
        else:
            detail = " ".join(self.stderr.split()) or "no error message"
            message = f"`{command}` failed with exit code {returncode}: {detail}"
        super().__init__(message)


def run(argv: Sequence[str]) -> str:
    """Run ``argv`` (no shell), return its stdout; raise ShapingError on any failure."""
    argv = list(argv)
    log.debug("run: %s", shlex.join(argv))
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        package = _PACKAGES.get(argv[0])
        hint = f" (install the {package} package)" if package else ""
        raise ShapingError(argv, None, f"{argv[0]} is not installed{hint}") from None
    except subprocess.TimeoutExpired:
        raise ShapingError(argv, None, f"no answer within {COMMAND_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        log.debug("exit %d: %s", done.returncode, done.stderr.strip())
        raise ShapingError(argv, done.returncode, done.stderr)
    return done.stdout


def prefixed(prefix: Sequence[str], runner: Runner = run) -> Runner:
    """A runner that runs every command under ``prefix`` (e.g. ``ip netns exec NS``)."""
    head = list(prefix)

    def run_prefixed(argv: Sequence[str]) -> str:
        return runner([*head, *argv])

    return run_prefixed
