"""Numbers over results: summaries across repetitions, and the names a
`cases.jsonl` record offers to `expect.check`. (The percentile is defined once,
for container and orchestrator alike, in :mod:`socklab.percentile`.)

Names in checks mirror the record's own nesting, with the client group's name in
place of the ``clients`` list:

- ``case.wall_s`` — the case's wall time;
- ``server.FIELD`` — the server's fields (``server.bytes_received``, ``server.cpu_s``,
  ``server.connections``, ``server.max_concurrent``);
- ``GROUP.FIELD`` — one client group over all its records (replicas and their
  connections): ``sender.bytes_accepted``, ``sender.goodput_bps``, and nested fields
  by their path, ``sender.tcp.rtt_ms``, ``sender.latency_ms.p99``.

A group's value is its **total** for byte and call counts (``bytes_*``, ``*_calls``,
``eagain``, ``timeouts``, ``tcp.retrans``) and its **mean** for everything else
(times ``*_s``/``*_ms``, rates ``*_bps``, ``tcp.snd_cwnd``). If any record of the
group lacks the field or has it null, the group's value is None: a total or mean
over part of a group would look plausible and be wrong.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

Number = int | float

# Two-sided 95 % critical values of Student's t, t(0.975, df), for df = 1..30.
_T_975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624,
    2.306004, 2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787,
    2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963, 2.079614,
    2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407,
    2.045230, 2.042272,
)
_Z_975 = 1.959963984540054

CASE_FIELDS = ("wall_s",)
SERVER_FIELDS = ("connections", "bytes_received", "bytes_sent", "cpu_s", "max_concurrent",
                 "threads_max", "peak_rss_kib", "idle_timeouts", "wall_s")
CLIENT_FIELDS = (
    "connections", "bytes_requested", "bytes_accepted", "bytes_delivered", "send_calls", "eagain",
    "timeouts", "send_s", "blocked_s", "wall_s", "cpu_s", "goodput_bps", "connect_s",
    "tcp.rtt_ms", "tcp.retrans", "tcp.snd_cwnd", "sndbuf_bytes", "rcvbuf_bytes",
)
# latency_ms is an object of named statistics (p50, p99, ...) whose keys the
# client chooses, so any key under it is a valid name.
CLIENT_OPEN_OBJECTS = ("latency_ms", "connect")
# Fields that identify a record (or name its trace file) rather than measure anything.
_IDENTITY_FIELDS = frozenset({"replica", "trace"})
_TOTALLED_FIELDS = frozenset({"connections", "send_calls", "eagain", "timeouts", "retrans"})


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and 95 % confidence interval of the mean.

    ``stdev`` and the interval are None for fewer than two values (they are not
    defined); everything but ``n`` is None for no values.
    """

    n: int
    mean: float | None
    stdev: float | None
    ci95_low: float | None
    ci95_high: float | None


def t_critical_95(df: int) -> float:
    """Two-sided 95 % Student's t critical value for ``df`` degrees of freedom.

    A table for df 1..30; above that the Cornish-Fisher expansion around the
    normal quantile, within 2e-6 of the exact value and converging to 1.96.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return (z
            + (z**3 + z) / (4 * df)
            + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def summarize(values: Iterable[Number | None]) -> Summary:
    """Summarise repetitions of one measurement.

    None entries (a repetition where the field did not apply or was not
    measured) are left out, and ``n`` counts the rest. The interval is
    mean ± t(0.975, n-1) · stdev / √n.
    """
    data = [float(v) for v in values if v is not None]
    n = len(data)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = statistics.fmean(data)
    if n == 1:
        return Summary(1, mean, None, None, None)
    stdev = statistics.stdev(data, mean)
    half_width = t_critical_95(n - 1) * stdev / math.sqrt(n)
    return Summary(n, mean, stdev, mean - half_width, mean + half_width)


def aggregation(field: str) -> str:
    """How a client group combines ``field`` (a dotted path in a client record):
    "total" for byte and call counts, "mean" for everything else."""
    leaf = field.rsplit(".", 1)[-1]
    if leaf.startswith("bytes_") or leaf.endswith("_calls") or leaf in _TOTALLED_FIELDS:
        return "total"
    return "mean"


def aggregate_group(client_records: Sequence[Mapping[str, Any]], field: str) -> Number | None:
    """One group's value of ``field`` (dotted path) over its client records.

    Total or mean as :func:`aggregation` says; None when there are no records
    or any record lacks the field.
    """
    found = [_lookup(record, field) for record in client_records]
    if not found or any(v is None for v in found):
        return None
    if aggregation(field) == "total":
        return sum(found)
    return statistics.fmean(found)


def case_values(record: Mapping[str, Any]) -> dict[str, Number | None]:
    """Flatten a ``cases.jsonl`` record into the names checks can use.

    Null fields are present with the value None, so that a check can tell "does
    not apply here" from a misspelt name.
    """
    values: dict[str, Number | None] = {"case.wall_s": record.get("wall_s")}
    for path, value in _numeric_leaves(record.get("server") or {}):
        values[f"server.{path}"] = value
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for client in record.get("clients") or ():
        groups.setdefault(client["name"], []).append(client)
    for name, records in groups.items():
        fields = dict.fromkeys(path for r in records for path, _ in _numeric_leaves(r))
        for path in fields:
            values[f"{name}.{path}"] = aggregate_group(records, path)
    return values


def explain_unknown_name(name: str, groups: Sequence[str]) -> str | None:
    """Why ``name`` can never have a value in a check, or None if it can.

    ``groups`` are the experiment's client group names.
    """
    head, _, field = name.partition(".")
    if head == "case":
        known, owner = CASE_FIELDS, "the case"
    elif head == "server":
        known, owner = SERVER_FIELDS, "the server"
    elif head in groups:
        known, owner = CLIENT_FIELDS, f"client group {head}"
        parent, _, key = field.partition(".")
        if parent in CLIENT_OPEN_OBJECTS and key and "." not in key:
            return None
    else:
        return (f"{name} does not start with a client group, server or case: "
                f"use GROUP.FIELD with a group from {', '.join(groups)}, server.FIELD or case.wall_s")
    if field in known:
        return None
    extra = [f"{o}.KEY" for o in CLIENT_OPEN_OBJECTS] if owner.startswith("client") else []
    return f"{name} is not a result of {owner}: use one of {', '.join([*known, *extra])}"


def _lookup(record: Mapping[str, Any], field: str) -> Number | None:
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value if _is_number(value) else None


def _numeric_leaves(obj: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Number | None]]:
    for key, value in obj.items():
        if not prefix and key in _IDENTITY_FIELDS:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _numeric_leaves(value, f"{path}.")
        elif value is None or _is_number(value):
            yield path, value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
