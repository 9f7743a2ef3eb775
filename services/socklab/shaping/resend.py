"""How the delay line's up direction sends its copies again: a raw IP socket, or a packet socket for GSO.

A copy of wire size goes out of a raw IP socket (IP_HDRINCL) as before: routed
by its destination, it passes netfilter again (the rule lets its mark through)
and the device's qdisc. When the up queue is bound with NFQA_CFG_F_GSO (only
where no loss is configured: loss must strike wire packets), a copy may be a
GSO aggregate of up to 64 KiB, one message for tens of wire packets, and its
TCP/UDP checksum may be partial (only the pseudo-header's sum, to be completed
on transmit). Then:

* a partial checksum of a packet of wire size is completed here and the packet
  goes out of the raw socket as before;
* a TCP/IPv4 aggregate cannot go out of a raw IP socket (EMSGSIZE: longer than
  the MTU), so it goes out of an AF_PACKET socket bound to the device it was
  leaving by, with PACKET_VNET_HDR: a virtio_net_hdr asks the kernel to
  complete the checksum and to segment it as TCP (in C, on transmit, after the
  qdisc: tbf shapes it as it shapes any GSO packet), behind an Ethernet header
  (the next hop's MAC from the neighbour table, the device's own). A packet
  socket's send meets no netfilter hook, so the copy is not queued again.

What cannot go out (no route or neighbour for the next hop, a non-TCP
aggregate, a copy the kernel truncated) is dropped and counted by the caller.

The header builders and table parsers are pure functions; ``Resender`` owns the
sockets and reads the kernel's tables.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

from .nfqueue import NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO, Packet

ETH_P_IP = 0x0800
ETHERNET_HEADER_BYTES = 14
IPPROTO_TCP = 6
IPPROTO_UDP = 17
# Where the checksum field sits in each transport header.
CHECKSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}
TCP_FLAG_CWR = 0x80

# include/uapi/linux/virtio_net.h
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: in the host's
# order (a packet socket reads it as legacy virtio, little-endian on LE hosts).
_VNET_HDR = struct.Struct("=BBHHHH")
VNET_HDR_BYTES = _VNET_HDR.size
# include/uapi/linux/if_packet.h
SOL_PACKET = 263  # not exported by every Python's socket module
PACKET_VNET_HDR = 15
_SIOCGIFMTU = 0x8921
_SO_SNDBUFFORCE = 32  # not exported by the socket module
# /proc/net/arp: an entry whose address is known (ATF_COM).
_ATF_COM = 0x2
# /proc/net/route flags.
_RTF_UP = 0x1
_RTF_GATEWAY = 0x2

PROC_ARP = Path("/proc/net/arp")
PROC_ROUTE = Path("/proc/net/route")
# The neighbour and route tables are read again this often, and on a miss no
# more often than NEIGHBOUR_RETRY_S: a neighbour whose MAC changed is followed
# within a second, and a miss costs a read of /proc only now and then.
NEIGHBOUR_REFRESH_S = 1.0
NEIGHBOUR_RETRY_S = 0.05
# Sent copies wait in the qdisc charged to the sending socket; the bottleneck's
# own limit, not this buffer, must decide drops.
SNDBUF_BYTES = 16 << 20


# -- pure pieces --------------------------------------------------------------------


def vnet_header(*, gso_type: int = VIRTIO_NET_HDR_GSO_NONE, gso_size: int = 0, hdr_len: int = 0,
                csum_start: int | None = None, csum_offset: int = 0) -> bytes:
    """struct virtio_net_hdr: a checksum to complete from ``csum_start`` (when given), GSO to do (when typed).

    Offsets count from the start of the frame, Ethernet header included.
    """
    flags = 0 if csum_start is None else VIRTIO_NET_HDR_F_NEEDS_CSUM
    return _VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start or 0, csum_offset)


def ethernet_header(dst_mac: bytes, src_mac: bytes, ethertype: int = ETH_P_IP) -> bytes:
    """Destination, source, EtherType: 14 bytes."""
    return dst_mac + src_mac + struct.pack("!H", ethertype)


def gso_size_bytes(mtu_bytes: int, ip_header_bytes: int, tcp_header_bytes: int) -> int:
    """Payload per segment of a TCP aggregate: what one MTU holds after this packet's headers.

    The headers include the TCP options the aggregate carries (each segment
    repeats them), so with timestamps at MTU 1500 this is 1448, the MSS the
    sender itself works with; the sender's MSS is not in the packet.
    """
    return mtu_bytes - ip_header_bytes - tcp_header_bytes


def gso_frame_header(packet: bytes, dst_mac: bytes, src_mac: bytes, mtu_bytes: int) -> bytes | None:
    """virtio_net_hdr and Ethernet header to send a TCP/IPv4 GSO aggregate, or None for anything else.

    The aggregate's TCP checksum field holds the pseudo-header's sum (as the
    kernel queued it): NEEDS_CSUM has the segmentation complete each segment's.
    A CWR flag is carried as the kernel's own TCP does (GSO_ECN: only the
    first segment keeps it).
    """
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != IPPROTO_TCP:
        return None
    ip_header_bytes = (packet[0] & 0x0F) * 4
    if len(packet) < ip_header_bytes + 20:
        return None
    tcp_header_bytes = (packet[ip_header_bytes + 12] >> 4) * 4
    gso_size = gso_size_bytes(mtu_bytes, ip_header_bytes, tcp_header_bytes)
    if gso_size <= 0:
        return None
    gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    if packet[ip_header_bytes + 13] & TCP_FLAG_CWR:
        gso_type |= VIRTIO_NET_HDR_GSO_ECN
    csum_start = ETHERNET_HEADER_BYTES + ip_header_bytes
    return vnet_header(gso_type=gso_type, gso_size=gso_size, hdr_len=csum_start + tcp_header_bytes,
                       csum_start=csum_start, csum_offset=CHECKSUM_OFFSET[IPPROTO_TCP]) + \
        ethernet_header(dst_mac, src_mac)


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the complement of its ones'-complement sum of 16-bit words.

    Since 2**16 is 1 modulo 0xFFFF, the ones'-complement sum of the words is
    the big number the bytes spell, modulo 0xFFFF (with 0xFFFF for a nonzero
    multiple): one C-speed operation instead of a loop over words.
    """
    if len(data) % 2:
        data += b"\0"
    number = int.from_bytes(data, "big")
    total = number % 0xFFFF
    if total == 0 and number:
        total = 0xFFFF
    return 0xFFFF - total


def complete_checksum(packet: bytes) -> bytes:
    """An IPv4 TCP or UDP packet whose partial checksum (the pseudo-header's sum) is made whole.

    What a device does for CHECKSUM_PARTIAL: sum everything from the transport
    header on, the field's seed included, and store the complement. Other
    packets come back unchanged.
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return packet
    offset = CHECKSUM_OFFSET.get(packet[9])
    start = (packet[0] & 0x0F) * 4
    if offset is None or len(packet) < start + offset + 2:
        return packet
    checksum = inet_checksum(packet[start:])
    if checksum == 0 and packet[9] == IPPROTO_UDP:
        checksum = 0xFFFF  # zero says "no checksum" in UDP
    at = start + offset
    return packet[:at] + struct.pack("!H", checksum) + packet[at + 2:]


def parse_mac(text: str) -> bytes:
    """'02:42:ac:12:00:03' as 6 bytes."""
    return bytes.fromhex(text.replace(":", ""))


def parse_arp_table(text: str) -> dict[tuple[str, str], bytes]:
    """/proc/net/arp: the MAC of each complete entry, by (IPv4 address, device)."""
    table = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6:
            continue
        address, _hw_type, flags, mac, _mask, device = fields[:6]
        if int(flags, 16) & _ATF_COM and mac != "00:00:00:00:00:00":
            table[(address, device)] = parse_mac(mac)
    return table


class Route(NamedTuple):
    """One IPv4 route of the main table: its device, destination and mask, and gateway (None if on-link)."""

    device: str
    destination: int
    mask: int
    gateway: str | None


def _hex_address(text: str, byteorder: str) -> int:
    """A /proc/net/route address (the in-memory bytes of a network-order address, in hex) as a number."""
    return int.from_bytes(int(text, 16).to_bytes(4, byteorder), "big")


def parse_route_table(text: str, byteorder: str = sys.byteorder) -> list[Route]:
    """/proc/net/route's usable routes (``byteorder``: the host's, in which the kernel prints addresses)."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        device, destination, gateway, flags = fields[0], fields[1], fields[2], int(fields[3], 16)
        if not flags & _RTF_UP:
            continue
        via = None
        if flags & _RTF_GATEWAY:
            via = socket.inet_ntoa(_hex_address(gateway, byteorder).to_bytes(4, "big"))
        routes.append(Route(device, _hex_address(destination, byteorder), _hex_address(fields[7], byteorder), via))
    return routes


def next_hop(routes: list[Route], destination: str, device: str) -> str | None:
    """The neighbour a packet to ``destination`` leaving by ``device`` goes to: longest prefix wins."""
    address = int.from_bytes(socket.inet_aton(destination), "big")
    best: Route | None = None
    for route in routes:
        if route.device == device and address & route.mask == route.destination:
            if best is None or route.mask > best.mask:
                best = route
    if best is None:
        return None
    return best.gateway or destination


# -- the sockets ----------------------------------------------------------------------


class _Egress(NamedTuple):
    sock: socket.socket
    name: str
    mac: bytes
    mtu_bytes: int


class Resender:
    """Sends copies again: wire-size ones from a raw IP socket, GSO aggregates from packet sockets.

    ``send`` returns False for a copy that could not go (the caller counts it).
    ``raw``: the raw IP socket to use (tests pass a fake); opened here by default.
    """

    def __init__(self, mark: int, clock: Callable[[], float] = time.monotonic,
                 raw: socket.socket | None = None) -> None:
        self.mark = mark
        self.clock = clock
        self.raw = raw or _raw_socket(mark)
        self._egress: dict[int, _Egress] = {}
        self._neighbours: dict[tuple[str, str], bytes] = {}
        self._routes: list[Route] = []
        self._read_s = -float("inf")
        self.aggregates = 0
        self.checksummed = 0

    def send(self, packet: Packet) -> bool:
        """Send one copy as it was queued; False if it could not go."""
        payload = packet.payload
        if packet.skb_info & NFQA_SKB_GSO or packet.truncated:
            return not packet.truncated and self._send_aggregate(packet)
        if packet.skb_info & NFQA_SKB_CSUMNOTREADY:
            payload = complete_checksum(payload)
            self.checksummed += 1
        try:
            # IPPROTO_RAW implies IP_HDRINCL: the copy goes out as it was
            # queued, routed by its destination (bytes 16-19 of the header).
            self.raw.sendto(payload, (socket.inet_ntoa(payload[16:20]), 0))
        except OSError:
            # Too big to send again (a datagram over the MTU that the kernel
            # would have fragmented after this hook), or the send buffer is full.
            return False
        return True

    def _send_aggregate(self, packet: Packet) -> bool:
        payload = packet.payload
        egress = self._egress_for(packet.outdev)
        if egress is None or len(payload) < 20:
            return False
        hop = next_hop(self._routes, socket.inet_ntoa(payload[16:20]), egress.name)
        mac = self._neighbour(hop, egress.name) if hop else None
        header = gso_frame_header(payload, mac, egress.mac, egress.mtu_bytes) if mac else None
        if header is None:
            return False
        try:
            # Two pieces, one datagram: the 64 KiB aggregate is not copied again to prepend 24 bytes.
            egress.sock.sendmsg([header, payload])
        except OSError:
            return False
        self.aggregates += 1
        return True

    def _refresh(self, now_s: float) -> None:
        self._read_s = now_s
        try:
            self._neighbours = parse_arp_table(PROC_ARP.read_text())
            self._routes = parse_route_table(PROC_ROUTE.read_text())
        except OSError:
            pass  # keep what was read last
        for ifindex, egress in list(self._egress.items()):
            mtu_bytes = _device_mtu(egress.sock, egress.name)
            if mtu_bytes != egress.mtu_bytes:
                self._egress[ifindex] = egress._replace(mtu_bytes=mtu_bytes)

    def _neighbour(self, address: str, device: str) -> bytes | None:
        now_s = self.clock()
        if now_s - self._read_s >= NEIGHBOUR_REFRESH_S:
            self._refresh(now_s)
        mac = self._neighbours.get((address, device))
        if mac is None and now_s - self._read_s >= NEIGHBOUR_RETRY_S:
            self._refresh(now_s)
            mac = self._neighbours.get((address, device))
        return mac

    def _egress_for(self, ifindex: int) -> _Egress | None:
        egress = self._egress.get(ifindex)
        if egress is not None or not ifindex:
            return egress
        try:
            name = socket.if_indextoname(ifindex)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError:
            return None
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, SNDBUF_BYTES)
            # Protocol 0: this socket sends only; it is handed no packets to read.
            sock.bind((name, 0))
            mac = sock.getsockname()[4]
            egress = _Egress(sock, name, mac, _device_mtu(sock, name))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        self._egress[ifindex] = egress
        self._refresh(self.clock())
        return egress

    def close(self) -> None:
        """Close every socket."""
        self.raw.close()
        for egress in self._egress.values():
            egress.sock.close()


def _raw_socket(mark: int) -> socket.socket:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    raw.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, SNDBUF_BYTES)
    # Should it fill all the same, a copy is lost and counted: a blocked
    # send would stall every packet of both directions.
    raw.setblocking(False)
    return raw


def _device_mtu(sock: socket.socket, name: str) -> int:
    """The device's MTU (SIOCGIFMTU), asked through any socket."""
    request = struct.pack("16si", name.encode(), 0)
    return struct.unpack_from("16si", fcntl.ioctl(sock.fileno(), _SIOCGIFMTU, request))[1]
