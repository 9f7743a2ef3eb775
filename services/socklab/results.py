"""Result lines: every role prints exactly one JSON object when it finishes."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

from . import RESULT_KEY, RESULT_SCHEMA
from .atomic import write_atomic


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_kib() -> int:
    """The most resident memory this process has used so far, in KiB (Linux units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def emit_result(result: dict[str, Any], result_file: str | None = None) -> None:
    """Print ``result`` as one JSON line tagged with the result key and schema.

    With ``result_file`` the same line is also written there (atomically), for
    the demonstration whose summary reads results from a shared volume.
    """
    record = {RESULT_KEY: RESULT_SCHEMA, **result}
    line = json.dumps(record, separators=(",", ":"), sort_keys=False)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if result_file:
        write_atomic(result_file, line + "\n")


# The role a failure line carries: a role that cannot print its own result
# says here which role failed, with the sentence it printed and its exit status.
FAILURE_ROLE = "error"
# Set by the entrypoint for itself and its workload: under it, a failing role
# prints a failure line (run by hand, a role's stdout stays its results alone).
ENV_FAILURE_LINE = "SOCKLAB_FAILURE_LINE"


def emit_failure(failed: str, message: str, exit_code: int) -> None:
    """Print the result line of a failure (under the entrypoint): which role, why, its exit status."""
    if os.environ.get(ENV_FAILURE_LINE) == "1":
        emit_result({"role": FAILURE_ROLE, "failed": failed, "error": message, "exit_code": exit_code})


def find_results(text: str) -> list[dict[str, Any]]:
    """Every result line in ``text`` (a container's log), in order."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{") or RESULT_KEY not in line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get(RESULT_KEY) == RESULT_SCHEMA:
            found.append(obj)
    return found
