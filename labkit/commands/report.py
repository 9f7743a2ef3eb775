"""`lab.py report` and `lab.py compare`: from run directories alone, no engine."""

from __future__ import annotations

from pathlib import Path

from .common import DEFAULT_OUT, say


def cmd_report(args) -> int:
    """Rebuild report.md, plots/ and summary.csv from a run directory alone."""
    from .. import report
    from ..rundir import RunDir

    rundir = RunDir.open_existing(Path(args.run_dir))
    report.write_report(rundir)
    say(f"wrote {rundir.path / 'report.md'}")
    return 0


def cmd_compare(args) -> int:
    """Put several run directories side by side: compare.md and plots in --out."""
    from .. import compare

    out = Path(args.out) if args.out else compare.default_out(DEFAULT_OUT)
    path = compare.write_comparison([Path(p) for p in args.run_dirs], out)
    say(f"wrote {path}")
    return 0
