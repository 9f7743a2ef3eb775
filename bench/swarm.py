"""Benchmark: the lab on Docker Swarm: its cost per case, and links across hosts.

    python3 bench/swarm.py [--quick]          # as root, after .ci/prepare-host.sh (the VMs)

On a single-node swarm on this host (made for the benchmark when the engine is
in none, and left afterwards), the lab's case runner with the Swarm engine
runs overhead.py's near-empty case (ten 1 KiB round trips per client) with 1
and 10 client containers; the seconds outside the workload are the case's
whole time (stack file written, stack deployed, the server's readiness and the
clients' tasks awaited, the server stopped, results and traces collected from
the tasks' logs, stack removed) minus the workload's (the longest client's own
wall time). The reference is the least any tool does with the same stack: the
case's own stack file as the lab kept it in the run directory, its clients at
the replicas the lab scales them to, deployed by bare `docker stack deploy`,
waited for until every client task has ended, and removed by `docker stack rm`
until its containers and network are gone — timed in the same repetition.
The bare deploy starts the clients with the server, without waiting for it to
listen: a lower bound, which the lab's own wait counts against. Its `stack rm`
stops a server that still runs, through the swarm's graceful stop (most of its
time: 5.8 of 7.1 s in a run here); the lab has stopped its server itself to
collect its figures before it removes the stack, whose containers have then
all ended.

Across hosts, on a swarm of three VMs of the test tier's fabric (Debian's stock
kernel under QEMU, vm0 the manager where lab.py runs, vm1 and vm2 workers with
the lab image built there), `lab.py run --engine swarm` with the server on vm1
and the clients on vm2:

- goodput of a 24 MB bulk upload through 10 and 50 Mbit/s on the sender's link,
  against the TCP ceiling at the overlay's MTU (rate x (MTU-52)/(MTU+14), MTU
  as the record gives it);
- the echo round trip with 20 ms each way on the client's link, against 40 ms
  plus the unshaped round trip between the same nodes, same repetition (both
  with 40 ms of think time: an emulated process wakes slower after a wait).

Twenty client containers on two nodes is a check, not a figure: the VM tier's
test_swarm_across_vms.py runs it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import build_image, engine  # noqa: E402
from common import Log, figure, log_to_stderr  # noqa: E402
from labkit import proc  # noqa: E402
from labkit.config import Experiment  # noqa: E402
from labkit.engine.swarm import ENDED_STATES, SCALE_KEY, STACK_LABEL, SwarmEngine, task_state, wait_for  # noqa: E402
from labkit.rundir import RunDir  # noqa: E402
from overhead import BareReference, per_case  # noqa: E402
from socklab.shaping.plan import tcp_ceiling_bps  # noqa: E402
from socklab.units import parse_rate_bps  # noqa: E402
from tests.vm.fabric import Fabric, Vm, build_image as build_vm_image, missing_prerequisite  # noqa: E402
from tests.vm.guestlab import (BASE_IMAGE, FABRIC_MEMORY_MIB, in_tree, install_lab,  # noqa: E402
                               leave_swarm, make_swarm, run_records)

BARE_S = 300.0

CROSS_GOODPUT = """\
name: cross-host-goodput
description: A bulk upload from vm2 to vm1 through a rate on the sender's link.
repeat: {repeat}
timeout: 300s
server: {{mode: threaded, placement: [node.hostname == vm1]}}
clients:
  - name: sender
    mode: blocking
    placement: [node.hostname == vm2]
    workload: {{kind: bulk, bytes: 24MB}}
    link: {{rate: 10mbit}}
matrix:
  clients.sender.link.rate: [10mbit, 50mbit]
"""
CROSS_RTT = """\
name: cross-host-rtt
description: Echo round trips from vm2 to vm1, unshaped and through 20 ms each way.
repeat: {repeat}
timeout: 300s
server: {{mode: blocking, placement: [node.hostname == vm1]}}
clients:
  - name: pinger
    mode: blocking
    placement: [node.hostname == vm2]
    workload: {{kind: echo, requests: 100, size: 64, think: 40ms}}
    link: {{delay: 0ms}}
matrix:
  clients.pinger.link.delay: [0ms, 20ms]
"""


def _swarm_state() -> str:
    return proc.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"], timeout_s=30).stdout.strip()


def bare_deploy_rm(stack_path: Path, workdir: Path) -> float:
    """Seconds for bare Swarm to run the stack at ``stack_path`` until its clients end, and remove it."""
    stack = yaml.safe_load(stack_path.read_text(encoding="utf-8"))
    for service, replicas in stack.pop(SCALE_KEY, {}).items():
        stack["services"][service]["deploy"]["replicas"] = replicas
    bare = workdir / f"bare-{stack_path.name}"
    bare.write_text(yaml.safe_dump(stack, sort_keys=False), encoding="utf-8")
    name = f"socklab-bench-bare-{secrets.token_hex(3)}"
    client = engine().client
    clients = sum(int(s["deploy"]["replicas"]) for n, s in stack["services"].items() if n != "server")
    flt = {"label": f"{STACK_LABEL}={name}"}

    def clients_ended() -> bool | None:
        states = [task_state(t) for s in client.services.list(filters=flt) if not s.name.endswith("_server")
                  for t in s.tasks()]
        return True if len(states) >= clients and all(state in ENDED_STATES for state in states) else None

    started = time.monotonic()
    try:
        proc.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(bare), name], timeout_s=120)
        wait_for(clients_ended, BARE_S, f"the clients of the bare stack {name} did not end")
    finally:
        proc.run(["docker", "stack", "rm", name], check=False, timeout_s=120)
        wait_for(lambda: None if client.containers.list(all=True, filters=flt, sparse=True) else True, BARE_S,
                 f"the containers of the bare stack {name} were not removed")
        wait_for(lambda: None if client.networks.list(filters=flt) else True, BARE_S,
                 f"the network of the bare stack {name} was not removed")
    return time.monotonic() - started


def _swarm_seconds(rundir: RunDir, repetition: int, experiment: Experiment, scratch: Path) -> float:
    (stack_path,) = rundir.compose.glob(f"*r{repetition}*.stack.yaml")
    return bare_deploy_rm(stack_path, scratch)


SWARM_REFERENCE = BareReference("swarm", "bare `docker stack deploy` + `rm` of the case's stack", "bare_deploy_rm_s",
                                _swarm_seconds)


def _swarm_run(manager: Vm, name: str, text: str, log: Log) -> list[dict]:
    """An experiment run by lab.py on the VMs' swarm; its records (every case must be ok)."""
    manager.put(f"/root/{name}.yaml", text.encode())
    out = f"/root/bench-runs/{name}"
    started = time.monotonic()
    done = in_tree(manager, ["python3", "lab.py", "run", f"/root/{name}.yaml", "--engine", "swarm", "--no-trace",
                             "--out", out], timeout_s=1800)
    records = run_records(manager, out)
    bad = [r for r in records if r["status"] != "ok"]
    if bad:  # the case's own sentence says why
        raise RuntimeError(f"{name}: case {bad[0]['case']}: {bad[0]['status']}: {bad[0]['error']}")
    if done.returncode != 0 or not records:
        raise RuntimeError(f"{name} on the VMs' swarm exited {done.returncode}:\n{done.stdout[-3000:]}"
                           f"{done.stderr[-2000:]}")
    log(f"{name}: {len(records)} case(s) on the VMs' swarm in {time.monotonic() - started:.0f} s")
    return records


def cross_host(quick: bool, log: Log) -> tuple[list[dict], dict]:
    """Goodput and round trips across the hosts of a three-VM swarm."""
    problem = missing_prerequisite(BASE_IMAGE)
    if problem:
        raise RuntimeError(f"no VMs here: {problem}")
    repeat = 1 if quick else 2
    image = build_vm_image(env={"BASE_IMAGE": BASE_IMAGE})
    with tempfile.TemporaryDirectory(prefix="socklab-bench-swarm-") as workdir:
        with Fabric(image, Path(workdir), count=3, memory_mib=FABRIC_MEMORY_MIB) as fabric:
            fabric.wait_docker()
            install_lab(fabric.vms[0])
            make_swarm(fabric.vms)
            log("a swarm of three VMs, the lab image on each")
            try:
                manager = fabric.vms[0]
                goodput = _swarm_run(manager, "cross-host-goodput", CROSS_GOODPUT.format(repeat=repeat), log)
                rtt = _swarm_run(manager, "cross-host-rtt", CROSS_RTT.format(repeat=repeat), log)
            finally:
                leave_swarm(fabric.vms)
    figures = []
    for rate in ("10mbit", "50mbit"):
        chosen = [r for r in goodput if r["params"]["clients.sender.link.rate"] == rate]
        measured = [r["clients"][0]["goodput_bps"] / 1e6 for r in chosen]
        ceilings = [tcp_ceiling_bps(parse_rate_bps(rate), r["link"]["mtu"]) / 1e6 for r in chosen]
        figures.append(figure(f"swarm.cross.goodput.{rate}", f"bulk goodput vm2 -> vm1 through {rate} on the overlay",
                              "Mbit/s", measured, reference="TCP ceiling at the overlay's MTU",
                              reference_samples=ceilings, target={"within": 0.05}))
    by_repetition: dict[int, dict[str, float]] = {}
    for record in rtt:
        delay = record["params"]["clients.pinger.link.delay"]
        by_repetition.setdefault(record["repetition"], {})[delay] = record["clients"][0]["latency_ms"]["p50"]
    pairs = [(p["20ms"], 40 + p["0ms"]) for p in by_repetition.values()]
    figures.append(figure("swarm.cross.rtt.20ms", "echo round trip vm2 -> vm1 with 20 ms each way (p50)", "ms",
                          [m for m, _ in pairs], reference="2 x delay + unshaped round trip vm2 -> vm1, same run",
                          reference_samples=[e for _, e in pairs], target={"within": 0.05}))
    details = {
        "mtu": sorted({r["link"]["mtu"] for r in goodput}),
        "backend": sorted({r["link"]["backend"] for r in goodput + rtt}),
        "nodes": {"goodput": goodput[0]["nodes"], "rtt": rtt[0]["nodes"]},
        "unshaped_rtt_ms": [p["0ms"] for p in by_repetition.values()],
    }
    return figures, details


def run(quick: bool, log: Log) -> dict:
    """Every swarm figure; ``quick`` uses fewer repetitions."""
    build_image()
    made = _swarm_state() == "inactive"
    if made:
        proc.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], timeout_s=60)
    try:
        figures, rows = [], []
        for replicas in (1, 10):
            fig, timings = per_case(replicas, 1 if quick else 3, log, SWARM_REFERENCE, SwarmEngine(engine()))
            figures.append(fig)
            rows += timings
    finally:
        if made:
            proc.run(["docker", "swarm", "leave", "--force"], timeout_s=60)
    cross_figures, cross_details = cross_host(quick, log)
    return {"figures": figures + cross_figures, "details": {"per_case": rows, "cross_host": cross_details}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, log_to_stderr), indent=1))
