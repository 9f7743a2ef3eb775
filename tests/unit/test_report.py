"""report.md, plots and compare.md from stored run directories, without Docker.

The fixtures under tests/data/runs/ are real runs, kept small: ``report-bulk``
(a 4 MiB send() in the modes blocking, nonblocking and nonblocking-spin over a
20 Mbit/s link) and ``report-echo`` (echo round trips, server blocking or
epoll x client blocking or epoll), two repetitions each, without the files a
report rebuilds. To make new ones, run experiments like them with
``lab.py run ... --out DIR`` and keep experiment.yaml, meta.json, cases.jsonl
and traces/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import compare, plots, records, report
from labkit.config import CLIENT_MODES, SERVER_MODES
from labkit.plots import extract, latency, timeline
from labkit.rundir import RunDir, new_meta
from socklab.errors import UsageError
from socklab.trace import read_trace

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "tests" / "data" / "runs"
BULK = RUNS / "report-bulk" / "20261127-113746"
ECHO = RUNS / "report-echo" / "20261127-113810"
T_975_DF1 = 12.706205  # two repetitions: Student's t, 95 %, one degree of freedom

BULK_PLOTS = {"send-timeline.png", "goodput.png", "cpu-blocked.png", "send-queue.png"}
# Echo clients' send queues hold one request at a time: not plotted (see plots.queue.QUEUE_WORKLOADS).
ECHO_PLOTS = {"send-timeline.png", "goodput.png", "latency-cdf.png", "cpu-blocked.png"}


def copy_run(fixture: Path, tmp_path: Path) -> Path:
    """A writable copy: reporting writes into the run directory."""
    target = tmp_path / fixture.parent.name / fixture.name
    shutil.copytree(fixture, target)
    return target


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table(text: str, heading: str, key: str = "case") -> dict[str, dict[str, str]]:
    """The first Markdown table after ``heading``: rows by their ``key`` cell (backticks off)."""
    lines = [line for line in text[text.index(heading):].splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[row[key].strip("`")] = row
    return rows


def mean_and_half(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % CI half-width of two repetitions, computed here, not by labkit."""
    assert len(values) == 2
    return statistics.fmean(values), T_975_DF1 * statistics.stdev(values) / 2 ** 0.5


def group_values(run: Path, case: str, field: str) -> list[float]:
    return [r["clients"][0][field] for r in records_of(run) if r["case"] == case and r["status"] == "ok"]


# ------------------------------------------------------------ the report

@pytest.mark.parametrize("fixture, expected", [(BULK, BULK_PLOTS), (ECHO, ECHO_PLOTS)])
def test_report_writes_its_files_and_embeds_exactly_the_plots_drawn(tmp_path, fixture, expected):
    run = copy_run(fixture, tmp_path)
    drawn = report.write_report(RunDir.open_existing(run))
    assert {p.name for p in drawn} == expected
    assert {p.name for p in (run / "plots").iterdir()} == expected
    text = (run / "report.md").read_text()
    assert set(re.findall(r"!\[[^\]]+\]\(plots/([^)]+)\)", text)) == expected
    for name in expected:
        width, height = png_size(run / "plots" / name)
        assert 900 <= width <= 1400 and 250 <= height <= 1600, (name, width, height)
        assert (run / "plots" / name).stat().st_size > 20_000, f"{name} is nearly empty"
    assert (run / "summary.csv").read_text().startswith("case,")


def test_a_report_without_plots_draws_none_and_embeds_none(tmp_path):
    run = copy_run(BULK, tmp_path)
    assert report.write_report(RunDir.open_existing(run), draw=False) == []
    assert not (run / "plots").exists()
    text = (run / "report.md").read_text()
    assert "](plots/" not in text and text.startswith("# report-bulk\n")
    assert (run / "summary.csv").read_text().startswith("case,")


def test_report_names_the_experiment_engine_and_every_case_setting(tmp_path):
    run = copy_run(BULK, tmp_path)
    report.write_report(RunDir.open_existing(run))
    text = (run / "report.md").read_text()
    meta = json.loads((run / "meta.json").read_text())
    assert text.startswith("# report-bulk\n\nThe tutorial's send() in three modes")
    assert f"kernel {meta['host_kernel']}, Docker {meta['docker']['engine']}" in text
    assert f"Compose {meta['compose']}" in text and "shaping backend: netem" in text
    cases = table(text, "## Cases")
    assert list(cases) == ["sender.mode=blocking", "sender.mode=nonblocking", "sender.mode=nonblocking-spin"]
    spin = cases["sender.mode=nonblocking-spin"]["group `sender`"]
    assert spin.startswith("**nonblocking-spin**; bulk (bytes 4194304")
    assert "link rate 20mbit" in cases["sender.mode=blocking"]["group `sender`"]


def test_bulk_table_values_are_the_means_and_intervals_of_cases_jsonl(tmp_path):
    run = copy_run(BULK, tmp_path)
    report.write_report(RunDir.open_existing(run))
    rows = table((run / "report.md").read_text(), "### Client group `sender`")
    assert "p50 latency (ms)" not in rows["sender.mode=blocking"], "a column with no value is left out"
    for case, row in rows.items():
        assert row["runs"] == "2"
        accepted = group_values(run, case, "bytes_accepted")
        assert row["accepted (B)"] == f"{accepted[0]:,} ± 0" and accepted[0] == accepted[1]
        mean, half = mean_and_half([g / 1e6 for g in group_values(run, case, "goodput_bps")])
        shown_mean, shown_half = (float(x.replace(",", "")) for x in row["goodput (Mbit/s)"].split(" ± "))
        assert shown_mean == pytest.approx(mean, rel=1e-3)
        assert shown_half == pytest.approx(half, rel=0.05, abs=0.01)
        mean, _ = mean_and_half(group_values(run, case, "cpu_s"))
        assert float(row["CPU (s)"].split(" ± ")[0]) == pytest.approx(mean, rel=1e-3)
    spin_calls = group_values(run, "sender.mode=nonblocking-spin", "send_calls")
    assert rows["sender.mode=nonblocking-spin"]["send calls"].startswith(f"{statistics.fmean(spin_calls):,.0f} ± ")


def test_echo_table_shows_latency_percentiles_from_cases_jsonl(tmp_path):
    run = copy_run(ECHO, tmp_path)
    report.write_report(RunDir.open_existing(run))
    rows = table((run / "report.md").read_text(), "### Client group `echo`")
    for case, row in rows.items():
        p50s = [r["clients"][0]["latency_ms"]["p50"] for r in records_of(run) if r["case"] == case]
        assert float(row["p50 latency (ms)"].split(" ± ")[0]) == pytest.approx(statistics.fmean(p50s), rel=1e-3)


def test_every_expectation_is_listed_with_its_outcome_and_observed_values(tmp_path):
    run = copy_run(ECHO, tmp_path)
    report.write_report(RunDir.open_existing(run))
    text = (run / "report.md").read_text()
    outcomes = [e for r in records_of(run) for e in r["expectations"]]
    assert text.count("— held;") == sum(e["passed"] for e in outcomes) == len(outcomes)
    assert f"{len(outcomes)} of {len(outcomes)} checks held." in text
    delivered = records_of(run)[0]["clients"][0]["bytes_delivered"]
    assert f"echo.bytes_delivered = {delivered:,}" in text


def test_a_failed_repetition_is_reported_and_left_out_of_tables_and_plots(tmp_path):
    run = copy_run(BULK, tmp_path)
    failed = {**records_of(run)[0], "repetition": 2, "status": "timeout", "error": "the case ran past 60 s",
              "expectations": []}
    failed["clients"] = [{**failed["clients"][0], "bytes_accepted": 1}]
    with open(run / "cases.jsonl", "a") as fh:
        fh.write(json.dumps(failed) + "\n")
    report.write_report(RunDir.open_existing(run))
    text = (run / "report.md").read_text()
    assert "- `sender.mode=blocking` r2: timeout — the case ran past 60 s" in text
    row = table(text, "### Client group `sender`")["sender.mode=blocking"]
    assert row["runs"] == "3 (1 failed)" and row["accepted (B)"] == "4,194,304 ± 0"
    bars = extract.metric_bars(RunDir(run).load(), 0, "sender", "bytes_accepted")
    assert bars[0].values == (4194304.0, 4194304.0)


def test_a_plot_without_data_is_not_drawn_and_not_mentioned(tmp_path):
    run = copy_run(BULK, tmp_path)
    report.write_report(RunDir.open_existing(run))
    assert (run / "plots" / "send-timeline.png").exists()
    shutil.rmtree(run / "traces")  # as after `lab.py run --no-trace`
    drawn = report.write_report(RunDir.open_existing(run))
    assert {p.name for p in drawn} == {"goodput.png", "cpu-blocked.png"}
    assert {k.name for k in plots.PLOT_KINDS if k.needs == "summary"} == {"goodput.png", "cpu-blocked.png"}
    assert {p.name for p in (run / "plots").iterdir()} == {"goodput.png", "cpu-blocked.png"}
    text = (run / "report.md").read_text()
    assert "timeline" not in text.lower() and "send-queue" not in text


def offline_env() -> dict[str, str]:
    """No Docker daemon to reach, whatever this machine has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    return env


def test_lab_report_rebuilds_report_and_plots_offline(tmp_path):
    run = copy_run(ECHO, tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "lab.py"), "report", str(run)], cwd=tmp_path,
                          env=offline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {run / 'report.md'}"
    assert {p.name for p in (run / "plots").iterdir()} == ECHO_PLOTS
    assert "## Plots" in (run / "report.md").read_text()


# ------------------------------------------------------ trace extraction

def trace_and_record(run: Path, case: str, repetition: int = 0):
    """A client's trace records (found by its file's name in the record) and its record entry."""
    record = next(r for r in RunDir(run).load().records if r["case"] == case and r["repetition"] == repetition)
    _, records = read_trace(str(run / record["clients"][0]["trace"]))
    return records, record["clients"][0]


@pytest.mark.parametrize("case", ["sender.mode=blocking", "sender.mode=nonblocking",
                                  "sender.mode=nonblocking-spin"])
def test_send_timeline_agrees_with_the_clients_own_counts(case):
    records, client = trace_and_record(BULK, case)
    timeline = extract.send_timeline(records)
    assert timeline.send_calls == client["send_calls"]
    assert timeline.refused_calls == client["eagain"]
    assert timeline.accepted_bytes == timeline.steps_bytes[-1] == client["bytes_accepted"]
    assert list(timeline.steps_s) == sorted(timeline.steps_s)
    if case == "sender.mode=blocking":
        # One call that lasts as long as the client spent inside send().
        (send,) = [(s, e) for s, e, _ in timeline.calls if e - s > 0.5]
        assert send[1] - send[0] == pytest.approx(client["send_s"], abs=1e-6)


def test_send_timeline_counts_bytes_when_calls_return_even_when_threads_overlap():
    def rec(t_s, conn, call, returned, dur_s, errno="", n=1):
        return {"t_s": t_s, "conn": conn, "call": call, "asked": 100, "returned": returned,
                "errno": errno, "dur_s": dur_s, "n": n}
    timeline = extract.send_timeline([
        rec(0.0, 0, "send", 100, 2.0),            # a blocking send, returns at 2.0
        rec(0.5, 1, "send", 50, 0.5),             # another thread's, returns at 1.0
        rec(1.5, 1, "send", -1, 0.1, "EAGAIN", 400),
        rec(1.7, 1, "outq", 900, 0.0),
        rec(2.5, 1, "write", 30, 0.1)])
    assert timeline.steps_s == pytest.approx((0.0, 1.0, 1.0, 2.0, 2.0, 2.6, 2.6, 2.6))
    assert timeline.steps_bytes == (0, 0, 50, 50, 150, 150, 180, 180)
    assert timeline.calls[0] == (0.0, 2.0, 0) and timeline.calls[2] == (1.5, 1.6, 50)
    assert timeline.refused == ((1.5, 50, 400),)
    assert (timeline.send_calls, timeline.refused_calls) == (403, 400)
    assert timeline.last_accept_s == pytest.approx(2.6)
    assert extract.level_at_s(timeline, 1.5) == 50


@pytest.mark.parametrize("case", ["server.mode=blocking,echo.mode=blocking", "server.mode=blocking,echo.mode=epoll",
                                  "server.mode=epoll,echo.mode=blocking", "server.mode=epoll,echo.mode=epoll"])
def test_latencies_rebuilt_from_a_trace_are_the_ones_the_client_measured(case):
    records, client = trace_and_record(ECHO, case)
    latencies_ms = sorted(s * 1000 for s in extract.request_latencies_s(records))
    assert len(latencies_ms) == client["latency_ms"]["count"]
    nearest_rank_p50 = latencies_ms[(len(latencies_ms) + 1) // 2 - 1]  # the client's own rule
    assert nearest_rank_p50 == pytest.approx(client["latency_ms"]["p50"], abs=0.02)
    assert latencies_ms[-1] == pytest.approx(client["latency_ms"]["max"], abs=0.05)


def test_zoom_and_smoothing_helpers():
    def line(end_s):
        return extract.SendTimeline((0.0, end_s), (0, 1), (), (), 1, 0, 1, end_s)
    assert timeline.zoom_window_s([line(10.0), line(0.003)]) == 0.005
    assert timeline.zoom_window_s([line(10.0), line(2.0)]) is None
    early = extract.SendTimeline((0.0, 0.001, 0.001, 0.002), (0, 0, 400, 400), (), (), 1, 0, 400, 0.001)
    # Room for the early finisher, not for the line still climbing past it.
    assert timeline.zoom_top_bytes([early, line(10.0)], 0.005) == 1000

    def ramp(end_s):  # 1000 bytes accepted 10 at a time, evenly up to end_s
        times = [end_s * k / 100 for k in range(101)]
        return extract.SendTimeline(tuple(times), tuple(10 * k for k in range(101)), (), (), 100, 0, 1000, end_s)
    assert timeline.lines_may_overlap([ramp(10.0), ramp(10.1)])
    assert not timeline.lines_may_overlap([ramp(10.0), ramp(5.0)])
    assert extract.moving_mean([1, 2, 3, 4, 5, 6], 3) == [1.5, 2, 3, 4, 5, 5.5]


def test_report_and_compare_draw_the_registry_of_plot_kinds(tmp_path):
    assert [k.name for k in plots.PLOT_KINDS] == ["send-timeline.png", "goodput.png", "latency-cdf.png",
                                                  "cpu-blocked.png", "send-queue.png", "tcp-sequence.png"]
    assert {k.needs for k in plots.PLOT_KINDS} == {"traces", "summary", "captures"}
    # A kind is one registry entry: here one drawn from the summary alone, and one with no data.
    loaded = RunDir(copy_run(ECHO, tmp_path)).load()
    seen = []
    wall = plots.PlotKind(
        "wall.png", "Case wall time", "summary",
        extract=lambda runs, load: [c.metric("case.wall_s") for r in runs for c in r.summary.cases],
        draw=lambda data, runs, path: (seen.append(data), path.write_bytes(b"png")),
        caption=lambda data, runs: f"{len(data)} cases")
    nothing = plots.PlotKind("none.png", "Nothing", "traces", lambda runs, load: {}, None, None)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "none.png").write_bytes(b"old")
    drawn = plots.draw_plots([loaded], tmp_path / "out", kinds=(wall, nothing))
    assert drawn == [plots.PlotFile("wall.png", "Case wall time", "4 cases")]
    assert [m.summary.n for m in seen[0]] == [2, 2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["wall.png"]


def test_every_mode_has_its_own_colour():
    modes = set(SERVER_MODES) | set(CLIENT_MODES)
    assert modes <= set(plots.MODE_COLOURS)
    assert len({plots.MODE_COLOURS[m] for m in modes}) == len(modes)


# ---------------------------------------------------------------- compare

def test_compare_puts_runs_side_by_side_with_changes_against_the_first(tmp_path):
    before = copy_run(BULK, tmp_path / "a")
    after = copy_run(BULK, tmp_path / "b")
    # The same run with the link slower and every goodput halved: a "before/after".
    recs = records_of(after)
    for r in recs:
        r["clients"][0]["goodput_bps"] /= 2
    (after / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (after / "experiment.yaml").write_text((after / "experiment.yaml").read_text().replace("20mbit", "10mbit"))
    out = tmp_path / "cmp"
    path = compare.write_comparison([before, after], out)
    text = path.read_text()
    assert path == out / "compare.md"
    assert table(text, "## What differs", key="setting")["clients.sender.link.rate"] == {
        "setting": "`clients.sender.link.rate`", "A": "`20mbit`", "B": "`10mbit`"}
    rows = table(text, "### goodput (Mbit/s)")
    assert rows["sender.mode=blocking"]["B vs A"] == "**-50.0 %**"
    assert table(text, "### send() calls")["sender.mode=blocking"]["B vs A"] == "+0.0 %"
    assert {p.name for p in (out / "plots").iterdir()} == BULK_PLOTS
    for name in BULK_PLOTS:
        png_size(out / "plots" / name)
        assert f"](plots/{name})" in text


def test_compare_takes_two_to_four_runs():
    with pytest.raises(UsageError, match="2 to 4 run directories"):
        compare.write_comparison([BULK], Path("unused"))


def test_lab_compare_works_offline_and_refuses_what_is_not_a_run(tmp_path):
    out = tmp_path / "cmp"
    lab = [sys.executable, str(ROOT / "lab.py"), "compare"]
    done = subprocess.run([*lab, str(copy_run(ECHO, tmp_path / "a")), str(copy_run(ECHO, tmp_path / "b")),
                           "--out", str(out)], env=offline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "compare.md").is_file() and (out / "plots" / "latency-cdf.png").is_file()
    done = subprocess.run([*lab, str(tmp_path), str(tmp_path), "--out", str(out)], env=offline_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a run directory" in done.stderr


def test_default_compare_directory_is_timestamped_under_results(tmp_path):
    now = dt.datetime(2026, 11, 27, 11, 45, 0)
    first = compare.default_out(tmp_path, now)
    assert first == tmp_path / "compare" / "20261127-114500"
    first.mkdir(parents=True)
    assert compare.default_out(tmp_path, now) == tmp_path / "compare" / "20261127-114500-2"


# ------------------------------------------------- the one run loader (issue 12)

def rewrite_records(run: Path, change) -> None:
    recs = records_of(run)
    change(recs)
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_schema_1_records_are_upgraded_with_the_trace_each_client_kept(tmp_path):
    assert {r["schema"] for r in records_of(ECHO)} == {1}, "the fixtures are schema 1 runs"
    run = copy_run(ECHO, tmp_path)
    loaded = RunDir(run).load()
    assert {r["schema"] for r in loaded.records} == {2}
    for record in loaded.records:
        (client,) = record["clients"]
        assert client["trace"].startswith("traces/") and (run / client["trace"]).is_file()
        assert loaded.trace_path(client) == run / client["trace"]
    # A schema 1 run resumed by this lab holds records of both schemas.
    RunDir(run).append_case({**loaded.records[0], "repetition": 2,
                             "clients": [{**loaded.records[0]["clients"][0], "trace": None}]})
    mixed = RunDir(run).load()
    assert [r["schema"] for r in records_of(run)] == [1] * 8 + [2]
    assert mixed.records[:8] == loaded.records and mixed.records[8]["clients"][0]["trace"] is None
    shutil.rmtree(run / "traces")  # as after `lab.py run --no-trace`: nothing to name
    assert all(c["trace"] is None for r in RunDir(run).load().records for c in r["clients"])


def test_a_schema_2_run_named_by_write_trace_reports_as_its_schema_1_original(tmp_path):
    original = copy_run(ECHO, tmp_path / "v1")
    report.write_report(RunDir.open_existing(original))
    # The same run as the lab writes it now: traces kept by write_trace, records naming them.
    target = RunDir.create(tmp_path / "v2", "report-echo")
    for name in ("experiment.yaml", "meta.json"):
        shutil.copy(original / name, target.path / name)
    for record in RunDir(original).load().records:
        clients = []
        for client in record["clients"]:
            key = client["name"] if client["replica"] == 0 else f"{client['name']}#{client['replica']}"
            name = target.write_trace(record["case"], record["repetition"], key,
                                      (original / client["trace"]).read_bytes())
            clients.append(records.client_record(client["name"], client["replica"], client, trace=name))
        target.append_case({**record, "clients": clients})
    written = records_of(target.path)
    assert {r["schema"] for r in written} == {2}
    assert all(c["trace"] == f"traces/{r['case'].replace(',', '%2C')}.r{r['repetition']}.echo.trace.gz"
               for r in written for c in r["clients"])
    drawn = report.write_report(RunDir.open_existing(target.path))
    assert {p.name for p in drawn} == ECHO_PLOTS
    assert (target.path / "report.md").read_text() == (original / "report.md").read_text()
    assert (target.path / "summary.csv").read_text() == (original / "summary.csv").read_text()


def test_write_trace_names_are_one_per_case_and_container(tmp_path):
    rundir = RunDir.create(tmp_path, "t")
    a = rundir.write_trace("x=1,y=2", 0, "echo#1", b"one")
    b = rundir.write_trace("x=1_y=2", 0, "echo#1", b"two")  # schema 1's rule gave these one name
    assert a == "traces/x=1%2Cy=2.r0.echo%231.trace.gz" and a != b
    assert (rundir.path / a).read_bytes() == b"one" and (rundir.path / b).read_bytes() == b"two"
    entry = records.client_record("echo", 1, {"socklab_result": 1, "role": "client", "mode": "epoll",
                                              "trace": "/etc/passwd"}, trace=a)
    assert entry["trace"] == a and entry["mode"] == "epoll"
    assert records.client_record("echo", 0, None)["trace"] is None


@pytest.mark.parametrize("schema, words", [
    (3, "has schema 3, newer than this lab reads (schemas 1 to 2); report it with a newer socklab"),
    (0, "has schema 0, which is too old to upgrade; this lab reads schemas 1 to 2"),
    ("2", "has no integer schema ('2'); this lab reads schemas 1 to 2"),
])
def test_a_record_schema_this_lab_cannot_read_is_refused_in_one_sentence(tmp_path, capsys, schema, words):
    from labkit import cli
    run = copy_run(ECHO, tmp_path)
    rewrite_records(run, lambda recs: recs[2].update(schema=schema))
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lab.py: {run / 'cases.jsonl'} line 3: the record {words}"
    assert err.count(". ") == 0 and "\n" not in err
    assert not (run / "report.md").exists()


def test_a_trace_field_outside_the_run_directory_is_refused(tmp_path):
    run = copy_run(ECHO, tmp_path)
    rewrite_records(run, lambda recs: recs[0].update(
        schema=2, clients=[{**recs[0]["clients"][0], "trace": "../elsewhere.trace.gz"}]))
    with pytest.raises(UsageError, match=r"line 1: a client's trace must be a path inside the run directory"):
        RunDir(run).load()


def test_a_newer_meta_schema_is_refused_and_an_unversioned_one_upgraded(tmp_path, capsys):
    from labkit import cli
    run = copy_run(ECHO, tmp_path)
    meta = json.loads((run / "meta.json").read_text())
    assert "schema" not in meta, "the fixtures' meta.json predate its schema"
    assert RunDir(run).load().meta == {**meta, "schema": 1, "shaping_backend": "netem"}
    (run / "meta.json").write_text(json.dumps({**meta, "schema": 2}))
    assert cli.main(["report", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lab.py: {run / 'meta.json'}: meta.json has schema 2, newer than this lab reads (up to 1); "
        "report it with a newer socklab")


def test_meta_names_the_shaping_backend_of_the_records_a_list_when_cases_differ(tmp_path):
    rundir = RunDir.create(tmp_path, "t")
    versions = {"host_kernel": "6.1", "docker": {"kernel": "6.1", "engine": "24.0", "api": "1.43"}, "compose": "2.26"}
    started = rundir.begin(new_meta(git_revision="abc1234", versions=versions), resumed=False)
    assert started["schema"] == 1 and started["shaping_backend"] is None and started["ended_at"] is None
    for case, backend in (("a", "netem"), ("b", "none"), ("c", "userspace"), ("d", "netem")):
        rundir.append_case({"schema": 2, "case": case, "repetition": 0, "status": "ok",
                            "link": {"backend": backend}, "clients": []})
        if case == "a":
            assert rundir.finish()["shaping_backend"] == "netem"  # as after an interrupted run
    meta = rundir.finish()
    assert meta["shaping_backend"] == ["netem", "userspace"] and meta["ended_at"]
    assert json.loads((rundir.path / "meta.json").read_text()) == meta
    resumed = rundir.begin(new_meta(git_revision="other", versions=versions), resumed=True)
    assert resumed["git_revision"] == "abc1234" and len(resumed["resumed_at"]) == 1
    unshaped = RunDir.create(tmp_path, "u")
    unshaped.begin(started, resumed=False)
    unshaped.append_case({"schema": 2, "case": "a", "repetition": 0, "status": "ok", "link": {"backend": "none"},
                          "clients": []})
    assert unshaped.finish()["shaping_backend"] == "none"


def test_the_report_says_which_backends_when_cases_differ(tmp_path):
    run = copy_run(BULK, tmp_path)
    rewrite_records(run, lambda recs: recs[-1]["link"].update(backend="userspace"))
    report.write_report(RunDir.open_existing(run))
    assert "- shaping backend: netem, userspace (cases differ)\n" in (run / "report.md").read_text()


def test_the_summary_is_computed_once_and_shared_by_tables_bars_and_summary_csv(tmp_path, monkeypatch):
    from labkit import rundir as rundir_module
    calls = []
    real = rundir_module.summarize_run

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(rundir_module, "summarize_run", counted)
    run = copy_run(BULK, tmp_path / "a")
    report.write_report(RunDir.open_existing(run))
    assert len(calls) == 1
    compare.write_comparison([run, copy_run(BULK, tmp_path / "b")], tmp_path / "cmp")
    assert len(calls) == 3, "one summary per run compared"
    loaded = RunDir(run).load()
    bar = extract.metric_bars(loaded, 0, "sender", "goodput_bps")[0]
    assert bar.mean == loaded.summary.get(bar.row).metric("sender.goodput_bps").summary.mean
    assert (run / "summary.csv").read_text() == loaded.summary.csv_text()


def test_cdf_legend_and_table_show_the_same_percentiles(tmp_path):
    run = copy_run(ECHO, tmp_path)
    report.write_report(RunDir.open_existing(run))
    rows = table((run / "report.md").read_text(), "### Client group `echo`")
    loaded = RunDir(run).load()
    panels = latency.latency_panels([loaded], extract.trace_loader())
    for case, row in rows.items():
        server, client = case.split(",")  # a line per server mode, a panel per client mode
        (line,) = [line for line in panels[client] if f"server.mode={line.mode}" == server]
        legend = dict(re.findall(r"(p50|p99|max) ([0-9.]+)", line.legend()))
        for name in ("p50", "p99"):
            shown = float(row[f"{name} latency (ms)"].split(" ± ")[0])
            assert float(legend[name]) == pytest.approx(shown, rel=2e-3), (case, name, line.legend())
        # Oracle: what each repetition's client measured (nearest rank), averaged here.
        for name in ("p50", "p99"):
            measured = [r["clients"][0]["latency_ms"][name] for r in records_of(run) if r["case"] == case]
            assert getattr(line, f"{name}_ms") == pytest.approx(statistics.fmean(measured), abs=1e-9), case
    # The case the issue names: the legend said p99 5.99 ms (pooled, interpolated), the table 7.12.
    (line,) = [line for line in panels["echo.mode=blocking"] if line.mode == "blocking"]
    assert "p99 7.12," in line.legend()
    assert rows["server.mode=blocking,echo.mode=blocking"]["p99 latency (ms)"].startswith("7.117 ± ")


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (ROOT / "docs" / "results").glob("*/meta.json")))
def test_committed_reports_are_what_their_run_directories_give(name):
    """docs/results keeps no traces, so the plots are not redrawn here: everything before them is."""
    committed = (ROOT / "docs" / "results" / name / "report.md").read_text()
    text = report.render(RunDir(ROOT / "docs" / "results" / name).load())
    assert text == committed.split("\n## Plots\n")[0].rstrip("\n") + "\n"
    summary = (ROOT / "docs" / "results" / name / "summary.csv").read_text()
    assert RunDir(ROOT / "docs" / "results" / name).load().summary.csv_text() == summary


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "docs" / "results" / "backends").iterdir()))
def test_committed_backend_comparisons_are_what_their_run_directories_give(name, monkeypatch):
    """docs/results/backends: each experiment's netem run (A) beside its delay-line run (B), compared
    by `lab.py compare` from the repository root; everything before the plots is redrawn."""
    monkeypatch.chdir(ROOT)
    base = Path("docs") / "results" / "backends" / name
    runs = [compare.load_run(base / backend, label) for backend, label in (("netem", "A"), ("userspace", "B"))]
    assert [run.meta["shaping_backend"] for run in runs] == ["netem", "userspace"]
    committed = (base / "compare.md").read_text()
    assert compare.render(runs, []).split("\n## Plots\n")[0] == committed.split("\n## Plots\n")[0]
