"""BENCHMARKS.md and the README's headline, made from a results file and nothing else.

    python3 bench/render.py bench/results/benchmarks.json > BENCHMARKS.md

Pure functions of the results (and of :mod:`findings`, the explanations of
missed targets, written by people after profiling), so that a test can render
the committed results again and find the committed text unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from findings import HEADLINE, WHY  # noqa: E402

SECTIONS = {
    "fidelity": "Link fidelity and bulk load generation",
    "overhead": "Lab overhead",
    "echo": "Echo load: requests per second by server mode",
    "scale": "Scale: concurrent connections held",
    "vm": "Link fidelity on a stock kernel with netem, inside an emulated VM",
    "swarm": "Lab overhead on Docker Swarm",
    "tracer": "Socket-call tracer overhead (socklab.usertrace)",
    "delayline": "Userspace delay line: the fastest traffic it carries at 20 ms each way",
}
HEADLINE_BEGIN = "<!-- bench:headline (made by bench/render.py from bench/results/benchmarks.json) -->"
HEADLINE_END = "<!-- /bench:headline -->"


def number(value: float | None) -> str:
    """A figure as printed: four significant digits, thousands grouped."""
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def span(stats: dict, unit: str = "") -> str:
    """``median (min–max) unit``; just the median when there is one sample."""
    if not stats.get("n"):
        return "–"
    suffix = f" {unit}" if unit else ""
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return f"{number(stats['median'])}{suffix}"
    return f"{number(stats['median'])} ({number(stats['min'])}–{number(stats['max'])}){suffix}"


def target_text(target: dict | None) -> str:
    """The target as a condition on the ratio."""
    if not target:
        return "–"
    if "min" in target:
        return f"≥ {target['min']:g}×"
    if "max" in target:
        return f"≤ {target['max']:g}×"
    return f"1 ± {target['within']:g}"


def verdict(fig: dict) -> str:
    """Met, missed (with the reason's anchor) or only reported."""
    if fig["met"] is None:
        return "reported"
    return "met" if fig["met"] else "**missed**"


def figure_rows(figures: list[dict]) -> list[str]:
    """A markdown table of figures."""
    rows = ["| figure | measured | reference | ratio | target | |",
            "|---|---|---|---|---|---|"]
    for fig in figures:
        measured = span(fig["value"], fig["unit"]) if "error" not in fig else f"not measured: {fig['error']}"
        reference = f"{fig['reference']['label']}: {span(fig['reference'], fig['unit'])}"
        rows.append(f"| {fig['label']} (`{fig['id']}`) | {measured} | {reference} | {span(fig['ratio'])} | "
                    f"{target_text(fig['target'])} | {verdict(fig)} |")
    return rows


def machine_sentence(about: dict) -> str:
    """Where a section was measured when not on the machine above (the VM benchmark's guest)."""
    return (f"Measured inside an emulated VM on the machine above: {about['emulator']}, {about['cpus']} × "
            f"{about['cpu_model']}, {about['memory_gib']} GiB, kernel {about['kernel']}, Docker engine / Compose "
            f"{about['docker']} / {about['compose']}. Absolute times are slower there than on real hardware; "
            "the ratios are what carry over.")


def measured_apart_sentence(own: dict, file_env: dict) -> str:
    """Where and when a section was measured, when apart from the rest of the file (`run.py --merge`)."""
    machine = ("the machine above" if (own["cpu_model"], own["cpus"]) == (file_env["cpu_model"], file_env["cpus"])
               else f"{own['cpus']} × {own['cpu_model']}, {own['memory_gib']} GiB, kernel {own['host_kernel']}")
    return (f"Measured apart from the rest of this file: {own['when']} (git {own['git_revision']}) on {machine}, "
            f"Docker engine / Compose {own['docker']} / {own['compose']}, load average {own['load_average_1min']} "
            "at its start.")


def _notes(details: dict) -> list[str]:
    lines = []
    for note in details.get("notes", []):
        lines.append(f"- {note}")
    for name, sentence in details.get("limits", {}).items():
        lines.append(f"- **{name}**: {sentence}")
    for backend, sentence in details.get("backends_unavailable", {}).items():
        lines.append(f"- Backend **{backend}** not measured on this machine: “{sentence}”")
    return lines


def breakdown_tables(details: dict) -> list[str]:
    """The section's breakdown tables (``details["breakdown"]``: a caption, a column per figure, a row per
    phase), each as a caption and a markdown table; none when the section has none."""
    lines = []
    for table in details.get("breakdown", []):
        suffix = f" {table['unit']}" if table.get("unit") else ""
        lines += ["", f"{table['caption']}:", "", "| | " + " | ".join(f"`{c}`" for c in table["columns"]) + " |",
                  "|---|" + "---|" * len(table["columns"])]
        for label, values in table["rows"]:
            cells = [number(v) + suffix if v is not None else "–" for v in values]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def missed(results: dict) -> list[dict]:
    """Every figure whose target was missed, in the order of the file."""
    return [f for b in results["benchmarks"].values() for f in b.get("figures", []) if f["met"] is False]


def render(results: dict) -> str:
    """The whole of BENCHMARKS.md."""
    env = results["environment"]
    figures = [f for b in results["benchmarks"].values() for f in b.get("figures", [])]
    judged = [f for f in figures if f["met"] is not None]
    out = [
        "# Benchmarks",
        "",
        "Made by `python3 bench/run.py` (all of it; `--quick` for a shorter run) from "
        "`bench/results/benchmarks.json`, which holds every sample; the explanations of missed "
        "targets are in `bench/findings.py`. Do not edit this file: run `python3 bench/render.py "
        "bench/results/benchmarks.json > BENCHMARKS.md` (a test checks the two agree).",
        "",
        "Every figure is the median over repetitions with min–max in brackets, next to its reference "
        "measured in the same run; the ratio (figure ÷ reference, pairwise per repetition) is what a "
        "target is judged on, by its median, and what carries over to another machine.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| measured | {env['when']} (git {env['git_revision']}), {'quick run' if results['quick'] else 'full run'}, "
        f"{number(results['duration_s'])} s |",
        f"| CPU | {env['cpus']} × {env['cpu_model']} |",
        f"| memory | {env['memory_gib']} GiB |",
        f"| kernel | {env['host_kernel']} |",
        f"| Docker engine / Compose | {env['docker']} / {env['compose']} |",
        f"| load average (1 min) at the start | {env['load_average_1min']} |",
        "",
        "## Targets",
        "",
        f"{sum(bool(f['met']) for f in judged)} of {len(judged)} targets met.",
        "",
    ]
    for fig in missed(results):
        out.append(f"- Missed: {fig['label']} (`{fig['id']}`): ratio {span(fig['ratio'])}, target "
                   f"{target_text(fig['target'])}. {WHY.get(fig['id'], 'No explanation recorded.')}")
    for key, bench in results["benchmarks"].items():
        out += ["", f"## {SECTIONS.get(key, key)}", ""]
        if "error" in bench:
            out += [f"Did not complete: {bench['error']}"]
            continue
        if "environment" in bench:
            out += [measured_apart_sentence(bench["environment"], env), ""]
        if "machine" in bench.get("details", {}):
            out += [machine_sentence(bench["details"]["machine"]), ""]
        out += figure_rows(bench["figures"])
        notes = [f"- `{f['id']}`: {f['note']}" for f in bench["figures"] if f.get("note")]
        notes += _notes(bench.get("details", {}))
        if notes:
            out += [""] + notes
        out += breakdown_tables(bench.get("details", {}))
    return "\n".join(out) + "\n"


def figure_by_id(results: dict, fid: str) -> dict:
    """One figure of the results, by id."""
    for bench in results["benchmarks"].values():
        for fig in bench.get("figures", []):
            if fig["id"] == fid:
                return fig
    raise KeyError(fid)


def render_headline(results: dict) -> str:
    """The README's block of headline ratios, between its markers."""
    lines = [HEADLINE_BEGIN]
    for fid, sentence in HEADLINE:
        try:
            fig = figure_by_id(results, fid)
        except KeyError:
            continue
        lines.append(f"- {sentence}: **{span(fig['ratio'])}×** ({span(fig['value'], fig['unit'])} against "
                     f"{fig['reference']['label']} {span(fig['reference'], fig['unit'])}; target "
                     f"{target_text(fig['target'])}, {verdict(fig).strip('*')})")
    lines.append(HEADLINE_END)
    return "\n".join(lines)


def replace_headline(readme: str, results: dict) -> str:
    """``readme`` with its headline block made anew from ``results``."""
    begin, end = readme.index(HEADLINE_BEGIN), readme.index(HEADLINE_END) + len(HEADLINE_END)
    return readme[:begin] + render_headline(results) + readme[end:]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    sys.stdout.write(render(json.loads(args.results.read_text())))
