"""labkit.pcap against captures written here with dpkt, and what report and plots make of them.

Every capture is built packet by packet (Ethernet/IPv4/TCP), data segments cut
at the lab's snap length of 128 bytes as tcpdump -s 128 keeps them, and the
expected summary is worked out in the test from the segments as sent, with
plain integers (no mod 2**32), so the code's sequence arithmetic is checked,
not copied.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest

from labkit import linkcheck, pcap, report
from labkit.plots import extract, tseq
from labkit.rundir import RunDir
from socklab.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
BULK = ROOT / "tests" / "data" / "runs" / "report-bulk" / "20261127-113746"
PORT = 5000
SNAPLEN = 128
CLIENT, SERVER, OTHER = b"\x0a\x00\x00\x02", b"\x0a\x00\x00\x03", b"\x0a\x00\x00\x09"
T0_S = 1_700_000_000.0
SYN, ACK, FIN = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN
MSS = 1448


@dataclass(frozen=True)
class Sent:
    """One TCP segment as the test sent it: ``seq`` unwrapped (it may pass 2**32)."""

    t_s: float
    client_port: int
    to_server: bool
    seq: int
    ack: int
    flags: int
    payload_bytes: int


def frame(seg: Sent) -> bytes:
    """The segment as an Ethernet frame, with the timestamp option Linux sends (a 32-byte TCP header)."""
    sport, dport = (seg.client_port, PORT) if seg.to_server else (PORT, seg.client_port)
    src, dst = (CLIENT, SERVER) if seg.to_server else (SERVER, CLIENT)
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seg.seq % 2 ** 32, ack=seg.ack % 2 ** 32, flags=seg.flags,
                       opts=b"\x01\x01\x08\x0a" + bytes(8), data=b"x" * seg.payload_bytes)
    tcp.off = (20 + len(tcp.opts)) // 4
    ip = dpkt.ip.IP(src=src, dst=dst, p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=tcp)
    ip.len = len(bytes(ip))
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def others() -> list[tuple[float, bytes]]:
    """What else an eth0 carries: ARP (first in the capture), DNS over UDP, TCP to another port."""
    arp = bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\xff" * 6, type=dpkt.ethernet.ETH_TYPE_ARP,
                                       data=dpkt.arp.ARP(spa=CLIENT, tpa=SERVER)))
    udp = dpkt.udp.UDP(sport=40999, dport=53, data=b"q" * 30)
    udp.ulen = len(bytes(udp))
    ip = dpkt.ip.IP(src=CLIENT, dst=OTHER, p=dpkt.ip.IP_PROTO_UDP, data=udp)
    ip.len = len(bytes(ip))
    dns = bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))
    elsewhere = dpkt.tcp.TCP(sport=41000, dport=8080, seq=5, flags=ACK, data=b"y" * 100)
    ip = dpkt.ip.IP(src=CLIENT, dst=OTHER, p=dpkt.ip.IP_PROTO_TCP, data=elsewhere)
    ip.len = len(bytes(ip))
    web = bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))
    return [(0.0, arp), (0.0005, dns), (0.9, web)]


def conversation() -> list[Sent]:
    """Two connections to the server.

    40000: seen from its SYN, both sequence spaces wrapping past 2**32; ten
    full segments, one retransmitted, one partly new (it overlaps the highest
    end), a 21-byte reply and FIN both ways. 40001: already running when the
    capture began (no SYN), with a retransmission of data sent before the
    capture's first segment of it, and no FIN.
    """
    isn, server_isn = 2 ** 32 - 3 * MSS, 2 ** 32 - 5
    a = 40000
    segs = [Sent(0.001, a, True, isn, 0, SYN, 0),
            Sent(0.002, a, False, server_isn, isn + 1, SYN | ACK, 0),
            Sent(0.003, a, True, isn + 1, server_isn + 1, ACK, 0)]
    t_s = 0.004
    for k in range(10):
        segs.append(Sent(t_s, a, True, isn + 1 + k * MSS, server_isn + 1, ACK, MSS))
        t_s += 0.001
        if k == 5:
            segs.append(Sent(t_s, a, False, server_isn + 1, isn + 1 + 4 * MSS, ACK, 0))
            t_s += 0.001
    segs.append(Sent(t_s, a, True, isn + 1 + 4 * MSS, server_isn + 1, ACK, MSS))  # retransmitted
    segs.append(Sent(t_s + 0.001, a, True, isn + 1 + 9 * MSS + 100, server_isn + 1, ACK, MSS))  # partly new
    end = isn + 1 + 10 * MSS + 100
    segs += [Sent(t_s + 0.002, a, False, server_isn + 1, end, ACK, 21),
             Sent(t_s + 0.003, a, True, end, server_isn + 22, ACK | FIN, 0),
             Sent(t_s + 0.004, a, False, server_isn + 22, end + 1, ACK | FIN, 0),
             Sent(t_s + 0.005, a, True, end + 1, server_isn + 23, ACK, 0)]
    b, base = 40001, 123_456_789
    for k in range(4):
        segs.append(Sent(0.5 + k * 0.01, b, True, base + k * 1000, 77, ACK, 1000))
    segs.append(Sent(0.6, b, True, base - 1000, 77, ACK, 1000))  # sent before the capture began
    segs.append(Sent(0.61, b, True, base + 2000, 77, ACK, 1000))
    segs.append(Sent(0.62, b, True, base + 4000, 77, ACK, 500))
    return sorted(segs, key=lambda s: s.t_s)


def write_capture(path: Path, segs: list[Sent], *, linktype: int = 1, fmt: str = "pcap") -> Path:
    """The segments (and the other traffic) as tcpdump -s 128 would have written them."""
    packets = sorted([(s.t_s, frame(s)) for s in segs] + others(), key=lambda p: p[0])
    with open(path, "wb") as fh:
        writer = (dpkt.pcap.Writer if fmt == "pcap" else dpkt.pcapng.Writer)(fh, snaplen=SNAPLEN, linktype=linktype)
        for t_s, data in packets:
            if linktype == dpkt.pcap.DLT_LINUX_SLL:  # the Ethernet header becomes a cooked one
                ethtype = int.from_bytes(data[12:14], "big")
                data = bytes(dpkt.sll.SLL(type=4, hdr=b"\x02" * 6, ethtype=ethtype)) + data[14:]
            writer.writepkt(data[:SNAPLEN], T0_S + t_s)
    return path


def oracle(segs: list[Sent]) -> dict:
    """The summary, from the segments as sent (unwrapped sequence numbers, plain integers)."""
    flows: dict[tuple[int, bool], dict] = {}
    retransmitted = 0
    data_times = []
    for s in segs:
        flow = flows.setdefault((s.client_port, s.to_server), {"isn": None, "highest": None, "new": 0, "fin": False})
        if s.flags & SYN:
            flow["isn"] = s.seq
            flow["highest"] = s.seq + 1
        flow["fin"] |= bool(s.flags & FIN)
        if s.payload_bytes:
            data_times.append(s.t_s)
            end = s.seq + s.payload_bytes
            if flow["highest"] is not None and end <= flow["highest"]:
                retransmitted += 1
            else:
                flow["new"] += end - max(s.seq, flow["highest"] or s.seq)
                flow["highest"] = end

    def unique(flow: dict) -> int:
        return flow["highest"] - flow["isn"] - 1 if flow["isn"] is not None else flow["new"]

    # The ARP frame is the capture's first packet: times count from it.
    return {
        "packets": len(segs) + len(others()),
        "tcp_packets": len(segs) + 1,
        "data_segments": len(data_times),
        "retransmitted_segments": retransmitted,
        "payload_bytes": {"to_server": sum(unique(f) for (_, up), f in flows.items() if up),
                          "from_server": sum(unique(f) for (_, up), f in flows.items() if not up)},
        "connections": len({port for port, _ in flows}),
        "first_data_s": pytest.approx(min(data_times), abs=1e-6),
        "last_data_s": pytest.approx(max(data_times), abs=1e-6),
        "fin": {"to_server": any(f["fin"] for (_, up), f in flows.items() if up),
                "from_server": any(f["fin"] for (_, up), f in flows.items() if not up)},
        "syn": True,
    }


# ------------------------------------------------------------- summarize

def test_the_conversation_is_what_the_test_means_it_to_be():
    """The oracle's inputs: sequence numbers that wrap, records the snap length cut."""
    segs = conversation()
    assert any(s.seq < 2 ** 32 <= s.seq + s.payload_bytes for s in segs), "a segment straddles 2**32"
    assert any(len(frame(s)) > SNAPLEN for s in segs) and len(frame(segs[0])) < SNAPLEN


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_summary_matches_the_segments_as_sent(tmp_path, fmt):
    segs = conversation()
    path = write_capture(tmp_path / f"c.{fmt}", segs, fmt=fmt)
    expected = oracle(segs)
    assert pcap.summarize(path, PORT) == expected
    # Spelled out once, so that the oracle itself is checked too.
    assert expected["retransmitted_segments"] == 3 and expected["connections"] == 2
    assert expected["payload_bytes"] == {"to_server": 10 * MSS + 100 + 4500, "from_server": 21}


def test_payload_lengths_come_from_the_headers_not_the_captured_bytes(tmp_path):
    segs = [Sent(0.0, 40000, True, 10, 0, SYN, 0),
            Sent(0.1, 40000, True, 11, 0, ACK, 65_000)]  # a GSO super-packet, 128 bytes of it kept
    summary = pcap.summarize(write_capture(tmp_path / "gso.pcap", segs), PORT)
    assert summary["payload_bytes"]["to_server"] == 65_000
    assert summary["data_segments"] == 1 and summary["retransmitted_segments"] == 0


def test_linux_cooked_captures_read_the_same(tmp_path):
    segs = conversation()
    path = write_capture(tmp_path / "any.pcap", segs, linktype=dpkt.pcap.DLT_LINUX_SLL)
    cooked = pcap.summarize(path, PORT)
    assert cooked == oracle(segs)


def test_a_capture_without_data_or_tcp_says_so(tmp_path):
    path = tmp_path / "quiet.pcap"
    with open(path, "wb") as fh:
        writer = dpkt.pcap.Writer(fh, snaplen=SNAPLEN)
        for t_s, data in others()[:2]:
            writer.writepkt(data, T0_S + t_s)
    assert pcap.summarize(path, PORT) == {
        "packets": 2, "tcp_packets": 0, "data_segments": 0, "retransmitted_segments": 0,
        "payload_bytes": {"to_server": 0, "from_server": 0}, "connections": 0,
        "first_data_s": None, "last_data_s": None, "fin": {"to_server": False, "from_server": False}, "syn": False}
    assert pcap.sequence_series(path, PORT) == []


def test_a_record_torn_by_a_kill_ends_the_capture(tmp_path):
    segs = conversation()
    path = write_capture(tmp_path / "torn.pcap", segs)
    data = path.read_bytes()
    # The last record (TCP to another port, 128 bytes kept) cut inside its 16-byte record header.
    path.write_bytes(data[:-(SNAPLEN + 10)])
    summary = pcap.summarize(path, PORT)
    assert summary["packets"] == oracle(segs)["packets"] - 1
    assert summary["tcp_packets"] == oracle(segs)["tcp_packets"] - 1
    assert summary["payload_bytes"] == oracle(segs)["payload_bytes"]


@pytest.mark.parametrize("content, words", [
    (b"hello, this is text\n" * 3, "is not a packet capture: it is neither a pcap nor a pcapng file"),
    (b"\xd4\xc3", "is not a packet capture: it is neither a pcap nor a pcapng file"),
    (b"", "is empty: the capture wrote nothing, not even a pcap header"),
])
def test_what_is_not_a_capture_is_refused_in_one_sentence(tmp_path, content, words):
    path = tmp_path / "not.pcap"
    path.write_bytes(content)
    with pytest.raises(UsageError) as raised:
        pcap.summarize(path, PORT)
    assert str(raised.value) == f"{path} {words}"
    with pytest.raises(UsageError, match="is not a packet capture|is empty"):
        pcap.sequence_series(path, PORT)


def test_a_missing_capture_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"cannot read the capture .*gone\.pcap"):
        pcap.summarize(tmp_path / "gone.pcap", PORT)


# ------------------------------------------------------- sequence_series

def test_sequence_series_gives_each_flow_relative_to_its_start(tmp_path):
    segs = conversation()
    flows = pcap.sequence_series(write_capture(tmp_path / "c.pcap", segs), PORT)
    assert [(f.connection, f.direction) for f in flows] == [(0, "to_server"), (0, "from_server"), (1, "to_server")]
    up, reply, b = flows
    isn = segs[0].seq
    sent = [s for s in segs if s.client_port == 40000 and s.to_server and s.payload_bytes]
    assert up.seq_end_bytes == [s.seq + s.payload_bytes - (isn + 1) for s in sent]
    assert up.retransmits == [False] * 10 + [True, False]
    assert up.times_s == pytest.approx([s.t_s for s in sent], abs=1e-6)
    assert up.highest_end_bytes == 10 * MSS + 100
    # The server's ACKs on the same offsets: what it had of the data (then the FIN's one more).
    server_acks = [s.ack - (isn + 1) for s in segs if s.client_port == 40000 and not s.to_server]
    assert up.ack_bytes == server_acks and server_acks[-1] == 10 * MSS + 101
    assert reply.seq_end_bytes == [21] and reply.retransmits == [False]
    assert reply.ack_bytes[-1] == 22  # the client acknowledged the reply and the server's FIN
    # No SYN: offsets from the first sequence number seen; the older data is below zero.
    assert b.seq_end_bytes == [1000, 2000, 3000, 4000, 0, 3000, 4500]
    assert b.retransmits == [False, False, False, False, True, True, False]
    assert b.ack_bytes == []


# ---------------------------------------------------- report and the plot

def bulk_capture(path: Path) -> Path:
    """A sender's capture: a second of 1448-byte segments, a 0.3 s stall (the window full), one loss."""
    isn = 2 ** 32 - 10 * MSS
    segs = [Sent(0.01, 40000, True, isn, 0, SYN, 0), Sent(0.02, 40000, False, 9, isn + 1, SYN | ACK, 0)]
    t_s, sent = 0.03, 0
    while sent < 400 * MSS:
        segs.append(Sent(t_s, 40000, True, isn + 1 + sent, 10, ACK, MSS))
        segs.append(Sent(t_s + 0.02, 40000, False, 10, isn + 1 + sent + MSS, ACK, 0))
        sent += MSS
        t_s += 0.3 if sent == 200 * MSS else 0.002
    segs.append(Sent(t_s, 40000, True, isn + 1 + 150 * MSS, 10, ACK, MSS))
    segs.append(Sent(t_s + 0.01, 40000, True, isn + 1 + sent, 10, ACK | FIN, 0))
    return write_capture(path, sorted(segs, key=lambda s: s.t_s))


def with_captures(run: Path) -> None:
    """The bulk fixture as a run that captured its sender and probed its link: each record's
    client gets its capture and summary, the first case's link is off in r1."""
    (run / "captures").mkdir()
    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    for record in records:
        name = f"captures/{record['case']}.r{record['repetition']}.sender.pcap"
        bulk_capture(run / name)
        record["clients"][0]["capture"] = {
            "file": name, "packets": 1000, "bytes": 150_000, "cut_packets": 0, "cut_bytes": 0, "snaplen": SNAPLEN,
            "cap_bytes": 32 * 2 ** 20, "dropped_by_kernel": 0, "tcp": pcap.summarize(run / name, PORT)}
        off = record["case"] == "sender.mode=blocking" and record["repetition"] == 1
        record["link"]["measured"] = {"sender": {
            "rtt_ms": 0.412, "rtt_expected_ms": 0.0, "rtt_ratio": None, "up_rate_bps": 19.6e6 if not off else 12e6,
            "up_expected_bps": 20e6, "up_ratio": 0.98 if not off else 0.6, "down_rate_bps": None,
            "down_expected_bps": 20e6, "down_ratio": None, "probe_s": 0.8, "ok": not off,
            "problems": ["up rate 12 Mbit/s where 20 Mbit/s was configured (0.6 of it)"] if off else []}}
        record["link_ok"] = not off
    records[2]["clients"][0]["capture"].update(cut_packets=1024, cut_bytes=1_400_000)
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_draws_the_time_sequence_graph_and_says_what_the_captures_and_probes_saw(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(BULK, run)
    with_captures(run)
    drawn = report.write_report(RunDir.open_existing(run))
    assert "tcp-sequence.png" in {p.name for p in drawn}
    data = (run / "plots" / "tcp-sequence.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    text = (run / "report.md").read_text()
    assert "](plots/tcp-sequence.png)" in text and "The slope is the goodput" in text
    tcp = pcap.summarize(run / "captures" / "sender.mode=blocking.r0.sender.pcap", PORT)
    assert tcp["retransmitted_segments"] == 1 and tcp["payload_bytes"]["to_server"] == 400 * MSS
    assert (f"- `sender.mode=blocking` r0: capture (client sender): 1,000 packets, 1 retransmitted segment, "
            f"data from {tcp['first_data_s']:.3g} s to {tcp['last_data_s']:.3g} s, "
            f"{400 * MSS:,} payload bytes to the server, FIN seen to the server only\n") in text
    assert ("- `sender.mode=nonblocking` r0: capture (client sender): 1,000 packets, 1 retransmitted segment, "
            "data from") in text
    assert "FIN seen to the server only; 1,024 packets (1.4 MB) cut at the 32 MiB cap\n" in text
    assert text.count("cut at the") == 1, "only the capture that was cut says so"
    assert ("- `sender.mode=blocking` r0: link measured (sender): RTT 0.412 ms, up 19.6 of 20 Mbit/s (0.98) "
            "(probe 0.80 s): ok\n") in text
    assert "- `sender.mode=blocking`: the link was off in r1 as well\n" in text
    assert text.count("link measured (sender)") == 3 and text.count(": capture (") == 3


def test_the_link_line_says_what_was_off():
    verdict = {"rtt_ms": 100.4, "rtt_expected_ms": 100, "rtt_ratio": 1.004, "up_rate_bps": 6e6,
               "up_expected_bps": 10e6, "up_ratio": 0.6, "ok": False,
               "problems": ["up rate 6 Mbit/s where 10 Mbit/s was configured (0.6 of it)"]}
    assert linkcheck.verdict_text(verdict) == (
        "RTT 100.4 ms of 100 ms configured (1.00), up 6 of 10 Mbit/s (0.60): off — "
        "up rate 6 Mbit/s where 10 Mbit/s was configured (0.6 of it)")
    assert linkcheck.verdict_text({"ok": None, "problems": ["the probe measured nothing"]}) == (
        "nothing measured: not judged — the probe measured nothing")


def test_a_capture_that_could_not_be_read_is_named_not_decoded():
    assert report.capture_text({"packets": 3, "tcp": None, "error": "x.pcap is empty: ..."}) == (
        "3 packets, not decoded (x.pcap is empty: ...)")


def test_the_plot_reads_only_captures_inside_the_run_directory(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(BULK, run)
    with_captures(run)
    outside = bulk_capture(tmp_path / "outside.pcap")
    records = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    for record in records:
        record["clients"][0]["capture"]["file"] = "../" + outside.name
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = RunDir(run).load()
    assert tseq.sequence_panels([loaded], extract.trace_loader()) == []


def test_one_panel_per_case_from_its_first_repetition(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(BULK, run)
    with_captures(run)
    panels = tseq.sequence_panels([RunDir(run).load()], extract.trace_loader())
    assert [p.title for p in panels] == ["sender.mode=blocking (r0)", "sender.mode=nonblocking (r0)",
                                         "sender.mode=nonblocking-spin (r0)"]
    assert [p.mode for p in panels] == ["blocking", "nonblocking", "nonblocking-spin"]
    assert all(p.retransmitted == 1 and p.flow.highest_end_bytes == 400 * MSS for p in panels)
