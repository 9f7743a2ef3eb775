"""The VM fabric itself: stock kernel with netem, the private network, the agent, clean-up."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The first test of a session also waits for the image (built once, ~6 min) and the boots.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]


def test_vms_run_debians_stock_kernel_with_netem(fabric):
    for vm in fabric.vms:
        kernel = vm.sh("uname -r").stdout.strip()
        assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", kernel), kernel
        vm.sh("modprobe sch_netem && grep -q '^sch_netem ' /proc/modules")


def test_vms_reach_each_other_over_the_switch_and_nothing_else(fabric):
    vm0, *peers = fabric.vms
    for peer in peers:
        done = vm0.sh(f"ping -c 5 -i 0.2 -W 2 {peer.address}").stdout
        assert " 0% packet loss" in done, done
    # No default route; eth0 carries only the fabric's subnet (docker0 its own bridge), so any
    # other destination has no route at all and nothing is sent.
    for vm in fabric.vms:
        assert vm.sh("ip -4 route show default").stdout.strip() == ""
        assert vm.sh("ip -4 route show dev eth0").stdout.split() == ["10.213.7.0/24", "proto", "kernel",
                                                                    "scope", "link", "src", vm.address]
        refused = vm.exec(["ip", "route", "get", "192.0.2.1"])
        assert refused.returncode != 0 and "unreachable" in refused.stderr, refused


def test_files_cross_the_agent_both_ways_unchanged(fabric):
    vm = fabric.vms[1]
    data = os.urandom(3 * 1024 * 1024)
    vm.put("/tmp/blob", data, mode=0o600)
    assert vm.sh("sha256sum /tmp/blob").stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert vm.get("/tmp/blob") == data
    assert vm.sh("stat -c %a /tmp/blob").stdout.strip() == "600"


def test_a_command_past_its_timeout_is_killed_in_the_guest(fabric):
    started = time.monotonic()
    done = fabric.vms[1].exec(["sh", "-c", "sleep 60"], timeout_s=2)
    assert done.timed_out and time.monotonic() - started < 30
    assert fabric.vms[1].sh("pgrep -x sleep || true").stdout.strip() == ""


CTRL_C_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.vm.fabric import Fabric
from tests.vm.qemu import Image
fabric = Fabric(Image(Path({image!r})), Path({workdir!r}), count=1, memory_mib=512)
fabric.start()
print(" ".join(map(str, fabric.pids())), flush=True)
time.sleep(600)
"""


def test_ctrl_c_stops_every_process_the_fabric_started(vm_image, tmp_path):
    script = CTRL_C_SCRIPT.format(root=str(ROOT), image=str(vm_image.directory), workdir=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2, "the switch and one QEMU"
        assert "qemu-system" in Path(f"/proc/{pids[1]}/cmdline").read_text()
        parent.send_signal(signal.SIGINT)
        parent.wait(60)
        assert "KeyboardInterrupt" in parent.stderr.read(), "Ctrl-C ended it as Ctrl-C does"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived Ctrl-C"
    assert not list(tmp_path.glob("*.qcow2")), "the overlay is removed"
