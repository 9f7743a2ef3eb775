"""Is the link what was asked? Measured against configured, with the tolerances stated once.

Each client container probes its path to the server before its workload
(``socklab.linkprobe``): the round trip by UDP pings, and where a rate is set
on the path, the rate its bottleneck passes by a packet train. This module
judges one probe's result against what the path was configured to be (from
the links as applied at both ends), so a case run and ``lab.py link verify``
say the same thing about the same link. Pure functions: no Docker, no sockets.

Tolerances, and why:

- round trip: within 10 % of the configured delays, or 5 ms, whichever is
  larger, plus the configured jitter. The floor is what a path costs beyond
  its configured delays: a veth and a bridge, tenths of a ms; an emulated CPU
  (the VM tier), 1.3-3.4 ms measured on netem, as a process that waited wakes
  late. A link asked to add nothing is never off for being real; one whose
  delay did nothing is off from 5 ms up.
- rate: measured between 0.85 and 1.20 of the configured rate, in frame bytes
  as tbf counts them. Below is a bottleneck that passes less than asked (a
  queue that drops early, a delay line that cannot keep up); above is one that
  does not limit at all, through which the probe's train passes at the 1.5 it
  was sent at. The room above 1.0 is for a receiver that wakes late on an
  emulated CPU: it reads the train's first packets in a bunch, which shortens
  the span they are timed over (netem's 50 Mbit/s read as 1.17 of it once, in
  the VM tier, from a 0.15 s train). The packets' kernel stamps would not do:
  they are taken as a packet reaches the device, before the ingress shaping
  (ifb, the delay line) that the probe is there to measure.

Loss is not judged: a probe of tens of packets cannot tell 1 % from 2 %.
"""

from __future__ import annotations

from typing import Any, Mapping

RTT_TOLERANCE_FRACTION = 0.10
RTT_TOLERANCE_MS = 5.0
RATE_RATIO_LOW = 0.85
RATE_RATIO_HIGH = 1.20
TOLERANCE_TEXT = (f"round trip within {RTT_TOLERANCE_FRACTION:.0%} or {RTT_TOLERANCE_MS:g} ms of the configured "
                  f"delays plus their jitter; rate between {RATE_RATIO_LOW:g} and {RATE_RATIO_HIGH:g} of the "
                  "configured rate")
VERIFY_CHOICES = ("mark", "strict", "off")


def _ratio(measured: float | None, expected: float | None) -> float | None:
    if measured is None or not expected:
        return None
    return round(measured / expected, 3)


def _mbit(rate_bps: float) -> str:
    return f"{rate_bps / 1e6:.3g} Mbit/s"


def rtt_allowed_ms(expected_ms: float, jitter_ms: float = 0.0) -> float:
    """How far a measured round trip may sit from ``expected_ms`` (either way)."""
    return max(RTT_TOLERANCE_FRACTION * expected_ms, RTT_TOLERANCE_MS) + jitter_ms


def rate_ratio_ok(ratio: float) -> bool:
    """Whether a measured rate, as a ratio of the configured one, is within tolerance."""
    return RATE_RATIO_LOW <= ratio <= RATE_RATIO_HIGH


def judge(probe: Mapping[str, Any]) -> dict[str, Any]:
    """One probe's result (a ``probe`` result line) judged: measured beside expected, ratios, ``ok``.

    ``ok`` is True when everything measured is within tolerance, False when
    something is not (``problems`` says what, one sentence each), and None when
    nothing could be measured (``problems`` says why).
    """
    expected = probe.get("expected") or {}
    rtt = probe.get("rtt_ms") or {}
    measured_rtt = rtt.get("median")
    expected_rtt = float(expected.get("rtt_ms") or 0.0)
    jitter_ms = float(expected.get("jitter_ms") or 0.0)
    verdict: dict[str, Any] = {
        "rtt_ms": measured_rtt,
        "rtt_expected_ms": expected_rtt,
        "rtt_ratio": _ratio(measured_rtt, expected_rtt),
        "pings": {"sent": rtt.get("sent"), "received": rtt.get("received")} if rtt else None,
    }
    off: list[str] = []  # what is outside its tolerance
    judged = False
    if measured_rtt is not None:
        judged = True
        allowed_ms = rtt_allowed_ms(expected_rtt, jitter_ms)
        if abs(measured_rtt - expected_rtt) > allowed_ms:
            off.append(f"round trip {measured_rtt:.3g} ms where {expected_rtt:g} ms was configured "
                            f"(allowed ± {allowed_ms:.3g} ms)")
    for direction in ("up", "down"):
        want = expected.get(f"{direction}_rate_bps")
        got = (probe.get(direction) or {}).get("rate_bps")
        verdict[f"{direction}_rate_bps"] = got
        verdict[f"{direction}_expected_bps"] = want
        verdict[f"{direction}_ratio"] = ratio = _ratio(got, want)
        if ratio is not None:
            judged = True
            if not rate_ratio_ok(ratio):
                off.append(f"{direction} rate {_mbit(got)} where {_mbit(want)} was configured "
                                f"({ratio:g} of it)")
    verdict["rate_by"] = probe.get("rate_by")
    verdict["probe_s"] = probe.get("probe_s")
    verdict["ok"] = not off if judged else None
    problems = off + ([probe["error"]] if probe.get("error") else [])
    verdict["problems"] = problems or ([] if judged else ["the probe measured nothing"])
    return verdict


def case_link_ok(measured: Mapping[str, Mapping[str, Any]]) -> bool | None:
    """The case's ``link_ok``: False if any link is off, True if all judged ones hold, None if none was judged."""
    verdicts = [m.get("ok") for m in measured.values()]
    if any(v is False for v in verdicts):
        return False
    return True if any(v is True for v in verdicts) else None


def strict_failure(measured: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Under ``verify: strict``, the sentence that fails the case (None when every link was proven)."""
    for key, verdict in sorted(measured.items()):
        if verdict.get("ok") is not True:
            what = "is off" if verdict.get("ok") is False else "could not be verified"
            return (f"the link of {key} {what} ({'; '.join(verdict.get('problems') or ())}), "
                    "and the experiment says verify: strict")
    return None


def _rate_part(verdict: Mapping[str, Any], direction: str) -> str | None:
    got, want = verdict.get(f"{direction}_rate_bps"), verdict.get(f"{direction}_expected_bps")
    if got is None:
        return None
    if not want:
        return f"{direction} {got / 1e6:.3g} Mbit/s"
    ratio = verdict.get(f"{direction}_ratio")
    shown = f" ({ratio:.2f})" if ratio is not None else ""
    return f"{direction} {got / 1e6:.3g} of {want / 1e6:.3g} Mbit/s{shown}"


def verdict_text(verdict: Mapping[str, Any]) -> str:
    """One measured link beside its configuration, as the report, the run's summary and ``lab.py
    link verify`` print it: "RTT 100.4 ms of 100 ms configured (1.00), up 9.6 of 10 Mbit/s (0.96): ok",
    or ": off — what was off"."""
    parts = []
    if verdict.get("rtt_ms") is not None:
        expected, ratio = verdict.get("rtt_expected_ms"), verdict.get("rtt_ratio")
        rtt = f"RTT {verdict['rtt_ms']:.4g} ms"
        if expected:
            rtt += f" of {expected:g} ms configured" + (f" ({ratio:.2f})" if ratio is not None else "")
        parts.append(rtt)
    parts += [p for p in (_rate_part(verdict, d) for d in ("up", "down")) if p]
    ok = verdict.get("ok")
    state = {True: "ok", False: "off"}.get(ok, "not judged")
    problems = verdict.get("problems") or []
    tail = f" — {'; '.join(problems)}" if problems and ok is not True else ""
    # The probe runs before the workload: its time is the case's, never the socket calls'.
    cost = f" (probe {verdict['probe_s']:.2f} s)" if verdict.get("probe_s") is not None else ""
    return f"{', '.join(parts) or 'nothing measured'}{cost}: {state}{tail}"
