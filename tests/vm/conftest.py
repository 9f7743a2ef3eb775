"""Fixtures of the VM tier: the image, one fabric of VMs per session, the lab inside one.

Each VM boots once per session (TCG boots take tens of seconds). The fabric is
closed by a finaliser — also when a test fails or the run is interrupted — and
the fabric itself ends its processes by PID at exit or on a signal.

Where the orchestrator runs: *inside* the lab VM. The VM's Docker engine is
reachable only through the agent (the VMs' network has no route to the host, by
design), and the lab's own behaviour there — `auto` probing the kernel it runs
on, `lab.py doctor`, Compose building from the working tree — is exactly what a
user on a netem kernel gets when they run lab.py next to their engine.
"""

from __future__ import annotations

import time

import pytest

from .fabric import Fabric, Vm, build_image, missing_prerequisite
from .guestlab import BASE_IMAGE, FABRIC_CPUS, FABRIC_MEMORY_MIB, echo_project, install_lab

# Every timing of the tier's set-up, printed at the end of the session (pytest -s or -rA).
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def vm_image():
    """The VM image, built once per set of inputs and cached on the host."""
    problem = missing_prerequisite(BASE_IMAGE)
    if problem:
        pytest.skip(problem)
    started = time.monotonic()
    image = build_image(env={"BASE_IMAGE": BASE_IMAGE})
    TIMINGS["image (build or cache hit)"] = time.monotonic() - started
    return image


@pytest.fixture(scope="session")
def fabric(vm_image, tmp_path_factory):
    """Three VMs on one switch: vm0 runs the lab, vm1 and vm2 are its peers on the network and, in
    test_swarm_across_vms.py, the swarm's workers (their sizes: guestlab.FABRIC_MEMORY_MIB and FABRIC_CPUS)."""
    vms = Fabric(vm_image, tmp_path_factory.mktemp("vm-fabric"), count=3, memory_mib=FABRIC_MEMORY_MIB,
                 cpus=FABRIC_CPUS)
    try:
        TIMINGS["boot to agents answering (3 VMs)"] = vms.start()
        started = time.monotonic()
        vms.wait_docker()
        TIMINGS["dockerd ready after that"] = time.monotonic() - started
    except BaseException:
        vms.close()
        raise
    yield vms
    vms.close()


@pytest.fixture(scope="session")
def lab_vm(fabric) -> Vm:
    """vm0 with the working tree at GUEST_TREE and the lab image built there."""
    return _with_lab(fabric.vms[0], "working tree into the VM, lab image built there")


@pytest.fixture(scope="session")
def netem_vm(fabric) -> Vm:
    """vm1, one vCPU, with the working tree at GUEST_TREE and the lab image built there: where
    test_netem_link.py measures netem's delay and jitter to the millisecond.

    Two emulated vCPUs (the lab VM's) spread the round trips those tests read: a 20 ms
    round trip through netem with no jitter had 3.4-4.7 ms between p50 and p90 there, and
    0.4-0.8 ms on one vCPU; its p50 sat 1-1.8 ms past the unshaped round trip (within 0.4
    ms on one vCPU). A wake-up that crosses to the other emulated CPU is slow. The VM's
    swarm tests install the lab again when vm1 joins as a worker.
    """
    return _with_lab(fabric.vms[1], "working tree into the netem VM, lab image built there")


def _with_lab(vm: Vm, timing: str) -> Vm:
    """``vm`` after install_lab, its time kept in TIMINGS under ``timing``."""
    started = time.monotonic()
    install_lab(vm)
    TIMINGS[timing] = time.monotonic() - started
    return vm


@pytest.fixture(scope="session")
def echo_lab(lab_vm):
    """guestlab.echo_project in the lab VM: the references of test_backends_agree.py's runs."""
    lab = echo_project(lab_vm)
    yield lab
    lab.down()


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "VM tier timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")

