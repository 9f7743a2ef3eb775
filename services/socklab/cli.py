"""Command-line plumbing shared by every role: argument errors exit 2 with one line."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from .errors import SocklabError, UsageError
from . import units
from .results import emit_failure


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one plain line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def size_arg(text: str) -> int:
    """argparse type for sizes ('64KiB')."""
    try:
        return units.parse_size_bytes(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration_arg(text: str) -> float:
    """argparse type for durations in seconds ('20ms', '1.5s'; bare numbers are seconds)."""
    try:
        return units.parse_duration_s(text, bare_unit_s=1.0)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def port_arg(text: str) -> int:
    """argparse type for a TCP port to connect to or watch (1-65535)."""
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> NoReturn:
    """Run a role's main, turning an error into its sentence, a failure line and an exit code.

    The sentence goes to stderr for whoever reads it; the failure line (see
    results.emit_failure) goes to stdout with the results, so the orchestrator
    can say which role failed and why without guessing from stderr.
    """
    role = argv[0] if argv else "socklab"
    try:
        code = main(argv)
    except SocklabError as exc:
        print(f"socklab: {exc}", file=sys.stderr)
        code = exc.exit_code
        emit_failure(role, str(exc), code)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug: the traceback for whoever debugs it, the line for the report
        traceback.print_exc()
        code = 1
        emit_failure(role, f"{type(exc).__name__}: {exc}", code)
    sys.stdout.flush()
    sys.exit(code)
