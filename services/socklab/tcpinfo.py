"""What the kernel knows about a TCP connection: TCP_INFO and the send queue (Linux).

Both are read with plain ``getsockopt``/``ioctl`` and ``struct``, so they work
in the image without any extra package. Where the platform lacks them the
readers return None and results say ``null`` rather than guessing.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from typing import Any

# The stable head of Linux's struct tcp_info (include/uapi/linux/tcp.h): eight
# u8 fields, then u32 fields from tcpi_rto up to tcpi_total_retrans. Later
# fields were added over kernel versions; none of them is needed here.
_TCP_INFO_HEAD = struct.Struct("8B24I")
_U32_INDEX = {name: 8 + i for i, name in enumerate((
    "rto", "ato", "snd_mss", "rcv_mss",
    "unacked", "sacked", "lost", "retrans", "fackets",
    "last_data_sent", "last_ack_sent", "last_data_recv", "last_ack_recv",
    "pmtu", "rcv_ssthresh", "rtt", "rttvar", "snd_ssthresh", "snd_cwnd",
    "advmss", "reordering", "rcv_rtt", "rcv_space", "total_retrans",
))}

# SIOCOUTQ (== TIOCOUTQ on Linux): bytes in the send queue not yet acknowledged
# by the peer. The socket module does not export the constant.
SIOCOUTQ = 0x5411
_INT = struct.Struct("i")


def read_tcp_info(sock: socket.socket) -> dict[str, Any] | None:
    """``{"rtt_ms", "retrans", "snd_cwnd"}`` for a connected TCP socket, or None.

    ``retrans`` is the connection's total retransmitted segments
    (tcpi_total_retrans), not just those currently outstanding.
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_HEAD.size)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_HEAD.size:
        return None
    fields = _TCP_INFO_HEAD.unpack_from(raw)
    return {
        "rtt_ms": fields[_U32_INDEX["rtt"]] / 1000.0,  # the kernel reports microseconds
        "retrans": fields[_U32_INDEX["total_retrans"]],
        "snd_cwnd": fields[_U32_INDEX["snd_cwnd"]],
    }


def combine_tcp_info(infos: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One ``tcp`` result for several connections: mean RTT and cwnd, total retransmits."""
    present = [info for info in infos if info is not None]
    if not present:
        return None
    count = len(present)
    return {
        "rtt_ms": round(sum(i["rtt_ms"] for i in present) / count, 3),
        "retrans": sum(i["retrans"] for i in present),
        "snd_cwnd": round(sum(i["snd_cwnd"] for i in present) / count),
    }


def send_queue_bytes(fd: int) -> int | None:
    """Bytes sitting in the socket's send queue (unsent or unacknowledged), or None."""
    try:
        raw = fcntl.ioctl(fd, SIOCOUTQ, _INT.pack(0))
    except OSError:
        return None
    return _INT.unpack(raw)[0]
