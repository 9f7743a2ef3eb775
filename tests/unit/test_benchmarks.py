"""The committed benchmark results, BENCHMARKS.md and the README's headline agree.

No benchmark runs here (they are benchmarks, not tests: `python3 bench/run.py`);
this checks that every figure a reader sees comes from the committed results
file, that each missed target is explained, and the figure arithmetic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import experiments  # noqa: E402
import findings  # noqa: E402
import render  # noqa: E402
import run  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "benchmarks.json"


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def test_benchmarks_md_is_the_rendering_of_the_committed_results(results):
    assert (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8") == render.render(results), \
        "BENCHMARKS.md differs from bench/results/benchmarks.json: run bench/render.py"


def test_readme_headline_is_the_rendering_of_the_committed_results(results):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render.render_headline(results) in readme, "README's headline block is stale: run bench/run.py"


def test_the_committed_run_is_complete(results):
    assert results["schema"] == common.RESULTS_SCHEMA
    assert results["quick"] is False
    assert list(results["benchmarks"]) == list(run.BENCHMARKS)
    for name, bench in results["benchmarks"].items():
        assert "error" not in bench, f"{name}: {bench.get('error')}"
        assert bench["figures"], name
    for key in ("when", "git_revision", "host_kernel", "cpus", "docker", "compose"):
        assert results["environment"][key], key


def test_every_figure_is_its_samples_against_its_reference(results):
    for fig in (f for b in results["benchmarks"].values() for f in b["figures"]):
        if "error" in fig:
            continue
        again = common.figure(fig["id"], fig["label"], fig["unit"], fig["value"]["samples"],
                              reference=fig["reference"]["label"],
                              reference_samples=fig["reference"]["samples"], target=fig["target"])
        # Samples are stored rounded to four digits, so the ratios are recomputed to that.
        assert again["ratio"]["median"] == pytest.approx(fig["ratio"]["median"], rel=1e-3), fig["id"]
        assert again["met"] == fig["met"] or abs(again["ratio"]["median"] - fig["ratio"]["median"]) < 1e-3


def test_every_missed_target_is_explained_and_every_headline_exists(results):
    missed = [f["id"] for f in render.missed(results)]
    assert [fid for fid in missed if fid not in findings.WHY] == []
    ids = {f["id"] for b in results["benchmarks"].values() for f in b["figures"]}
    assert [fid for fid, _ in findings.HEADLINE if fid not in ids] == []
    assert findings.HEADLINE, "the README quotes no headline ratio"


def test_figure_ratios_are_pairwise_and_targets_judged_on_the_median():
    fig = common.figure("x", "x", "s", [1.0, 3.0, 2.0], reference="r", reference_samples=[2.0, 2.0, 1.0],
                        target={"max": 1.2})
    assert fig["ratio"]["samples"] == [0.5, 1.5, 2.0]
    assert (fig["ratio"]["median"], fig["ratio"]["min"], fig["ratio"]["max"]) == (1.5, 0.5, 2.0)
    assert fig["value"]["median"] == 2.0 and fig["met"] is False
    assert common.target_met({"within": 0.05}, 1.049) and not common.target_met({"within": 0.05}, 0.949)
    assert common.target_met({"min": 1.0}, 1.0) and not common.target_met({"min": 1.0}, 0.999)
    with pytest.raises(ValueError):
        common.figure("x", "x", "s", [1.0], reference="r", reference_samples=[1.0, 2.0])


def test_spans_print_median_and_range():
    assert render.span(common.spread([3.0, 1.0, 2.0]), "ms") == "2 (1–3) ms"
    assert render.span(common.spread([12345.6]), "req/s") == "12,346 req/s"
    assert render.span(common.spread([])) == "–"


def test_run_refuses_an_unknown_benchmark_in_one_sentence():
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--only", "fidelity,speed"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench/run.py: --only: 'speed' is not a benchmark; choose from "
        "fidelity, delayline, overhead, echo, scale, vm, swarm, tracer"]


# ------------------------------------------------- the roles benchmarks start

def _options(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a role's argv (after the role), by flag."""
    flags = [i for i, word in enumerate(argv) if word.startswith("--")]
    return {argv[i]: argv[i + 1] for i in flags}


def test_with_options_replaces_a_flag_scenario_set_and_appends_the_others():
    assert experiments.with_options(["server", "--port", "5000", "--mode", "epoll"], {"--port": 5001, "--backlog": 4096}) \
        == ["server", "--port", "5001", "--mode", "epoll", "--backlog", "4096"]


def test_link_env_is_scenarios_rendering_of_the_link_a_benchmark_names():
    unshaped = experiments.link_env()
    assert unshaped["SOCKLAB_LINK_BACKEND"] == "auto"
    assert {value for key, value in unshaped.items() if key != "SOCKLAB_LINK_BACKEND"} == {""}
    shaped = experiments.link_env(delay="20ms", limit=5000, backend="userspace")
    assert set(shaped) == set(unshaped)
    assert {k: v for k, v in shaped.items() if v} == {"SOCKLAB_LINK_DELAY": "20ms", "SOCKLAB_LINK_LIMIT": "5000",
                                                     "SOCKLAB_LINK_BACKEND": "userspace"}
    assert experiments.link_env(rate="10mbit")["SOCKLAB_LINK_RATE"] == "10mbit"


def test_a_link_key_lab_py_would_refuse_is_refused_here_too():
    from socklab.errors import UsageError

    with pytest.raises(UsageError, match="speed"):
        experiments.link_env(speed="1mbit")


def test_echo_roles_are_scenarios_with_the_benchmarks_options_on_top():
    from echo import roles

    server = roles.lab_server_command("blocking")
    assert server[:3] == ["server", "--mode", "blocking"]
    assert {k: v for k, v in _options(server).items() if k in ("--port", "--workload", "--recv-size", "--backlog",
                                                                  "--idle-timeout", "--max-connections")} == {
        "--port": "5000", "--workload": "echo", "--recv-size": "65536", "--backlog": "1024", "--idle-timeout": "600s"}
    client = roles.client_command("socklab-bench-echo-abc123-reference", 100, 240).split()
    assert client[:4] == ["python3", "-m", "socklab", "client"]
    assert {k: v for k, v in _options(client).items() if k != "--think"} == {
        "--mode": "poll", "--host": "socklab-bench-echo-abc123-reference", "--port": "5000", "--workload": "echo",
        "--connections": "100", "--requests": "240", "--size": "1024", "--eof-wait": "120s"}
    assert roles.reference_command()[:3] == ["exec", "python3", "-c"]


def test_scale_roles_hold_idle_connections_in_chunks_of_one_client_process():
    from scale import plan

    server = plan.server_command("threaded")
    assert server[:5] == ["python3", "-m", "socklab", "server", "--mode"]
    assert {k: v for k, v in _options(server).items() if k != "--recv-size"} == {
        "--mode": "threaded", "--port": "5000", "--workload": "slow", "--idle-timeout": "600", "--backlog": "4096"}
    assert plan.server_command("ref-epoll")[-2:] == ["5000", "4096"]
    assert plan.client_chunks(12_000) == [5000, 5000, 2000] and plan.client_chunks(10_000) == [5000, 5000]
    command = plan.client_command(12_000, 140)
    clients = json.loads(command[-1])
    assert [_options(argv)["--connections"] for argv in clients] == ["5000", "5000", "2000"]
    assert {k: v for k, v in _options(clients[0]).items() if k != "--connections"} == {
        "--mode": "epoll", "--host": "server", "--port": "5000", "--workload": "slow", "--rate": "0",
        "--hold": "140s", "--connect-timeout": "60s", "--eof-wait": "30s"}


# ------------------------------------------------- fidelity's points, on a fake client

class FakeClient:
    """A ClientRun that answers as the image would: netem refused (this kernel has none),
    every other link carried at the figures given; it keeps each link it was asked for."""

    REFUSAL = "the link asks for delay 20ms (up) but this kernel has no netem qdisc (kernel module sch_netem)"

    def __init__(self, iperf3_bps: float, lab_bps: float, rtt_ms: dict[str, float]):
        self.iperf3_bps, self.lab_bps, self.rtt_ms, self.links = iperf3_bps, lab_bps, rtt_ms, []

    def __call__(self, script, env, *, timeout_s=300):
        self.links.append(dict(env))
        if env["SOCKLAB_LINK_BACKEND"] == "netem":  # the entrypoint's failure line, then its exit status
            return {"error": {"socklab_result": 1, "role": "error", "failed": "entry", "error": self.REFUSAL,
                              "exit_code": 3}}, ""
        if script.startswith("iperf3"):
            iperf = {"end": {"sum_received": {"bits_per_second": self.iperf3_bps}, "sum_sent": {"retransmits": 0}}}
            client = {"role": "client", "goodput_bps": self.lab_bps, "bytes_delivered": 1}
            return {"client": client}, "iperf3 " + json.dumps(iperf) + "\n"
        p50 = self.rtt_ms[env["SOCKLAB_LINK_DELAY"] or "0"]
        return {"client": {"role": "client", "latency_ms": {"p50": p50}}}, ""


def test_rate_delay_goodput_measures_each_backend_the_kernel_has_and_names_the_one_it_lacks():
    import fidelity

    client = FakeClient(iperf3_bps=9.5e6, lab_bps=9.31e6, rtt_ms={})
    figures, points, unavailable = fidelity.rate_delay_goodput(client, quick=True, log=lambda _: None)
    assert unavailable == {"netem": FakeClient.REFUSAL}
    assert [f["id"] for f in figures] == ["link.goodput.userspace.10mbit_20ms.iperf3",
                                          "link.goodput.userspace.10mbit_20ms.lab"]
    ceiling = 10 * 1448 / 1514
    assert figures[0]["ratio"]["median"] == pytest.approx(9.5 / ceiling, rel=1e-3) and figures[0]["met"]
    assert figures[1]["ratio"]["median"] == pytest.approx(0.98, rel=1e-3) and figures[1]["met"]
    assert {(link["SOCKLAB_LINK_RATE"], link["SOCKLAB_LINK_DELAY"], link["SOCKLAB_LINK_BACKEND"])
            for link in client.links} == {("10mbit", "20ms", "userspace"), ("10mbit", "20ms", "netem")}
    assert points[0]["delay"] == "20ms" and points[0]["backend"] == "userspace"


def test_round_trip_is_judged_against_twice_the_delay_plus_the_unshaped_round_trip():
    import fidelity

    client = FakeClient(0, 0, rtt_ms={"0": 0.4, "1ms": 2.6, "10ms": 20.5, "50ms": 100.5, "200ms": 400.5})
    figures, points, unavailable = fidelity.round_trip(client, quick=True, log=lambda _: None)
    assert list(unavailable) == ["netem"]
    assert [f["id"] for f in figures] == [f"link.rtt.userspace.{d}ms" for d in fidelity.DELAYS_MS]
    assert figures[0]["reference"]["samples"] == [2.4] and figures[0]["met"] is False  # 2.6 / 2.4
    assert all(f["met"] for f in figures[1:])


def test_merge_goes_into_the_full_results_only():
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--only", "swarm", "--merge", "--quick"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench/run.py: --merge goes into the full results file: drop --quick and --out"]


def test_keep_is_a_full_run_and_refuses_a_partial_one_in_one_sentence():
    import subprocess

    for extra in (["--quick"], ["--only", "echo"], ["--merge"]):
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--keep", "swarm", *extra],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, extra
        assert done.stderr.strip().splitlines() == [
            "bench/run.py: --keep is a full run: drop --only, --merge, --quick and --out"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--keep", "swarms"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "'swarms' is not a benchmark" in done.stderr


def test_a_section_measured_apart_says_when_and_where(results):
    apart = {name: b for name, b in results["benchmarks"].items() if "environment" in b}
    assert apart, "the committed run has no section measured apart (run.py --merge)"
    text = render.render(results)
    for bench in apart.values():
        env = bench["environment"]
        assert f"Measured apart from the rest of this file: {env['when']} (git {env['git_revision']})" in text


def test_overhead_times_each_phase_by_the_runners_messages_and_renders_the_breakdown():
    import overhead

    clock = overhead.PhaseClock()
    for text in ("starting the server, then client-load", "starting the server", "starting client-load",
                 "running 2 client container(s)", "collecting results", "writing the results into the run directory",
                 "tearing down", "at 1 s: link of server -> rate=1mbit"):
        clock(text)
    assert [phase for _, phase in clock.marks] == ["start containers", "start server", "start clients", "run",
                                                   "collect", "write results", "tear down"]
    clock.marks = [(0.0, "define"), (0.1, "start containers"), (1.1, "run"), (1.6, "collect"), (1.9, "tear down"),
                   (2.2, "end"), (5.0, "define"), (5.1, "start containers"), (6.0, "run"), (6.5, "end")]
    assert clock.seconds_by_phase(6) == {"define": 0.1, "start containers": 0.9, "run": 0.5}
    assert clock.seconds_by_phase()["run"] == 1.0

    def row(replicas, repetition, outside, run):
        return {"replicas": replicas, "repetition": repetition, "case_s": outside + 0.01, "outside_s": outside,
                "bare_up_down_s": 1.5, "seconds_by_phase": {"define": 0.0, "start containers": 1.0, "run": run,
                                                            "probe": 0.0, "workload": 0.01},
                "reference_by_phase": {"bare up": 1.0, "bare down": 0.5}}

    figures = [{"id": "overhead.case.1"}, {"id": "overhead.case.10"}, {"id": "overhead.sweep.reuse"}]
    rows = [row(1, 1, 1.6, 0.4), row(1, 2, 1.8, 0.6), row(1, 3, 1.7, 0.5), row(10, 1, 4.0, 0.7)]
    sweeps = [{"reuse": True, "wall_s": 80.0, "workload_s": 72.0,
               "seconds_by_phase": {"start server": 2.0, "run": 76.0, "probe": 3.0, "workload": 72.0}}]
    cases, sweep = overhead.breakdown(figures, rows, sweeps)
    assert cases["columns"] == ["overhead.case.1", "overhead.case.10"]
    by_label = dict((label, values) for label, values in cases["rows"])
    assert by_label[overhead.PHASE_LABELS["run"]] == [0.5, 0.7]  # the median over the repetitions
    assert by_label[overhead.PHASE_LABELS["bare down"]] == [0.5, 0.5]
    assert by_label["**outside the workload** (the figure)"] == [1.7, 4.0]
    assert sweep["columns"] == ["overhead.sweep.reuse"] and ["**outside the workloads**", [8.0]] in sweep["rows"]

    text = "\n".join(render.breakdown_tables({"breakdown": [cases, sweep]}))
    assert "| | `overhead.case.1` | `overhead.case.10` |\n|---|---|---|" in text
    assert f"| {overhead.PHASE_LABELS['run']} | 0.5 s | 0.7 s |" in text
    assert render.breakdown_tables({}) == []
