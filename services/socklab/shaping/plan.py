"""Pure builders of the tc / ip commands that shape a link (no side effects).

Layout, per shaped direction (up on the container's device, down on the ifb
device that the ingress redirect feeds):

    rate only           root 1: tbf
    delay/jitter/loss   root 10: netem
    both                root 1: tbf, and parent 1:1 handle 10: netem

Why tbf at the root with netem as its child, and not the reverse: with netem at
the root and a child qdisc, netem's queue accounting has changed across kernel
versions and their stable backports (whether its limit counts the child's
packets; a queue length that crept up whenever the child split a GSO packet, as
tbf does, until the limit was reached and the link stalled: "net/sched: netem:
account for backlog updates from child qdisc"). With tbf at the root netem has
no child, so its limit means the same on every kernel; this is also the order
Mininet's link.py uses. Packets are delayed first and rate-limited as they leave
the delay line; for a FIFO link a constant delay before or after the bottleneck
gives the same departure times.
"""

from __future__ import annotations

import math

from .. import units
from .model import LinkShape, LinkSpec, format_percent

# Bytes tc charges for a full-size packet: 1500 B MTU plus the 14 B Ethernet
# header (qdiscs see frames without the FCS). Used to turn packet counts into
# byte budgets; at a 1500 B MTU a TCP segment then carries 1448 payload bytes,
# so TCP goodput tops out at rate * 1448 / 1514.
FRAME_BYTES = 1514

# tbf's bucket must hold at least one packet plus what the rate earns between two
# timer ticks, or the rate falls short on kernels with coarse timers; 4 ms is one
# jiffy at HZ=250, the common distribution setting (at HZ=1000 it is four, which
# only makes the first burst a little longer). Ten frames is Mininet's 15000 B
# floor, and lets GSO packets up to 15 KB pass without tbf splitting them.
TOKEN_TICK_S = 0.004
BURST_MIN_BYTES = 10 * FRAME_BYTES

# The bottleneck queue holds about one bandwidth-delay product (the classic
# router buffer rule: enough for a TCP flow to keep the link busy through a
# multiplicative decrease, no more, so queueing delay stays near one RTT). The
# round trip the lab configures is the sum of both directions' delays and
# jitters; links without delay still see TCP bursts of tens of packets, so the
# RTT counts as at least 20 ms and the queue as at least 16 full frames.
QUEUE_RTT_FLOOR_S = 0.020
QUEUE_MIN_PKTS = 16

ROOT_HANDLE = "1:"
NETEM_HANDLE = "10:"
NETEM_PARENT = "1:1"
INGRESS_HANDLE = "ffff:"


def burst_bytes(rate_bps: int) -> int:
    """tbf bucket size for ``rate_bps`` (see TOKEN_TICK_S)."""
    return max(BURST_MIN_BYTES, math.ceil(rate_bps / 8 * TOKEN_TICK_S))


def queue_pkts(shape: LinkShape, round_trip_s: float) -> int:
    """Packets the bottleneck may queue: the user's limit, else about one BDP."""
    if shape.limit_pkts is not None:
        return shape.limit_pkts
    if shape.rate_bps is None:
        raise ValueError("a queue behind no rate limit has no bandwidth-delay product")
    bdp_bytes = shape.rate_bps / 8 * max(round_trip_s, QUEUE_RTT_FLOOR_S)
    return max(QUEUE_MIN_PKTS, math.ceil(bdp_bytes / FRAME_BYTES))


def netem_limit_pkts(shape: LinkShape, round_trip_s: float) -> int | None:
    """netem's packet limit, or None to keep netem's default (1000 packets).

    Under tbf, netem's limit counts the packets still in the delay line as well as
    those waiting for tokens, while a real link's propagation delay costs no
    buffer. So the limit is the bottleneck queue plus the delay line, the latter
    counted twice over: it is sized for full frames at the link rate, and small
    packets (a faster reverse direction's ACKs) and jitter's bunching occupy
    slots without bytes. Without a rate there is no bottleneck, and a user's
    limit is netem's own (as in tc-netem).
    """
    if shape.rate_bps is None:
        return shape.limit_pkts
    in_flight_s = (shape.delay_ms + shape.jitter_ms) / 1000
    delay_line_pkts = math.ceil(shape.rate_bps / 8 * in_flight_s / FRAME_BYTES)
    return queue_pkts(shape, round_trip_s) + 2 * delay_line_pkts


def tbf_args(shape: LinkShape, round_trip_s: float) -> list[str]:
    """``tbf rate .. burst .. limit ..`` for a rate-limited direction."""
    assert shape.rate_bps is not None
    # With a netem child the limit is inert (netem replaces tbf's byte FIFO), but
    # tc requires one; the same value keeps `tc qdisc show` telling the truth
    # about the intended queue.
    limit_bytes = max(queue_pkts(shape, round_trip_s) * FRAME_BYTES, FRAME_BYTES)
    return [
        "tbf",
        "rate", units.format_rate(shape.rate_bps),
        "burst", str(burst_bytes(shape.rate_bps)),
        "limit", str(limit_bytes),
    ]


def netem_args(shape: LinkShape, round_trip_s: float) -> list[str]:
    """``netem delay .. [jitter] loss .. limit ..`` with only what is asked for."""
    args = ["netem"]
    if shape.delay_ms > 0:
        args += ["delay", units.format_duration(shape.delay_ms / 1000)]
        if shape.jitter_ms > 0:
            args.append(units.format_duration(shape.jitter_ms / 1000))
    if shape.loss_pct > 0:
        args += ["loss", format_percent(shape.loss_pct)]
    limit = netem_limit_pkts(shape, round_trip_s)
    if limit is not None:
        args += ["limit", str(limit)]
    return args


def direction_qdiscs(shape: LinkShape, dev: str, round_trip_s: float, verb: str = "add") -> list[list[str]]:
    """The qdisc commands for one direction on ``dev``; [] when unshaped.

    ``verb`` is 'add' for a fresh device or 'change' to retune qdiscs that are
    already in place with the same layout (their queues survive).
    """
    commands = []
    if shape.rate_bps is not None:
        commands.append(["tc", "qdisc", verb, "dev", dev, "root", "handle", ROOT_HANDLE, *tbf_args(shape, round_trip_s)])
        if shape.needs_netem:
            commands.append(
                ["tc", "qdisc", verb, "dev", dev, "parent", NETEM_PARENT, "handle", NETEM_HANDLE,
                 *netem_args(shape, round_trip_s)]
            )
    elif shape.needs_netem:
        commands.append(["tc", "qdisc", verb, "dev", dev, "root", "handle", NETEM_HANDLE, *netem_args(shape, round_trip_s)])
    return commands


def ingress_redirect(dev: str, ifb: str) -> list[list[str]]:
    """Send everything arriving on ``dev`` through ``ifb``'s egress qdiscs."""
    return [
        ["tc", "qdisc", "add", "dev", dev, "handle", INGRESS_HANDLE, "ingress"],
        ["tc", "filter", "add", "dev", dev, "parent", INGRESS_HANDLE, "protocol", "all",
         "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb],
    ]


def netem_tbf_plan(spec: LinkSpec, dev: str, ifb: str) -> list[list[str]]:
    """The whole plan for a fresh device: up on ``dev``, down via ``ifb``."""
    round_trip_s = spec.round_trip_ms() / 1000
    commands = direction_qdiscs(spec.up, dev, round_trip_s)
    if spec.down.shaped:
        commands += [
            ["ip", "link", "add", ifb, "type", "ifb"],
            ["ip", "link", "set", "dev", ifb, "up"],
            # ifb's qdiscs go in before the redirect, so no packet crosses ifb
            # unshaped while the plan is half done.
            *direction_qdiscs(spec.down, ifb, round_trip_s),
            *ingress_redirect(dev, ifb),
        ]
    return commands


def netem_tbf_change(old: LinkSpec, new: LinkSpec, dev: str, ifb: str) -> list[list[str]] | None:
    """``tc qdisc change`` commands turning ``old`` into ``new`` in place, or None.

    In place is possible when both plans have the same commands apart from the
    qdiscs' parameters (same qdisc kinds at the same handles, same redirect):
    then queued packets and running connections are kept, where a teardown
    would drop the queues and leave a moment unshaped. tbf's change leaves a
    netem child alone (it only resizes FIFO children).
    """
    old_plan, new_plan = netem_tbf_plan(old, dev, ifb), netem_tbf_plan(new, dev, ifb)
    if [_layout(c) for c in old_plan] != [_layout(c) for c in new_plan]:
        return None
    round_trip_s = new.round_trip_ms() / 1000
    commands = direction_qdiscs(new.up, dev, round_trip_s, verb="change")
    commands += direction_qdiscs(new.down, ifb, round_trip_s, verb="change")
    return commands


def _layout(command: list[str]) -> tuple[str, ...]:
    """A command without the parameters that `tc qdisc change` may alter."""
    if command[:3] == ["tc", "qdisc", "add"]:
        # The qdisc's kind follows its handle: everything up to it is layout.
        kind_at = command.index("handle") + 2
        return tuple(command[: kind_at + 1])
    return tuple(command)


def build_teardown(dev: str = "eth0", ifb: str = "ifb0") -> list[list[str]]:
    """Commands that remove everything a plan can have added.

    Each may fail harmlessly when its part was never added; the caller decides
    what counts as done by looking at what is left.
    """
    return [
        ["tc", "qdisc", "del", "dev", dev, "root"],
        ["tc", "qdisc", "del", "dev", dev, "ingress"],
        ["ip", "link", "del", "dev", ifb],
    ]
