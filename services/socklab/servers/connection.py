"""Every connection's workload, the same object in every mode: what is done with its bytes."""

from __future__ import annotations

from array import array
from typing import Any

from ..address import format_peer
from ..protocol import encode_trailer

WORKLOADS = ("bulk", "echo", "connect", "slow")

# Echo output one connection may have queued before the server stops reading
# from it. A peer that sends but does not read then stalls itself, as it would
# against a blocking echo server, instead of growing the server's memory.
ECHO_HIGH_WATER_BYTES = 256 * 1024

# How a connection ended, as stored (index) and reported (name); None: still open.
CLOSED_BY = (None, "eof", "idle", "reset", "shutdown")
_CLOSED_BY_CODE = {name: code for code, name in enumerate(CLOSED_BY)}
# A port takes 16 bits: the rest of a peer's code numbers its host.
_PORT_BITS = 16


class Connections:
    """Every connection's workload state, driven identically by every mode.

    A connection is a number (its index, in the order connections opened),
    and its state is one entry in each of a few typed arrays rather than an
    object: at ten thousand idle connections, an object, its peer string and
    its start time per connection would cost more than the socket itself.

    A strategy calls ``on_data`` with each chunk received, sends back what it
    returns, calls ``on_sent`` with what the kernel took, and on EOF sends
    ``on_eof()`` after everything else it owes the peer. Only the strategy
    serving a connection touches its entries; ``open`` is called under the
    server's lock (the arrays grow).
    """

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        # Hosts numbered in order of first sight: a peer is a host number and a port.
        self._host_codes: dict[str, int] = {}
        self._hosts: list[str] = []
        self._peers = array("q")
        self._start_s = array("d")
        self._end_s = array("d")
        self._received = array("q")
        self._sent = array("q")
        self._closed_by = bytearray()

    def __len__(self) -> int:
        return len(self._peers)

    def open(self, address: Any, start_s: float) -> int:
        """A new connection from ``address`` (the peer's sockaddr) at ``start_s``: its number."""
        host, port = address[0], address[1]
        code = self._host_codes.get(host)
        if code is None:
            code = self._host_codes[host] = len(self._hosts)
            self._hosts.append(host)
        self._peers.append(code << _PORT_BITS | port)
        self._start_s.append(start_s)
        self._end_s.append(0.0)
        self._received.append(0)
        self._sent.append(0)
        self._closed_by.append(0)
        return len(self._peers) - 1

    def peer(self, cid: int) -> str:
        """Connection ``cid``'s peer as ``host:port``."""
        code = self._peers[cid]
        return format_peer((self._hosts[code >> _PORT_BITS], code & ((1 << _PORT_BITS) - 1)))

    def on_data(self, cid: int, data: memoryview | bytes) -> memoryview | bytes:
        """Count a received chunk; return the bytes to send back.

        When echoing, the result is ``data`` itself, usually a view of the
        caller's receive buffer: send or copy it before the next receive.
        """
        self._received[cid] += len(data)
        return data if self.echo else b""

    def on_eof(self, cid: int) -> bytes:
        """The trailer owed once the peer has finished sending."""
        return encode_trailer(self._received[cid])

    def on_sent(self, cid: int, nbytes: int) -> None:
        """Count bytes the kernel accepted for sending."""
        self._sent[cid] += nbytes

    def close(self, cid: int, end_s: float, closed_by: str) -> None:
        """Record the end of connection ``cid``."""
        self._end_s[cid] = end_s
        self._closed_by[cid] = _CLOSED_BY_CODE[closed_by]

    def closed_by(self, cid: int) -> str | None:
        """How connection ``cid`` ended (a name of CLOSED_BY); None while it is open."""
        return CLOSED_BY[self._closed_by[cid]]

    def open_ones(self) -> list[int]:
        """The connections not closed yet."""
        return [cid for cid, code in enumerate(self._closed_by) if not code]

    def bytes_received(self) -> int:
        """Bytes received over all connections."""
        return sum(self._received)

    def bytes_sent(self) -> int:
        """Bytes sent over all connections."""
        return sum(self._sent)

    def record(self, cid: int) -> dict[str, Any]:
        """Connection ``cid``'s entry of the result's ``per_connection``."""
        closed_by = self.closed_by(cid)
        return {
            "peer": self.peer(cid),
            "bytes_received": self._received[cid],
            "bytes_sent": self._sent[cid],
            "start_s": round(self._start_s[cid], 6),
            "end_s": None if closed_by is None else round(self._end_s[cid], 6),
            "closed_by": closed_by,
        }
