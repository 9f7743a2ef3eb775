"""What a run directory's files may say, version by version, and how old ones are read.

``cases.jsonl`` records carry ``schema``:

- **2** (written now): each client entry names its own trace file, ``"trace":
  "traces/NAME"`` relative to the run directory, or null when none was kept.
- **1** (written until issue 12): no ``trace`` field; the file name followed a
  naming rule. Upgraded on read: :func:`upgrade_record` fills ``trace`` by that
  rule (null where the file is not there). The rule lives here and nowhere else.
- anything older, or newer than :data:`RECORD_SCHEMA`, is refused with one sentence.

``meta.json`` carries ``schema`` too:

- **1** (written now): ``shaping_backend`` is derived from the records (one name,
  or a list when cases used different backends).
- unversioned (written until issue 12): upgraded on read; its ``shaping_backend``
  was the last record's, so it is derived from the records again.
- newer than :data:`META_SCHEMA`: refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from socklab.errors import UsageError

RECORD_SCHEMA = 2
OLDEST_RECORD_SCHEMA = 1
META_SCHEMA = 1


def check_record_schema(record: Mapping[str, Any], where: str) -> int:
    """The record's schema, if this lab can read it; bad input otherwise.

    ``where`` names the record for the message (``FILE line N``).
    """
    schema = record.get("schema")
    readable = f"this lab reads schemas {OLDEST_RECORD_SCHEMA} to {RECORD_SCHEMA}"
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise UsageError(f"{where}: the record has no integer schema ({schema!r}); {readable}")
    if schema > RECORD_SCHEMA:
        raise UsageError(f"{where}: the record has schema {schema}, newer than this lab reads "
                         f"(schemas {OLDEST_RECORD_SCHEMA} to {RECORD_SCHEMA}); report it with a newer socklab")
    if schema < OLDEST_RECORD_SCHEMA:
        raise UsageError(f"{where}: the record has schema {schema}, which is too old to upgrade; {readable}")
    return schema


def upgrade_record(record: Mapping[str, Any], where: str,
                   trace_exists: Callable[[str], bool]) -> dict[str, Any]:
    """The record as schema :data:`RECORD_SCHEMA` says (a copy; schema 2 is checked and kept).

    ``trace_exists`` tells whether a path relative to the run directory is a
    file: a schema 1 record did not say whether its trace was kept.
    """
    schema = check_record_schema(record, where)
    upgraded = dict(record)
    if schema == 1:
        upgraded["clients"] = [
            {**client, "trace": _v1_trace(record, client, trace_exists)} for client in record.get("clients") or ()]
        upgraded["schema"] = 2
    for client in upgraded.get("clients") or ():
        _check_trace_field(client.get("trace"), where)
    return upgraded


def _v1_trace(record: Mapping[str, Any], client: Mapping[str, Any],
              trace_exists: Callable[[str], bool]) -> str | None:
    """Where a schema 1 run kept a client's trace, if it is there."""
    replica = client["replica"]
    key = client["name"] if replica == 0 else f"{client['name']}#{replica}"
    name = f"traces/{v1_trace_name(record['case'], record['repetition'], key)}"
    return name if trace_exists(name) else None


def v1_trace_name(case_id: str, repetition: int, container: str) -> str:
    """Schema 1's rule for a trace's file name (frozen: old run directories depend on it)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in case_id)
    return f"{safe}.r{repetition}.{container}.trace.gz"


def _check_trace_field(trace: Any, where: str) -> None:
    if trace is None:
        return
    path = Path(trace) if isinstance(trace, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or not path.parts:
        raise UsageError(f"{where}: a client's trace must be a path inside the run directory "
                         f"(like traces/NAME.trace.gz) or null, not {trace!r}")


def check_meta(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """meta.json as schema :data:`META_SCHEMA` (unversioned meta upgraded); newer refused.

    The caller derives ``shaping_backend`` from the records (see
    :func:`shaping_backend`): an unversioned meta's was the last record's.
    """
    schema = meta.get("schema", 0)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 0:
        raise UsageError(f"{where}: schema must be an integer from 0 to {META_SCHEMA}, not {schema!r}")
    if schema > META_SCHEMA:
        raise UsageError(f"{where}: meta.json has schema {schema}, newer than this lab reads "
                         f"(up to {META_SCHEMA}); report it with a newer socklab")
    return {**meta, "schema": META_SCHEMA}


def shaping_backend(records: Sequence[Mapping[str, Any]]) -> str | list[str]:
    """The shaping backend of a run, from its records: the one every shaped case
    used, a list (in case order) when cases differ, "none" when nothing was shaped."""
    used = list(dict.fromkeys(
        backend for r in records if (backend := (r.get("link") or {}).get("backend")) not in (None, "none")))
    if not used:
        return "none"
    return used[0] if len(used) == 1 else used
