"""A stdlib-only client for the kernel's packet queue (nfnetlink_queue, iptables NFQUEUE).

Raw ``AF_NETLINK`` / ``NETLINK_NETFILTER`` messages built and parsed with
``struct`` (layouts from include/uapi/linux/netfilter/nfnetlink_queue.h), so the
image needs no libnetfilter_queue and builds without network. Only what a delay
line needs: bind a queue, receive packet ids and lengths, issue verdicts later.

Encoding and parsing are pure functions (tested without a kernel); ``NfQueue``
is the socket around them.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path
from typing import NamedTuple

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0

NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

# Packet attributes (enum nfqnl_attr_type).
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_IFINDEX_OUTDEV = 6
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14

# NFQA_SKB_INFO flags: what the kernel says about a packet it queued.
# The checksum is partial (CHECKSUM_PARTIAL): the TCP/UDP checksum field holds
# only the pseudo-header's sum, to be completed by the device (or by whoever
# sends the packet again).
NFQA_SKB_CSUMNOTREADY = 0x1
# A GSO aggregate: larger than the device's MTU, to be segmented on transmit.
NFQA_SKB_GSO = 0x2
NFQA_SKB_CSUM_NOTVERIFIED = 0x4

# Config attributes (enum nfqnl_attr_config).
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
# With fail-open the kernel would accept what overflows the queue: packets would
# skip the delay line unseen. Off, an overflow is a drop the kernel counts.
NFQA_CFG_F_FAIL_OPEN = 0x1
# With the GSO flag the kernel queues a GSO aggregate (up to 64 KiB) as one
# packet, and leaves partial checksums partial; without it, it segments the
# aggregate to wire size and completes checksums first (one message each).
NFQA_CFG_F_GSO = 0x4

NF_DROP = 0
NF_ACCEPT = 1

# A packet whose verdict is held needs only its id and length. In COPY_PACKET
# mode the kernel reports the full length (NFQA_CAP_LEN) whenever it copies less
# than the packet, so one byte of payload is the cheapest copy that still says
# how big the packet is (COPY_META reports no length at all).
COPY_LENGTH_ONLY = 1
# A packet that is to be sent again from userspace is copied whole. Without the
# GSO flag the kernel segments GSO packets to wire size and completes their
# checksums before copying, so each copy is a valid packet of at most one MTU.
# With it, a copy may be a GSO aggregate with a partial checksum (see
# NFQA_SKB_INFO). The kernel copies at most 65531 bytes (its netlink attribute
# length is 16 bits); a longer packet comes truncated, with NFQA_CAP_LEN.
COPY_WHOLE = 0xFFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the queue number, big-endian)
_NLATTR = struct.Struct("=HH")  # len, type
_CFG_CMD = struct.Struct("!BxH")  # command, pad, pf
_CFG_PARAMS = struct.Struct("!IB")  # copy_range, copy_mode (packed)
_BE32 = struct.Struct("!I")
_VERDICT_HDR = struct.Struct("!II")  # verdict, id
_ERRNO = struct.Struct("=i")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

_HEAD_BYTES = _NLMSGHDR.size + _NFGENMSG.size
# A verdict message has a fixed size: header, nfgenmsg, one attribute.
VERDICT_BYTES = _HEAD_BYTES + _NLATTR.size + _VERDICT_HDR.size
PROC_QUEUES = Path("/proc/net/netfilter/nfnetlink_queue")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def _message(msg: int, queue_num: int, attrs: bytes, flags: int, seq: int) -> bytes:
    length = _HEAD_BYTES + len(attrs)
    return (
        _NLMSGHDR.pack(length, (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0)
        + _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue_num)
        + attrs
    )


def encode_bind(queue_num: int, seq: int = 0) -> bytes:
    """NFQNL_MSG_CONFIG: bind ``queue_num`` to this socket (acknowledged).

    The older per-family PF_BIND command is a no-op since Linux 3.8 and is not sent.
    """
    return _message(NFQNL_MSG_CONFIG, queue_num, _attr(NFQA_CFG_CMD, _CFG_CMD.pack(NFQNL_CFG_CMD_BIND, 0)),
                    NLM_F_REQUEST | NLM_F_ACK, seq)


def encode_unbind(queue_num: int, seq: int = 0) -> bytes:
    """NFQNL_MSG_CONFIG: release ``queue_num`` (acknowledged)."""
    return _message(NFQNL_MSG_CONFIG, queue_num, _attr(NFQA_CFG_CMD, _CFG_CMD.pack(NFQNL_CFG_CMD_UNBIND, 0)),
                    NLM_F_REQUEST | NLM_F_ACK, seq)


def encode_params(queue_num: int, maxlen_pkts: int, copy_range_bytes: int = COPY_LENGTH_ONLY, seq: int = 0,
                  gso: bool = False) -> bytes:
    """NFQNL_MSG_CONFIG: copy mode and range, queue length, fail-open off, GSO on or off (acknowledged).

    Both flags are in the mask, so a queue configured again loses a GSO flag it had.
    """
    attrs = (
        _attr(NFQA_CFG_PARAMS, _CFG_PARAMS.pack(copy_range_bytes, NFQNL_COPY_PACKET))
        + _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(maxlen_pkts))
        + _attr(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO))
        + _attr(NFQA_CFG_FLAGS, _BE32.pack(NFQA_CFG_F_GSO if gso else 0))
    )
    return _message(NFQNL_MSG_CONFIG, queue_num, attrs, NLM_F_REQUEST | NLM_F_ACK, seq)


def encode_verdict(queue_num: int, packet_id: int, verdict: int) -> bytes:
    """NFQNL_MSG_VERDICT for one packet (not acknowledged: errors still come back)."""
    return _message(NFQNL_MSG_VERDICT, queue_num, _attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id)),
                    NLM_F_REQUEST, 0)


def encode_verdict_batch(queue_num: int, last_id: int, verdict: int) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: ``verdict`` for every packet still queued with id <= ``last_id``."""
    return _message(NFQNL_MSG_VERDICT_BATCH, queue_num,
                    _attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, last_id)), NLM_F_REQUEST, 0)


class Packet(NamedTuple):
    """One queued packet: its queue, its id there, its length, and the bytes copied of it.

    ``skb_info``: NFQA_SKB_* flags (0 when the kernel sent none); ``outdev``:
    the ifindex it was to leave by (0 when not leaving, as in PREROUTING).
    """

    queue_num: int
    packet_id: int
    length_bytes: int
    payload: bytes
    skb_info: int = 0
    outdev: int = 0

    @property
    def truncated(self) -> bool:
        """Whether the copy is shorter than the packet (one over 65531 bytes, or a short copy range)."""
        return len(self.payload) < self.length_bytes


class Ack(NamedTuple):
    """The kernel's answer to a request: errno 0 for success, else the (positive) errno."""

    seq: int
    errno: int


_PACKET_MESSAGE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET


def parse_messages(data: bytes | memoryview) -> list[Packet | Ack]:
    """Every packet and acknowledgement in one netlink datagram, in order.

    Other messages (NOOP, DONE, other subsystems) are skipped. A truncated
    message ends the datagram: ValueError, since that means the buffer was too small.
    """
    view = memoryview(data)
    offset = 0
    end = len(view)
    found: list[Packet | Ack] = []
    while offset + _NLMSGHDR.size <= end:
        length, kind, _flags, seq, _portid = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > end:
            raise ValueError(f"truncated netlink message ({length} bytes at offset {offset} of {end})")
        if kind == _PACKET_MESSAGE:
            found.append(_parse_packet(view, offset, offset + length))
        elif kind == NLMSG_ERROR:
            (code,) = _ERRNO.unpack_from(view, offset + _NLMSGHDR.size)
            (original_seq,) = struct.unpack_from("=I", view, offset + _NLMSGHDR.size + 4 + 8)
            found.append(Ack(original_seq, -code))
        offset += (length + 3) & ~3
    return found


# Bound once: this runs for every packet of the link, and a delay line in
# Python spends most of its time here.
_unpack_attr = _NLATTR.unpack_from
_unpack_be32 = _BE32.unpack_from
_unpack_gen = _NFGENMSG.unpack_from


def _parse_packet(view: memoryview, offset: int, end: int) -> Packet:
    queue_num = _unpack_gen(view, offset + _NLMSGHDR.size)[2]
    pos = offset + _HEAD_BYTES
    packet_id = None
    payload = b""
    cap_len = None
    skb_info = 0
    outdev = 0
    while pos + 4 <= end:
        attr_len, attr_type = _unpack_attr(view, pos)
        if attr_len < 4:
            break
        attr_type &= _NLA_TYPE_MASK
        if attr_type == NFQA_PACKET_HDR:
            # packet_id is the header's first field, a big-endian u32.
            packet_id = _unpack_be32(view, pos + 4)[0]
        elif attr_type == NFQA_PAYLOAD:
            payload = view[pos + 4:pos + attr_len].tobytes()
        elif attr_type == NFQA_CAP_LEN:
            cap_len = _unpack_be32(view, pos + 4)[0]
        elif attr_type == NFQA_SKB_INFO:
            skb_info = _unpack_be32(view, pos + 4)[0]
        elif attr_type == NFQA_IFINDEX_OUTDEV:
            outdev = _unpack_be32(view, pos + 4)[0]
        pos += (attr_len + 3) & ~3
    if packet_id is None:
        raise ValueError("a queued-packet message without a packet header")
    return Packet(queue_num, packet_id, len(payload) if cap_len is None else cap_len, payload, skb_info, outdev)


def parse_proc_queues(text: str) -> dict[int, dict[str, int]]:
    """/proc/net/netfilter/nfnetlink_queue by queue number.

    Each: held (packets waiting for a verdict), overflow (dropped because the
    queue was at its maximum length) and socket_overflow (dropped because the
    listener's socket buffer was full), as the kernel counts them.
    """
    queues = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        num, _portid, total, _mode, _range, dropped, user_dropped = (int(f) for f in fields[:7])
        queues[num] = {"held": total, "overflow": dropped, "socket_overflow": user_dropped}
    return queues


def read_proc_queues(path: Path = PROC_QUEUES) -> dict[int, dict[str, int]]:
    """The kernel's own per-queue counters for this network namespace ({} if none)."""
    try:
        return parse_proc_queues(path.read_text())
    except FileNotFoundError:
        return {}


class NfQueueError(OSError):
    """The kernel refused a queue request (errno and a sentence)."""


class NfQueue:
    """A netlink socket bound to one or more NFQUEUE queues.

    Receiving is non-blocking (``receive`` takes what is there); the caller
    waits on ``fileno()``. Verdicts are collected by the caller and sent
    together with ``send``: the kernel handles every message of a datagram.
    """

    # Room for a burst of whole-packet copies (about 3,000 at wire size, or 250
    # GSO aggregates of 64 KiB); when it fills, the kernel drops and counts
    # (socket_overflow), and says ENOBUFS.
    RCVBUF_BYTES = 16 << 20
    # One message: a whole copy (up to COPY_WHOLE bytes) and its attributes.
    RECV_BYTES = 1 << 17
    # Verdicts per datagram: well inside the socket's send buffer.
    SEND_BYTES = 1024 * VERDICT_BYTES
    _SO_RCVBUFFORCE = 33

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            # The forced variant may exceed net.core.rmem_max; it needs root,
            # which the delay line has.
            self.sock.setsockopt(socket.SOL_SOCKET, self._SO_RCVBUFFORCE, self.RCVBUF_BYTES)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF_BYTES)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self._buf = bytearray(self.RECV_BYTES)
        self._seq = 0
        # Packets that arrived while a request waited for its answer.
        self._pending: list[Packet] = []
        self.socket_overflows = 0

    def fileno(self) -> int:
        """The socket's descriptor, to wait on."""
        return self.sock.fileno()

    def _request(self, message: bytes, queue_num: int, timeout_s: float = 5.0) -> None:
        """Send one acknowledged request (built with ``self._seq``) and wait for its answer."""
        self.sock.settimeout(timeout_s)
        try:
            self.sock.send(message)
            while True:
                n = self.sock.recv_into(self._buf)
                for item in parse_messages(memoryview(self._buf)[:n]):
                    if isinstance(item, Packet):
                        self._pending.append(item)
                    elif item.seq == self._seq:
                        if item.errno:
                            raise NfQueueError(item.errno, f"NFQUEUE queue {queue_num}: {os.strerror(item.errno)}")
                        return
        except socket.timeout:
            raise NfQueueError(errno.ETIMEDOUT, f"NFQUEUE queue {queue_num}: no answer from the kernel") from None
        finally:
            self.sock.setblocking(False)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def bind(self, queue_num: int, maxlen_pkts: int, copy_range_bytes: int = COPY_LENGTH_ONLY,
             gso: bool = False) -> None:
        """Take ``queue_num`` (EBUSY if another listener has it) and configure it."""
        self._request(encode_bind(queue_num, self._next_seq()), queue_num)
        self.configure(queue_num, maxlen_pkts, copy_range_bytes, gso)

    def configure(self, queue_num: int, maxlen_pkts: int, copy_range_bytes: int = COPY_LENGTH_ONLY,
                  gso: bool = False) -> None:
        """Set a bound queue's length, copy range and GSO flag (packets arriving meanwhile are kept)."""
        self._request(encode_params(queue_num, maxlen_pkts, copy_range_bytes, self._next_seq(), gso), queue_num)

    def receive(self, max_packets: int, max_bytes: int | None = None) -> list[Packet]:
        """Up to ``max_packets`` packet notifications waiting on the socket (and, if given, until their
        copies reach ``max_bytes``), without blocking.

        A full socket buffer (ENOBUFS) is counted in ``socket_overflows`` and
        reading goes on; an error answer to a request raises NfQueueError.
        """
        packets, self._pending = self._pending, []
        view = memoryview(self._buf)
        copied_bytes = 0
        while len(packets) < max_packets and (max_bytes is None or copied_bytes < max_bytes):
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.socket_overflows += 1
                continue
            for item in parse_messages(view[:n]):
                if isinstance(item, Packet):
                    packets.append(item)
                    copied_bytes += len(item.payload)
                elif item.errno:
                    raise NfQueueError(item.errno, f"NFQUEUE request {item.seq}: {os.strerror(item.errno)}")
        return packets

    def send(self, verdicts: bytes | bytearray) -> None:
        """Send verdict messages, concatenated, in as few datagrams as fit."""
        view = memoryview(verdicts)
        for start in range(0, len(view), self.SEND_BYTES):
            self.sock.send(view[start:start + self.SEND_BYTES])

    def close(self) -> None:
        """Close the socket: the kernel drops whatever is still queued to it."""
        self.sock.close()
