"""The lab's Compose project inside a VM, driven through the agent (for the netem tests).

The same moves as tests/lab/test_userspace_link.py makes on the host — an
unshaped server, a client run with its link given as SOCKLAB_LINK_* — but every
command runs in the VM, next to its engine and its netem kernel.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shlex
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from labkit import linkcheck
from labkit.compose import READY_SERVICE
from socklab.entry import FLUSH_TCP_METRICS
from socklab.results import find_results

from .fabric import FabricError, GuestResult, Vm

ROOT = Path(__file__).resolve().parents[2]
GUEST_TREE = "/root/socklab"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "socklab-base:bookworm")
# The memory of the three VMs of the tier and of the cross-host benchmark. vm0 runs the lab;
# vm1 and vm2, the swarm's workers, start ten client containers each at once: on 512 MiB
# that had a worker's dockerd killed for want of memory, and 1 GiB peaked at 819 MiB used.
FABRIC_MEMORY_MIB = (1024, 1536, 1536)
# vCPUs of the lab VM. netem runs in the kernel, on whichever CPU the packet is on; the delay
# line is a process, and with one vCPU it shared that CPU with both ends of the flow it shapes:
# the VM was 98 % busy through seed-demo's bulk, the line released packets 3.5-7 ms late, and
# its goodput fell to 0.88-0.91 of netem's on a slower machine. Any machine a user runs the lab
# on has a second CPU. (Raising the line's priority instead made it worse: 6.9 of 9.0 Mbit/s.)
LAB_VM_CPUS = 2
# The swarm's workers start containers and carry their flows; the emulated CPU is all they need.
# vm1 is also where test_netem_link.py reads netem to the millisecond (conftest's netem_vm): on
# one vCPU no wake-up crosses between emulated CPUs.
# (bench/vm.py and bench/swarm.py keep one vCPU per VM: BENCHMARKS.md's emulated sections were
# measured so, and a change of their machine goes with a run that measures it.)
FABRIC_CPUS = (LAB_VM_CPUS, 1, 1)
# An emulated CPU now and then runs late for a while (another process of the
# host's, QEMU's own threads): a measurement whose round trips spread, or that
# misses, is taken again, at most this many times in all. A link that is wrong
# misses every time; every attempt is printed.
ATTEMPTS = 3
# The curated experiments' timeouts are for a native host, and a case's timeout counts its
# containers' start: under TCG that alone is ~25 s, and on a loaded host a seed-demo case on
# the swarm ran past its 90 s and a lossy-link case took 117 of its 120. The tier's runs of
# them set this budget instead; it bounds a hang, it measures nothing.
EMULATED_TIMEOUT = ("--set", "timeout=600s")


# What the lab needs to build and run: the tests, docs and recorded results stay on the host.
LAB_PATHS = ("lab.py", "compose.yaml", "requirements.txt", "labkit/", "services/", "configs/")


def working_tree_tar() -> bytes:
    """The lab's files of the working tree as git sees them (tracked and untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name in sorted(set(listed.decode().split("\0")) - {""}):
            if name.startswith(LAB_PATHS) and (ROOT / name).is_file():
                tar.add(ROOT / name, arcname=name, recursive=False)
    return buffer.getvalue()


def install_lab(vm: Vm) -> None:
    """The working tree's lab at GUEST_TREE in ``vm``, its image built there (from BASE_IMAGE)."""
    vm.put("/root/socklab.tar.gz", working_tree_tar())
    vm.sh(f"rm -rf {GUEST_TREE} && mkdir -p {GUEST_TREE} && tar -xzf /root/socklab.tar.gz -C {GUEST_TREE}")
    # Built as lab.py builds it (labelled with its sources), so that no run in the VM builds again.
    in_tree(vm, ["python3", "-c", "from labkit.engine.compose import ComposeEngine; ComposeEngine().build_image()"],
            timeout_s=900, env={"PYTHONPATH": "services"}).check()


def run_records(vm: Vm, out: str) -> list[dict]:
    """The records of the one run `lab.py run --out OUT` made in ``vm`` (none if it wrote no cases.jsonl)."""
    found = vm.exec(["sh", "-c", f"ls {out}/*/*/cases.jsonl"]).stdout.split()
    if len(found) > 1:
        raise FabricError(f"{out} holds {len(found)} runs, not one: {found}")
    return [json.loads(line) for line in vm.get(found[0]).decode().splitlines()] if found else []


def make_swarm(vms: list[Vm]) -> None:
    """A swarm of ``vms``: the first the manager, the others workers, each with the lab image built there."""
    manager, *workers = vms
    with ThreadPoolExecutor(max(1, len(workers))) as pool:
        list(pool.map(install_lab, workers))
    manager.sh(f"docker swarm init --advertise-addr {manager.address}", timeout_s=120)
    token = manager.sh("docker swarm join-token -q worker").stdout.strip()
    for worker in workers:
        worker.sh(f"docker swarm join --advertise-addr {worker.address} --token {token} {manager.address}:2377",
                  timeout_s=120)
    manager.sh(f"i=0; until [ \"$(docker node ls --filter role=worker --format '{{{{.Status}}}}' | grep -c Ready)\" "
               f"= {len(workers)} ]; do i=$((i+1)); [ $i -lt 300 ] || exit 1; sleep 0.2; done", timeout_s=120)


def leave_swarm(vms: list[Vm]) -> None:
    """Every VM out of its swarm, workers first; a VM that was powered off is left alone."""
    for vm in reversed(vms):
        if vm.process.poll() is None:
            vm.exec(["docker", "swarm", "leave", "--force"], timeout_s=120)


def in_tree(vm: Vm, argv: list[str], timeout_s: float = 600, env: dict | None = None) -> GuestResult:
    """Run ``argv`` in the VM's copy of the working tree (the lab's environment set)."""
    return vm.exec(argv, cwd=GUEST_TREE, timeout_s=timeout_s, env={"BASE_IMAGE": BASE_IMAGE, **(env or {})})


SHOW_MARK = "--- socklab shape show ---"
# A ping-pong of 64-byte requests: each request, reply and ACK is one packet.
ECHO = ["--mode", "blocking", "--workload", "echo", "--size", "64"]
SERVER_ARGS = ["server", "--mode", "threaded", "--port", "5000", "--max-connections", "1000"]


def link_flags(link: dict[str, str], backend: str = "netem") -> list[str]:
    """`docker compose run -e` flags for a client link (rate unset unless given)."""
    env = {"SOCKLAB_LINK_RATE": "", "SOCKLAB_LINK_BACKEND": backend, "SOCKLAB_REPORT_LINK": "1",
           **{f"SOCKLAB_LINK_{k.upper()}": v for k, v in link.items()}}
    return [flag for key, value in env.items() for flag in ("-e", f"{key}={value}")]


class GuestProject:
    """One Compose project in the VM: an unshaped server and one kept client container.

    Under TCG a `docker compose run` costs tens of seconds, so the measurements
    share one client container: each applies its link from scratch with
    `socklab shape apply` (new qdiscs, counters from zero) and runs the lab's
    client in it by `docker exec`, as the orchestrator's --reuse does.
    """

    def __init__(self, vm: Vm, *server_args: str, command: list[str] | None = None):
        """The server runs ``command`` (the image's entrypoint's arguments), by default the
        threaded server on port 5000 with ``server_args`` on top."""
        self.vm = vm
        self.name = f"socklab-vm-{secrets.token_hex(3)}"
        self.override = f"/tmp/{self.name}.json"
        self.client_container = f"{self.name}-client"
        command = command or [*SERVER_ARGS, *server_args]
        vm.put(self.override, json.dumps({"services": {"server": {"command": command}}}).encode())
        self.compose("up", "-d", "--wait", "server", env={"SERVER_LINK_RATE": ""})
        self.compose("run", "--rm", "--no-deps", READY_SERVICE)  # until it listens (ComposeProject.up)
        self.compose("run", "-d", "--use-aliases", "--name", self.client_container, *link_flags({}),
                     "client", "exec", "sleep", "3600")

    def compose(self, *args: str, timeout_s: float = 300, env: dict | None = None, check: bool = True):
        done = in_tree(self.vm, ["docker", "compose", "-p", self.name, "-f", f"{GUEST_TREE}/compose.yaml",
                                 "-f", self.override, *args], timeout_s=timeout_s, env=env)
        return done.check() if check else done

    def shape(self, *argv: str) -> str:
        """`socklab shape ARGV` in the client container, as root (it has NET_ADMIN only)."""
        return self.vm.exec(["docker", "exec", self.client_container, "python3", "-m", "socklab", "shape",
                             *argv], timeout_s=120).check().stdout

    def probe(self, link: list[str], sabotage: str | None = None) -> dict:
        """Shape ``link`` on netem in the client container (nothing shaped if empty), run
        ``sabotage`` (a shell command) if given, and probe the path to the server as every case
        does (socklab.linkprobe): the probe's result, judged by labkit.linkcheck."""
        apply = ["python3", "-m", "socklab", "shape", "apply", *(["backend=netem", *link] if link else [])]
        probe = ["python3", "-m", "socklab", "probe", "--server", "server:5000"]
        steps = [f"{shlex.join(apply)} >&2", *([sabotage] if sabotage else []), shlex.join(probe)]
        done = self.vm.exec(["docker", "exec", self.client_container, "sh", "-c", " && ".join(steps)],
                            timeout_s=300).check()
        (found,) = [r for r in find_results(done.stdout) if r.get("role") == "probe"]
        verdict = linkcheck.judge(found)
        print(f"{' '.join(link) or 'unshaped'}{' then ' + sabotage if sabotage else ''}: "
              f"{linkcheck.verdict_text(verdict)}")
        return verdict

    def probe_until_held(self, link: list[str], unshaped_rtt_ms: float, attempts: int = ATTEMPTS) -> list[dict]:
        """Probe ``link`` until a verdict holds past ``unshaped_rtt_ms`` (see holds_past), at most
        ``attempts`` times: every verdict, in order (a wrong link misses every time)."""
        verdicts = [self.probe(link)]
        while not holds_past(verdicts[-1], unshaped_rtt_ms) and len(verdicts) < attempts:
            verdicts.append(self.probe(link))
        return verdicts

    def link(self) -> dict:
        """The client container's link as applied, with the kernel's qdisc counters."""
        return json.loads(self.shape("show", "--json"))

    def run_client(self, *args: str, timeout_s: float = 300) -> dict:
        """The lab's client (unprivileged) against the server, on the link as it is now; its result."""
        done = self.vm.exec(["docker", "exec", "-u", "socklab", self.client_container, "python3", "-m", "socklab",
                             "client", "--host", "server", "--port", "5000", *args], timeout_s=timeout_s).check()
        found = [r for r in find_results(done.stdout) if r.get("role") == "client"]
        if len(found) != 1:
            raise FabricError(f"the client printed no result:\n{done.stdout}\n{done.stderr}")
        assert found[0]["errors"] == [], found[0]
        return found[0]

    def client(self, link: list[str], *args: str) -> dict[str, dict]:
        """Apply ``link`` (shape words: delay=20ms, up.rate=5mbit, ...) on netem, run one client.

        Its results by role: client, and link (applied, qdiscs with counters)
        read right after it. One `docker exec` for all three steps: each exec
        costs seconds under TCG. The client runs unprivileged, as in the lab.
        """
        apply = shlex.join(["python3", "-m", "socklab", "shape", "apply", *(["backend=netem", *link] if link else [])])
        client = shlex.join(["setpriv", "--reuid=socklab", "--regid=socklab", "--clear-groups", "python3", "-m",
                             "socklab", "client", "--host", "server", "--port", "5000", *args])
        # The kernel remembers ssthresh and RTT per peer: a kept container forgets them first,
        # as the lab's --reuse does (FLUSH_TCP_METRICS), or one loss test slows the next bulk.
        flush = shlex.join(FLUSH_TCP_METRICS)
        script = f"{flush} && {apply} >&2 && {client} && echo {SHOW_MARK} && python3 -m socklab shape show --json"
        done = self.vm.exec(["docker", "exec", self.client_container, "sh", "-c", script], timeout_s=300).check()
        if link and "backend netem" not in done.stderr:
            raise FabricError(f"the link was not applied on netem: {done.stderr}")
        ran, _, shown = done.stdout.partition(SHOW_MARK)
        found = [r for r in find_results(ran) if r.get("role") == "client"]
        if len(found) != 1:
            raise FabricError(f"the client printed no result:\n{done.stdout}\n{done.stderr}")
        assert found[0]["errors"] == [], found[0]
        return {"client": found[0], "link": json.loads(shown)}

    def down(self) -> None:
        """Remove the project (tolerating a VM that is already gone)."""
        try:
            self.compose("down", "-v", "--remove-orphans", "--timeout", "2", timeout_s=120, check=False)
            self.vm.exec(["rm", "-f", self.override])
        except FabricError:
            pass


def echo_project(vm: Vm) -> GuestProject:
    """An unshaped iterative echo server in ``vm``, and a kept client container.

    The iterative server waits in recv() alone. Under an emulated CPU the lab's
    other servers take longer to wake after an idle gap than between
    back-to-back requests, which a delayed link makes part of every round trip:
    with a bare ping-pong client through 20 ms of netem, measured 20.50 ms p50
    behind blocking, 21.33 behind threaded and 22.01 behind epoll (0.27-0.36 ms
    unshaped behind each). That is the emulated server, not the link.
    """
    return GuestProject(vm, "--mode", "blocking", "--workload", "echo")


def holds_past(verdict: dict, unshaped_rtt_ms: float) -> bool:
    """linkcheck's tolerances on a probe's verdict, its round trip counted past ``unshaped_rtt_ms``
    (what the probe measures in the same VM with nothing shaped): its pings are answered and timed
    by Python, and on an emulated CPU that adds milliseconds to every round trip (40 ms of netem
    probed 41-47.3, with 1.4-2.6 unshaped)."""
    expected_ms = verdict["rtt_expected_ms"]
    ratios = [verdict[f"{direction}_ratio"] for direction in ("up", "down")]
    return (abs(verdict["rtt_ms"] - unshaped_rtt_ms - expected_ms) <= linkcheck.rtt_allowed_ms(expected_ms)
            and all(r is None or linkcheck.rate_ratio_ok(r) for r in ratios))


def unshaped_after_idle(echo_lab: GuestProject, idle_ms: float, requests: int) -> dict[str, float]:
    """The unshaped round trip's figures (the client's latency_ms: p50, p90, ...) when each request
    follows ``idle_ms`` of nothing.

    Under an emulated CPU a process that waited longer wakes slower: back to
    back, the unshaped round trip was 0.41 ms; after 20 ms of idle, 0.9-1.2 ms;
    after 40 ms, 1.3 ms; after 60 ms, up to 2.4 ms more than after 20. Through
    a delayed link both roles wait that long before each request and each
    reply, so a delay is judged against the unshaped round trip with the same
    wait (the client's think time), measured in the same attempt; kernel-only
    pings through netem in the same VM showed netem itself within 0.4 ms of 20 ms.
    """
    results = echo_lab.client([], *ECHO, "--requests", str(requests), "--think", f"{idle_ms:g}ms")
    return results["client"]["latency_ms"]


def netem_qdiscs(link_result: dict) -> dict[str, dict]:
    """The link's netem qdiscs by direction: 'up' on eth0, 'down' on the ifb device."""
    found = {}
    for dev, qdiscs in link_result["qdisc"].items():
        for qdisc in qdiscs:
            if qdisc["kind"] == "netem":
                found["up" if dev == "eth0" else "down"] = qdisc
    return found
