"""The lab inside a VM with Debian's stock kernel: netem is what `auto` picks there.

The orchestrator runs inside the VM, next to the VM's engine (see conftest.py
for why); every byte goes between the containers of the VM's own lab networks.
"""

from __future__ import annotations

import pytest

from socklab.results import find_results

from .guestlab import in_tree

# The first test of a session also waits for the image (built once, ~6 min) and the boots.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

# The tutorial's 10 Mi lines take minutes through an emulated CPU; 1 Mi lines
# (13.6 MB) still dwarf every socket buffer, which is all the facts need.
PAYLOAD = len("Hello Python\n" * 1024 * 1024)


def test_doctor_in_the_vm_names_netem(lab_vm):
    done = in_tree(lab_vm, ["python3", "lab.py", "doctor"], timeout_s=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shaping backend: netem (rate by tbf; delay, jitter and loss by sch_netem)" in done.stdout, done.stdout
    assert "netem yes" in done.stdout and "sch_netem is missing" not in done.stdout


def _logs(vm, project: str, service: str) -> str:
    """What ``service`` printed, read in the VM the way the lab reads logs (ComposeProject.logs)."""
    script = ("import sys; sys.path.insert(0, 'services'); from labkit.compose import ComposeProject; "
              f"sys.stdout.write(ComposeProject({project!r}).logs({service!r}))")
    return in_tree(vm, ["python3", "-c", script]).check().stdout


def _result(vm, project: str, service: str, role: str) -> dict:
    found = [r for r in find_results(_logs(vm, project, service)) if r.get("role") == role]
    assert len(found) == 1, f"{service}: {found}"
    return found[0]


def test_the_compose_demo_tells_the_tutorials_facts_on_netem(lab_vm):
    project = "socklab-vmdemo"
    # A small delay on the clients' links makes `auto` choose: netem here, the delay line without it.
    env = {"CLIENT_LINK_DELAY": "2ms", "DEMO_BYTES": str(PAYLOAD)}
    try:
        done = in_tree(lab_vm, ["docker", "compose", "-p", project, "up"], timeout_s=600, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        blocking = _result(lab_vm, project, "client-blocking", "client")
        nonblocking = _result(lab_vm, project, "client-nonblocking", "client")
        server = _result(lab_vm, project, "server", "server")
        summary = _logs(lab_vm, project, "summary")
        links = [_logs(lab_vm, project, s) for s in ("client-blocking", "client-nonblocking")]
    finally:
        in_tree(lab_vm, ["docker", "compose", "-p", project, "down", "-v", "--remove-orphans"], timeout_s=120)
    print(summary)
    assert blocking["bytes_requested"] == blocking["bytes_accepted"] == blocking["bytes_delivered"] == PAYLOAD
    assert blocking["send_s"] > 5 * nonblocking["send_s"]
    assert nonblocking["send_calls"] == 1 and 0 < nonblocking["bytes_accepted"] < PAYLOAD
    # "At once" under an emulated CPU: one send() of ~80 KB measured 0.04 s here.
    assert nonblocking["send_s"] < 0.25
    assert nonblocking["bytes_delivered"] == nonblocking["bytes_accepted"]
    received = sorted(c["bytes_received"] for c in server["per_connection"])
    assert received == sorted([PAYLOAD, nonblocking["bytes_accepted"]])
    for label in ("bytes requested", "bytes send() returned", "seconds inside send()",
                  "bytes server confirmed", "server (blocking): 2 connections"):
        assert label in summary, summary
    assert f"{PAYLOAD:,}" in summary and f"{nonblocking['bytes_accepted']:,}" in summary
    for log in links:  # the entrypoint's one line about the link it applied
        assert "link eth0: " in log and "(backend netem, applied" in log, log[-2000:]
