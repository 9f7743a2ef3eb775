"""The run directory: the only thing a run leaves, and all a report needs.

    results/<experiment>/<YYYYmmdd-HHMMSS>/
        experiment.yaml   the experiment as resolved (defaults filled in)
        meta.json         versions, revision, kernel, shaping backend, start/end
        cases.jsonl       one record per case x repetition, appended as each finishes
        summary.csv       one row per case: mean, stdev and 95 % CI over repetitions
        compose/          the override file of every case, to reproduce it by hand
        traces/           every client's socket calls (gzip)

Records are flushed and synced as each case finishes, so an interrupted run keeps
every finished case and ``--resume`` can run only what is missing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import yaml

from socklab.errors import UsageError



class RunDir:
    """A run directory on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.traces = self.path / "traces"
        self.compose = self.path / "compose"

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

    def write_experiment(self, resolved: dict[str, Any]) -> None:
        """Save the resolved experiment."""
        text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
        (self.path / "experiment.yaml").write_text(text, encoding="utf-8")

    def read_meta(self) -> dict[str, Any]:
        """meta.json, or {} before it is written."""
        try:
            return json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace meta.json atomically."""
        _write_atomic(self.path / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def append_case(self, record: dict[str, Any]) -> None:
        """Append one case record and make sure it is on disk before going on."""
        line = json.dumps(record, separators=(",", ":"), sort_keys=False)
        with open(self.path / "cases.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_cases(self) -> list[dict[str, Any]]:
        """Every complete record in cases.jsonl (a torn last line is ignored)."""
        try:
            lines = (self.path / "cases.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill mid-write; the case reruns
        return records

    def done(self) -> set[tuple[str, int]]:
        """(case id, repetition) of every recorded case."""
        return {(r["case"], int(r["repetition"])) for r in self.read_cases()}

    def write_text(self, name: str, text: str) -> Path:
        """Write a file of the run (report.md, summary.csv) atomically."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, text)
        return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def trace_name(case_id: str, repetition: int, container: str) -> str:
    """A trace's file name: safe on every filesystem, unique per case, repetition, container."""
    safe = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in case_id)
    return f"{safe}.r{repetition}.{container}.trace.gz"

