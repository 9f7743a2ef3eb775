"""Benchmark: the link's fidelity on a stock kernel with netem, inside an emulated VM.

    python3 bench/vm.py [--quick]            # as root, after .ci/prepare-host.sh

The host measured in the other benchmarks may lack sch_netem (this project's CI
host does), so the backend nearly every user's kernel picks gets its figures
here: one VM of the test tier's fabric (tests/vm: Debian's stock kernel, its
Docker engine, QEMU with TCG unless SOCKLAB_VM_ACCEL=kvm), the lab image built
in it from this working tree, and the points of bench/fidelity.py measured in
it for netem and for the userspace delay line alike, on the same kernel:

- round trip at 1, 10, 50 and 200 ms each way, against twice the delay plus the
  unshaped round trip measured in the same repetition;
- goodput through 10 Mbit/s with 20 ms each way, iperf3 against the TCP
  ceiling and the lab's client against iperf3.

Absolute times are slower under an emulated CPU; the ratios are what carry
over. Each point runs in one kept client container by the image's entrypoint,
as lab.py's --reuse runs a role (a fresh container costs tens of seconds under
TCG), with the link applied from scratch and removed after it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import client_results, env_flags  # noqa: E402
from common import Log, log_to_stderr  # noqa: E402
from experiments import SOCKLAB, probe_command  # noqa: E402
from fidelity import ClientRun, rate_delay_goodput, round_trip, server_command  # noqa: E402
from socklab.entry import ENV_KEEP  # noqa: E402
from tests.vm.fabric import Fabric, Vm, build_image, missing_prerequisite  # noqa: E402
from tests.vm.guestlab import BASE_IMAGE, GuestProject, install_lab  # noqa: E402

MEMORY_MIB = 1024
TIMER_SLEEP_MS, TIMER_SLEEPS = 1, 400
# The iterative server: under an emulated CPU the threaded and epoll servers take
# longer to wake after an idle gap than between back-to-back requests, and a
# delayed link makes that gap part of every round trip (tests/vm/test_netem_link.py
# measured 20.50 ms behind blocking, 21.33 behind threaded, 22.01 behind epoll
# through 20 ms of netem). The points here never overlap, so it serves them all.
SERVER_MODE = "blocking"


def machine(vm: Vm, accel: str) -> dict:
    """The VM as the figures were measured in it."""
    script = ("uname -r; nproc; sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n 1; "
              "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; "
              "docker version --format '{{.Server.Version}}'; docker compose version --short")
    kernel, cpus, cpu_model, mem_kib, docker, compose = vm.sh(script).stdout.strip().splitlines()
    return {"emulator": f"QEMU, {accel.upper()}", "kernel": kernel, "cpus": int(cpus), "cpu_model": cpu_model,
            "memory_gib": round(int(mem_kib) / 2**20, 2), "docker": docker, "compose": compose}


def timer_lateness(vm: Vm) -> dict:
    """How late a 1 ms sleep wakes, in the VM's kernel and on this host (bench/probes/timer_lateness.py)."""
    argv = probe_command("timer_lateness", TIMER_SLEEP_MS, TIMER_SLEEPS)
    guest = json.loads(vm.exec(argv, timeout_s=120).check().stdout)
    host = json.loads(subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, check=True,
                                     timeout=120).stdout)
    return {"vm": guest, "host": host}


def timer_note(lateness: dict) -> str:
    """The timer measurement as the section's note."""
    vm, host = lateness["vm"], lateness["host"]
    return (f"Timers: a {vm['sleep_ms']:g} ms sleep woke {vm['late_ms']['p50']:g} ms late in the VM "
            f"(median of {vm['count']}; p90 {vm['late_ms']['p90']:g} ms) and {host['late_ms']['p50']:g} ms late "
            f"on the machine above (p90 {host['late_ms']['p90']:g} ms), both measured from Python. A delayed packet "
            "waits on such a timer in each direction, netem's in the kernel and the delay line's in its process.")


def kept_client(lab: GuestProject) -> ClientRun:
    """Points in ``lab``'s kept client container, each started as lab.py's --reuse starts a role.

    The image's entrypoint, told the container is kept, forgets the kernel's
    TCP metrics, shapes the link from the point's SOCKLAB_LINK_* variables,
    runs the script unprivileged and removes the link again.
    """
    def run_point(script: str, env: Mapping[str, str], *, timeout_s: float = 300) -> tuple[dict, str]:
        done = lab.vm.exec(["docker", "exec", *env_flags({**env, ENV_KEEP: "1"}), lab.client_container,
                            *SOCKLAB, "entry", "exec", "sh", "-c", script], timeout_s=timeout_s)
        returncode = done.returncode if not done.timed_out else 124  # as coreutils' timeout says it
        return client_results(done.stdout, done.stderr, returncode), done.stdout
    return run_point


def run(quick: bool, log: Log) -> dict:
    """The round-trip and rate + delay figures of both backends, measured in one VM."""
    problem = missing_prerequisite(BASE_IMAGE)
    if problem:
        raise RuntimeError(f"no VM here: {problem}")
    started = time.monotonic()
    image = build_image(env={"BASE_IMAGE": BASE_IMAGE})
    log(f"VM image ready in {time.monotonic() - started:.0f} s")
    with tempfile.TemporaryDirectory(prefix="socklab-bench-vm-") as workdir:
        with Fabric(image, Path(workdir), count=1, memory_mib=MEMORY_MIB) as fabric:
            fabric.wait_docker()
            (vm,) = fabric.vms
            log(f"VM up with Docker in {time.monotonic() - started:.0f} s")
            install_lab(vm)
            log(f"lab image built in the VM {time.monotonic() - started:.0f} s after the start")
            lab = GuestProject(vm, command=server_command(SERVER_MODE))
            try:
                client = kept_client(lab)
                rtt_figures, rtt_points, rtt_unavailable = round_trip(client, quick, log)
                goodput_figures, goodput_points, unavailable = rate_delay_goodput(client, quick, log)
            finally:
                lab.down()
            about = machine(vm, fabric.specs[0].accel)
            lateness = timer_lateness(vm)
    note = timer_note(lateness)
    log(note)
    return {
        "figures": [{**f, "id": f"vm.{f['id']}"} for f in rtt_figures + goodput_figures],
        "details": {"machine": about, "notes": [note], "timer_lateness": lateness,
                    "server_mode": SERVER_MODE, "round_trip": rtt_points,
                    "rate_delay": goodput_points, "backends_unavailable": {**unavailable, **rtt_unavailable}},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, log_to_stderr), indent=1))
