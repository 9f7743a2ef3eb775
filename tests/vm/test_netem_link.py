"""The netem backend on Debian's stock kernel, inside a VM: the same fidelity checks
the userspace backend passes on the host (tests/lab/test_userspace_link.py).

Every reference is measured in the same VM: a round trip is held against the
configured delay plus the round trip the VM measures with nothing shaped, so
what the emulated CPU adds to every packet cancels out. Every byte goes between
the containers of the VM's own lab network. The numbers each test measured are
printed (pytest -s, or when a test fails). Experiments run by `lab.py run` with
backend netem, seed-demo among them, are in test_backends_agree.py.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from labkit import linkcheck
from socklab.shaping.plan import tcp_ceiling_bps
from tests.unit.test_delayline import binomial_interval

from .guestlab import (ATTEMPTS, ECHO, EMULATED_TIMEOUT, GuestProject, echo_project, holds_past, in_tree,
                       netem_qdiscs, unshaped_after_idle)

# The first test of a session also waits for the image (built once, ~6 min) and the boots.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

BULK = ["--mode", "blocking", "--workload", "bulk"]


def within(measured: float, expected: float, tolerance: float) -> bool:
    return abs(measured - expected) <= tolerance


@pytest.fixture(scope="module")
def bulk_lab(netem_vm):
    lab = GuestProject(netem_vm)
    yield lab
    lab.down()


@pytest.fixture(scope="module")
def netem_echo(netem_vm):
    """guestlab.echo_project in the netem VM."""
    lab = echo_project(netem_vm)
    yield lab
    lab.down()


@pytest.fixture(scope="module")
def unshaped_rtt_ms(netem_echo) -> float:
    """The VM's round trip between two containers with nothing shaped: the median of three medians."""
    medians = [netem_echo.client([], *ECHO, "--requests", "40")["client"]["latency_ms"]["p50"] for _ in range(3)]
    print(f"unshaped ping-pong p50: {medians} ms")
    return statistics.median(medians)


DELAYS = [(5, "up"), (5, "both"), (20, "up"), (20, "both"), (100, "up"), (100, "both")]


def test_delay_fidelity_rtt_against_the_unshaped_vm(netem_echo):
    """Each delay's round trip (TCP_INFO and the ping-pong's p50) within max(1 ms, 5 %) of the
    configured delay plus the unshaped round trip after as long idle, measured just before. An
    attempt that misses, or whose spread (p90 - p50) is wider than that tolerance past the
    unshaped run's own spread, is measured again, up to ATTEMPTS; the last one is judged. The
    unshaped spread is the VM's noise in the same attempt, not netem's jitter: on one slower CI
    machine, two 5 ms attempts that held were measured again for a spread over 1 ms, and the
    unshaped p50 alone moved from 4.3 to 8.1 ms between attempts."""
    rows, failures = [], []
    for delay_ms, directions in DELAYS:
        key = {"up": "up.delay", "both": "delay"}[directions]
        configured_ms = delay_ms * (2 if directions == "both" else 1)
        requests = 30 if configured_ms <= 50 else 15
        for attempt in range(1, ATTEMPTS + 1):
            unshaped = unshaped_after_idle(netem_echo, configured_ms, requests)
            expected_ms = configured_ms + unshaped["p50"]
            tolerance_ms = max(1.0, 0.05 * expected_ms)
            results = netem_echo.client([f"{key}={delay_ms}ms"], *ECHO, "--requests", str(requests))
            latency = results["client"]["latency_ms"]
            tcp_ms, p50_ms = results["client"]["tcp"]["rtt_ms"], latency["p50"]
            held = within(tcp_ms, expected_ms, tolerance_ms) and within(p50_ms, expected_ms, tolerance_ms)
            spread_ms, unshaped_spread_ms = latency["p90"] - p50_ms, unshaped["p90"] - unshaped["p50"]
            rows.append(f"{delay_ms:>4} ms {directions:<4}: expected {expected_ms:8.3f} ms (configured + unshaped "
                        f"{unshaped['p50']:.3f} after as long idle); TCP_INFO {tcp_ms:8.3f} ms, "
                        f"ping-pong p50 {p50_ms:8.3f} ms "
                        f"(ratio {p50_ms / expected_ms:.4f}; ±{tolerance_ms:.2f} ms; p90 - p50 {spread_ms:.3f} ms, "
                        f"unshaped {unshaped_spread_ms:.3f}; attempt {attempt})")
            if held and spread_ms <= tolerance_ms + unshaped_spread_ms:
                break
        netems = netem_qdiscs(results["link"])
        assert set(netems) == ({"up", "down"} if directions == "both" else {"up"}), netems
        assert results["link"]["backend"] == "netem" and results["link"]["delay_line"] is None, results["link"]
        if not held:
            failures.append(rows[-1])
    print("\n".join(rows))
    assert not failures, "\n".join(failures)


def test_jitter_spreads_round_trips_as_netems_uniform_model(netem_echo, unshaped_rtt_ms):
    """netem without a distribution table draws each packet's delay uniformly from
    [delay - jitter, delay + jitter]. A ping-pong's round trip is that draw plus what the VM
    adds; where the jitter is wide against the spread of what the VM adds, the round trip's
    percentiles are the draw's moved by its mean, so the model's spreads hold: the 90th
    percentile 0.8 jitter above the median, the 99th 0.98 jitter above it, and the mean on
    the median. With 400 draws their standard errors are about 5 % of the jitter.

    Hence ±50 ms: an emulated CPU spreads a round trip of its own. With two vCPUs (the lab
    VM's) a 20 ms round trip with no jitter had p99 - p50 of 7-9 ms, and under ±10 ms p99 -
    p50 read 12.1-13.2 ms in six runs of six (model 9.8 ± 2.0; one vCPU, this VM's, read 9.4
    and 10.1). Under ±50 ms both held: p90 - p50 35.5-44.7 and p99 - p50 44.4-53.4 in seven
    runs of 400 on two vCPUs, 35.6-43.7 and 46.6-52.1 in two runs of 300 on one (models 40 ± 8
    and 49 ± 9.8). An attempt that misses is measured again, up to ATTEMPTS."""
    delay_ms, jitter_ms = 100.0, 50.0
    rows = []
    for attempt in range(1, ATTEMPTS + 1):
        results = netem_echo.client([f"up.delay={delay_ms:g}ms", f"up.jitter={jitter_ms:g}ms"], *ECHO,
                                    "--requests", "400")
        latency = results["client"]["latency_ms"]
        up = netem_qdiscs(results["link"])["up"]
        assert up["options"]["delay"]["jitter"] == jitter_ms / 1000, up["options"]
        spread_90_ms = latency["p90"] - latency["p50"]
        spread_99_ms = latency["p99"] - latency["p50"]
        rows.append(f"delay {delay_ms:g} ms jitter {jitter_ms:g} ms up: p50 {latency['p50']:.3f} (delay + unshaped "
                    f"{delay_ms + unshaped_rtt_ms:.3f}), mean {latency['mean']:.3f}, p90 - p50 {spread_90_ms:.3f} "
                    f"(model {0.8 * jitter_ms:.3f}), p99 - p50 {spread_99_ms:.3f} (model {0.98 * jitter_ms:.3f}), "
                    f"max {latency['max']:.3f} ms; netem {up['options']} (attempt {attempt})")
        held = (within(spread_90_ms, 0.8 * jitter_ms, 0.2 * 0.8 * jitter_ms)
                and within(spread_99_ms, 0.98 * jitter_ms, 0.2 * 0.98 * jitter_ms)
                and within(latency["mean"], latency["p50"], 0.1 * jitter_ms))
        if held:
            break
    print("\n".join(rows))
    assert held, "\n".join(rows)


# Echo requests of 64 bytes: each is one packet, and so is each reply and ACK.
# (A bulk transfer would not do: netem counts a GSO packet as one drop but as all
# its segments when it passes, so drops and packets would not be of one unit.)
# 1 % of about 2,000 packets and 5 % of about 800 make enough drops for the
# binomial interval to mean something, and few enough retransmission timeouts.
LOSS_REQUESTS = {1: 1000, 5: 400}


@pytest.mark.parametrize("loss_pct", [1, 5])
def test_loss_is_counted_by_the_qdisc_binomially_and_tcp_retransmits(netem_echo, loss_pct):
    requests = LOSS_REQUESTS[loss_pct]
    # A count outside a 99 % interval happens once in a hundred honest runs; such a
    # run is measured once more, and the second must be inside.
    for attempt in (1, 2):
        results = netem_echo.client([f"loss={loss_pct}%"], *ECHO, "--requests", str(requests))
        netems = netem_qdiscs(results["link"])
        assert set(netems) == {"up", "down"}, netems
        # Both directions draw with the same probability: their sum is one binomial.
        offered = sum(q["packets"] + q["drops"] + q["qlen"] for q in netems.values())
        dropped = sum(q["drops"] for q in netems.values())
        low, high = binomial_interval(offered, loss_pct / 100)
        retrans = results["client"]["tcp"]["retrans"]
        print(f"loss {loss_pct}% (attempt {attempt}): netem dropped {dropped} of {offered} packets "
              f"(99 % binomial interval {low}..{high}; up {netems['up']['drops']}, down {netems['down']['drops']}),"
              f" client tcp.retrans {retrans}, {results['client']['latency_ms']['count']} round trips")
        if low <= dropped <= high:
            break
    assert results["client"]["latency_ms"]["count"] == requests
    assert low <= dropped <= high
    assert retrans > 0


def test_rate_and_delay_reach_the_tcp_ceiling(bulk_lab):
    unshaped = bulk_lab.client([], *BULK, "--bytes", "20MB")["client"]["goodput_bps"]
    # 13 s on the link: slow start over the 100 ms round trip (about 0.4 s below the
    # rate) costs 3 % of it, where over 8 MB it cost the 5 % the bound allows.
    results = bulk_lab.client(["rate=10mbit", "delay=50ms"], *BULK, "--bytes", "16MB")
    goodput_bps = results["client"]["goodput_bps"]
    ceiling_bps = tcp_ceiling_bps(10e6)
    print(f"10mbit + 50 ms each way: goodput {goodput_bps / 1e6:.3f} Mbit/s = {goodput_bps / ceiling_bps:.3f} "
          f"x the TCP ceiling {ceiling_bps / 1e6:.3f}; unshaped in this VM {unshaped / 1e6:.1f} Mbit/s")
    # The VM's own speed is far above the link's, so the link is what limits.
    assert unshaped > 3 * ceiling_bps
    assert 0.95 <= goodput_bps / ceiling_bps <= 1.0
    # eth0 also holds the ingress qdisc whose redirect feeds the down direction's ifb.
    assert {q["kind"] for q in results["link"]["qdisc"]["eth0"]} == {"ingress", "tbf", "netem"}


def test_a_limit_that_overflows_drops_and_counts(bulk_lab):
    # netem holds every packet for 50 ms: at the VM's unshaped speed that is far more than 8.
    results = bulk_lab.client(["up.delay=50ms", "up.limit=8"], *BULK, "--bytes", "4MB")
    up = netem_qdiscs(results["link"])["up"]
    retrans = results["client"]["tcp"]["retrans"]
    print(f"limit 8 behind 50 ms: netem dropped {up['drops']} of {up['packets'] + up['drops']}, "
          f"tcp.retrans {retrans}, goodput {results['client']['goodput_bps'] / 1e6:.3f} Mbit/s")
    # The drops happen at the sender's own qdisc: its TCP is told at once and sends the
    # segment again later as new, so tcp.retrans need not count them (0 in the runs here).
    assert up["options"].get("limit") == 8, up["options"]
    assert results["client"]["bytes_delivered"] == 4_000_000
    assert up["drops"] > 0


def test_each_direction_has_its_own_shape(bulk_lab, unshaped_rtt_ms):
    results = bulk_lab.client(["up.rate=5mbit", "down.delay=30ms"], *BULK, "--bytes", "4MB")
    qdiscs = results["link"]["qdisc"]
    up_kinds = {q["kind"] for q in qdiscs["eth0"]}
    down = netem_qdiscs(results["link"])
    goodput_bps = results["client"]["goodput_bps"]
    tcp_ms = results["client"]["tcp"]["rtt_ms"]
    print(f"up 5mbit, down 30 ms: goodput {goodput_bps / 1e6:.3f} Mbit/s "
          f"({goodput_bps / tcp_ceiling_bps(5e6):.3f} x ceiling); TCP rtt {tcp_ms:.2f} ms; up qdiscs {up_kinds}")
    assert up_kinds == {"ingress", "tbf"} and set(down) == {"down"}
    assert 0.93 <= goodput_bps / tcp_ceiling_bps(5e6) <= 1.0
    # A bulk upload queues in tbf, so its RTT is at least the down delay, and more by the queue.
    assert tcp_ms >= 30 + unshaped_rtt_ms - 1


def test_link_set_changes_a_running_netem_link(netem_echo):
    step_tolerance_ms = max(1.0, 0.05 * 40)
    # The change is what this test is about: 2 x 20 ms more on the round trip, from one
    # link to the next in the same container. How close each sits to its configured
    # delay is the delay test's. As there, a step off by the emulated CPU's noise is
    # measured once more (39.242 ms against 41.245 ± 2 once: the 10 ms link's p50 2 ms high),
    # with its references: each round trip is judged against the unshaped one after as long
    # an idle wait (unshaped_after_idle), measured first in each attempt, as applying no link
    # resets it (on a loaded host one 60 ms reference read 6.7 ms, 4.3 above the 20 ms one, and
    # three steps of 36.6-40.6 ms missed the 44.3 ± 2 it predicted).
    for attempt in range(1, ATTEMPTS + 1):
        unshaped_ms = {rtt_ms: unshaped_after_idle(netem_echo, rtt_ms, 20)["p50"] for rtt_ms in (20, 60)}
        step_ms = 40 + unshaped_ms[60] - unshaped_ms[20]
        netem_echo.shape("apply", "backend=netem", "delay=10ms")
        before_ms = netem_echo.run_client(*ECHO, "--requests", "20")["latency_ms"]["p50"]
        changed = in_tree(netem_echo.vm, ["python3", "lab.py", "link", "--project", netem_echo.name, "set",
                                          "client", "delay=30ms"]).check().stdout
        after_ms = netem_echo.run_client(*ECHO, "--requests", "20")["latency_ms"]["p50"]
        print(f"delay 10 -> 30 ms by `lab.py link set` ({changed.strip()}): p50 {before_ms:.3f} -> {after_ms:.3f} "
              f"ms; unshaped after 20 / 60 ms idle {unshaped_ms[20]:.3f} / {unshaped_ms[60]:.3f} ms, so the step "
              f"expected {step_ms:.3f} ms (attempt {attempt})")
        assert "backend netem, changed in place" in changed
        if within(after_ms - before_ms, step_ms, step_tolerance_ms):
            break
    shown = netem_echo.link()
    assert within(after_ms - before_ms, step_ms, step_tolerance_ms), (before_ms, after_ms)
    for measured, configured in ((before_ms, 20), (after_ms, 60)):
        expected = configured + unshaped_ms[configured]
        assert within(measured, expected, max(2.0, 0.1 * expected)), (measured, expected)
    assert shown["applied"]["up"]["delay_ms"] == shown["applied"]["down"]["delay_ms"] == 30.0
    assert set(netem_qdiscs(shown)) == {"up", "down"}


ROOT = Path(__file__).resolve().parents[2]
# The userspace link test's schedule step (10 -> 30 ms each way), with the backend left to auto.
LINK_STEP = ROOT / "tests" / "link-step.yaml"


def test_a_schedule_step_changes_a_netem_link_during_a_case_and_auto_picks_netem(netem_vm):
    netem_vm.put("/root/link-step.yaml", LINK_STEP.read_bytes())
    out = "/root/runs/link-step"
    done = in_tree(netem_vm, ["python3", "lab.py", "run", "/root/link-step.yaml", *EMULATED_TIMEOUT, "--out", out],
                     timeout_s=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (run,) = netem_vm.sh(f"ls -d {out}/link-step/*").stdout.split()
    (record,) = [json.loads(line) for line in netem_vm.get(f"{run}/cases.jsonl").decode().splitlines()]
    latency = record["clients"][0]["latency_ms"]
    print(f"schedule 10 -> 30 ms: p50 {latency['p50']:.2f} ms, max {latency['max']:.2f} ms")
    assert json.loads(netem_vm.get(f"{run}/meta.json"))["shaping_backend"] == "netem"
    assert record["link"]["backend"] == "netem" and record["link"]["delay_line"]["pinger"] is None
    assert record["expectations"][0]["passed"], record["expectations"]


def test_the_link_probe_proves_a_netem_link_and_catches_one_whose_ingress_filter_is_gone(netem_echo):
    link = ["delay=20ms", "rate=5mbit"]
    try:
        unshaped_probe_rtt_ms = netem_echo.probe([])["rtt_ms"]
        proven = netem_echo.probe_until_held(link, unshaped_probe_rtt_ms)
        # The down direction's qdiscs are in place on ifb0, but nothing sends them a packet: the
        # ingress redirect that feeds them is gone (the netem wrappers' "filter that never matched").
        broken = netem_echo.probe(link, "tc qdisc del dev eth0 ingress")
    finally:
        netem_echo.shape("apply")
    # Judged past the probe's own unshaped round trip here (guestlab.holds_past): this 40 ms of
    # netem probed 47.3 with 2.6 unshaped once, where linkcheck alone allows 45.
    assert holds_past(proven[-1], unshaped_probe_rtt_ms), proven
    assert proven[-1]["rtt_expected_ms"] == 40 and proven[-1]["up_expected_bps"] == 5e6
    assert proven[-1]["down_expected_bps"] == 5e6
    assert broken["ok"] is False, broken
    # Only the up direction's 20 ms delays a round trip; the down train passes at the rate it was sent.
    assert broken["rtt_ms"] < 30 and broken["down_ratio"] > 1.3 and linkcheck.rate_ratio_ok(broken["up_ratio"]), broken
