"""The lab on real containers: the demonstration, shaped links, least privilege.

Every byte these tests send goes between containers of the project they
created, on its internal network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from labkit import proc
from socklab.shaping.plan import tcp_ceiling_bps
from socklab.units import parse_rate_bps

from .conftest import iperf3_bps, result_of

pytestmark = pytest.mark.docker

RATE_TOLERANCE = 0.07
SERVER_ENV = {"SERVER_MODE": "threaded", "SERVER_MAX_CONNECTIONS": "1000000"}
UNSHAPED_CLIENT = {"CLIENT_LINK_RATE": ""}


def bulk_client(*, megabytes: int, host: str = "server") -> list[str]:
    """Arguments for the lab's blocking bulk client."""
    return ["client", "--mode", "blocking", "--host", host, "--port", "5000",
            "--workload", "bulk", "--bytes", f"{megabytes}MB"]


def assert_near_ceiling(measured_bps: float, rate: str, what: str) -> None:
    ceiling = tcp_ceiling_bps(parse_rate_bps(rate))
    ratio = measured_bps / ceiling
    assert abs(ratio - 1) <= RATE_TOLERANCE, (
        f"{what}: {measured_bps / 1e6:.2f} Mbit/s is {ratio:.3f} x the {rate} ceiling "
        f"({ceiling / 1e6:.2f} Mbit/s)")


def test_demo_reproduces_the_tutorial(project):
    started = time.monotonic()
    done = project.compose("up", timeout_s=300, check=False)
    elapsed_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    blocking = result_of(proc.Completed((), 0, project.logs("client-blocking"), ""))
    nonblocking = result_of(proc.Completed((), 0, project.logs("client-nonblocking"), ""))
    server = result_of(proc.Completed((), 0, project.logs("server"), ""))
    payload = len("Hello Python\n" * 10 * 1024 * 1024)

    # Blocking send(): the kernel took everything, and it took the link's time.
    assert blocking["bytes_requested"] == blocking["bytes_accepted"] == payload
    assert blocking["bytes_delivered"] == payload
    assert blocking["send_s"] > 5 * nonblocking["send_s"]
    # Non-blocking send(): one call, a partial count, at once.
    assert nonblocking["send_calls"] == 1
    assert 0 < nonblocking["bytes_accepted"] < payload
    assert nonblocking["send_s"] < 0.05
    # What send() accepted is what the server received, in both modes.
    assert nonblocking["bytes_delivered"] == nonblocking["bytes_accepted"]
    received = sorted(c["bytes_received"] for c in server["per_connection"])
    assert received == sorted([payload, nonblocking["bytes_accepted"]])

    summary = project.logs("summary")
    for label in ("bytes requested", "bytes send() returned", "seconds inside send()",
                  "bytes server confirmed", "server (blocking): 2 connections"):
        assert label in summary, summary
    assert f"{payload:,}" in summary and f"{nonblocking['bytes_accepted']:,}" in summary
    assert elapsed_s < 120, f"the demonstration took {elapsed_s:.0f} s"


# (what is shaped, compose variables): up is the client's egress; down is the
# server's ingress (through ifb), which carries the same client-to-server bulk.
SHAPES = [
    pytest.param("up", "10mbit", {"CLIENT_LINK_UP_RATE": "10mbit"}, 6, id="up-10mbit"),
    pytest.param("up", "50mbit", {"CLIENT_LINK_UP_RATE": "50mbit"}, 25, id="up-50mbit"),
    pytest.param("down", "10mbit", {"SERVER_LINK_DOWN_RATE": "10mbit"}, 6, id="down-10mbit"),
    pytest.param("down", "50mbit", {"SERVER_LINK_DOWN_RATE": "50mbit"}, 25, id="down-50mbit"),
]


@pytest.mark.parametrize("direction,rate,shape_env,megabytes", SHAPES)
def test_rate_shaping_holds(project, direction, rate, shape_env, megabytes):
    env = {**SERVER_ENV, **UNSHAPED_CLIENT, **shape_env}
    project.up("server", env=env)

    lab = result_of(project.run("client", *bulk_client(megabytes=megabytes), env=env))
    assert lab["bytes_delivered"] == megabytes * 10**6
    assert_near_ceiling(lab["goodput_bps"], rate, f"lab client, {direction}")

    # The same link measured by a reference tool between the same containers.
    project.exec("server", "iperf3", "-s", "-D", "-1")
    time.sleep(0.5)
    iperf = project.run("client", "exec", "iperf3", "-c", "server", "-t", "5", "-J", env=env)
    assert_near_ceiling(iperf3_bps(iperf), rate, f"iperf3, {direction}")


def test_changing_a_running_link_takes_effect(project):
    env = {**SERVER_ENV, "CLIENT_LINK_RATE": "50mbit"}
    project.up("server", env=env)
    name = f"{project.name}-reshaped"
    project.run("client", "exec", "sleep", "600", env=env, detach=True, container_name=name)
    try:
        # `run -d` returns when the container starts, before its entrypoint has shaped the link.
        show = ["docker", "exec", name, "python3", "-m", "socklab", "shape", "show", "--json"]
        deadline = time.monotonic() + 30
        while json.loads(proc.run(show).stdout)["backend"] == "none":
            assert time.monotonic() < deadline, "the container's link was never applied"
            time.sleep(0.2)

        def goodput_bps() -> float:
            argv = ["docker", "exec", "-u", "socklab", name, "python3", "-m", "socklab",
                    *bulk_client(megabytes=12)]
            return result_of(proc.run(argv, timeout_s=120))["goodput_bps"]

        assert_near_ceiling(goodput_bps(), "50mbit", "before the change")
        proc.run(["docker", "exec", name, "python3", "-m", "socklab", "shape", "set", "rate=10mbit"])
        assert_near_ceiling(goodput_bps(), "10mbit", "after the change")
        shown = json.loads(proc.run(["docker", "exec", name, "python3", "-m", "socklab",
                                     "shape", "show", "--json"]).stdout)
        assert shown["applied"]["up"]["rate_bps"] == 10_000_000
    finally:
        proc.run(["docker", "rm", "-f", name], check=False)


def test_link_the_kernel_cannot_shape_stops_the_container(project):
    caps = json.loads(project.run("client", "shape", "caps", "--json", env=UNSHAPED_CLIENT).stdout)
    env = {**UNSHAPED_CLIENT, "CLIENT_LINK_DELAY": "20ms", "LINK_BACKEND": "netem"}
    attempt = project.run("client", "exec", "true", env=env, check=False)
    if caps["qdiscs"]["netem"]:
        assert attempt.returncode == 0, attempt.stderr
    else:
        # This host's kernel (CI's) has no sch_netem: say so, never run unshaped.
        assert attempt.returncode != 0
        message = attempt.stderr.strip().splitlines()[-1]
        assert "delay" in message and "sch_netem" in message, attempt.stderr
    # With the backend left to choose, the same link runs: through netem, or
    # without it through the userspace delay line.
    chosen = project.run("client", "exec", "true", env={**env, "LINK_BACKEND": "auto"})
    expected = "netem" if caps["qdiscs"]["netem"] else "userspace"
    assert f"(backend {expected}, applied" in chosen.stderr, chosen.stderr


def test_containers_have_least_privilege_and_no_route_out(project):
    project.up("server", env=SERVER_ENV)
    probe = "import os; print(os.getuid()); print(open('/proc/self/status').read())"
    out = project.run("client", "exec", "python3", "-c", probe).stdout
    uid = int(out.split()[0])
    cap_eff = re.search(r"^CapEff:\s*([0-9a-f]+)$", out, re.M).group(1)
    assert uid != 0 and int(cap_eff, 16) == 0, "the workload must run unprivileged"

    container_id = project.compose("ps", "-q", "server").stdout.strip()
    host_config = json.loads(proc.run(["docker", "inspect", container_id]).stdout)[0]["HostConfig"]
    assert host_config["Privileged"] is False
    assert host_config["CapAdd"] == ["NET_ADMIN"]
    assert not host_config["PortBindings"]

    network = json.loads(proc.run(["docker", "network", "inspect", f"{project.name}_lab"]).stdout)[0]
    assert network["Internal"] is True
    # Docker keeps a gateway route in the containers of an internal network and
    # drops at the bridge whatever would leave the subnet. Checked in the
    # engine's own rules, so that no packet has to be sent anywhere to prove it.
    if shutil.which("iptables") and os.geteuid() == 0:
        bridge = f"br-{network['Id'][:12]}"
        subnet = network["IPAM"]["Config"][0]["Subnet"]
        rules = proc.run(["iptables", "-S", "DOCKER-ISOLATION-STAGE-1"]).stdout
        assert f"! -d {subnet} -i {bridge} -j DROP" in rules, rules
