"""Run every benchmark and write the results file and BENCHMARKS.md.

    BASE_IMAGE=... python3 bench/run.py            # full run: bench/results/benchmarks.json,
                                                   # BENCHMARKS.md and the README's headline
    BASE_IMAGE=... python3 bench/run.py --quick    # under 10 minutes: bench/results/quick.json + quick.md
    python3 bench/run.py --only echo,scale         # some of them
    python3 bench/run.py --only swarm --merge      # measure some again, into the full results and
                                                   # BENCHMARKS.md (each such section says when)
    python3 bench/run.py --only tracer --merge     # the socket-call tracer's overhead (no containers, ~1 min)
    python3 bench/run.py --keep swarm              # full run, but the swarm section kept as measured apart

Benchmarks, not tests: each measures on real containers of a project of its
own (removed afterwards) and reports figures against references measured in
the same run; `vm` does so inside a QEMU VM with a stock kernel (netem), so it
needs root and what .ci/prepare-host.sh installs. The results file is written
again after each benchmark, so an interrupted run keeps what it measured. Exit
status 0 when every benchmark ran (a missed target is a finding, not a
failure), 1 when one could not run, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, RESULTS_SCHEMA, ROOT, environment  # noqa: E402
from render import render, replace_headline  # noqa: E402

BENCHMARKS = ("fidelity", "delayline", "overhead", "echo", "scale", "vm", "swarm", "tracer")


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and repetitions (under 10 minutes)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/benchmarks.json, "
                                                 "or quick.json with --quick)")
    parser.add_argument("--merge", action="store_true",
                        help="put the chosen benchmarks' sections into the full results file (replacing theirs, "
                             "each with the machine and revision it was measured at) and render BENCHMARKS.md")
    parser.add_argument("--keep", help="full run of every benchmark but these (comma-separated), whose sections "
                                       "are kept from the full results file, each saying when it was measured")
    args = parser.parse_args(argv)
    chosen = BENCHMARKS if not args.only else tuple(name.strip() for name in args.only.split(","))
    kept = tuple(name.strip() for name in args.keep.split(",")) if args.keep else ()
    unknown = [name for name in chosen + kept if name not in BENCHMARKS]
    if unknown:
        option = "--keep" if unknown[0] in kept else "--only"
        print(f"bench/run.py: {option}: {unknown[0]!r} is not a benchmark; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    if args.merge and (args.quick or args.out is not None):
        print("bench/run.py: --merge goes into the full results file: drop --quick and --out", file=sys.stderr)
        return 2
    if kept and (args.only or args.merge or args.quick or args.out is not None):
        print("bench/run.py: --keep is a full run: drop --only, --merge, --quick and --out", file=sys.stderr)
        return 2
    full = not args.quick and (chosen == BENCHMARKS or args.merge) and args.out is None
    out = args.out or RESULTS_DIR / ("quick.json" if args.quick else "benchmarks.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.merge:
        results = json.loads(out.read_text(encoding="utf-8"))
    else:
        results = {"schema": RESULTS_SCHEMA, "quick": args.quick, "environment": environment(),
                   "duration_s": None, "benchmarks": {}}
    if kept:
        previous = json.loads(out.read_text(encoding="utf-8"))
        missing = [name for name in kept if name not in previous["benchmarks"]]
        if missing:
            print(f"bench/run.py: --keep: {out} has no {missing[0]!r} section to keep", file=sys.stderr)
            return 2
        for name in kept:  # a kept section was measured at another time: it says when, as a merged one does
            section = previous["benchmarks"][name]
            results["benchmarks"][name] = {**section, "environment": section.get("environment",
                                                                                   previous["environment"])}
        chosen = tuple(name for name in chosen if name not in kept)
    started = time.monotonic()
    failed = False
    for name in chosen:
        _log(f"benchmark {name}{' (quick)' if args.quick else ''}")
        measured_at = environment() if args.merge else None
        bench_started = time.monotonic()
        try:
            section = importlib.import_module(name).run(args.quick, _log)
        except Exception as exc:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            section, failed = {"error": f"{type(exc).__name__}: {exc}"}, True
        section["duration_s"] = round(time.monotonic() - bench_started, 1)
        if measured_at:  # measured apart from the rest of the file: say where and when
            section["environment"] = measured_at
        results["benchmarks"][name] = section
        # Sections in the order of BENCHMARKS, whichever were measured now and whichever kept.
        results["benchmarks"] = {key: results["benchmarks"][key] for key in sorted(
            results["benchmarks"], key=lambda key: BENCHMARKS.index(key) if key in BENCHMARKS else len(BENCHMARKS))}
        if not args.merge:
            results["duration_s"] = round(time.monotonic() - started, 1)
        _write(out, json.dumps(results, indent=1) + "\n")
        _log(f"benchmark {name}: {section['duration_s']} s; results so far in {out}")

    markdown = ROOT / "BENCHMARKS.md" if full else out.with_suffix(".md")
    _write(markdown, render(results))
    if full:
        readme = ROOT / "README.md"
        _write(readme, replace_headline(readme.read_text(encoding="utf-8"), results))
    _log(f"done in {results['duration_s']} s: {out}, {markdown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
