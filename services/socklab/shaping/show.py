"""What the kernel says is installed: qdiscs with their counters, as plain dicts."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from .runner import Runner, ShapingError

# Keys every qdisc entry has, whatever tc printed; counters are cumulative since
# the qdisc was added. backlog is in bytes and qlen in packets, as tc names them.
COUNTERS = ("bytes", "packets", "drops", "overlimits", "backlog", "qlen")
# The counters that count; backlog and qlen (and a delay line's held) are levels.
QDISC_COUNTS = ("bytes", "packets", "drops", "overlimits")
DELAY_LINE_COUNTS = ("packets", "bytes", "delayed", "lost", "overflow", "send_errors", "gso_packets")


def counts_since(now: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """A link as ``show_link`` shows it (``now``) with every count less what it was at ``before``
    (an earlier ``show_link`` of the same link): the counts of what passed in between.

    The entrypoint takes ``before`` once the link probe has measured the link, so that a
    case's counters are its workload's alone. A qdisc matches by device, kind, handle and
    parent; one that was not there before keeps its counts.
    """
    def key(qdisc: Mapping[str, Any]) -> tuple:
        return qdisc.get("kind"), qdisc.get("handle"), qdisc.get("parent")

    qdiscs = {}
    for dev, found in (now.get("qdisc") or {}).items():
        earlier = {key(q): q for q in (before.get("qdisc") or {}).get(dev) or ()}
        qdiscs[dev] = [{**q, **{name: q[name] - earlier[key(q)].get(name, 0) for name in QDISC_COUNTS if name in q}}
                       if key(q) in earlier else dict(q) for q in found]
    since = {**now, "qdisc": qdiscs}
    line, earlier_line = now.get("delay_line"), before.get("delay_line")
    if isinstance(line, Mapping) and isinstance(earlier_line, Mapping):
        since["delay_line"] = {
            name: ({**part, **{c: part[c] - earlier_line[name].get(c, 0) for c in DELAY_LINE_COUNTS if c in part}}
                   if isinstance(part, Mapping) and isinstance(earlier_line.get(name), Mapping) else part)
            for name, part in line.items()}
    return since


def qdisc_stats(runner: Runner, dev: str) -> list[dict[str, Any]]:
    """``tc -s qdisc show dev DEV`` as a list of dicts, root first.

    Each: kind, handle, parent ('root' for the root qdisc), options (tc's own
    JSON options, or {'text': ...} when tc cannot print JSON) and COUNTERS.
    """
    try:
        return parse_qdisc_json(runner(["tc", "-s", "-j", "qdisc", "show", "dev", dev]))
    except (ShapingError, ValueError):
        # An iproute2 without -j either rejects it or prints text; a missing
        # device fails here again and raises.
        return parse_qdisc_text(runner(["tc", "-s", "qdisc", "show", "dev", dev]))


def parse_qdisc_json(text: str) -> list[dict[str, Any]]:
    """Normalise ``tc -s -j qdisc show`` output; ValueError if it is not that JSON."""
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(e, dict) and "kind" in e for e in data):
        raise ValueError("not a list of qdiscs")
    return [
        {
            "kind": entry["kind"],
            "handle": entry.get("handle"),
            "parent": "root" if entry.get("root") else entry.get("parent"),
            "options": entry.get("options", {}),
            **{name: int(entry.get(name, 0)) for name in COUNTERS},
        }
        for entry in data
    ]


_HEAD = re.compile(r"^qdisc (?P<kind>\S+) (?P<handle>\S+) (?:(?P<root>root)|parent (?P<parent>\S+))(?P<rest>.*)$")
_SENT = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)")
_BACKLOG = re.compile(r"backlog (\d+)([KMG]?)b (\d+)p")
_SCALE = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}


def parse_qdisc_text(text: str) -> list[dict[str, Any]]:
    """Minimal parse of ``tc -s qdisc show``: kind, handle, parent and counters."""
    entries: list[dict[str, Any]] = []
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head:
            entries.append({
                "kind": head["kind"],
                "handle": head["handle"],
                "parent": "root" if head["root"] else head["parent"],
                "options": {"text": " ".join(head["rest"].split())},
                **{name: 0 for name in COUNTERS},
            })
            continue
        if not entries:
            continue
        entry = entries[-1]
        sent = _SENT.search(line)
        if sent:
            entry["bytes"], entry["packets"], entry["drops"], entry["overlimits"] = map(int, sent.groups())
        backlog = _BACKLOG.search(line)
        if backlog:
            entry["backlog"] = int(backlog[1]) * _SCALE[backlog[2]]
            entry["qlen"] = int(backlog[3])
    return entries


def link_mtus(runner: Runner) -> dict[str, int | None]:
    """The network devices in this namespace (veth peers without '@ifN') and their MTUs."""
    mtus: dict[str, int | None] = {}
    for line in runner(["ip", "-o", "link", "show"]).splitlines():
        parts = line.split(": ", 2)
        if len(parts) >= 2:
            words = parts[2].split() if len(parts) == 3 else []
            mtu = words[words.index("mtu") + 1] if "mtu" in words[:-1] else ""
            mtus[parts[1].split("@", 1)[0]] = int(mtu) if mtu.isdigit() else None
    return mtus


def link_names(runner: Runner) -> set[str]:
    """Names of the network devices in this namespace (veth peers without '@ifN')."""
    return set(link_mtus(runner))
