"""What a packet capture of a role says about its TCP connections to the server.

The lab captures each container's eth0 with a short snap length (headers only),
so every length here comes from the IP and TCP headers, never from the bytes a
record kept: a segment's payload is ``ip.len - ip.hl * 4 - tcp.off * 4``. On a
veth, GSO/TSO hands the capture super-packets of up to 64 KiB; their ``ip.len``
says so, and they count as one segment each.

Read with dpkt: it is pure Python (nothing native to build in the lab's venv or
in CI), maintained, reads both pcap and pcapng, and decodes Ethernet, IPv4 and
TCP headers, which is all this needs. scapy would do the same far more slowly
and with far more weight; pyshark drives tshark, which the host would need.

Sequence numbers are taken relative to each direction's initial sequence
number (mod 2**32, unwrapped against the highest end seen so far), so that a
connection whose sequence space wraps past 2**32 reads as one rising line.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import dpkt

from socklab.errors import UsageError

TO_SERVER = "to_server"
FROM_SERVER = "from_server"
DIRECTIONS = (TO_SERVER, FROM_SERVER)

_SEQ_MOD = 2 ** 32
_SEQ_HALF = 2 ** 31

# The link layers a capture may have: tcpdump -i eth0 gives Ethernet; -i any, Linux
# "cooked" headers (v1 or v2); some tools write bare IP.
_DLT_EN10MB = 1
_DLT_RAW = (12, 14, 101)
_DLT_LINUX_SLL = 113
_DLT_LINUX_SLL2 = 276


@dataclass
class SequenceFlow:
    """One direction of one connection, as a time–sequence graph draws it.

    ``times_s``: each data segment's time since the capture's first packet;
    ``seq_end_bytes``: the offset just past its last byte, relative to the
    direction's first data byte (ISN + 1 when the SYN was captured, else the
    first sequence number seen); ``retransmits``: whether it ended at or below
    data already seen. ``ack_times_s``/``ack_bytes``: the other direction's
    acknowledgements of this data, on the same offsets.
    """

    direction: str
    connection: int
    times_s: list[float] = field(default_factory=list)
    seq_end_bytes: list[int] = field(default_factory=list)
    retransmits: list[bool] = field(default_factory=list)
    ack_times_s: list[float] = field(default_factory=list)
    ack_bytes: list[int] = field(default_factory=list)

    @property
    def highest_end_bytes(self) -> int:
        """The furthest offset any of its segments reached (0 without data)."""
        return max(self.seq_end_bytes, default=0)


@dataclass(frozen=True, slots=True)
class _Segment:
    """A decoded TCP segment to or from the server."""

    t_s: float
    connection: int
    direction: str
    seq: int
    ack: int | None  # None when the ACK flag is off
    payload_bytes: int
    syn: bool
    fin: bool


class _Direction:
    """The sequence space of one direction of one connection."""

    def __init__(self) -> None:
        self.isn: int | None = None
        self.base: int | None = None  # the absolute sequence number of offset 0
        self.highest_end: int | None = None  # relative; None until data (or the SYN) is seen
        self.new_bytes = 0
        self.fin = False

    def see_syn(self, seq: int) -> None:
        """A SYN fixes the ISN; the first data byte is the one after it."""
        if self.isn is None and self.highest_end is None:
            self.isn, self.base, self.highest_end = seq, (seq + 1) % _SEQ_MOD, 0

    def offset(self, seq: int) -> int:
        """``seq`` relative to the base, unwrapped against the highest end seen: the nearest
        value mod 2**32, so a wrap past 2**32 keeps rising and an old segment stays below."""
        if self.base is None:
            self.base = seq
        reference = self.highest_end or 0
        delta = (seq - self.base - reference) % _SEQ_MOD
        if delta >= _SEQ_HALF:
            delta -= _SEQ_MOD
        return reference + delta

    def see_data(self, seq: int, payload_bytes: int) -> tuple[int, bool]:
        """Record a data segment; returns its relative end and whether it was a retransmission."""
        start = self.offset(seq)
        end = start + payload_bytes
        retransmitted = self.highest_end is not None and end <= self.highest_end
        if not retransmitted:
            self.new_bytes += end - max(start, self.highest_end if self.highest_end is not None else start)
            self.highest_end = end
        return end, retransmitted

    def unique_bytes(self) -> int:
        """Payload bytes the direction carried: the highest end past the ISN when its SYN was
        seen (gaps the capture missed count: the receiver got them), else the new bytes seen."""
        return (self.highest_end or 0) if self.isn is not None else self.new_bytes


def _open_reader(fh: Any, path: Path) -> Any:
    """dpkt's reader for a pcap or pcapng file; a clear sentence for anything else."""
    try:
        return dpkt.pcap.UniversalReader(fh)
    except (ValueError, dpkt.UnpackError, struct.error):
        # dpkt's own words name its internals (magic numbers, block types), not the user's mistake.
        raise UsageError(f"{path} is not a packet capture: it is neither a pcap nor a pcapng file") from None


def _ip_of(linktype: int, buf: bytes) -> Any:
    """The IPv4 packet in one captured record, or None (another protocol, or undecodable)."""
    try:
        if linktype == _DLT_EN10MB:
            frame = dpkt.ethernet.Ethernet(buf)
        elif linktype == _DLT_LINUX_SLL:
            frame = dpkt.sll.SLL(buf)
        elif linktype == _DLT_LINUX_SLL2:
            frame = dpkt.sll2.SLL2(buf)
        elif linktype in _DLT_RAW:
            return dpkt.ip.IP(buf) if buf[:1] and buf[0] >> 4 == 4 else None
        else:
            return None
    except (dpkt.Error, ValueError, IndexError, struct.error):
        return None  # a record cut inside its link header, or a frame dpkt cannot make sense of
    ip = frame.data
    return ip if isinstance(ip, dpkt.ip.IP) else None


def _records(path: Path) -> Iterator[tuple[float, int, bytes]]:
    """(time, link type, bytes) of each record; a record torn by a kill mid-write ends the file."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read the capture {path}: {e.strerror or e}") from None
    with fh:
        if not fh.read(1):
            raise UsageError(f"{path} is empty: the capture wrote nothing, not even a pcap header")
        fh.seek(0)
        reader = _open_reader(fh, path)
        linktype = reader.datalink()
        if linktype not in (_DLT_EN10MB, _DLT_LINUX_SLL, _DLT_LINUX_SLL2, *_DLT_RAW):
            raise UsageError(f"{path} captured link type {linktype}, which this lab does not decode "
                             f"(it reads Ethernet, Linux cooked and raw IP captures)")
        try:
            for ts, buf in reader:
                yield float(ts), linktype, buf
        except (dpkt.UnpackError, ValueError, struct.error):
            return


class _Walk:
    """One pass over a capture: iterating yields every TCP segment to or from the server,
    placed in its connection, and counts every packet on the way (read once, kept nowhere:
    a capture at its cap holds a quarter of a million records)."""

    def __init__(self, path: Path, server_port: int):
        self.path, self.server_port = path, server_port
        self.packets = 0
        self.tcp_packets = 0
        self.connections: dict[tuple, int] = {}

    def __iter__(self) -> Iterator[_Segment]:
        first_s: float | None = None
        for t_s, linktype, buf in _records(self.path):
            self.packets += 1
            if first_s is None:
                first_s = t_s
            ip = _ip_of(linktype, buf)
            tcp = ip.data if ip is not None else None
            if not isinstance(tcp, dpkt.tcp.TCP):
                continue  # ARP, IPv6, UDP, a later fragment, or a TCP header the snap length cut
            self.tcp_packets += 1
            if tcp.dport == self.server_port:
                direction, key = TO_SERVER, (ip.src, tcp.sport, ip.dst, tcp.dport)
            elif tcp.sport == self.server_port:
                direction, key = FROM_SERVER, (ip.dst, tcp.dport, ip.src, tcp.sport)
            else:
                continue
            connection = self.connections.setdefault(key, len(self.connections))
            # From the headers: the capture kept only the first snaplen bytes of each packet.
            payload_bytes = max(0, ip.len - ip.hl * 4 - tcp.off * 4)
            flags = tcp.flags
            yield _Segment(t_s - first_s, connection, direction, tcp.seq,
                           tcp.ack if flags & dpkt.tcp.TH_ACK else None, payload_bytes,
                           bool(flags & dpkt.tcp.TH_SYN), bool(flags & dpkt.tcp.TH_FIN))


def summarize(path: str | Path, server_port: int) -> dict[str, Any]:
    """What one capture says about the TCP connections to ``server_port``.

    ``packets`` counts every record and ``tcp_packets`` every IPv4 TCP one;
    the rest is about connections to or from the server port:
    ``data_segments`` (payload > 0), ``retransmitted_segments`` (a data segment
    ending at or below the highest sequence end already seen in its direction),
    ``payload_bytes`` per direction (unique bytes: see :class:`_Direction`),
    ``connections`` (distinct 4-tuples), ``first_data_s``/``last_data_s`` (since
    the capture's first packet; None without data), ``fin`` per direction and
    ``syn`` (any SYN seen). Not a pcap or pcapng file: :class:`UsageError`.
    """
    walk = _Walk(Path(path), server_port)
    states: dict[tuple[int, str], _Direction] = {}
    data_times_s: list[float] = []
    retransmitted = 0
    syn = False
    for seg in walk:
        state = states.setdefault((seg.connection, seg.direction), _Direction())
        if seg.syn:
            syn = True
            state.see_syn(seg.seq)
        if seg.fin:
            state.fin = True
        if seg.payload_bytes > 0:
            _, again = state.see_data(seg.seq, seg.payload_bytes)
            retransmitted += again
            data_times_s.append(seg.t_s)
        elif state.base is None:
            state.base = seg.seq  # no SYN seen: offsets start where the capture found the direction
    return {
        "packets": walk.packets,
        "tcp_packets": walk.tcp_packets,
        "data_segments": len(data_times_s),
        "retransmitted_segments": retransmitted,
        "payload_bytes": {d: sum(s.unique_bytes() for (_, sd), s in states.items() if sd == d) for d in DIRECTIONS},
        "connections": len(walk.connections),
        # Microseconds are what a pcap's timestamps resolve; more digits would be noise in a record.
        "first_data_s": round(data_times_s[0], 6) if data_times_s else None,
        "last_data_s": round(data_times_s[-1], 6) if data_times_s else None,
        "fin": {d: any(s.fin for (_, sd), s in states.items() if sd == d) for d in DIRECTIONS},
        "syn": syn,
    }


def sequence_series(path: str | Path, server_port: int) -> list[SequenceFlow]:
    """Each direction of each connection to ``server_port`` that carried data, as a
    time–sequence graph draws it (see :class:`SequenceFlow`), in connection order."""
    walk = _Walk(Path(path), server_port)
    states: dict[tuple[int, str], _Direction] = {}
    flows: dict[tuple[int, str], SequenceFlow] = {}
    for seg in walk:
        key = (seg.connection, seg.direction)
        state = states.setdefault(key, _Direction())
        if seg.syn:
            state.see_syn(seg.seq)
        if seg.payload_bytes > 0:
            end, again = state.see_data(seg.seq, seg.payload_bytes)
            flow = flows.setdefault(key, SequenceFlow(seg.direction, seg.connection))
            flow.times_s.append(seg.t_s)
            flow.seq_end_bytes.append(end)
            flow.retransmits.append(again)
        elif state.base is None:
            state.base = seg.seq
        # This segment's ACK acknowledges the other direction's data, on that direction's offsets.
        other = states.get((seg.connection, FROM_SERVER if seg.direction == TO_SERVER else TO_SERVER))
        if seg.ack is not None and other is not None and other.base is not None:
            reverse = flows.setdefault((seg.connection, other_direction(seg.direction)),
                                       SequenceFlow(other_direction(seg.direction), seg.connection))
            reverse.ack_times_s.append(seg.t_s)
            reverse.ack_bytes.append(other.offset(seg.ack))
    return sorted((f for f in flows.values() if f.times_s), key=lambda f: (f.connection, DIRECTIONS.index(f.direction)))


def other_direction(direction: str) -> str:
    """The reverse of ``direction``."""
    return FROM_SERVER if direction == TO_SERVER else TO_SERVER

