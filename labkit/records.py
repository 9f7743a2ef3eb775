"""Case records (schema 2, see :mod:`labkit.schema`): pure functions.

A record is assembled from what the containers printed (their result lines),
so the same function serves a live run and tests; expectations are evaluated
on the finished record. The summary over repetitions is :mod:`labkit.summary`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from . import stats
from .config import Experiment, Program
from .matrix import Case
from .schema import RECORD_SCHEMA as SCHEMA
# Client result fields every record carries (null where they do not apply).
CLIENT_FIELDS = (
    "mode", "workload", "bytes_requested", "bytes_accepted", "bytes_delivered", "send_calls",
    "eagain", "blocked_s", "wall_s", "cpu_s", "goodput_bps", "connect_s", "latency_ms", "tcp",
)
SERVER_FIELDS = ("mode", "connections", "bytes_received", "cpu_s", "max_concurrent")
_RESULT_META = ("socklab_result", "role")


def _strip(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _RESULT_META}


def client_record(group: str, replica: int, result: Mapping[str, Any] | None,
                  trace: str | None = None) -> dict[str, Any]:
    """One client container's entry in ``clients``: every schema field, then the rest.

    ``trace`` is the name :meth:`labkit.rundir.RunDir.write_trace` gave its trace
    file, or None when none was kept.
    """
    result = _strip(result or {})
    result.pop("trace", None)  # the record's own field; a result never names a file of the run
    entry: dict[str, Any] = {"name": group, "replica": replica}
    entry.update({field: result.pop(field, None) for field in CLIENT_FIELDS})
    entry["trace"] = trace
    entry.update(result)
    return entry


def server_record(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``server`` object: schema fields first, then the rest (per-connection bytes)."""
    if result is None:
        return None
    rest = _strip(result)
    entry = {field: rest.pop(field, None) for field in SERVER_FIELDS}
    entry.update(rest)
    return entry


def with_program(result: Mapping[str, Any], program: Program, digest: str | None,
                 outputs: Mapping[str, str]) -> dict[str, Any]:
    """A program role's result with what the run knows of the program: the path and sha256 of
    its copy, and the names of its kept stdout and stderr (``outputs``: stream -> file name).

    ``mode`` is the program's name, which is what results, tables and plots call it.
    """
    said = dict(result.get("program") or {})
    said.update({"path": program.script, "sha256": digest,
                 "stdout": outputs.get("stdout"), "stderr": outputs.get("stderr")})
    return {**result, "mode": program.name, "program": said}


def with_deliveries(clients: Sequence[Mapping[str, Any]], server: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``clients`` with ``bytes_delivered`` filled in from the server's side where a client could
    not learn it (a program of the user's reads no trailer): the server's bytes from each of the
    client's connections, matched by address (the client's local address is the server's peer).

    Left null unless every connection the client made is found among the server's.
    """
    received: dict[str, int] = {}
    for conn in (server or {}).get("per_connection") or ():
        if conn.get("peer") is not None and conn.get("bytes_received") is not None:
            received[conn["peer"]] = received.get(conn["peer"], 0) + conn["bytes_received"]
    filled = []
    for client in clients:
        client = dict(client)
        sockets = (client.get("program") or {}).get("sockets") or ()
        local = [s.get("local") for s in sockets if s.get("kind") == "connect"]
        if client.get("bytes_delivered") is None and local and all(a in received for a in local):
            client["bytes_delivered"] = sum(received[a] for a in local)
        filled.append(client)
    return filled


def evaluate_expectations(experiment: Experiment, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every expectation that applies to this case, evaluated on its record."""
    values = stats.case_values(record)
    results = []
    for expectation in experiment.expect:
        if not expectation.applies_to(experiment):
            continue
        evaluation = expectation.check.evaluate(values)
        results.append({"name": expectation.name, "check": expectation.check.text,
                        "passed": bool(evaluation.passed), "observed": dict(evaluation.observed),
                        "error": evaluation.error})
    return results


def case_record(
    *, case: Case, repetition: int, status: str, error: str | None, wall_s: float,
    link: Mapping[str, Any], server: Mapping[str, Any] | None,
    clients: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """A complete ``cases.jsonl`` record; expectations evaluated when the case ran."""
    record: dict[str, Any] = {
        "schema": SCHEMA, "experiment": case.experiment.name, "case": case.id,
        "params": dict(case.params), "repetition": repetition, "status": status, "error": error,
        "wall_s": round(wall_s, 6), "link": dict(link), "server": server, "clients": list(clients),
        "expectations": [],
    }
    if status == "ok":
        record["expectations"] = evaluate_expectations(case.experiment, record)
    return record


def record_passed(record: Mapping[str, Any]) -> bool:
    """The case ran and every expectation held."""
    return record["status"] == "ok" and all(e["passed"] for e in record["expectations"])
