"""Result lines: every role prints exactly one JSON object when it finishes."""

from __future__ import annotations

import base64
import hashlib
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


# A file a role leaves in its container (a trace) can travel in the container's
# log, where nothing else can reach it: a swarm task on another node. Base64 in
# lines well below the 16 KiB at which Docker splits a log line, each tagged.
FILE_LINE = "socklab-file"
FILE_END = "socklab-file-end"
FILE_CHUNK_BYTES = 3072  # 4096 characters of base64


def emit_file(path: str) -> bool:
    """Print the file at ``path`` on stdout as tagged base64 lines; False if it is not there.

    :func:`find_files` takes it back out of the log, whole or not at all.
    """
    if any(c.isspace() for c in path):
        raise ValueError(f"a file sent through the log needs a path without spaces: {path!r}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    out = sys.stdout
    chunks = 0
    for chunks, start in enumerate(range(0, len(data), FILE_CHUNK_BYTES), start=1):
        encoded = base64.b64encode(data[start:start + FILE_CHUNK_BYTES]).decode("ascii")
        out.write(f"{FILE_LINE} {path} {chunks - 1} {encoded}\n")
    out.write(f"{FILE_END} {path} {chunks} {len(data)} {hashlib.sha256(data).hexdigest()}\n")
    out.flush()
    return True


def find_files(text: str) -> dict[str, bytes]:
    """The files :func:`emit_file` printed in ``text`` (a log), by path.

    A file whose lines are not all there (the log was cut, the role killed
    while printing) is left out: a partial trace would pass for a short one.
    """
    chunks: dict[str, dict[int, str]] = {}
    found: dict[str, bytes] = {}
    for line in text.splitlines():
        words = line.strip().split(" ")
        if len(words) == 4 and words[0] == FILE_LINE and words[2].isdigit():
            chunks.setdefault(words[1], {})[int(words[2])] = words[3]
        elif len(words) == 5 and words[0] == FILE_END and words[2].isdigit() and words[3].isdigit():
            path, count, size, digest = words[1], int(words[2]), int(words[3]), words[4]
            parts = chunks.pop(path, {})
            if sorted(parts) != list(range(count)):
                continue
            data = b"".join(base64.b64decode(parts[n]) for n in range(count))
            if len(data) == size and hashlib.sha256(data).hexdigest() == digest:
                found[path] = data
    return found
