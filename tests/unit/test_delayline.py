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
from socklab.shaping.delayline import HELD, LOST, OVERFLOW, QUEUES, RESEND_MARK, DelayLine, DelayQueue, LineConfig
from socklab.shaping.cli import _parser
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
        (4, struct.pack("!I", 0x1)),           # NFQA_CFG_MASK: the fail-open flag ...
        (5, struct.pack("!I", 0)),             # NFQA_CFG_FLAGS: ... cleared
    ]
    assert _split(nq.encode_params(1, 10, nq.COPY_WHOLE))[2][0] == (2, struct.pack("!IB", 0xFFFF, 2))


def test_verdicts_one_packet_or_a_batch_up_to_an_id():
    single = nq.encode_verdict(7302, 0xDEADBEEF, nq.NF_ACCEPT)
    assert len(single) == nq.VERDICT_BYTES == 32
    head, gen, attrs = _split(single)
    assert head == ((3 << 8) | 1, 0x1, 0, 0) and gen[2] == 7302  # NFQNL_MSG_VERDICT, no ACK asked
    assert attrs == [(2, struct.pack("!II", 1, 0xDEADBEEF))]  # NFQA_VERDICT_HDR: verdict, id
    head, _, attrs = _split(nq.encode_verdict_batch(7301, 42, nq.NF_DROP))
    assert head[0] == (3 << 8) | 3 and attrs == [(2, struct.pack("!II", 0, 42))]


def _packet_message(queue: int, packet_id: int, payload: bytes, cap_len: int | None) -> bytes:
    def attr(kind, data):
        raw = struct.pack("=HH", 4 + len(data), kind) + data
        return raw + b"\0" * (-len(raw) % 4)

    attrs = attr(1, struct.pack("!IHB", packet_id, 0x0800, 3))  # PACKET_HDR: id, ETH_P_IP, hook
    attrs += attr(5 | 0x8000, struct.pack("!I", 2))  # IFINDEX_INDEV, with a flag bit that must be masked
    if cap_len is not None:
        attrs += attr(13, struct.pack("!I", cap_len))
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

    def receive(self, max_packets):
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
    line.nfq = FakeQueue([[nq.Packet(UP, 1, 30, ip_packet), nq.Packet(UP, 2, 30, ip_packet),
                           nq.Packet(DOWN, 7, 1500, b"E"), nq.Packet(DOWN, 8, 1500, b"E"),
                           nq.Packet(DOWN, 9, 1500, b"E")]])
    line.raw = FakeRaw()
    # Loss draws for the down packets, in order: keep, lose, keep.
    line.lines["down"].queue._uniform = _scripted(0.9, 0.1, 0.9)
    line._take()
    assert _verdicts(line.nfq.sent) == [("one", DOWN, "drop", 8), ("batch", UP, "drop", 2)]
    assert line.raw.sent == []

    line.nfq.sent.clear()
    now[0] = 10.005
    line._release(now[0])
    assert _verdicts(line.nfq.sent) == [("batch", DOWN, "accept", 9)]
    now[0] = 10.020
    line._release(now[0])
    assert line.raw.sent == [(ip_packet, ("10.1.2.3", 0))] * 2

    stats = line.stats()
    assert stats["up"]["method"] == "copy" and stats["down"]["method"] == "verdict"
    assert (stats["up"]["delayed"], stats["down"]["delayed"], stats["down"]["lost"]) == (2, 2, 1)


def test_a_change_must_keep_the_directions_it_runs_for():
    line = DelayLine({"down": LineConfig(delay_ms=5)})
    with pytest.raises(UsageError, match="runs for down; a change to up and down needs a new one"):
        line.reconfigure({"up": LineConfig(delay_ms=1), "down": LineConfig(delay_ms=1)})
    with pytest.raises(UsageError, match="directions among up, down"):
        DelayLine({"sideways": LineConfig()})
