"""Benchmark: what the lab costs per case on Docker Swarm, against a bare `docker stack deploy` + `rm`.

    python3 bench/swarm.py [--quick]

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

from benchlab import build_image, case_runner, engine  # noqa: E402
from common import Log, figure, log_to_stderr  # noqa: E402
from labkit import proc  # noqa: E402
from labkit.config import load_experiment_text  # noqa: E402
from labkit.engine.swarm import ENDED_STATES, SCALE_KEY, STACK_LABEL, SwarmEngine, wait_for  # noqa: E402
from labkit.matrix import expand_cases, expand_runs  # noqa: E402
from labkit.rundir import RunDir  # noqa: E402
from overhead import CASE_EXPERIMENT, _workload_s  # noqa: E402

BARE_S = 300.0


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
        states = [t["Status"]["State"] for s in client.services.list(filters=flt) if not s.name.endswith("_server")
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


def per_case(replicas: int, repetitions: int, log: Log) -> tuple[dict, list[dict]]:
    """The swarm overhead figure for ``replicas`` client containers, and every repetition's timings."""
    experiment = load_experiment_text(CASE_EXPERIMENT.format(replicas=replicas), "bench-swarm.yaml")
    (case, _), = expand_runs(expand_cases(experiment))
    lab_s, bare_s, rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        rundir = RunDir.create(Path(tmp), experiment.name)
        runner = case_runner(rundir, lambda text: None, SwarmEngine(engine()), trace=True)
        for repetition in range(1, repetitions + 1):
            started = time.monotonic()
            record = runner.run(case, repetition)
            total_s = time.monotonic() - started
            if record["status"] != "ok":
                raise RuntimeError(f"swarm case with {replicas} clients: {record['status']}: {record['error']}")
            outside_s = total_s - _workload_s(record)
            (stack_path,) = rundir.compose.glob(f"*r{repetition}*.stack.yaml")
            bare = bare_deploy_rm(stack_path, Path(tmp))
            lab_s.append(outside_s)
            bare_s.append(bare)
            rows.append({"replicas": replicas, "repetition": repetition, "case_s": round(total_s, 3),
                         "workload_s": round(_workload_s(record), 3), "outside_s": round(outside_s, 3),
                         "bare_deploy_rm_s": round(bare, 3)})
            log(f"swarm overhead, {replicas} client container(s): case {total_s:.2f} s, outside the workload "
                f"{outside_s:.2f} s; bare stack deploy + rm {bare:.2f} s")
    return figure(f"swarm.overhead.case.{replicas}", f"seconds per case outside the workload on a single-node "
                  f"swarm, {replicas} client container(s)", "s", lab_s,
                  reference="bare `docker stack deploy` + `rm` of the case's stack", reference_samples=bare_s,
                  target={"max": 1.2}), rows


def run(quick: bool, log: Log) -> dict:
    """Every swarm figure; ``quick`` uses fewer repetitions."""
    build_image()
    made = _swarm_state() == "inactive"
    if made:
        proc.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], timeout_s=60)
    try:
        figures, rows = [], []
        for replicas in (1, 10):
            fig, timings = per_case(replicas, 1 if quick else 3, log)
            figures.append(fig)
            rows += timings
    finally:
        if made:
            proc.run(["docker", "swarm", "leave", "--force"], timeout_s=60)
    return {"figures": figures, "details": {"per_case": rows}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, log_to_stderr), indent=1))
