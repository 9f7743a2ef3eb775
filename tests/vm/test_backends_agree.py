"""netem and the userspace delay line held against each other on one kernel.

The same experiments run in the same VM (Debian's stock kernel, which has both
sch_netem and NFQUEUE) once with every link on ``backend: netem`` and once on
``backend: userspace``: every expectation of each experiment must hold on both,
and the figures that the backend makes must agree (connect times over a long
link, goodput through rate + delay, window-limited goodput, round trips and
retransmissions under loss). The two runs of each experiment are then put side
by side by `lab.py compare`, on the host, from the run directories alone.

Each experiment runs a narrowed variant (``--set`` fixes a swept key), so the
pair costs minutes under an emulated CPU; `--reuse` keeps containers between
the cases that can share them.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from labkit import linkcheck
from socklab import linkprobe
from socklab.shaping.model import LinkChanges, assignments_from_changes
from socklab.shaping.plan import tcp_ceiling_bps
from tests.unit.test_delayline import binomial_interval

from .guestlab import ATTEMPTS, EMULATED_TIMEOUT, holds_past, in_tree, unshaped_after_idle

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("netem", "userspace")

# name: (the narrowing, the links whose backend is set)
EXPERIMENTS = {
    # The tutorial, and a rate + delay bulk: 10 MB over 10 Mbit/s with 20 ms each way (the
    # delay line is a process on an emulated CPU: its limit there is far below the host's).
    "seed-demo": (["--set", "clients.sender.workload.bytes=10MB", "--set", "clients.sender.link.rate=10mbit",
                   "--set", "clients.sender.link.delay=20ms"], ["clients.sender.link"]),
    # The stop button over 500 ms each way, blocking and non-blocking, SYNs not lost.
    "stop-connect": (["--set", "clients.caller.link.up.loss=0%"], ["clients.caller.link"]),
    # 5 % loss on the server's link.
    "lossy-link": (["--set", "server.link.loss=5%", "--set", "clients.big.workload.requests=20",
                    "--set", "clients.small.workload.requests=100"],
                   ["server.link", "clients.big.link", "clients.small.link"]),
    # A 64 KiB receive window over a 100 ms round trip. 16 MB: the slow start weighs little
    # against the experiment's floor (0.8 window / RTT); 4.44-4.81 Mbit/s measured here, on
    # both backends, against a floor of 4.19 (0.85 had been missed by 0.4 %). The link at
    # 20 Mbit/s, not the experiment's 50: the window (5.2 Mbit/s) stays the limit, and the link
    # probe can time it. Its trains are 1,200-byte datagrams sent and read by Python, and on an emulated
    # CPU that is slower than 50 Mbit/s: a netem link of 50 was measured at 28-41 Mbit/s
    # in three runs on one CI machine (20 measured 20.1), and judged off by the probe's own limit.
    "send-buffer": (["--set", "clients.sender.mode=blocking", "--set", "clients.sender.sndbuf=1MiB",
                     "--set", "server.rcvbuf=64KiB", "--set", "clients.sender.workload.bytes=16MB",
                     "--set", "clients.sender.link.rate=20mbit"],
                    ["clients.sender.link"]),
}
# What a run directory needs to be read back (report, compare); traces stay in the VM.
RUN_FILES = ("experiment.yaml", "meta.json", "cases.jsonl", "summary.csv")


def _fetch_run(vm, run_dir: str, into: Path) -> Path:
    """Copy ``run_dir``'s files (no traces) from the VM to ``into``/<its name>."""
    vm.sh(f"tar -czf /tmp/run.tgz -C {run_dir} {' '.join(RUN_FILES)}")
    target = into / Path(run_dir).name
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(vm.get("/tmp/run.tgz")), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return target


def _run(vm, backend: str, name: str, host: Path, out: str, fixed: tuple[str, ...] = ()) -> Path:
    """Experiment ``name``, narrowed (EXPERIMENTS) and by ``fixed`` (--set words) on top, on
    ``backend`` in ``vm`` with its output under ``out`` there (which must not hold a run of
    ``name`` yet); its run directory, copied under ``host``/<backend>."""
    narrowing, links = EXPERIMENTS[name]
    argv = ["python3", "lab.py", "run", f"configs/{name}.yaml", "--repeat", "1", "--reuse", "--no-trace",
            "--no-plots", *EMULATED_TIMEOUT, *narrowing, *fixed,
            *[word for link in links for word in ("--set", f"{link}.backend={backend}")], "--out", out]
    done = in_tree(vm, argv, timeout_s=900)
    print(f"{name} on {backend} ({vm.name}):\n{done.stdout[-1500:]}")
    # 1: a case failed or an expectation did not hold. Its record is kept and judged by the test
    # about it (test_every_case_holds_its_expectations_on_both_backends), not by every test here.
    assert done.returncode in (0, 1), done.stdout[-4000:] + done.stderr[-2000:]
    (run_dir,) = vm.sh(f"ls -d {out}/{name}/*").stdout.split()
    return _fetch_run(vm, run_dir, host / backend)


def _run_all(vm, backend: str, host: Path) -> dict[str, Path]:
    """Every experiment on ``backend`` in ``vm``, one after the other; run directories on the host."""
    return {name: _run(vm, backend, name, host, f"/root/backends/{backend}") for name in EXPERIMENTS}


@pytest.fixture(scope="module")
def runs(lab_vm, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Every experiment run on each backend in the VM, one after the other (two VMs at once
    on this 2-core host slowed each emulated CPU enough to move window-limited goodput);
    run directories copied to the host."""
    host = tmp_path_factory.mktemp("backends")
    by_backend = {backend: _run_all(lab_vm, backend, host) for backend in BACKENDS}
    return {name: {backend: by_backend[backend][name] for backend in BACKENDS} for name in EXPERIMENTS}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]


def case(run: Path, **params: str) -> dict:
    """The one record whose swept parameters include ``params`` (keys without their 'clients.' prefix)."""
    chosen = [r for r in records(run)
              if all(r["params"].get(k) == v or r["params"].get(f"clients.{k}") == v for k, v in params.items())]
    assert len(chosen) == 1, (params, [r["params"] for r in records(run)])
    return chosen[0]


def client(record: dict, group: str) -> dict:
    (found,) = [c for c in record["clients"] if c["name"] == group]
    return found


def test_every_case_holds_its_expectations_on_both_backends(runs):
    for name, by_backend in runs.items():
        for backend, run in by_backend.items():
            meta = json.loads((run / "meta.json").read_text())
            assert meta["shaping_backend"] == backend, (name, meta)
            for record in records(run):
                assert record["status"] == "ok", (name, backend, record["error"])
                assert record["link"]["backend"] == backend
                assert record["expectations"] and all(e["passed"] for e in record["expectations"]), \
                    (name, backend, record["expectations"])


def path_link_words(applied: dict, key: str) -> list[str]:
    """Shape words that give client ``key`` alone the path a case's links made between it and the
    server (``applied``: the record's link.applied): each direction's two legs (linkprobe.path_legs)
    in one, the delays and jitters added, the slower rate, the losses compounded."""
    changes = LinkChanges()
    for direction, legs in linkprobe.path_legs(applied[key], applied["server"]).items():
        values = {"rate": linkprobe.legs_min_rate_bps(legs), "delay": linkprobe.legs_total(legs, "delay_ms"),
                  "jitter": linkprobe.legs_total(legs, "jitter_ms"), "loss": linkprobe.legs_loss_pct(legs)}
        for name, value in values.items():
            if value:
                changes.set(direction, name, value)
    return assignments_from_changes(changes)


def test_every_case_measured_its_links_and_netem_holds_every_one(runs, echo_lab):
    """Every case probed its links on both backends. On netem each is within tolerance, its round
    trip counted past what the same probe measures in this VM with nothing shaped (guestlab.holds_past;
    seed-demo's 40 ms link probed 45.2 once, and linkcheck alone judged it off by 0.2 ms). The rate
    trains are sent and timed by Python as well, while the case's other clients probe and the VM's
    engine works: a stall of a tenth of a second empties the bottleneck's queue (a train is sent at
    1.5 x the rate), and a good 20 Mbit/s netem link read 16 once. A netem link the case's probe read
    off is marked so in the record, and the same path, shaped on the client alone, is probed again
    here, up to ATTEMPTS in all: a wrong link misses every time. The delay line is a Python process
    on an emulated CPU here: where it falls short of its link (4-5 ms added to a round trip, 14-15 of
    20 Mbit/s up, measured), the case is marked off, never hidden."""
    unshaped_rtt_ms = echo_lab.probe([])["rtt_ms"]
    for name, by_backend in runs.items():
        for backend, run in by_backend.items():
            for record in records(run):
                measured = record["link"].get("measured")
                assert measured, (name, backend, record["case"], "no link was measured")
                for key, verdict in measured.items():
                    print(f"{name} {record['case']} on {backend}, {key}: {linkcheck.verdict_text(verdict)}")
                    assert verdict["rtt_ms"] is not None and verdict["rtt_ms"] >= verdict["rtt_expected_ms"] - 1
                    if backend == "netem" and not holds_past(verdict, unshaped_rtt_ms):
                        words = path_link_words(record["link"]["applied"], key)
                        again = echo_lab.probe_until_held(words, unshaped_rtt_ms, ATTEMPTS - 1)
                        assert holds_past(again[-1], unshaped_rtt_ms), \
                            (name, record["case"], key, unshaped_rtt_ms, verdict, again)
                assert record["link_ok"] == linkcheck.case_link_ok(measured)
    # The seed demo's sender: the probe knew its path (20 ms each way on its own link, 10 Mbit/s both ways).
    verdict = case(runs["seed-demo"]["netem"], **{"sender.mode": "blocking"})["link"]["measured"]["sender"]
    assert verdict["rtt_expected_ms"] == 40 and verdict["up_expected_bps"] == verdict["down_expected_bps"] == 10e6


def goodput_pairs(runs, lab_vm, host: Path, name: str, params: dict[str, str], agree) -> list[dict[str, float]]:
    """The sender's goodput (bit/s) on each backend in experiment ``name``'s case that ``params``
    picks (as :func:`case` takes them), and while a pair does not ``agree``, the same case run again on both
    backends, one after the other in the same VM, up to ATTEMPTS pairs in all: every pair, in order.

    The delay line is a Python process on the VM's emulated CPU, and on a slower CI machine its
    goodput fell short of netem's in one run on both links here (8.76 of 9.47 Mbit/s through rate
    and delay; 4.01 of 4.70 through a window) while every run before had agreed: a pair measured
    again side by side says whether that was the machine or the line (a line that is wrong falls
    short every time)."""
    # --set of a swept key narrows its axis to that value: the case keeps its params.
    fixed = tuple(word for key, value in params.items() for word in ("--set", f"clients.{key}={value}"))

    def sender_bps(run: Path) -> float:
        return client(case(run, **params), "sender")["goodput_bps"]

    pairs = [{b: sender_bps(runs[name][b]) for b in BACKENDS}]
    while not agree(pairs[-1]) and len(pairs) < ATTEMPTS:
        out = f"/root/backends-again/{name}/{len(pairs)}"
        pairs.append({b: sender_bps(_run(lab_vm, b, name, host, f"{out}/{b}", fixed)) for b in BACKENDS})
    for pair in pairs:
        print(f"{name}: netem {pair['netem'] / 1e6:.3f}, delay line {pair['userspace'] / 1e6:.3f} Mbit/s")
    return pairs


def test_goodput_through_rate_and_delay_agrees(runs, lab_vm, tmp_path):
    ceiling_bps = tcp_ceiling_bps(10e6)
    print(f"10 Mbit/s + 20 ms each way, 10 MB (ceiling {ceiling_bps / 1e6:.3f} Mbit/s)")

    def agree(pair: dict[str, float]) -> bool:
        return (0.95 <= pair["userspace"] / pair["netem"] <= 1.05
                and all(0.9 <= bps / ceiling_bps <= 1.0 for bps in pair.values()))

    pairs = goodput_pairs(runs, lab_vm, tmp_path, "seed-demo", {"sender.mode": "blocking"}, agree)
    assert agree(pairs[-1]), pairs


def test_the_tutorials_non_blocking_send_is_partial_on_both(runs):
    netem, userspace = (client(case(runs["seed-demo"][b], **{"sender.mode": "nonblocking"}), "sender")
                        for b in BACKENDS)
    print(f"one non-blocking send(): netem {netem['bytes_accepted']:,} B, delay line {userspace['bytes_accepted']:,} B")
    # One call, more than the initial window of 10 segments and a small part of the
    # payload, on both. The counts themselves differ (78,192 against 104,256 B in the
    # runs here): the kernel sizes the first send buffer from what the handshake did,
    # and the delay line's up direction sends a copy of each packet and drops the
    # kernel's own. README: "netem and the delay line, side by side".
    for figures in (netem, userspace):
        assert figures["send_calls"] == 1
        assert 10 * 1448 < figures["bytes_accepted"] < 256 * 1024


def test_connect_times_over_a_long_link_agree(runs):
    blocking = [client(case(runs["stop-connect"][b], **{"caller.mode": "blocking"}), "caller") for b in BACKENDS]
    stopped = [client(case(runs["stop-connect"][b], **{"caller.mode": "select"}), "caller") for b in BACKENDS]
    print(f"blocking connect() over 500 ms each way: netem {blocking[0]['connect_s']:.4f} s, delay line "
          f"{blocking[1]['connect_s']:.4f} s; stop at 300 ms took effect after "
          f"{stopped[0]['connect']['control_away_max_ms']:.1f} / {stopped[1]['connect']['control_away_max_ms']:.1f} ms")
    # A handshake is one round trip: 1 s, within ±max(1 ms, 5 %) on each backend.
    for figures in blocking:
        assert abs(figures["connect_s"] - 1.0) <= 0.05
    assert abs(blocking[0]["connect_s"] - blocking[1]["connect_s"]) <= 0.05
    assert abs(stopped[0]["connect"]["control_away_max_ms"] - stopped[1]["connect"]["control_away_max_ms"]) <= 25


def test_window_limited_goodput_agrees(runs, lab_vm, tmp_path):
    print("64 KiB receive window over 100 ms")

    def agree(pair: dict[str, float]) -> bool:
        return 0.9 <= pair["userspace"] / pair["netem"] <= 1.1

    pairs = goodput_pairs(runs, lab_vm, tmp_path, "send-buffer", {}, agree)
    assert agree(pairs[-1]), pairs


def _ms_per_packet(line: dict) -> float:
    """A delay line's CPU milliseconds per packet it handled, from its own counters."""
    return 1000 * line["cpu_s"] / max(1, line["up"]["packets"] + line["down"]["packets"])


def wake_after_idle_ms(echo_lab) -> float:
    """What an emulated process's wake-up costs more after 20 ms of idle than back to back.

    An unshaped ping-pong wakes two processes per round trip (the server for
    the request, the client for the reply), so half the difference between its
    round trip after 20 ms of think time and back to back.
    """
    idle_ms, busy_ms = (unshaped_after_idle(echo_lab, think_ms, 30)["p50"] for think_ms in (20, 0))
    return max(0.0, (idle_ms - busy_ms) / 2)


def test_round_trips_and_repairs_under_loss(runs, echo_lab):
    figures = {b: records(runs["lossy-link"][b])[0] for b in BACKENDS}
    small = {b: client(r, "small")["latency_ms"] for b, r in figures.items()}
    big = {b: client(r, "big") for b, r in figures.items()}
    lines = figures["userspace"]["link"]["delay_line"]
    print("5 % loss on the server's link: " + "; ".join(
        f"{b}: small p50 {small[b]['p50']:.2f} ms max {small[b]['max']:.1f} ms, big p50 "
        f"{big[b]['latency_ms']['p50']:.1f} ms, big retrans {big[b]['tcp']['retrans']}" for b in BACKENDS)
        + f"; delay lines' CPU per packet: server {_ms_per_packet(lines['server']):.3f} ms, "
          f"small {_ms_per_packet(lines['small']):.3f} ms")
    # Most tiny requests meet no loss: their median is the link's round trip. On the
    # delay line such a round trip crosses two lines (the client's and the server's)
    # twice each, and on an emulated CPU each crossing costs about what the line
    # spends per packet, which its own counters say (natively ~0.05 ms, here 0.5-1 ms),
    # and the line's wake-up after it idled, which the VM's ping-pong measures (0.18 ms
    # in a run on one CI machine; on another, 7.9 ms of crossings in all failed a bound
    # of 6.9 without it).
    wake_ms = wake_after_idle_ms(echo_lab)
    crossings_ms = 2 * _ms_per_packet(lines["server"]) + 2 * _ms_per_packet(lines["small"]) + 4 * wake_ms
    print(f"crossings of the delay lines: {crossings_ms:.3f} ms, with a wake after idle of {wake_ms:.3f} ms each")
    tolerance_ms = max(1.0, 0.05 * small["netem"]["p50"])
    assert small["netem"]["p50"] - tolerance_ms <= small["userspace"]["p50"] \
        <= small["netem"]["p50"] + crossings_ms + tolerance_ms
    for b in BACKENDS:
        assert big[b]["tcp"]["retrans"] > 0
    # The delay line counts every packet it is given (GSO packets reach it as
    # segments), so its drops are binomial; netem's are checked so in test_netem_link.py.
    # netem draws its loss per GSO packet, up to 45 segments at once: the big requests'
    # figures differ between the backends for that reason (README).
    offered = sum(lines["server"][d]["packets"] for d in ("up", "down"))
    lost = sum(lines["server"][d]["lost"] for d in ("up", "down"))
    # One unseeded run, not measured again (the four experiments take minutes): a 99 %
    # interval failed one CI run by chance (371 of 6,432 against 277..367). At 99.99 % an
    # honest run fails once in ten thousand; a loss drawn per aggregate instead of per
    # segment would still land far outside it.
    low, high = binomial_interval(offered, 0.05, confidence=0.9999)
    print(f"delay line on the server's link: {lost} of {offered} packets lost (99.99 % interval {low}..{high})")
    assert low <= lost <= high


def test_lab_compare_puts_each_pair_side_by_side(runs, tmp_path):
    for name, by_backend in runs.items():
        out = tmp_path / name
        done = subprocess.run([sys.executable, "lab.py", "compare", str(by_backend["netem"]),
                               str(by_backend["userspace"]), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        text = (out / "compare.md").read_text()
        assert by_backend["netem"].name in text and by_backend["userspace"].name in text
