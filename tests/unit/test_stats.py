"""Summaries over repetitions, percentiles, and the names checks see."""

import math

import pytest

from labkit.stats import aggregate_group, aggregation, case_values, explain_unknown_name, summarize, t_critical_95
from socklab.percentile import latency_summary_ms, percentiles

# The record from SPEC.md's cases.jsonl schema, with a second replica added.
RECORD = {
    "schema": 1, "experiment": "seed-demo", "case": "sender.mode=nonblocking,sender.link.rate=10mbit",
    "params": {"clients.sender.mode": "nonblocking", "clients.sender.link.rate": "10mbit"},
    "repetition": 0, "status": "ok", "error": None, "wall_s": 3.2,
    "link": {"backend": "netem", "applied": {"sender": {"up": {}, "down": {}}}, "qdisc": {"sender": "..."}},
    "server": {"mode": "blocking", "connections": 2, "bytes_received": 5242880, "cpu_s": 0.01,
               "max_concurrent": 1},
    "clients": [
        {"name": "sender", "replica": 0, "mode": "nonblocking", "workload": "bulk",
         "bytes_requested": 136314880, "bytes_accepted": 2621440, "bytes_delivered": 2621440,
         "send_calls": 1, "eagain": 0, "blocked_s": 0.0004, "wall_s": 0.0009, "cpu_s": 0.001,
         "goodput_bps": None, "connect_s": 0.021, "latency_ms": None,
         "tcp": {"rtt_ms": 40.2, "retrans": 0, "snd_cwnd": 10}},
        {"name": "sender", "replica": 1, "mode": "nonblocking", "workload": "bulk",
         "bytes_requested": 136314880, "bytes_accepted": 2621440, "bytes_delivered": 2621440,
         "send_calls": 1, "eagain": 0, "blocked_s": 0.0006, "wall_s": 0.0011, "cpu_s": 0.003,
         "goodput_bps": None, "connect_s": 0.023, "latency_ms": None,
         "tcp": {"rtt_ms": 39.8, "retrans": 2, "snd_cwnd": 14}},
        {"name": "echoer", "replica": 0, "mode": "select", "workload": "echo",
         "bytes_requested": 1024000, "bytes_accepted": 1024000, "bytes_delivered": 1024000,
         "send_calls": 1000, "eagain": 3, "blocked_s": 1.5, "wall_s": 2.0, "cpu_s": 0.2,
         "goodput_bps": 4096000.0, "connect_s": 0.02, "latency_ms": {"p50": 40.1, "p99": 45.0},
         "tcp": {"rtt_ms": 40.0, "retrans": 0, "snd_cwnd": 10}},
    ],
    "expectations": [],
}


def test_summary_of_four_values_uses_t_with_three_degrees_of_freedom():
    summary = summarize([1, 2, 3, 4])
    stdev = math.sqrt(5 / 3)
    assert summary.n == 4
    assert summary.mean == 2.5
    assert summary.stdev == pytest.approx(stdev)
    half = 3.182446 * stdev / 2
    assert summary.ci95_low == pytest.approx(2.5 - half)
    assert summary.ci95_high == pytest.approx(2.5 + half)
    assert summary.ci95_high == pytest.approx(4.554, abs=1e-3)


def test_one_value_has_no_spread_and_none_has_no_mean():
    assert summarize([7]).mean == 7
    assert summarize([7]).stdev is None and summarize([7]).ci95_low is None
    assert summarize([]) == summarize([None]) == type(summarize([]))(0, None, None, None, None)


def test_none_entries_are_left_out():
    assert summarize([1, None, 3]).n == 2
    assert summarize([1, None, 3]).mean == 2


def test_identical_values_have_a_zero_width_interval():
    summary = summarize([5.0, 5.0, 5.0])
    assert summary.stdev == 0 and summary.ci95_low == summary.ci95_high == 5.0


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228), (29, 2.045),
                                   (30, 2.042), (31, 2.0395), (40, 2.0211), (60, 2.0003),
                                   (120, 1.9799), (10**6, 1.96)])
def test_t_critical_values(df, t):
    assert t_critical_95(df) == pytest.approx(t, abs=6e-4)


def test_t_is_continuous_past_the_table():
    assert t_critical_95(30) > t_critical_95(31) > t_critical_95(32)
    assert t_critical_95(30) - t_critical_95(31) < 0.01


def test_t_needs_a_degree_of_freedom():
    with pytest.raises(ValueError):
        t_critical_95(0)


def test_percentiles_are_nearest_rank_measured_values():
    values = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]  # order does not matter
    # Rank ceil(p/100 * n) of the sorted values, 1 for p = 0: always a value that was measured.
    assert percentiles(values, [0, 7, 50, 90, 91, 99, 100]) == {
        0: 1.0, 7: 1.0, 50: 5.0, 90: 9.0, 91: 10.0, 99: 10.0, 100: 10.0}
    # 7 % of 100 values is rank 7 exactly (7 / 100 * 100 is 7.000000000000001 in floats).
    assert percentiles(range(1, 101), [7]) == {7: 7.0}


def test_percentiles_of_one_value_and_of_none():
    assert percentiles([3], [50, 99]) == {50: 3.0, 99: 3.0}
    assert percentiles([], [50]) == {50: None}


def test_percentiles_outside_0_100_are_refused():
    with pytest.raises(ValueError):
        percentiles([1, 2], [101])


def test_the_clients_latency_summary_uses_the_one_definition():
    import random

    from socklab import clients
    rng = random.Random(12)
    for n in (1, 2, 3, 99, 100, 101, 1000, 4321):
        latencies_s = [rng.lognormvariate(-7, 1.2) for _ in range(n)]
        ordered = sorted(latencies_s)
        summary = latency_summary_ms(latencies_s)
        assert summary == clients.latency_summary(latencies_s)
        assert summary["p99"] == round(ordered[math.ceil(0.99 * n) - 1] * 1000, 3)


@pytest.mark.parametrize("field, how", [
    ("bytes_accepted", "total"), ("bytes_delivered", "total"), ("send_calls", "total"),
    ("eagain", "total"), ("timeouts", "total"), ("tcp.retrans", "total"),
    ("wall_s", "mean"), ("blocked_s", "mean"), ("goodput_bps", "mean"), ("tcp.rtt_ms", "mean"),
    ("latency_ms.p99", "mean"), ("tcp.snd_cwnd", "mean"),
])
def test_counts_are_totalled_and_times_and_rates_averaged(field, how):
    assert aggregation(field) == how


def test_aggregate_group_totals_counts_and_averages_times():
    senders = RECORD["clients"][:2]
    assert aggregate_group(senders, "bytes_accepted") == 5242880
    assert aggregate_group(senders, "tcp.retrans") == 2
    assert aggregate_group(senders, "blocked_s") == pytest.approx(0.0005)
    assert aggregate_group(senders, "tcp.rtt_ms") == pytest.approx(40.0)


def test_aggregate_group_is_none_when_any_record_lacks_the_field():
    senders = RECORD["clients"][:2]
    assert aggregate_group(senders, "goodput_bps") is None
    assert aggregate_group(senders, "nothing") is None
    assert aggregate_group([], "bytes_accepted") is None
    partial = [senders[0], {**senders[1], "bytes_delivered": None}]
    assert aggregate_group(partial, "bytes_delivered") is None


def test_case_values_flatten_a_record_into_check_names():
    values = case_values(RECORD)
    assert values["case.wall_s"] == 3.2
    assert values["server.bytes_received"] == 5242880
    assert values["server.connections"] == 2
    assert values["sender.bytes_accepted"] == 5242880
    assert values["sender.send_calls"] == 2
    assert values["sender.tcp.snd_cwnd"] == 12
    assert values["sender.goodput_bps"] is None
    assert values["echoer.latency_ms.p99"] == 45.0
    assert values["echoer.eagain"] == 3
    assert "sender.replica" not in values and "server.mode" not in values
    assert "sender.name" not in values and "sender.mode" not in values


def test_case_values_feed_a_check():
    from labkit.expr import compile_check
    check = compile_check("sender.send_calls == 2 and sender.bytes_accepted == server.bytes_received")
    assert check.evaluate(case_values(RECORD)).passed is True


def test_case_values_of_a_failed_case_have_no_clients():
    values = case_values({**RECORD, "clients": [], "server": None, "wall_s": None})
    assert values == {"case.wall_s": None}


@pytest.mark.parametrize("name", [
    "sender.bytes_accepted", "sender.tcp.rtt_ms", "sender.latency_ms.p99", "server.bytes_received",
    "case.wall_s", "echoer.goodput_bps",
])
def test_known_names(name):
    assert explain_unknown_name(name, ["sender", "echoer"]) is None


@pytest.mark.parametrize("name, fragment", [
    ("receiver.bytes_accepted", "does not start with a client group, server or case"),
    ("sender.bytes_sent", "is not a result of client group sender: use one of connections, bytes_requested"),
    ("server.bytes_accepted", "is not a result of the server"),
    ("case.cpu_s", "is not a result of the case: use one of wall_s"),
    ("sender.latency_ms.p99.x", "is not a result of client group sender"),
    ("sender", "is not a result of client group sender"),
])
def test_unknown_names_are_explained(name, fragment):
    assert fragment in explain_unknown_name(name, ["sender", "echoer"])
