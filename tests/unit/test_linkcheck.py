"""Judging a measured link against its configuration (labkit.linkcheck): the tolerances as stated."""

from __future__ import annotations

import pytest

from labkit import linkcheck


def probe(rtt_ms=None, expected_rtt_ms=100.0, jitter_ms=0.0, up=None, down=None, up_expected=None,
          down_expected=None, error=None) -> dict:
    return {
        "rtt_ms": None if rtt_ms is None else {"median": rtt_ms, "min": rtt_ms, "max": rtt_ms,
                                               "sent": 10, "received": 10},
        "expected": {"rtt_ms": expected_rtt_ms, "jitter_ms": jitter_ms, "up_rate_bps": up_expected,
                     "down_rate_bps": down_expected, "loss_pct": 0.0},
        "up": None if up is None else {"rate_bps": up},
        "down": None if down is None else {"rate_bps": down},
        "rate_by": "this container", "probe_s": 0.5, "error": error,
    }


# (probe, ok): at the edges of each tolerance, and past them.
CASES = [
    (probe(rtt_ms=100.4), True),
    (probe(rtt_ms=109.9), True),  # 10 % of 100 ms
    (probe(rtt_ms=110.2), False),
    (probe(rtt_ms=4.9, expected_rtt_ms=0.0), True),  # the 5 ms floor of an unshaped path
    (probe(rtt_ms=5.2, expected_rtt_ms=0.0), False),
    (probe(rtt_ms=44.9, expected_rtt_ms=40.0), True),  # 5 ms is more than 10 % of 40
    (probe(rtt_ms=45.1, expected_rtt_ms=40.0), False),
    (probe(rtt_ms=0.2, expected_rtt_ms=100.0), False),  # a delay that did nothing
    (probe(rtt_ms=118.0, jitter_ms=10.0), True),  # jitter widens the band
    (probe(rtt_ms=40.0, expected_rtt_ms=40.0, up=8.6e6, up_expected=10e6), True),
    (probe(rtt_ms=40.0, expected_rtt_ms=40.0, up=8.4e6, up_expected=10e6), False),
    (probe(rtt_ms=40.0, expected_rtt_ms=40.0, down=11.9e6, down_expected=10e6), True),
    (probe(rtt_ms=40.0, expected_rtt_ms=40.0, down=12.1e6, down_expected=10e6), False),
    (probe(rtt_ms=40.0, expected_rtt_ms=40.0, down=15.0e6, down_expected=10e6), False),  # no limit at all
    (probe(error="no answer from the link probe responder at server:5000 within 3 s"), None),
]


@pytest.mark.parametrize("measured, ok", CASES)
def test_judge_holds_each_tolerance_at_its_edge(measured, ok):
    verdict = linkcheck.judge(measured)
    assert verdict["ok"] is ok, verdict
    assert bool(verdict["problems"]) == (ok is not True)


def test_a_verdict_carries_measured_beside_expected_with_ratios():
    verdict = linkcheck.judge(probe(rtt_ms=101.0, up=9.5e6, up_expected=10e6))
    assert verdict["rtt_ms"] == 101.0 and verdict["rtt_expected_ms"] == 100.0 and verdict["rtt_ratio"] == 1.01
    assert verdict["up_ratio"] == 0.95 and verdict["down_ratio"] is None
    assert verdict["probe_s"] == 0.5
    assert linkcheck.verdict_text(verdict) == ("RTT 101 ms of 100 ms configured (1.01), up 9.5 of 10 Mbit/s (0.95) "
                                               "(probe 0.50 s): ok")


def test_an_off_link_says_what_is_off_in_one_line():
    verdict = linkcheck.judge(probe(rtt_ms=0.21))
    assert verdict["problems"] == ["round trip 0.21 ms where 100 ms was configured (allowed ± 10 ms)"]
    assert linkcheck.verdict_text(verdict).endswith(": off — round trip 0.21 ms where 100 ms was configured "
                                                    "(allowed ± 10 ms)")


def test_the_case_is_off_if_any_link_is_and_strict_names_the_first():
    good, bad = linkcheck.judge(probe(rtt_ms=100.0)), linkcheck.judge(probe(rtt_ms=0.2))
    unknown = linkcheck.judge(probe(error="no answer"))
    assert linkcheck.case_link_ok({"a": good, "b": bad}) is False
    assert linkcheck.case_link_ok({"a": good, "b": unknown}) is True
    assert linkcheck.case_link_ok({"b": unknown}) is None
    assert linkcheck.strict_failure({"a": good}) is None
    assert linkcheck.strict_failure({"a": good, "b": bad}).startswith("the link of b is off (round trip 0.2 ms")
    assert "could not be verified (no answer)" in linkcheck.strict_failure({"b": unknown})
