"""Pure builders of the tc / ip / iptables commands that shape a link (no side effects).

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

The userspace backend keeps the same tbf layout for rate and replaces netem by
the delay line (see delayline.py): iptables rules in the mangle table send the
link's packets to it, up from POSTROUTING and down from PREROUTING, each
direction through a chain of its own so that teardown removes exactly them.
"""

from __future__ import annotations

import math

from .. import units
from .delayline import DEFAULT_LIMIT_PKTS, QUEUES, RESEND_MARK, LineConfig
from .model import DIRECTIONS, LinkShape, LinkSpec, format_percent

# Bytes tc charges for a full-size packet: 1500 B MTU plus the 14 B Ethernet
# header (qdiscs see frames without the FCS). Used to turn packet counts into
# byte budgets; at a 1500 B MTU a TCP segment then carries 1448 payload bytes,
# so TCP goodput tops out at rate * 1448 / 1514.
FRAME_BYTES = 1514
ETHERNET_HEADER_BYTES = 14
# IPv4 (20) and TCP (20) headers, and the timestamps option Linux sends by default (12).
TCP_IP_HEADER_BYTES = 52


def tcp_ceiling_bps(rate_bps: float, mtu: int = 1500) -> float:
    """The most goodput TCP gets through ``rate_bps`` on a device of MTU ``mtu``.

    Full segments' payload per frame as the qdisc counts it: 1448 of 1514 bytes
    at 1500 (a bridge), 1398 of 1464 at 1450 (an overlay, whose VXLAN takes 50).
    """
    return rate_bps * (mtu - TCP_IP_HEADER_BYTES) / (mtu + ETHERNET_HEADER_BYTES)

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


def qdisc_plan(up: LinkShape, down: LinkShape, dev: str, ifb: str, round_trip_s: float) -> list[list[str]]:
    """The qdiscs for a fresh device: ``up`` on ``dev``, ``down`` via ``ifb``."""
    commands = direction_qdiscs(up, dev, round_trip_s)
    if down.shaped:
        commands += [
            ["ip", "link", "add", ifb, "type", "ifb"],
            ["ip", "link", "set", "dev", ifb, "up"],
            # ifb's qdiscs go in before the redirect, so no packet crosses ifb
            # unshaped while the plan is half done.
            *direction_qdiscs(down, ifb, round_trip_s),
            *ingress_redirect(dev, ifb),
        ]
    return commands


def qdisc_change(
    old: tuple[LinkShape, LinkShape], new: tuple[LinkShape, LinkShape], dev: str, ifb: str, round_trip_s: float,
) -> list[list[str]] | None:
    """``tc qdisc change`` commands turning (up, down) ``old`` into ``new`` in place, or None.

    In place is possible when both plans have the same commands apart from the
    qdiscs' parameters (same qdisc kinds at the same handles, same redirect):
    then queued packets and running connections are kept, where a teardown
    would drop the queues and leave a moment unshaped. tbf's change leaves a
    netem child alone (it only resizes FIFO children).
    """
    old_plan = qdisc_plan(*old, dev, ifb, round_trip_s)
    new_plan = qdisc_plan(*new, dev, ifb, round_trip_s)
    if [_layout(c) for c in old_plan] != [_layout(c) for c in new_plan]:
        return None
    up, down = new
    return direction_qdiscs(up, dev, round_trip_s, verb="change") + direction_qdiscs(down, ifb, round_trip_s, verb="change")


def netem_tbf_plan(spec: LinkSpec, dev: str, ifb: str) -> list[list[str]]:
    """The whole netem plan for a fresh device: up on ``dev``, down via ``ifb``."""
    return qdisc_plan(spec.up, spec.down, dev, ifb, spec.round_trip_ms() / 1000)


def netem_tbf_change(old: LinkSpec, new: LinkSpec, dev: str, ifb: str) -> list[list[str]] | None:
    """The netem plan's in-place change (see ``qdisc_change``), or None."""
    return qdisc_change((old.up, old.down), (new.up, new.down), dev, ifb, new.round_trip_ms() / 1000)


# --- the userspace backend ------------------------------------------------------

# How the container (or `ip netns exec`) runs the delay line's commands: the
# image's interpreter on PATH, with the package on its PYTHONPATH.
DELAYLINE_COMMAND = ["python3", "-m", "socklab", "shape", "delayline"]
IPTABLES_MANGLE = ["iptables", "-w", "-t", "mangle"]
CHAINS = {"up": "socklab-up", "down": "socklab-down"}
# Per direction, the built-in chain that feeds it and how it names the device.
_HOOKS = {"up": ("POSTROUTING", "-o"), "down": ("PREROUTING", "-i")}


def rate_only(shape: LinkShape) -> LinkShape:
    """What of ``shape`` stays in the kernel under the userspace backend: rate and its queue."""
    if shape.rate_bps is None:
        return LinkShape()
    return LinkShape(rate_bps=shape.rate_bps, limit_pkts=shape.limit_pkts)


def line_configs(spec: LinkSpec) -> dict[str, LineConfig]:
    """The delay line's work per direction that asks for delay, jitter or loss.

    Its queue is what netem's limit would be for the same link (the bottleneck
    queue plus twice the bandwidth-delay product, or the user's limit, or
    netem's default of 1000 packets without a rate), so a config means the same
    under either backend.
    """
    round_trip_s = spec.round_trip_ms() / 1000
    return {
        direction: LineConfig(
            delay_ms=float(shape.delay_ms), jitter_ms=float(shape.jitter_ms), loss_pct=float(shape.loss_pct),
            limit_pkts=netem_limit_pkts(shape, round_trip_s) or DEFAULT_LIMIT_PKTS,
        )
        for direction, shape in spec.directions()
        if shape.needs_netem
    }


def delayline_command(verb: str, configs: dict[str, LineConfig], seed: int | None = None) -> list[str]:
    """``python3 -m socklab shape delayline start|set --up WORD --down WORD``, and ``--seed=N`` when given."""
    argv = [*DELAYLINE_COMMAND, verb]
    for direction in DIRECTIONS:
        if direction in configs:
            argv += [f"--{direction}", configs[direction].to_word()]
    if seed is not None:
        # One word: after a separate --seed, argparse takes '-5' for a value only
        # as long as the parser has no option that looks like a negative number.
        argv.append(f"--seed={seed}")
    return argv


def delay_line_rules(directions: list[str] | dict[str, LineConfig], dev: str) -> list[list[str]]:
    """iptables commands that send ``dev``'s packets of ``directions`` to the delay line.

    Only ``dev``'s traffic, never loopback. Each chain is complete before the
    built-in chain jumps to it, so no packet meets half a rule set. The up
    chain first lets the delay line's own copies pass (they carry its mark).
    """
    commands = []
    for direction in DIRECTIONS:
        if direction not in directions:
            continue
        chain = CHAINS[direction]
        hook, dev_option = _HOOKS[direction]
        commands.append([*IPTABLES_MANGLE, "-N", chain])
        if direction == "up":
            commands.append([*IPTABLES_MANGLE, "-A", chain, "-m", "mark", "--mark", hex(RESEND_MARK), "-j", "RETURN"])
        commands += [
            [*IPTABLES_MANGLE, "-A", chain, "-j", "NFQUEUE", "--queue-num", str(QUEUES[direction])],
            [*IPTABLES_MANGLE, "-A", hook, dev_option, dev, "-j", chain],
        ]
    return commands


def delay_line_teardown(dev: str) -> list[list[str]]:
    """Unhook, flush and delete both chains, then stop the delay line (each may fail harmlessly).

    Rules go first: a rule whose queue has no listener would drop the link's packets.
    """
    commands = []
    for direction in DIRECTIONS:
        chain = CHAINS[direction]
        hook, dev_option = _HOOKS[direction]
        commands += [
            [*IPTABLES_MANGLE, "-D", hook, dev_option, dev, "-j", chain],
            [*IPTABLES_MANGLE, "-F", chain],
            [*IPTABLES_MANGLE, "-X", chain],
        ]
    return [*commands, [*DELAYLINE_COMMAND, "stop"]]


def userspace_plan(spec: LinkSpec, dev: str, ifb: str, seed: int | None = None) -> list[list[str]]:
    """tbf for rate as in the netem plan, then the delay line, then the rules that feed it.

    ``seed`` seeds the delay line's draws (None: unseeded).
    """
    round_trip_s = spec.round_trip_ms() / 1000
    commands = qdisc_plan(rate_only(spec.up), rate_only(spec.down), dev, ifb, round_trip_s)
    configs = line_configs(spec)
    if configs:
        commands.append(delayline_command("start", configs, seed))
        commands += delay_line_rules(configs, dev)
    return commands


def userspace_change(old: LinkSpec, new: LinkSpec, dev: str, ifb: str) -> list[list[str]] | None:
    """Retune tbf in place and tell the running delay line its new values; None to rebuild.

    A rebuild is needed when the qdisc layout changes or a direction joins or
    leaves the delay line (its queues and rules are fixed at start).
    """
    old_lines, new_lines = line_configs(old), line_configs(new)
    if set(old_lines) != set(new_lines):
        return None
    commands = qdisc_change((rate_only(old.up), rate_only(old.down)), (rate_only(new.up), rate_only(new.down)),
                            dev, ifb, new.round_trip_ms() / 1000)
    if commands is None:
        return None
    if new_lines != old_lines:
        commands.append(delayline_command("set", new_lines))
    return commands


def _layout(command: list[str]) -> tuple[str, ...]:
    """A command without the parameters that `tc qdisc change` may alter."""
    if command[:3] == ["tc", "qdisc", "add"]:
        # The qdisc's kind follows its handle: everything up to it is layout.
        kind_at = command.index("handle") + 2
        return tuple(command[: kind_at + 1])
    return tuple(command)


def qdisc_teardown(dev: str = "eth0", ifb: str = "ifb0") -> list[list[str]]:
    """Commands that remove every qdisc, filter and device a plan can have added."""
    return [
        ["tc", "qdisc", "del", "dev", dev, "root"],
        ["tc", "qdisc", "del", "dev", dev, "ingress"],
        ["ip", "link", "del", "dev", ifb],
    ]


def build_teardown(dev: str = "eth0", ifb: str = "ifb0") -> list[list[str]]:
    """Commands that remove everything a plan of either backend can have added.

    Each may fail harmlessly when its part was never added; the caller decides
    what counts as done by looking at what is left.
    """
    return [*delay_line_teardown(dev), *qdisc_teardown(dev, ifb)]
