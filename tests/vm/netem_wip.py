"""NOT COLLECTED (work in progress, issue 13 steps 2-3): seed-demo via lab.py and the netem
fidelity tests, inside a VM. Rename to test_netem_link.py once they pass.

Measured in the one full run they had (2026-12-04, the host shared with other jobs):
- RTT: every point 1.4-3.5 ms above configured + unshaped (5 up 7.41 vs 6.04; 5 both 12.90
  vs 11.04; 20 up 22.58 vs 21.04; 20 both 44.58 vs 41.04; 100 up 103.53 vs 101.04; 100 both
  203.93 vs 201.04 ms): about 1.5 ms per delayed direction that an emulated timer adds, so
  ±max(1 ms, 5 %) holds at 100 ms and misses at 5 and 20 ms.
- loss: qdisc `packets` counts GSO segments while `drops` counts whole GSO skbs (1 of 2821 at
  1 %, 47 of 2845 at 5 %): the binomial check needs one packet per skb, e.g. an echo
  workload of small requests instead of a bulk.
- rate + delay: 0.617 of the ceiling, the "unshaped" bulk only 5.4 Mbit/s, and up 5mbit at
  0.218 of its ceiling: all right after the loss tests in the same kept client container,
  whose kernel remembered the lossy path's ssthresh. GuestProject.client now flushes the TCP
  metrics first (as --reuse does); not yet run since.
- limit 8 behind 50 ms up: netem dropped 30 of 2800 packets (counted), tcp.retrans 0.
- link set (10 -> 30 ms on the kept client) and the schedule step: failed; the schedule's
  case "failed" after 122 s at `docker compose up -d` of its case project (slow under TCG).
- seed-demo via `lab.py run`: with backend netem, labkit's runner crashed on
  requests.ReadTimeout (read timeout=0.2) from docker_api.wait, which under TCG's slow engine
  raises instead of meaning "still running" (a labkit fix: treat that timeout as not yet
  exited). With auto (netem picked), the run completed, but "a blocking send() lasts about as
  long as the link needs" did not hold (send_s 1.455 s for 20 MB). Before that, lab.py could
  not run at all without git (_git_revision raises when git is missing): git is in the image.
- Durations of that run (host shared, load ~4): tier 30 min; demo 201 s, RTT test 196 s,
  seed-demo 104-149 s each, schedule 266 s; boot 24 s + dockerd 25 s + lab image 39 s.
"""

from __future__ import annotations

import json
import statistics

import pytest

from tests.unit.test_delayline import binomial_interval

from .guestlab import GuestProject, in_tree, netem_qdiscs

# The first test of a session also waits for the image (built once, ~6 min) and the boots.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

TCP_CEILING = 1448 / 1514
ECHO = ["--mode", "blocking", "--workload", "echo", "--size", "64"]
BULK = ["--mode", "blocking", "--workload", "bulk"]


def within(measured: float, expected: float, tolerance: float) -> bool:
    return abs(measured - expected) <= tolerance


@pytest.fixture(scope="module")
def echo_lab(lab_vm):
    lab = GuestProject(lab_vm, "--workload", "echo")
    yield lab
    lab.down()


@pytest.fixture(scope="module")
def bulk_lab(lab_vm):
    lab = GuestProject(lab_vm)
    yield lab
    lab.down()


@pytest.fixture(scope="module")
def unshaped_rtt_ms(echo_lab) -> float:
    """The VM's round trip between two containers with nothing shaped: the median of three medians."""
    medians = [echo_lab.client([], *ECHO, "--requests", "40")["client"]["latency_ms"]["p50"] for _ in range(3)]
    print(f"unshaped ping-pong p50: {medians} ms")
    return statistics.median(medians)


DELAYS = [(5, "up"), (5, "both"), (20, "up"), (20, "both"), (100, "up"), (100, "both")]
ATTEMPTS = 2


def test_delay_fidelity_rtt_against_the_unshaped_vm(echo_lab, unshaped_rtt_ms):
    rows, failures = [], []
    for delay_ms, directions in DELAYS:
        key = {"up": "up.delay", "both": "delay"}[directions]
        expected_ms = delay_ms * (2 if directions == "both" else 1) + unshaped_rtt_ms
        tolerance_ms = max(1.0, 0.05 * expected_ms)
        requests = "30" if expected_ms <= 50 else "15"
        for attempt in range(1, ATTEMPTS + 1):
            results = echo_lab.client([f"{key}={delay_ms}ms"], *ECHO, "--requests", requests)
            latency = results["client"]["latency_ms"]
            # An emulated CPU sometimes holds a packet: a spread means the host, not netem; measure again.
            if latency["p90"] - latency["p50"] <= tolerance_ms:
                break
        netems = netem_qdiscs(results["link"])
        assert set(netems) == ({"up", "down"} if directions == "both" else {"up"}), netems
        assert results["link"]["backend"] == "netem" and results["link"]["delay_line"] is None, results["link"]
        tcp_ms, p50_ms = results["client"]["tcp"]["rtt_ms"], latency["p50"]
        rows.append(f"{delay_ms:>4} ms {directions:<4}: expected {expected_ms:8.3f} ms (configured + unshaped "
                    f"{unshaped_rtt_ms:.3f}); TCP_INFO {tcp_ms:8.3f} ms, ping-pong p50 {p50_ms:8.3f} ms "
                    f"(ratio {p50_ms / expected_ms:.4f}; ±{tolerance_ms:.2f} ms; attempt {attempt})")
        if not (within(tcp_ms, expected_ms, tolerance_ms) and within(p50_ms, expected_ms, tolerance_ms)):
            failures.append(rows[-1])
    print("\n".join(rows))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("loss_pct", [1, 5])
def test_loss_is_counted_by_the_qdisc_binomially_and_tcp_retransmits(bulk_lab, loss_pct):
    results = bulk_lab.client([f"loss={loss_pct}%"], *BULK, "--bytes", "4MB")
    assert results["client"]["bytes_delivered"] == 4_000_000
    retrans = results["client"]["tcp"]["retrans"]
    print(f"loss {loss_pct}%: client tcp.retrans {retrans}")
    assert retrans > 0
    netems = netem_qdiscs(results["link"])
    assert set(netems) == {"up", "down"}
    for direction, qdisc in netems.items():
        # netem draws loss per packet it is given (a GSO packet is one draw) and counts each as a drop.
        offered = qdisc["packets"] + qdisc["drops"] + qdisc["qlen"]
        low, high = binomial_interval(offered, loss_pct / 100)
        print(f"  {direction}: {qdisc['drops']} of {offered} packets dropped (99 % binomial interval {low}..{high})")
        assert low <= qdisc["drops"] <= high, qdisc


def test_rate_and_delay_reach_the_tcp_ceiling(bulk_lab):
    unshaped = bulk_lab.client([], *BULK, "--bytes", "20MB")["client"]["goodput_bps"]
    results = bulk_lab.client(["rate=10mbit", "delay=50ms"], *BULK, "--bytes", "8MB")
    goodput_bps = results["client"]["goodput_bps"]
    ceiling_bps = 10e6 * TCP_CEILING
    print(f"10mbit + 50 ms each way: goodput {goodput_bps / 1e6:.3f} Mbit/s = {goodput_bps / ceiling_bps:.3f} "
          f"x the TCP ceiling {ceiling_bps / 1e6:.3f}; unshaped in this VM {unshaped / 1e6:.1f} Mbit/s")
    # The VM's own speed is far above the link's, so the link is what limits.
    assert unshaped > 3 * ceiling_bps
    assert 0.95 <= goodput_bps / ceiling_bps <= 1.0
    assert {q["kind"] for q in results["link"]["qdisc"]["eth0"]} == {"tbf", "netem"}


def test_a_limit_that_overflows_drops_and_counts(bulk_lab):
    # netem holds every packet for 50 ms: at the VM's unshaped speed that is far more than 8.
    results = bulk_lab.client(["up.delay=50ms", "up.limit=8"], *BULK, "--bytes", "4MB")
    up = netem_qdiscs(results["link"])["up"]
    retrans = results["client"]["tcp"]["retrans"]
    print(f"limit 8 behind 50 ms: netem dropped {up['drops']} of {up['packets'] + up['drops']}, "
          f"tcp.retrans {retrans}, goodput {results['client']['goodput_bps'] / 1e6:.3f} Mbit/s")
    assert up["options"].get("limit") == 8, up["options"]
    assert results["client"]["bytes_delivered"] == 4_000_000
    assert up["drops"] > 0 and retrans > 0


def test_each_direction_has_its_own_shape(bulk_lab, unshaped_rtt_ms):
    results = bulk_lab.client(["up.rate=5mbit", "down.delay=30ms"], *BULK, "--bytes", "4MB")
    qdiscs = results["link"]["qdisc"]
    up_kinds = {q["kind"] for q in qdiscs["eth0"]}
    down = netem_qdiscs(results["link"])
    goodput_bps = results["client"]["goodput_bps"]
    tcp_ms = results["client"]["tcp"]["rtt_ms"]
    print(f"up 5mbit, down 30 ms: goodput {goodput_bps / 1e6:.3f} Mbit/s "
          f"({goodput_bps / (5e6 * TCP_CEILING):.3f} x ceiling); TCP rtt {tcp_ms:.2f} ms; up qdiscs {up_kinds}")
    assert up_kinds == {"tbf"} and set(down) == {"down"}
    assert 0.93 <= goodput_bps / (5e6 * TCP_CEILING) <= 1.0
    # A bulk upload queues in tbf, so its RTT is at least the down delay, and more by the queue.
    assert tcp_ms >= 30 + unshaped_rtt_ms - 1


def test_link_set_changes_a_running_netem_link(echo_lab, unshaped_rtt_ms):
    echo_lab.shape("apply", "backend=netem", "delay=10ms")
    before_ms = echo_lab.run_client(*ECHO, "--requests", "20")["latency_ms"]["p50"]
    changed = in_tree(echo_lab.vm, ["python3", "lab.py", "link", "set", "--project", echo_lab.name, "client",
                                    "delay=30ms"]).check().stdout
    after_ms = echo_lab.run_client(*ECHO, "--requests", "20")["latency_ms"]["p50"]
    shown = echo_lab.link()
    print(f"delay 10 -> 30 ms by `lab.py link set` ({changed.strip()}): p50 {before_ms:.3f} -> {after_ms:.3f} ms")
    assert "backend netem, changed in place" in changed
    for measured, configured in ((before_ms, 20), (after_ms, 60)):
        expected = configured + unshaped_rtt_ms
        assert within(measured, expected, max(1.0, 0.05 * expected)), (measured, expected)
    assert shown["applied"]["up"]["delay_ms"] == shown["applied"]["down"]["delay_ms"] == 30.0
    assert set(netem_qdiscs(shown)) == {"up", "down"}


SCHEDULE = """\
name: netem-schedule
description: An echo client behind 10 ms of netem each way, raised to 30 ms a second into the case.
repeat: 1
timeout: 120s
server: {mode: threaded}
clients:
  - name: pinger
    mode: blocking
    workload: {kind: echo, requests: 40, size: 64, think: 20ms}
    link: {delay: 10ms, backend: netem}
schedule:
  - at: 1s
    target: clients.pinger
    link: {delay: 30ms}
expect:
  - name: round trips of both delays were seen
    check: "pinger.latency_ms.p50 > 15 and pinger.latency_ms.max > 55"
"""


def test_a_schedule_step_changes_a_netem_link_during_a_case(lab_vm):
    lab_vm.put("/root/netem-schedule.yaml", SCHEDULE.encode())
    out = "/root/runs/netem-schedule"
    done = in_tree(lab_vm, ["python3", "lab.py", "run", "/root/netem-schedule.yaml", "--out", out], timeout_s=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (run,) = lab_vm.sh(f"ls -d {out}/netem-schedule/*").stdout.split()
    (record,) = [json.loads(line) for line in lab_vm.get(f"{run}/cases.jsonl").decode().splitlines()]
    latency = record["clients"][0]["latency_ms"]
    print(f"schedule 10 -> 30 ms: p50 {latency['p50']:.2f} ms, max {latency['max']:.2f} ms")
    assert json.loads(lab_vm.get(f"{run}/meta.json"))["shaping_backend"] == "netem"
    assert record["link"]["backend"] == "netem" and record["link"]["delay_line"]["pinger"] is None
    assert record["expectations"][0]["passed"], record["expectations"]


# seed-demo's fast variant, with a delay so that the backend matters (rate alone
# is tbf on both backends).
SEED_FAST = ["--repeat", "1", "--set", "clients.sender.workload.bytes=20MB",
             "--set", "clients.sender.link.delay=5ms"]


@pytest.mark.parametrize("backend", ["netem", "auto"])
def test_seed_demo_runs_on_netem(lab_vm, backend):
    out = f"/root/runs/seed-{backend}"
    done = in_tree(lab_vm, ["python3", "lab.py", "run", "configs/seed-demo.yaml", *SEED_FAST,
                            "--set", f"clients.sender.link.backend={backend}", "--out", out], timeout_s=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run = lab_vm.sh(f"ls -d {out}/seed-demo/*").stdout.split()
    assert len(run) == 1, run
    meta = json.loads(lab_vm.get(f"{run[0]}/meta.json"))
    records = [json.loads(line) for line in lab_vm.get(f"{run[0]}/cases.jsonl").decode().splitlines()]
    assert meta["shaping_backend"] == "netem", meta
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    for record in records:
        assert record["link"]["backend"] == "netem", record["link"]
        assert all(v is None for v in record["link"]["delay_line"].values()), record["link"]["delay_line"]
        assert record["expectations"] and all(e["passed"] for e in record["expectations"]), record["expectations"]
