"""The userspace backend's pure parts: netlink messages, commands, and the delay line's schedule.

Nothing here needs a kernel: messages are checked byte by byte against the
layouts of include/uapi/linux/netfilter/nfnetlink_queue.h, and the delay line
runs on a scripted clock with fake sockets. The real thing runs in the netns
tests (test_shaping.py) and the lab tests.
"""

from __future__ import annotations

import math
import random
import socket
import struct

import pytest

from socklab.errors import UsageError
from socklab.shaping import LinkSpec, build_plan, link_spec_from_mapping
from socklab.shaping import nfqueue as nq
from socklab.shaping.delayline import (
    DEFAULT_LIMIT_PKTS,
    HELD,
    LOST,
    OVERFLOW,
    QUEUES,
    RESEND_MARK,
    DelayLine,
    DelayQueue,
    LineConfig,
)
from socklab.shaping.cli import _parser
from socklab.shaping import resend as rs
from socklab.shaping.resend import Resender
from socklab.shaping.plan import (
    delay_line_rules,
    delayline_command,
    line_configs,
    userspace_change,
    userspace_plan,
)

UP, DOWN = QUEUES["up"], QUEUES["down"]


# --- netlink messages ------------------------------------------------------------


def _split(message: bytes):
    """(nlmsghdr fields, nfgenmsg fields, [(attr type, payload)]) of one message."""
    length, kind, flags, seq, portid = struct.unpack_from("=IHHII", message)
    assert length == len(message)
    family, version, res_id = struct.unpack_from("!BBH", message, 16)
    attrs, pos = [], 20
    while pos < length:
        attr_len, attr_type = struct.unpack_from("=HH", message, pos)
        attrs.append((attr_type, message[pos + 4:pos + attr_len]))
        pos += (attr_len + 3) & ~3
    assert pos == length, "attributes end on the message's end, padded to 4 bytes"
    return (kind, flags, seq, portid), (family, version, res_id), attrs


def test_bind_is_an_acknowledged_config_command_for_the_queue():
    head, gen, attrs = _split(nq.encode_bind(7301, seq=9))
    assert head == ((3 << 8) | 2, 0x1 | 0x4, 9, 0)  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG; REQUEST|ACK
    assert gen == (socket.AF_UNSPEC, 0, 7301)
    assert attrs == [(1, bytes([1, 0, 0, 0]))]  # NFQA_CFG_CMD: BIND, pad, pf 0
    assert _split(nq.encode_unbind(7301))[2] == [(1, bytes([2, 0, 0, 0]))]


def test_params_set_copy_mode_range_queue_length_and_fail_open_off():
    head, gen, attrs = _split(nq.encode_params(7302, 68, nq.COPY_LENGTH_ONLY, seq=3))
    assert head[:3] == ((3 << 8) | 2, 5, 3) and gen[2] == 7302
    assert attrs == [
        (2, struct.pack("!IB", 1, 2)),         # NFQA_CFG_PARAMS: copy_range 1, NFQNL_COPY_PACKET (packed, 5 bytes)
        (3, struct.pack("!I", 68)),            # NFQA_CFG_QUEUE_MAXLEN
        (4, struct.pack("!I", 0x1 | 0x4)),     # NFQA_CFG_MASK: the fail-open and GSO flags ...
        (5, struct.pack("!I", 0)),             # NFQA_CFG_FLAGS: ... both cleared
    ]
    assert _split(nq.encode_params(1, 10, nq.COPY_WHOLE))[2][0] == (2, struct.pack("!IB", 0xFFFF, 2))


def test_params_with_gso_set_only_the_gso_flag():
    attrs = _split(nq.encode_params(7301, 68, nq.COPY_WHOLE, gso=True))[2]
    assert attrs[2:] == [(4, struct.pack("!I", 0x1 | 0x4)), (5, struct.pack("!I", 0x4))]  # NFQA_CFG_F_GSO = 1 << 2


def test_verdicts_one_packet_or_a_batch_up_to_an_id():
    single = nq.encode_verdict(7302, 0xDEADBEEF, nq.NF_ACCEPT)
    assert len(single) == nq.VERDICT_BYTES == 32
    head, gen, attrs = _split(single)
    assert head == ((3 << 8) | 1, 0x1, 0, 0) and gen[2] == 7302  # NFQNL_MSG_VERDICT, no ACK asked
    assert attrs == [(2, struct.pack("!II", 1, 0xDEADBEEF))]  # NFQA_VERDICT_HDR: verdict, id
    head, _, attrs = _split(nq.encode_verdict_batch(7301, 42, nq.NF_DROP))
    assert head[0] == (3 << 8) | 3 and attrs == [(2, struct.pack("!II", 0, 42))]


def _packet_message(queue: int, packet_id: int, payload: bytes, cap_len: int | None, skb_info: int | None = None,
                    outdev: int | None = None) -> bytes:
    def attr(kind, data):
        raw = struct.pack("=HH", 4 + len(data), kind) + data
        return raw + b"\0" * (-len(raw) % 4)

    attrs = attr(1, struct.pack("!IHB", packet_id, 0x0800, 3))  # PACKET_HDR: id, ETH_P_IP, hook
    attrs += attr(5 | 0x8000, struct.pack("!I", 2))  # IFINDEX_INDEV, with a flag bit that must be masked
    if outdev is not None:
        attrs += attr(6, struct.pack("!I", outdev))  # IFINDEX_OUTDEV
    if cap_len is not None:
        attrs += attr(13, struct.pack("!I", cap_len))
    if skb_info is not None:
        attrs += attr(14, struct.pack("!I", skb_info))  # SKB_INFO
    attrs += attr(10, payload)
    body = struct.pack("!BBH", socket.AF_INET, 0, queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


def _ack(seq: int, errno_value: int) -> bytes:
    echoed = struct.pack("=IHHII", 28, (3 << 8) | 2, 5, seq, 0)
    return struct.pack("=IHHII", 16 + 4 + 16, 2, 0, seq, 0) + struct.pack("=i", -errno_value) + echoed


def test_parse_reads_packets_and_acknowledgements_in_order():
    datagram = (_packet_message(7302, 5, b"E", cap_len=1500) + _ack(3, 0)
                + _packet_message(7301, 6, b"E\0\0\x1c" + b"x" * 24, cap_len=None) + _ack(4, 16))
    assert list(nq.parse_messages(datagram)) == [
        nq.Packet(7302, 5, 1500, b"E"),
        nq.Ack(3, 0),
        # Copied whole: no NFQA_CAP_LEN, the payload is the packet.
        nq.Packet(7301, 6, 28, b"E\0\0\x1c" + b"x" * 24),
        nq.Ack(4, 16),  # EBUSY: the queue has another listener
    ]


def test_parse_reads_the_skb_info_flags_and_the_outgoing_device():
    aggregate = b"E" + b"\0" * 39 + b"x" * 3000
    (packet,) = nq.parse_messages(_packet_message(7301, 9, aggregate, cap_len=None, skb_info=0x3, outdev=18681))
    assert packet == nq.Packet(7301, 9, len(aggregate), aggregate, skb_info=0x3, outdev=18681)
    assert packet.skb_info & nq.NFQA_SKB_GSO and packet.skb_info & nq.NFQA_SKB_CSUMNOTREADY
    assert not packet.truncated
    # Over 65531 bytes the kernel copies what fits and says how long the packet was.
    (cut,) = nq.parse_messages(_packet_message(7301, 10, aggregate[:100], cap_len=70000, skb_info=0x2))
    assert cut.truncated and cut.length_bytes == 70000 and cut.outdev == 0


def test_parse_refuses_a_truncated_datagram_or_a_packet_without_its_header():
    message = _packet_message(7302, 5, b"E", cap_len=1500)
    with pytest.raises(ValueError, match="truncated"):
        list(nq.parse_messages(message[:-4]))
    no_header = struct.pack("=IHHII", 20, 3 << 8, 0, 0, 0) + struct.pack("!BBH", 2, 0, 1)
    with pytest.raises(ValueError, match="without a packet header"):
        list(nq.parse_messages(no_header))


def test_proc_counters_per_queue():
    text = (" 7301  12345     0 2 65535     0     0      812  1\n"
            " 7302  12345     3 2     1    17     2     1406  1\n")
    assert nq.parse_proc_queues(text) == {
        7301: {"held": 0, "overflow": 0, "socket_overflow": 0},
        7302: {"held": 3, "overflow": 17, "socket_overflow": 2},
    }


# --- commands the userspace backend runs --------------------------------------------

MANGLE = ["iptables", "-w", "-t", "mangle"]
DELAYLINE = ["python3", "-m", "socklab", "shape", "delayline"]


def test_plan_keeps_rate_in_tbf_then_starts_the_delay_line_then_hooks_it():
    spec = link_spec_from_mapping({"rate": "10mbit", "delay": "20ms", "loss": "1%"})
    # Round trip 40 ms at 10 Mbit/s: bottleneck queue 34 frames, delay line 17 frames per direction.
    word = "delay_ms=20.0,jitter_ms=0.0,loss_pct=1.0,limit_pkts=68"
    assert build_plan(spec, "userspace") == [
        ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", "10mbit", "burst", "15140",
         "limit", "51476"],
        ["ip", "link", "add", "ifb0", "type", "ifb"],
        ["ip", "link", "set", "dev", "ifb0", "up"],
        ["tc", "qdisc", "add", "dev", "ifb0", "root", "handle", "1:", "tbf", "rate", "10mbit", "burst", "15140",
         "limit", "51476"],
        ["tc", "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress"],
        ["tc", "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
         "action", "mirred", "egress", "redirect", "dev", "ifb0"],
        [*DELAYLINE, "start", "--up", word, "--down", word],
        [*MANGLE, "-N", "socklab-up"],
        [*MANGLE, "-A", "socklab-up", "-m", "mark", "--mark", hex(RESEND_MARK), "-j", "RETURN"],
        [*MANGLE, "-A", "socklab-up", "-j", "NFQUEUE", "--queue-num", str(UP)],
        [*MANGLE, "-A", "POSTROUTING", "-o", "eth0", "-j", "socklab-up"],
        [*MANGLE, "-N", "socklab-down"],
        [*MANGLE, "-A", "socklab-down", "-j", "NFQUEUE", "--queue-num", str(DOWN)],
        [*MANGLE, "-A", "PREROUTING", "-i", "eth0", "-j", "socklab-down"],
    ]


def test_down_delay_alone_needs_no_ifb_and_only_the_down_rules():
    spec = link_spec_from_mapping({"down": {"delay": "5ms", "jitter": "1ms"}})
    assert userspace_plan(spec, "eth1", "ifb3") == [
        [*DELAYLINE, "start", "--down", "delay_ms=5.0,jitter_ms=1.0,loss_pct=0.0,limit_pkts=1000"],
        [*MANGLE, "-N", "socklab-down"],
        [*MANGLE, "-A", "socklab-down", "-j", "NFQUEUE", "--queue-num", str(DOWN)],
        [*MANGLE, "-A", "PREROUTING", "-i", "eth1", "-j", "socklab-down"],
    ]
    assert userspace_plan(link_spec_from_mapping({"rate": "1mbit"}), "eth0", "ifb0") == \
        build_plan(link_spec_from_mapping({"rate": "1mbit"}), "netem")
    assert userspace_plan(LinkSpec(), "eth0", "ifb0") == []


def test_rules_name_only_the_lab_device_never_loopback():
    for argv in delay_line_rules(["up", "down"], "eth0"):
        assert "lo" not in argv
        if argv[4] == "-A" and argv[5] in ("POSTROUTING", "PREROUTING"):
            assert argv[6:8] in (["-o", "eth0"], ["-i", "eth0"])


def test_queue_size_follows_netem_limit_rules():
    configs = line_configs(link_spec_from_mapping({"rate": "100mbit", "delay": "50ms", "up": {"limit": 50}}))
    # A user's limit is the bottleneck queue; the delay line adds twice its BDP (100 Mbit/s * 50 ms = 413 frames).
    assert configs["up"].limit_pkts == 50 + 2 * 413
    assert configs["down"].limit_pkts == math.ceil(100e6 / 8 * 0.1 / 1514) + 2 * 413
    assert line_configs(link_spec_from_mapping({"delay": "1s"}))["up"].limit_pkts == 1000  # netem's default


def test_change_retunes_in_place_or_asks_for_a_rebuild():
    old = link_spec_from_mapping({"rate": "10mbit", "delay": "20ms"})
    new = link_spec_from_mapping({"rate": "5mbit", "delay": "20ms", "loss": "1%"})
    commands = userspace_change(old, new, "eth0", "ifb0")
    assert [c[:3] for c in commands[:-1]] == [["tc", "qdisc", "change"]] * 2
    assert commands[-1] == delayline_command("set", line_configs(new))
    assert commands[-1][5:7] == ["set", "--up"]
    # The queue follows the bandwidth-delay product: a new up rate resizes the up delay line ...
    assert userspace_change(old, link_spec_from_mapping({"rate": "2mbit", "delay": "20ms"}), "eth0",
                            "ifb0")[-1][5] == "set"
    # ... but a new down rate leaves an up-only delay line alone.
    up_only = link_spec_from_mapping({"rate": "10mbit", "up": {"delay": "20ms"}})
    faster_down = link_spec_from_mapping({"rate": "10mbit", "up": {"delay": "20ms"}, "down": {"rate": "5mbit"}})
    assert all(c[0] == "tc" for c in userspace_change(up_only, faster_down, "eth0", "ifb0"))
    # A direction joins or leaves the delay line, or the rate layout changes: rebuild.
    assert userspace_change(old, up_only, "eth0", "ifb0") is None
    assert userspace_change(old, link_spec_from_mapping({"delay": "20ms"}), "eth0", "ifb0") is None


def test_a_seed_goes_to_the_delay_lines_start_as_one_word_that_the_command_line_reads_back():
    spec = link_spec_from_mapping({"loss": "1%"})
    word = "delay_ms=0.0,jitter_ms=0.0,loss_pct=1.0,limit_pkts=1000"
    assert build_plan(spec, "userspace", seed=-5)[0] == [*DELAYLINE, "start", "--up", word, "--down", word, "--seed=-5"]
    assert build_plan(spec, "userspace")[0] == [*DELAYLINE, "start", "--up", word, "--down", word]
    assert build_plan(spec, "netem", seed=42) == build_plan(spec, "netem")
    args = _parser().parse_args(build_plan(spec, "userspace", seed=-5)[0][len(DELAYLINE) - 1:])
    assert (args.action, args.seed) == ("start", "-5")


def test_line_config_round_trips_through_its_word_and_refuses_nonsense():
    config = LineConfig(delay_ms=1234.567, jitter_ms=0.5, loss_pct=0.01, limit_pkts=7)
    assert LineConfig.from_word(config.to_word()) == config
    for word, message in [("delay_ms=5,speed=3", "'speed=3' is not one of"), ("delay_ms=fast", "not a number"),
                          ("delay_ms=1,jitter_ms=2", "exceeds delay_ms"), ("loss_pct=101", "from 0 to 100"),
                          ("limit_pkts=0", "at least 1")]:
        with pytest.raises(UsageError, match=message):
            LineConfig.from_word(word)


# --- the schedule, on a scripted clock --------------------------------------------------


def _scripted(*values: float):
    it = iter(values)
    return lambda: next(it)


def test_constant_delay_releases_on_time_and_in_order():
    q = DelayQueue(LineConfig(delay_ms=20), _scripted())
    for i, t in enumerate((0.000, 0.001, 0.001, 0.005)):
        assert q.offer(t, i, 100) == HELD
    assert q.next_due_s() == pytest.approx(0.020)
    assert q.release(0.0199) == []
    assert q.release(0.0210) == [0, 1, 2]
    assert q.next_due_s() == pytest.approx(0.025)
    assert q.release(0.030) == [3]
    counters = q.counters()
    assert (counters["packets"], counters["bytes"], counters["delayed"], counters["held"]) == (4, 400, 4, 0)
    assert counters["held_max"] == 4
    assert counters["late_ms_max"] == pytest.approx(5.0)


def test_jitter_never_reorders_a_packet_ahead_of_the_one_before_it():
    # uniform() 1.0 -> +jitter, 0.0 -> -jitter: the second packet would overtake the first.
    q = DelayQueue(LineConfig(delay_ms=20, jitter_ms=10), _scripted(1.0, 0.0, 0.5))
    q.offer(0.000, "a", 1)  # due 30 ms
    q.offer(0.001, "b", 1)  # wants 11 ms, waits for a
    q.offer(0.040, "c", 1)  # due 60 ms
    assert q.release(0.0299) == []
    assert q.release(0.030) == ["a", "b"]
    assert q.release(0.060) == ["c"]


def test_loss_and_overflow_are_decided_on_arrival_and_counted():
    q = DelayQueue(LineConfig(delay_ms=10, loss_pct=50, limit_pkts=2), _scripted(0.7, 0.2, 0.9, 0.8))
    assert [q.offer(0.0, i, 10) for i in range(4)] == [HELD, LOST, HELD, OVERFLOW]
    counters = q.counters()
    assert (counters["packets"], counters["lost"], counters["overflow"], counters["held"]) == (4, 1, 1, 2)


def test_a_new_delay_applies_to_new_packets_and_held_ones_keep_their_time():
    q = DelayQueue(LineConfig(delay_ms=100), _scripted())
    q.offer(0.0, "old", 1)
    q.config = LineConfig(delay_ms=10)
    q.offer(0.001, "new", 1)  # would be due at 11 ms, but leaves after "old"
    assert q.release(0.050) == []
    assert q.release(0.100) == ["old", "new"]


def binomial_interval(n: int, p: float, confidence: float = 0.99) -> tuple[int, int]:
    """The central interval holding ``confidence`` of Binomial(n, p)."""
    tail = (1 - confidence) / 2
    logpmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
              + (n - k) * math.log1p(-p) for k in range(n + 1)]
    cdf, low, high = 0.0, None, n
    for k, lp in enumerate(logpmf):
        cdf += math.exp(lp)
        if low is None and cdf >= tail:
            low = k
        if cdf >= 1 - tail:
            high = k
            break
    return low, high


@pytest.mark.parametrize("loss_pct", [1.0, 5.0])
def test_loss_count_is_binomial(loss_pct):
    n = 20_000
    q = DelayQueue(LineConfig(delay_ms=1, loss_pct=loss_pct, limit_pkts=n), random.Random(1).random)
    for i in range(n):
        q.offer(i * 1e-6, i, 1)
    low, high = binomial_interval(n, loss_pct / 100)
    assert low <= q.lost <= high, (q.lost, low, high)
    assert q.lost + len(q) == n


def _loss_decisions(seed, directions=("up", "down"), packets=300):
    line = DelayLine({d: LineConfig(loss_pct=50) for d in directions}, seed=seed)
    return {d: [line.lines[d].queue.offer(i * 1e-3, i, 100) for i in range(packets)] for d in directions}


def test_a_seed_repeats_each_directions_loss_draws():
    first = _loss_decisions(42)
    assert {LOST, HELD} <= set(first["up"]) and {LOST, HELD} <= set(first["down"])
    assert _loss_decisions(42) == first
    # Up and down draw different sequences, and a direction's own does not
    # depend on whether the other direction runs at all.
    assert first["up"] != first["down"]
    assert _loss_decisions(42, ("up",))["up"] == first["up"]
    assert _loss_decisions(43) != first
    # Without a seed every delay line draws afresh (two equal runs: 2**-600).
    assert _loss_decisions(None) != _loss_decisions(None)


# --- the delay line's verdicts and copies, with fake sockets --------------------------


class FakeQueue:
    """Stands in for NfQueue: hands out scripted packets, records what is sent."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.sent = bytearray()

    def receive(self, max_packets, max_bytes=None):
        return self.batches.pop(0) if self.batches else []

    def send(self, verdicts):
        self.sent += verdicts


class FakeRaw:
    def __init__(self):
        self.sent = []

    def sendto(self, data, address):
        self.sent.append((data, address))


def _verdicts(data: bytes):
    out = []
    for pos in range(0, len(data), nq.VERDICT_BYTES):
        (kind, _, _, _), (_, _, queue), [(_, hdr)] = _split(bytes(data[pos:pos + nq.VERDICT_BYTES]))
        verdict, packet_id = struct.unpack("!II", hdr)
        out.append(("batch" if kind & 0xFF == 3 else "one", queue, "accept" if verdict else "drop", packet_id))
    return out


def test_down_holds_verdicts_up_drops_originals_and_sends_copies_later():
    now = [10.0]
    line = DelayLine({"up": LineConfig(delay_ms=20), "down": LineConfig(delay_ms=5, loss_pct=50)},
                     clock=lambda: now[0])
    ip_packet = b"\x45" + b"\0" * 15 + socket.inet_aton("10.1.2.3") + b"payload"
    size = len(ip_packet)
    line.nfq = FakeQueue([[nq.Packet(UP, 1, size, ip_packet), nq.Packet(UP, 2, size, ip_packet),
                           nq.Packet(DOWN, 7, 1500, b"E"), nq.Packet(DOWN, 8, 1500, b"E"),
                           nq.Packet(DOWN, 9, 1500, b"E")]])
    line.resender = Resender(RESEND_MARK, clock=lambda: now[0], raw=FakeRaw())
    # Loss draws for the down packets, in order: keep, lose, keep.
    line.lines["down"].queue._uniform = _scripted(0.9, 0.1, 0.9)
    line._take()
    assert _verdicts(line.nfq.sent) == [("one", DOWN, "drop", 8), ("batch", UP, "drop", 2)]
    assert line.resender.raw.sent == []

    line.nfq.sent.clear()
    now[0] = 10.005
    line._release(now[0])
    assert _verdicts(line.nfq.sent) == [("batch", DOWN, "accept", 9)]
    now[0] = 10.020
    line._release(now[0])
    assert line.resender.raw.sent == [(ip_packet, ("10.1.2.3", 0))] * 2

    stats = line.stats()
    assert stats["up"]["method"] == "copy" and stats["down"]["method"] == "verdict"
    assert (stats["up"]["delayed"], stats["down"]["delayed"], stats["down"]["lost"]) == (2, 2, 1)


def test_a_change_must_keep_the_directions_it_runs_for():
    line = DelayLine({"down": LineConfig(delay_ms=5)})
    with pytest.raises(UsageError, match="runs for down; a change to up and down needs a new one"):
        line.reconfigure({"up": LineConfig(delay_ms=1), "down": LineConfig(delay_ms=1)})
    with pytest.raises(UsageError, match="directions among up, down"):
        DelayLine({"sideways": LineConfig()})


# --- GSO: whole aggregates, sent again through a packet socket -------------------------


def _slow_sum(data: bytes) -> int:
    """RFC 1071 as written: add 16-bit words, fold the carries back in."""
    data += b"\0" * (len(data) % 2)
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _tcp_packet(payload: bytes, *, flags: int = 0x18, options: bytes = b"", partial: bool = True) -> bytes:
    """An IPv4 TCP packet 10.0.0.1 -> 10.0.0.2; ``partial``: its checksum field holds the pseudo-header sum only."""
    tcp_len = 20 + len(options) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0,
                     socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, tcp_len)
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, doff << 4, flags, 65535, 0, 0) + options + payload
    seed = _slow_sum(pseudo)
    if not partial:
        seed = 0xFFFF - _slow_sum(pseudo + tcp)
    return ip + tcp[:16] + struct.pack("!H", seed) + tcp[18:]


def test_inet_checksum_matches_rfc_1071_word_by_word():
    rng = random.Random(7)
    for size in (0, 1, 2, 3, 63, 1500, 9001):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert rs.inet_checksum(data) == 0xFFFF - _slow_sum(data)
    assert rs.inet_checksum(b"\xff\xff") == 0  # a sum of 0xFFFF (negative zero) checks as 0


def test_a_partial_checksum_is_completed_as_a_device_would():
    partial = _tcp_packet(b"hello, world")
    whole = rs.complete_checksum(partial)
    assert len(whole) == len(partial) and whole[:36] == partial[:36] and whole[38:] == partial[38:]
    assert whole == _tcp_packet(b"hello, world", partial=False)
    pseudo = whole[12:20] + struct.pack("!BBH", 0, 6, len(whole) - 20)
    assert _slow_sum(pseudo + whole[20:]) == 0xFFFF  # a receiver's check: everything sums to all ones
    assert rs.complete_checksum(b"\x60" + b"\0" * 50) == b"\x60" + b"\0" * 50  # not IPv4: unchanged


def test_vnet_header_packs_struct_virtio_net_hdr_in_host_order():
    header = rs.vnet_header(gso_type=rs.VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1448, hdr_len=66, csum_start=34,
                            csum_offset=16)
    assert len(header) == rs.VNET_HDR_BYTES == 10
    assert struct.unpack("=BBHHHH", header) == (1, 1, 66, 1448, 34, 16)  # NEEDS_CSUM, TCPV4
    assert rs.vnet_header() == bytes(10)  # nothing to do: no checksum, no GSO


def test_gso_size_is_what_one_mtu_holds_after_this_packets_headers():
    assert rs.gso_size_bytes(1500, 20, 32) == 1448  # timestamps, as Linux sends by default
    assert rs.gso_size_bytes(1450, 20, 20) == 1410  # an overlay's MTU, no options


def test_an_aggregate_gets_a_vnet_header_for_tcp_segmentation_and_an_ethernet_header():
    dst, src = bytes.fromhex("0242c0a89002"), bytes.fromhex("0242c0a89003")
    aggregate = _tcp_packet(b"x" * 20000, options=b"\x01\x01\x08\x0a" + bytes(8))
    header = rs.gso_frame_header(aggregate, dst, src, 1500)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("=BBHHHH", header)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (1, 1, 14 + 20 + 32, 1448, 34, 16)
    assert header[10:] == dst + src + b"\x08\x00"
    cwr = rs.gso_frame_header(_tcp_packet(b"x" * 20000, flags=0x80 | 0x10), dst, src, 1500)
    assert cwr[1] == rs.VIRTIO_NET_HDR_GSO_TCPV4 | rs.VIRTIO_NET_HDR_GSO_ECN
    udp = bytearray(aggregate)
    udp[9] = 17
    assert rs.gso_frame_header(bytes(udp), dst, src, 1500) is None  # UDP's segment size is not in the packet


ARP = """IP address       HW type     Flags       HW address            Mask     Device
192.168.144.2    0x1         0x2         02:42:c0:a8:90:02     *        eth0
192.168.144.9    0x1         0x0         00:00:00:00:00:00     *        eth0
192.168.144.1    0x1         0x6         02:42:5c:11:22:33     *        eth0
"""
ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0190A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0090A8C0\t00000000\t0001\t0\t0\t0\t00F0FFFF\t0\t0\t0
eth1\t0000000A\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0
"""


def test_neighbours_are_the_complete_arp_entries_by_address_and_device():
    assert rs.parse_arp_table(ARP) == {("192.168.144.2", "eth0"): bytes.fromhex("0242c0a89002"),
                                       ("192.168.144.1", "eth0"): bytes.fromhex("02425c112233")}


def test_next_hop_is_the_destination_on_link_else_the_gateway():
    routes = rs.parse_route_table(ROUTES, byteorder="little")
    assert routes == [rs.Route("eth0", 0, 0, "192.168.144.1"),
                      rs.Route("eth0", 0xC0A89000, 0xFFFFF000, None)]  # eth1's route is down
    assert rs.next_hop(routes, "192.168.144.2", "eth0") == "192.168.144.2"
    assert rs.next_hop(routes, "8.8.8.8", "eth0") == "192.168.144.1"
    assert rs.next_hop(routes, "10.0.0.1", "eth1") is None


class FakePacketSocket:
    def __init__(self):
        self.sent = []

    def sendmsg(self, buffers):
        self.sent.append(b"".join(buffers))


def _resender(now):
    resender = Resender(RESEND_MARK, clock=lambda: now[0], raw=FakeRaw())
    packet_socket = FakePacketSocket()
    resender._egress[5] = rs._Egress(packet_socket, "eth0", bytes.fromhex("0242c0a89003"), 1500)
    resender._neighbours = rs.parse_arp_table(ARP.replace("192.168.144.2 ", "10.0.0.2      "))
    resender._routes = rs.parse_route_table(ROUTES.replace("0090A8C0", "0000000A").replace("00F0FFFF", "000000FF"),
                                            byteorder="little")
    resender._read_s = now[0]
    return resender, packet_socket


def test_aggregates_go_through_the_packet_socket_and_wire_packets_through_the_raw_one():
    now = [100.0]
    resender, packet_socket = _resender(now)
    aggregate = _tcp_packet(b"x" * 30000)
    assert resender.send(nq.Packet(UP, 1, len(aggregate), aggregate, nq.NFQA_SKB_GSO | nq.NFQA_SKB_CSUMNOTREADY, 5))
    (frame,) = packet_socket.sent
    assert frame[:10] == rs.vnet_header(gso_type=1, gso_size=1460, hdr_len=54, csum_start=34, csum_offset=16)
    assert frame[10:24] == bytes.fromhex("0242c0a89002" "0242c0a89003" "0800") and frame[24:] == aggregate

    small = _tcp_packet(b"ping")
    assert resender.send(nq.Packet(UP, 2, len(small), small, nq.NFQA_SKB_CSUMNOTREADY, 5))
    assert resender.raw.sent == [(_tcp_packet(b"ping", partial=False), ("10.0.0.2", 0))]

    # A copy the kernel cut short, or an aggregate for a neighbour whose MAC is unknown, cannot go.
    assert not resender.send(nq.Packet(UP, 3, 70000, aggregate, nq.NFQA_SKB_GSO, 5))
    resender._neighbours.clear()
    resender._refresh = lambda now_s: None
    now[0] += 0.1
    assert not resender.send(nq.Packet(UP, 4, len(aggregate), aggregate, nq.NFQA_SKB_GSO, 5))
    assert len(packet_socket.sent) == 1 and resender.aggregates == 1


class ConfigRecorder(FakeQueue):
    def __init__(self):
        super().__init__([])
        self.configured = []

    def configure(self, queue_num, maxlen_pkts, copy_range_bytes, gso):
        self.configured.append((queue_num, maxlen_pkts, copy_range_bytes, gso))


def test_a_direction_takes_aggregates_whole_only_while_it_has_no_loss():
    line = DelayLine({"up": LineConfig(delay_ms=10), "down": LineConfig(delay_ms=10, loss_pct=1)})
    assert line.lines["up"].bind_args() == (DEFAULT_LIMIT_PKTS, nq.COPY_WHOLE, True)
    assert line.lines["down"].bind_args() == (DEFAULT_LIMIT_PKTS, nq.COPY_LENGTH_ONLY, False)
    line.nfq = ConfigRecorder()
    line.reconfigure({"up": LineConfig(delay_ms=30, loss_pct=1), "down": LineConfig(delay_ms=30, loss_pct=1)})
    # Only what changed the queue's configuration: up loses its GSO flag; down's delay is the line's own.
    assert line.nfq.configured == [(UP, DEFAULT_LIMIT_PKTS, nq.COPY_WHOLE, False)]
    line.reconfigure({"up": LineConfig(delay_ms=30), "down": LineConfig(delay_ms=30)})
    assert line.nfq.configured[1:] == [(UP, DEFAULT_LIMIT_PKTS, nq.COPY_WHOLE, True),
                                       (DOWN, DEFAULT_LIMIT_PKTS, nq.COPY_LENGTH_ONLY, True)]
    assert line.stats()["up"]["gso"] is True
