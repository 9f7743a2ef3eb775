"""Case records, expectations on them, summary.csv and report.md — from records alone."""

from __future__ import annotations

import csv
import io

from pathlib import Path

from labkit import records, report
from labkit.config import load_experiment_text
from labkit.matrix import expand_cases
from labkit.rundir import LoadedRun
from labkit.summary import summarize_run

EXPERIMENT = """
name: t
repeat: 3
clients:
  - name: sender
    workload: {kind: bulk, bytes: 1000}
matrix:
  clients.sender.mode: [blocking, nonblocking]
expect:
  - name: partial
    when: {clients.sender.mode: nonblocking}
    check: "sender.bytes_accepted < sender.bytes_requested"
  - name: delivered
    check: "server.bytes_received == sender.bytes_delivered"
"""


def client_result(accepted: int, goodput_bps: float) -> dict:
    return {"socklab_result": 1, "role": "client", "mode": "x", "workload": "bulk",
            "bytes_requested": 1000, "bytes_accepted": accepted, "bytes_delivered": accepted,
            "send_calls": 1, "eagain": 0, "send_s": 0.1, "blocked_s": 0.2, "wall_s": 0.3,
            "cpu_s": 0.01, "goodput_bps": goodput_bps, "connect_s": 0.001, "latency_ms": None,
            "tcp": {"rtt_ms": 1.0, "retrans": 0, "snd_cwnd": 10}, "errors": []}


def make_record(case, repetition, accepted, goodput_bps, status="ok"):
    clients = [records.client_record("sender", 0, client_result(accepted, goodput_bps))]
    server = records.server_record({"socklab_result": 1, "role": "server", "mode": "blocking",
                                    "connections": 1, "bytes_received": accepted, "cpu_s": 0.0,
                                    "max_concurrent": 1, "per_connection": []})
    return records.case_record(case=case, repetition=repetition, status=status,
                               error=None if status == "ok" else "boom", wall_s=1.5,
                               link={"backend": "netem", "applied": {}, "qdisc": {}},
                               server=server, clients=clients)


def test_record_has_every_schema_field_and_evaluates_the_expectations_that_apply():
    blocking, nonblocking = expand_cases(load_experiment_text(EXPERIMENT, "t.yaml"))
    record = make_record(nonblocking, 0, 400, 1e6)
    assert list(record)[:12] == ["schema", "experiment", "case", "params", "repetition", "status",
                                 "error", "wall_s", "link", "server", "clients", "expectations"]
    assert record["params"] == {"clients.sender.mode": "nonblocking"}
    assert "socklab_result" not in record["clients"][0] and record["clients"][0]["name"] == "sender"
    assert [(e["name"], e["passed"]) for e in record["expectations"]] == [
        ("partial", True), ("delivered", True)]
    assert [e["name"] for e in make_record(blocking, 0, 1000, 1e6)["expectations"]] == ["delivered"]
    assert records.record_passed(record)


def test_failed_case_is_not_evaluated_and_does_not_pass():
    _, nonblocking = expand_cases(load_experiment_text(EXPERIMENT, "t.yaml"))
    record = make_record(nonblocking, 0, 400, 1e6, status="timeout")
    assert record["expectations"] == [] and not records.record_passed(record)


def test_summary_csv_gives_mean_stdev_and_t_interval_per_case():
    blocking, nonblocking = expand_cases(load_experiment_text(EXPERIMENT, "t.yaml"))
    recs = [make_record(blocking, r, 1000, g) for r, g in enumerate((1e6, 2e6, 3e6))]
    recs += [make_record(nonblocking, 0, 400, 5e6), make_record(nonblocking, 1, 0, 0, status="failed")]
    rows = list(csv.DictReader(io.StringIO(summarize_run([blocking, nonblocking], recs).csv_text())))
    assert [r["case"] for r in rows] == ["sender.mode=blocking", "sender.mode=nonblocking"]
    assert rows[0]["clients.sender.mode"] == "blocking"
    assert float(rows[0]["sender.goodput_bps.mean"]) == 2e6
    assert float(rows[0]["sender.goodput_bps.stdev"]) == 1e6
    # t(0.975, df=2) = 4.303: half-width 4.303 * 1e6 / sqrt(3)
    assert abs(float(rows[0]["sender.goodput_bps.ci95_high"]) - (2e6 + 4.303 * 1e6 / 3**0.5)) < 1e3
    assert rows[1]["runs"] == "2" and rows[1]["failed"] == "1"
    assert float(rows[1]["sender.bytes_accepted.mean"]) == 400
    assert rows[1]["sender.bytes_accepted.stdev"] == ""


def test_report_shows_each_case_and_each_expectation():
    experiment = load_experiment_text(EXPERIMENT, "t.yaml")
    blocking, nonblocking = expand_cases(experiment)
    recs = [make_record(blocking, 0, 1000, 2e6), make_record(nonblocking, 0, 400, 5e6)]
    text = report.render(LoadedRun.of(Path("t"), experiment, recs, {"shaping_backend": "netem"}))
    assert "| `sender.mode=nonblocking` | 1 | 400 |" in text
    assert "shaping backend: netem" in text
    assert text.count("— held") == 3

