"""Packet captures and measured links, on real containers.

A capture of the tutorial's non-blocking send holds exactly the bytes send()
accepted, and the FIN; snap length and cap hold, and what was cut is counted;
`lab.py capture` of a running `docker compose up` yields a valid pcap. Each
case measures its links: a correct one is within tolerance, one shaped on an
interface its traffic does not use is caught and marked (and fails the case
under `verify: strict`); `lab.py link verify` says the same of a running lab.
Every packet goes between containers of the projects the tests created.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import dpkt
import pytest

from labkit import cli, proc, scenario
from labkit.linkcheck import RATE_RATIO_HIGH, RATE_RATIO_LOW

from .conftest import lab, records_of

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "examples" / "tutorial"
pytestmark = pytest.mark.docker


def tcp_to_port(path: Path, port: int) -> tuple[int, int, bool, int]:
    """An oracle read with dpkt alone: (payload bytes sent to ``port`` once each, payload bytes on the
    wire including retransmissions, whether a FIN went to it, how many packets the file holds)."""
    isn = highest = None
    wire = packets = 0
    fin = False
    with path.open("rb") as fh:
        for _, buf in dpkt.pcap.Reader(fh):
            packets += 1
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if not isinstance(ip, dpkt.ip.IP) or ip.p != dpkt.ip.IP_PROTO_TCP:
                continue
            # Headers only (the snap length): the TCP header is parsed from what was kept,
            # its payload length from the IP header's total length.
            tcp = dpkt.tcp.TCP(bytes(ip)[ip.hl * 4:ip.hl * 4 + 60])
            if tcp.dport != port:
                continue
            length = ip.len - ip.hl * 4 - tcp.off * 4
            wire += length
            fin = fin or bool(tcp.flags & dpkt.tcp.TH_FIN)
            if tcp.flags & dpkt.tcp.TH_SYN:
                isn = tcp.seq
            elif isn is not None and length > 0:  # the SYN takes one sequence number, the data the next
                end = (tcp.seq - isn - 1) % 2**32 + length
                highest = end if highest is None else max(highest, end)
    return highest or 0, wire, fin, packets


def test_a_capture_of_the_tutorials_non_blocking_send_holds_what_send_accepted_and_the_fin(lab_image, tmp_path):
    done = lab("try", str(TUTORIAL / "non_blocking_client.py"), "--server", str(TUTORIAL / "block_server.py"),
               "--link", "rate=100mbit", "--capture", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run, (record,) = records_of(tmp_path)
    (client,) = record["clients"]
    server = record["server"]
    accepted = client["bytes_accepted"]
    assert 0 < accepted < client["bytes_requested"], client
    for who, role in (("client", client), ("server", server)):
        capture = role["capture"]
        pcap = run / capture["file"]
        unique, wire, fin, packets = tcp_to_port(pcap, scenario.SERVER_PORT)
        # Exactly what send() accepted left the client, and the FIN after it, in both containers' captures.
        assert unique == accepted, (who, unique, accepted)
        assert wire >= accepted and fin, (who, wire, fin)
        assert capture["tcp"]["payload_bytes"]["to_server"] == accepted, (who, capture["tcp"])
        assert capture["tcp"]["fin"]["to_server"] and capture["tcp"]["syn"], (who, capture["tcp"])
        assert capture["packets"] == packets and capture["cut_packets"] == 0, (who, capture)
        assert capture["bytes"] == pcap.stat().st_size
    assert "packets of program" in done.stdout and (run / "plots" / "tcp-sequence.png").is_file()


def test_a_capture_keeps_its_snap_length_and_stops_at_its_cap_saying_what_it_cut(lab_image, tmp_path):
    experiment = tmp_path / "capped.yaml"
    experiment.write_text(
        "name: capped\n"
        "server: {mode: threaded}\n"
        "clients:\n"
        "  - name: bulk\n"
        "    mode: blocking\n"
        "    workload: {kind: bulk, bytes: 60MB}\n"
        "    link: {rate: 200mbit}\n"
        "    capture: {snaplen: 80, cap: 64KiB}\n")
    done = lab("run", str(experiment), "--out", str(tmp_path / "out"), "--no-plots")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run, (record,) = records_of(tmp_path / "out")
    capture = record["clients"][0]["capture"]
    pcap = run / capture["file"]
    assert capture["snaplen"] == 80 and capture["cap_bytes"] == 64 * 1024
    assert pcap.stat().st_size == capture["bytes"] <= 64 * 1024
    assert capture["cut_packets"] > 0 and capture["cut_bytes"] > 0
    assert capture["seen_packets"] == capture["packets"] + capture["cut_packets"]
    with pcap.open("rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        assert reader.snaplen == 80
        lengths = [len(buf) for _, buf in reader]
    assert len(lengths) == capture["packets"] and max(lengths) <= 80
    # The cap keeps the beginning: the handshake is there.
    assert capture["tcp"]["syn"]
    # The server was not asked to capture.
    assert "capture" not in record["server"]


def test_lab_capture_of_a_running_compose_up_yields_a_valid_pcap(project, tmp_path):
    env = {**os.environ, "CLIENT_LINK_RATE": "20mbit", "DEMO_BYTES": "40000000"}
    up = subprocess.Popen(project._argv("up", "--no-build"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "client-blocking" not in proc.run(["docker", "compose", "-p", project.name, "ps", "--services",
                                                  "--status", "running"], check=False).stdout:
            assert time.monotonic() < deadline and up.poll() is None, "the demo's blocking client never ran"
            time.sleep(0.2)
        out = tmp_path / "live.pcap"
        done = lab("capture", "client-blocking", "--project", project.name, "-w", str(out), "--count", "200",
                   timeout_s=120)
        assert done.returncode == 0, done.stdout + done.stderr
        unique, wire, _, packets = tcp_to_port(out, scenario.SERVER_PORT)
        assert packets == 200 and wire > 0, (packets, wire)
        # Nothing is left running in the container.
        ps = proc.run(["docker", "compose", "-p", project.name, "exec", "-T", "client-blocking", "sh", "-c",
                       "for p in /proc/[0-9]*; do cat $p/comm; done"], check=False)
        assert "tcpdump" not in ps.stdout
    finally:
        up.terminate()
        up.wait(60)


def _verdicts(record: dict) -> dict:
    return record["link"]["measured"]


def test_each_case_measures_its_link_within_tolerance(lab_image, tmp_path):
    experiment = tmp_path / "measured.yaml"
    experiment.write_text(
        "name: measured\n"
        "server: {mode: threaded, link: {delay: 10ms}}\n"
        "clients:\n"
        "  - name: bulk\n"
        "    workload: {kind: bulk, bytes: 2MB}\n"
        "    link: {rate: 10mbit, delay: 40ms, down: {rate: 20mbit}}\n"
        "    replicas: 2\n")
    done = lab("run", str(experiment), "--out", str(tmp_path / "out"), "--no-plots")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, (record,) = records_of(tmp_path / "out")
    verdicts = _verdicts(record)
    assert set(verdicts) == {"bulk", "bulk#1"}
    assert record["link_ok"] is True, verdicts
    for verdict in verdicts.values():
        # Both directions' delays at both ends: 2 x 40 ms + 2 x 10 ms.
        assert verdict["rtt_expected_ms"] == 100
        assert 97 <= verdict["rtt_ms"] <= 110, verdict
    # One container of the group measured the rates, the other said so.
    measuring = [v for v in verdicts.values() if v["up_rate_bps"] is not None]
    assert len(measuring) == 1, verdicts
    (rates,) = measuring
    assert rates["up_expected_bps"] == 10e6 and rates["down_expected_bps"] == 20e6
    for direction in ("up", "down"):
        assert RATE_RATIO_LOW <= rates[f"{direction}_ratio"] <= RATE_RATIO_HIGH, rates
    assert 0 < rates["probe_s"] < 3, rates


# A rate: on the wrong device it limits only what crosses that device (here loopback, the
# container's DNS), so the rest of the case runs as on an unshaped link.
BROKEN = ("name: broken\n"
          "server: {mode: threaded}\n"
          "clients:\n"
          "  - name: bulk\n"
          "    workload: {kind: bulk, bytes: 1MB}\n"
          "    link: {rate: 2mbit}\n")


@pytest.mark.parametrize("verify", ["mark", "strict"])
def test_a_link_shaped_on_an_interface_its_traffic_does_not_use_is_caught(lab_image, tmp_path, monkeypatch,
                                                                             capsys, verify):
    original = scenario.link_env

    def on_loopback(link):
        # The deliberate mistake of the netem wrappers' bug reports: the right qdiscs on the wrong device.
        env = original(link)
        return {**env, "SOCKLAB_LINK_DEV": "lo"} if link.is_shaped else env

    monkeypatch.setattr(scenario, "link_env", on_loopback)
    experiment = tmp_path / "broken.yaml"
    experiment.write_text(BROKEN + f"verify: {verify}\n")
    code = cli.main(["run", str(experiment), "--out", str(tmp_path / "out"), "--no-plots"])
    printed = capsys.readouterr().out
    _, (record,) = records_of(tmp_path / "out")
    verdict = _verdicts(record)["bulk"]
    assert record["link_ok"] is False and verdict["ok"] is False, verdict
    # The train went through at the rate it was sent, 1.5 x the link's: nothing limited it.
    assert verdict["up_expected_bps"] == 2e6 and verdict["up_ratio"] > 1.3, verdict
    assert "OFF" in printed and ": off — up rate" in printed
    if verify == "strict":
        assert code == 1 and record["status"] == "failed"
        assert "verify: strict" in record["error"]
    else:
        assert code == 0 and record["status"] == "ok"


def test_lab_link_verify_measures_a_running_lab(project):
    env = {"SERVER_MODE": "threaded", "CLIENT_LINK_RATE": "8mbit", "CLIENT_LINK_DELAY": "30ms"}
    project.up("server", env=env)
    name = f"{project.name}-verified"
    project.run("client", "exec", "sleep", "600", env=env, detach=True, container_name=name)
    try:
        deadline = time.monotonic() + 30
        show = ["docker", "exec", name, "python3", "-m", "socklab", "shape", "show", "--json"]
        while json.loads(proc.run(show).stdout)["backend"] == "none":
            assert time.monotonic() < deadline, "the container's link was never applied"
            time.sleep(0.2)
        # Measured again once if off: a freshly started delay line's down direction was seen to
        # add nothing to one probe's pings in ~6 runs (30.4 ms of 60), and to be right at once
        # after. A link that is wrong is off every time. Both attempts are printed.
        for attempt in range(2):
            done = lab("link", "--project", project.name, "verify", "--json", timeout_s=120)
            print(f"attempt {attempt + 1}: {done.stdout}{done.stderr}")
            if done.returncode == 0:
                break
        assert done.returncode == 0, done.stdout + done.stderr
        (verdict,) = json.loads(done.stdout).values()
        assert verdict["ok"] is True, verdict
        assert verdict["rtt_expected_ms"] == 60 and 58 <= verdict["rtt_ms"] <= 70, verdict
        assert verdict["up_expected_bps"] == verdict["down_expected_bps"] == 8e6
        shown = lab("link", "--project", project.name, "verify", timeout_s=120)
        assert "RTT" in shown.stdout and ": ok" in shown.stdout and "tolerance" in shown.stdout
    finally:
        proc.run(["docker", "rm", "-f", name], check=False)
