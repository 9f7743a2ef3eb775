"""How the scale and echo benchmarks split their load, and the figures and sentences made from it.

Pure functions, and the engine's descriptor grant on a fake Docker client: no container runs here
(the benchmarks are run by bench/run.py).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import docker.errors

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402,F401  (puts the orchestrator and the image's package on the path)
from echo import figures as echo_figures  # noqa: E402
from echo import measurement, roles  # noqa: E402
from labkit import scenario  # noqa: E402
from labkit.compose import NOFILE_WANTED, nofile_ulimits  # noqa: E402
from labkit.config import load_experiment_text  # noqa: E402
from scale import figures as scale_figures  # noqa: E402
from scale import limits, plan  # noqa: E402


# ------------------------------------------------------------------ scale: C100K over client containers

def test_scale_spreads_100k_connections_over_client_containers_under_their_port_range():
    assert plan.client_containers(100_000) == [25_000] * 4
    assert plan.client_containers(10_000) == [10_000]
    assert plan.client_containers(30_001) == [15_001, 15_000]
    assert all(n < 28_232 for n in plan.client_containers(100_000))
    commands = plan.client_commands(100_000, 140)
    assert len(commands) == 4 and commands[0] == plan.client_command(25_000, 140)
    assert plan.C100K in plan.FULL.ramps["epoll"] and plan.C100K in plan.FULL.ramps["asyncio"]


def test_compose_gives_containers_the_descriptors_asked_for():
    assert nofile_ulimits(20_000) == {"ulimits": {"nofile": {"soft": 20_000, "hard": 20_000}}}
    assert NOFILE_WANTED == 1_048_576
    experiment = load_experiment_text("name: t\nserver: {mode: epoll}\nclients:\n  - name: c\n"
                                      "    workload: {kind: slow}\n", "t.yaml")
    override = scenario.compose_override(experiment, "default", nofile=65_536)
    assert override["services"]["server"]["ulimits"] == {"nofile": {"soft": 65_536, "hard": 65_536}}
    assert override["services"]["client-c"]["ulimits"] == {"nofile": {"soft": 65_536, "hard": 65_536}}
    assert "ulimits" not in scenario.compose_override(experiment, "default")["services"]["server"]


def _step(**overrides) -> dict:
    step = {"mode": "epoll", "connections": 100_000, "held": 19_993, "all_held": False, "established": 24_090,
            "accept_queue": 4097, "fds": 20_000, "nofile": ["20000", "20000"], "server_stderr": [],
            "listen_drops": {}, "kib_per_connection": 0.606, "seconds_to_hold_all": None,
            "conntrack_entries": 62_869, "kernel_kib_per_connection": 4.0}
    return {**step, **overrides}


LIMITS = {"nofile_wanted": 1_048_576, "nofile_granted": 20_000, "nf_conntrack_max": "262144",
          "ip_local_port_range": "32768\t60999", "cgroup memory limit": "9223372036854771712",
          "nofile_refusal": "failed to create shim task: OCI runtime create failed: runc create failed: unable to "
                            "start container process: error during container init: error setting rlimits for ready "
                            "process: error setting rlimit type 7: operation not permitted: unknown"}


def test_scale_says_the_engine_refused_more_descriptors_and_what_would_bound_100k_next():
    why = limits.why_stopped(_step(), LIMITS)
    assert "ran out of file descriptors (20000 open of its RLIMIT_NOFILE 20000" in why
    assert "asks for 1048576" in why and "error setting rlimit type 7: operation not permitted" in why
    assert "CAP_SYS_RESOURCE" in why
    granted = limits.descriptor_cap({**LIMITS, "nofile_refusal": None, "nofile_granted": 1_048_576})
    assert granted == "the container's hard limit, 1048576 as the lab asks (Compose ulimits nofile)"
    steps = [_step(connections=10_000, held=10_000, all_held=True, seconds_to_hold_all=2.5, kib_per_connection=0.62),
             _step(kernel_kib_per_connection=9.0)]
    sentence = limits.limit_sentence("epoll", steps, LIMITS)
    assert "nf_conntrack_max 262144" in sentence and "38%" in sentence and "tracked 62869" in sentence
    assert "28232 ephemeral ports per client address" in sentence and "4 client containers" in sentence
    assert "0.61 KiB resident" in sentence and "59 MiB for 100000" in sentence
    assert "no cgroup memory limit" in sentence
    assert "4000 connections/s" in sentence and "~25 s" in sentence
    assert "slab grew by ~4.0 KiB per connection" in sentence and "~0.4 GiB for 100000" in sentence
    assert sentence.endswith("the first of them, at about 262144 connections, is connection tracking")


def test_scale_reads_the_kernels_side_of_the_connections():
    from scale import steps

    text = "62869\nSlab:             412345 kB\nSUnreclaim:       200000 kB\n"
    assert steps.parse_kernel_reading(text) == {"conntrack_entries": 62_869, "slab_kib": 412_345}
    assert steps.parse_kernel_reading("-\n") == {"conntrack_entries": None, "slab_kib": None}
    assert steps.kernel_per_connection({"slab_kib": 1000}, {"slab_kib": 41_000}, 10_000) == 4.0
    assert steps.kernel_per_connection({"slab_kib": None}, {"slab_kib": 41_000}, 10_000) is None
    assert steps.out_of_descriptors({"fds": 19_990}, {"nofile": ["20000", "20000"]})
    assert not steps.out_of_descriptors({"fds": 10_007}, {"nofile": ["20000", "20000"]})


def test_scale_held_figure_is_judged_against_the_c100k_line_and_memory_has_targets():
    reps = [[_step(connections=10_000, held=10_000, all_held=True), _step()]]
    fig = scale_figures.held_figure("epoll", reps, plan.FULL, "why it stopped")
    assert fig["reference"]["label"] == "C100K line"
    assert fig["ratio"]["median"] == 0.1999 and fig["met"] is False and fig["note"].endswith(". why it stopped")
    assert scale_figures.held_figure("poll", reps, plan.FULL)["reference"]["samples"] == [10_000]
    step = {"kib_per_connection": 0.9, "rss_held_kib": 31_000, "rss_idle_kib": 22_000}
    reference = {"kib_per_connection": 0.6}
    memory = scale_figures.memory_figure("epoll", [step], [reference])
    assert memory["target"] == {"max": 1.5} and memory["met"] is True
    assert scale_figures.memory_figure("asyncio", [step], [reference])["met"] is False


# ------------------------------------------------------------------ echo: the load over client processes

def test_echo_splits_connections_over_at_most_four_client_processes():
    assert roles.client_split(1) == [1]
    assert roles.client_split(10) == [3, 3, 2, 2]
    assert roles.client_split(100) == [25] * 4
    assert roles.client_split(1000) == [250] * 4
    script = roles.load_command("srv", 10, 7)
    starts = script.split(" & ")
    assert len(starts) == 5 and starts[-1].startswith("wait; cat /tmp/echo-client-0.out")
    first = shlex.split(starts[0])
    assert first[first.index("--connections") + 1] == "3" and first[first.index("--requests") + 1] == "7"
    assert first[-1] == ">/tmp/echo-client-0.out" or first[-2:] == [">/tmp/echo-client-0.out", "2>&1"]


def _client(connections: int, requests: int, wall_s: float, cpu_s: float) -> dict:
    done = connections * requests
    return {"role": "client", "wall_s": wall_s, "cpu_s": cpu_s, "latency_ms": {"count": done, "p50": 0.1},
            "bytes_accepted": done * 1024, "bytes_delivered": done * 1024, "requests_per_s": done / wall_s,
            "errors": []}


def test_echo_load_of_several_clients_counts_every_round_trip_over_the_longest_wall_time():
    m = measurement.load_measurement([_client(25, 40, 2.0, 0.5), _client(25, 40, 2.5, 1.5)], [25, 25], 40)
    assert m["round_trips"] == 2000 and m["req_per_s"] == 800.0 and m["client_processes"] == 2
    assert m["client_cpu_shares"] == [0.25, 0.6] and m["client_cpu_share"] == 0.6 and "error" not in m
    assert m["bytes_accepted"] == 2000 * 1024
    missing = measurement.load_measurement([_client(25, 40, 2.0, 0.5)], [25, 25], 40)
    assert missing["error"] == "client 2 of 2: the client printed no result"
    assert measurement.server_cpu_per_round_trip_us(0.05, 2000) == 25.0
    assert measurement.server_cpu_per_round_trip_us(0.05, 0) is None


def _point(mode: str, n: int, lab_rps: float, ref_rps: float, lab_us: float, ref_us: float,
           shares: list[float]) -> dict:
    side = {"client_cpu_shares": shares, "client_processes": len(shares), "client_cpu_share": max(shares)}
    return {"mode": mode, "connections": n,
            "lab": {**side, "req_per_s": lab_rps, "server_cpu_us_per_round_trip": lab_us},
            "reference": {**side, "req_per_s": ref_rps, "server_cpu_us_per_round_trip": ref_us}}


def test_echo_best_mode_has_its_targets_and_a_cpu_per_round_trip_figure():
    points = [_point("epoll", 100, 30_000, 24_000, 16.0, 20.0, [0.4, 0.5, 0.45, 0.41]),
              _point("poll", 100, 26_000, 24_000, 18.0, 20.0, [0.4, 0.5, 0.45, 0.41])]
    fig, best = echo_figures.best_nonblocking_figure(100, points)
    assert best == "epoll" and fig["target"] == {"min": 1.2} and fig["met"] is True
    assert "every client under 80%: no client was the bottleneck" in fig["note"]
    assert echo_figures.best_nonblocking_figure(10, [{**points[0], "connections": 10}])[0]["target"] == {"min": 1.0}
    cpu = echo_figures.cpu_per_round_trip_figure(100, points, best)
    assert cpu["id"] == "echo.best_nonblocking.cpu_per_rt.100" and cpu["ratio"]["median"] == 0.8
    assert cpu["target"] == {"max": 0.83} and cpu["met"] is True
    busy = [_point("epoll", 1000, 30_000, 24_000, 16.0, 20.0, [0.85, 0.5])]
    assert "2 of 4 client runs at 80% or more" in echo_figures.client_load_note(busy)
    assert echo_figures.cpu_per_round_trip_figure(1000, busy, None)["met"] is False


# ------------------------------------------------------------------ the engine: how many descriptors it grants

class _Container:
    def __init__(self, hard: int, refuse: bool, removed: list):
        self.hard, self.refuse, self.removed = hard, refuse, removed

    def start(self):
        if self.refuse:
            raise docker.errors.APIError("failed", explanation="runc create failed: error setting rlimits for "
                                         "ready process: error setting rlimit type 7: operation not permitted")

    def wait(self, timeout):
        return {"StatusCode": 0}

    def logs(self, stdout, stderr):
        return f"{self.hard}\n".encode()

    def remove(self, force):
        self.removed.append(force)


class _Containers:
    def __init__(self, daemon_hard: int, cap: int):
        self.daemon_hard, self.cap, self.asked, self.removed = daemon_hard, cap, [], []

    def create(self, image, command, *, entrypoint, network_mode, ulimits, labels):
        wanted = ulimits[0].hard if ulimits else None
        self.asked.append(wanted)
        refuse = wanted is not None and wanted > self.cap
        return _Container(wanted or self.daemon_hard, refuse, self.removed)


def test_the_engine_grants_the_descriptors_asked_for_or_says_why_not():
    from labkit.docker_api import DockerAPI

    class Client:
        def __init__(self, containers):
            self.containers = containers

    generous = _Containers(daemon_hard=524_288, cap=2**20)
    assert DockerAPI(Client(generous)).nofile_allowed("img", 1_048_576) == (1_048_576, None)
    assert generous.asked == [1_048_576] and generous.removed == [True]
    capped = _Containers(daemon_hard=20_000, cap=20_000)
    limit, refusal = DockerAPI(Client(capped)).nofile_allowed("img", 1_048_576)
    assert limit == 20_000 and "operation not permitted" in refusal
    assert capped.asked == [1_048_576, None] and capped.removed == [True, True]
