"""The run directory: the only thing a run leaves, and all a report needs.

    results/<experiment>/<YYYYmmdd-HHMMSS>/
        experiment.yaml   the experiment as resolved (defaults filled in)
        meta.json         schema, versions, revision, kernel, shaping backend(s), start/end
        cases.jsonl       one record per case x repetition, appended as each finishes
        summary.csv       one row per case: mean, stdev and 95 % CI over repetitions
        compose/          the override file of every case, to reproduce it by hand
        traces/           every client's socket calls (gzip), named by its record
        programs/         a copy of each program of the user's that a role ran (mounted read-only)
        outputs/          each such program's whole stdout and stderr, named by its record

Records are flushed and synced as each case finishes, so an interrupted run keeps
every finished case and ``--resume`` can run only what is missing. Reading goes
through :meth:`RunDir.load`, which checks and upgrades schemas (see
:mod:`labkit.schema`) and returns the one :class:`LoadedRun` that report,
compare and plots all use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import yaml

import socklab
from socklab.atomic import write_atomic
from socklab.errors import UsageError

from . import schema
from .config import Experiment, load_experiment
from .matrix import Case, expand_cases
from .summary import RunSummary, summarize_run

# Where a run keeps its programs: experiment.yaml's program_root says so, so that the
# run directory alone reruns and reports them.
PROGRAMS_DIR = "programs"


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.traces = self.path / "traces"
        self.compose = self.path / "compose"
        self.programs = self.path / PROGRAMS_DIR

    @classmethod
    def create(cls, out_root: Path, experiment: str, now: dt.datetime | None = None) -> "RunDir":
        """A new, empty run directory under ``out_root/experiment``, named by the time."""
        stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        base = Path(out_root) / experiment
        path, n = base / stamp, 1
        while path.exists():  # two runs in the same second keep apart
            n += 1
            path = base / f"{stamp}-{n}"
        path.mkdir(parents=True)
        run = cls(path)
        run.traces.mkdir()
        run.compose.mkdir()
        return run

    @classmethod
    def open_existing(cls, path: Path) -> "RunDir":
        """An existing run directory (for --resume and report); bad input if it is not one."""
        run = cls(Path(path))
        if not (run.path / "experiment.yaml").is_file():
            raise UsageError(f"{path} is not a run directory: it has no experiment.yaml")
        run.traces.mkdir(exist_ok=True)
        run.compose.mkdir(exist_ok=True)
        return run

    # ------------------------------------------------------------ writing

    def write_experiment(self, resolved: dict[str, Any]) -> None:
        """Save the resolved experiment."""
        text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
        (self.path / "experiment.yaml").write_text(text, encoding="utf-8")

    def read_meta(self) -> dict[str, Any]:
        """meta.json as this lab writes it (an older one upgraded, a newer refused), or {}
        before it is written."""
        path = self.path / "meta.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            meta = json.loads(text)
        except ValueError:
            raise UsageError(f"{path}: not JSON; the run directory is damaged") from None
        if not isinstance(meta, dict):
            raise UsageError(f"{path}: must be a JSON object, not {type(meta).__name__}")
        return schema.check_meta(meta, str(path))

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace meta.json atomically."""
        write_atomic(self.path / "meta.json", json.dumps(dict(meta), indent=2, sort_keys=True) + "\n", durable=True)

    def begin(self, new_meta: Mapping[str, Any], *, resumed: bool, now: dt.datetime | None = None) -> dict[str, Any]:
        """Write meta.json as a run starts: ``new_meta`` (see :func:`new_meta`) for a new
        run; for a resumed one the meta it has, with the time it resumed added."""
        meta = self.read_meta() or dict(new_meta)
        if resumed:
            meta["resumed_at"] = [*meta.get("resumed_at", []), _stamp(now)]
        self.write_meta(meta)
        return meta

    def finish(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """Write meta.json as a run ends (or is interrupted): the end time, and the shaping
        backend derived from every record so far."""
        meta = self.read_meta()
        meta["shaping_backend"] = schema.shaping_backend(self.read_cases())
        meta["ended_at"] = _stamp(now)
        self.write_meta(meta)
        return meta

    def append_case(self, record: dict[str, Any]) -> None:
        """Append one case record and make sure it is on disk before going on."""
        line = json.dumps(record, separators=(",", ":"), sort_keys=False)
        with open(self.path / "cases.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_trace(self, case_id: str, repetition: int, key: str, data: bytes) -> str:
        """Keep one client container's trace (``key``: group, or ``group#replica``); returns
        the name its record gives it (``traces/...``, relative to the run directory)."""
        name = f"traces/{_file_word(case_id)}.r{repetition}.{_file_word(key)}.trace.gz"
        self.traces.mkdir(exist_ok=True)
        # Synced: the record that names it is synced next, and must not outlive it.
        write_atomic(self.path / name, data, durable=True)
        return name

    def write_capture(self, case_id: str, repetition: int, key: str, data: bytes) -> str:
        """Keep one role's packet capture (``key`` as for a trace); returns the name its record
        gives it (``captures/...``, relative to the run directory)."""
        name = f"captures/{_file_word(case_id)}.r{repetition}.{_file_word(key)}.pcap"
        (self.path / "captures").mkdir(exist_ok=True)
        write_atomic(self.path / name, data, durable=True)
        return name

    def write_output(self, case_id: str, repetition: int, key: str, stream: str, data: bytes) -> str:
        """Keep a program's whole ``stream`` (stdout or stderr) of one role (``key`` as for a
        trace); returns the name its record gives it (``outputs/...``)."""
        name = f"outputs/{_file_word(case_id)}.r{repetition}.{_file_word(key)}.{stream}"
        (self.path / "outputs").mkdir(exist_ok=True)
        write_atomic(self.path / name, data, durable=True)
        return name

    def keep_programs(self, source_dir: Path, paths: Sequence[str]) -> None:
        """Copy each program (a file or directory, relative to ``source_dir``) to the same place
        under ``programs/``, readable by anyone: the workload's unprivileged user reads the copy."""
        for relative in paths:
            source, target = Path(source_dir) / relative, self.programs / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)
        for folder, dirs, files in os.walk(self.programs):
            os.chmod(folder, 0o755)
            for name in files:
                path = os.path.join(folder, name)
                os.chmod(path, 0o755 if os.stat(path).st_mode & 0o100 else 0o644)

    def program_digest(self, relative: str) -> str:
        """The sha256 of a kept program (see :func:`program_digest`)."""
        return program_digest(self.programs / relative)

    def definition_record(self, case_id: str, repetition: int) -> Path:
        """Where a case repetition's lab definition is kept, without a suffix: the engine
        adds its own (``.yaml`` for a Compose override)."""
        return self.compose / f"{_file_word(case_id)}.r{repetition}.compose"

    def write_text(self, name: str, text: str) -> Path:
        """Write a file of the run (report.md, summary.csv) atomically."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
        return path

    # ------------------------------------------------------------ reading

    def read_cases(self) -> list[dict[str, Any]]:
        """Every complete record in cases.jsonl, as schema 2 (older ones upgraded; a newer
        schema is bad input). A torn last line is ignored."""
        path = self.path / "cases.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill mid-write; the case reruns
            records.append(schema.upgrade_record(record, f"{path} line {number}",
                                                 lambda name: (self.path / name).is_file()))
        return records

    def done(self) -> set[tuple[str, int]]:
        """(case id, repetition) of every recorded case."""
        return {(r["case"], int(r["repetition"])) for r in self.read_cases()}

    def load(self, label: str | None = None) -> "LoadedRun":
        """The run as report, compare and plots read it: schemas checked, records upgraded,
        the summary over repetitions computed (once)."""
        records = self.read_cases()
        meta = self.read_meta()
        if meta and records:
            meta["shaping_backend"] = schema.shaping_backend(records)
        return LoadedRun.of(self.path, load_experiment(self.path / "experiment.yaml"), records, meta, label)


@dataclass(frozen=True)
class LoadedRun:
    """One run directory, read: what report, compare and plots are drawn from.

    ``label`` tells runs apart in a comparison ("A", "B", ...) and is None for a
    single run's report; ``records`` are schema 2; ``summary`` is the one summary
    over repetitions that every table, bar and summary.csv shows.
    """

    label: str | None
    path: Path
    experiment: Experiment
    cases: Sequence[Case]
    records: Sequence[Mapping[str, Any]]
    meta: Mapping[str, Any]
    summary: RunSummary

    @classmethod
    def of(cls, path: Path, experiment: Experiment, records: Sequence[Mapping[str, Any]],
           meta: Mapping[str, Any], label: str | None = None) -> "LoadedRun":
        """A run from its parts (schema 2 records): its cases expanded, its summary computed."""
        cases = tuple(expand_cases(experiment))
        return cls(label=label, path=Path(path), experiment=experiment, cases=cases, records=tuple(records),
                   meta=dict(meta), summary=summarize_run(cases, records))

    def trace_path(self, client: Mapping[str, Any]) -> Path | None:
        """The trace file a record's client entry names, or None if it kept none."""
        name = client.get("trace")
        return None if name is None else self.path / name


def program_digest(path: Path) -> str:
    """sha256 of a program: a file's bytes; for a directory, every file's path and bytes, in order."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def new_meta(*, git_revision: str | None, versions: Mapping[str, Any],
             now: dt.datetime | None = None) -> dict[str, Any]:
    """meta.json of a run that starts now. ``versions`` is what the engine reports under
    meta.json's own keys (``Engine.versions()``: host_kernel, docker, compose); the shaping
    backend is filled in from the records by :meth:`RunDir.finish`."""
    return {
        "schema": schema.META_SCHEMA, "lab_version": socklab.__version__, "git_revision": git_revision,
        **versions, "python": platform.python_version(), "shaping_backend": None,
        "started_at": _stamp(now), "ended_at": None, "resumed_at": [],
    }


def _stamp(now: dt.datetime | None) -> str:
    return (now or dt.datetime.now()).astimezone().isoformat(timespec="seconds")


def _file_word(text: str) -> str:
    """``text`` as part of a file name: safe on every filesystem, and one name per text
    (percent-encoded, so that "a,b" and "a_b" stay apart)."""
    return quote(text, safe="=.-_")
