"""One connection's workload, the same object in every mode: what is done with its bytes."""

from __future__ import annotations

from typing import Any

from ..protocol import encode_trailer

WORKLOADS = ("bulk", "echo", "connect", "slow")

# Echo output one connection may have queued before the server stops reading
# from it. A peer that sends but does not read then stalls itself, as it would
# against a blocking echo server, instead of growing the server's memory.
ECHO_HIGH_WATER_BYTES = 256 * 1024


class Connection:
    """One connection's workload state, driven identically by every mode.

    A strategy calls ``on_data`` with each chunk received, sends back what it
    returns, calls ``on_sent`` with what the kernel took, and on EOF sends
    ``on_eof()`` after everything else it owes the peer.
    """

    __slots__ = ("peer", "echo", "bytes_received", "bytes_sent", "start_s", "end_s", "closed_by")

    def __init__(self, peer: str, echo: bool, start_s: float) -> None:
        self.peer = peer
        self.echo = echo
        self.bytes_received = 0
        self.bytes_sent = 0
        self.start_s = start_s
        self.end_s: float | None = None
        self.closed_by: str | None = None

    def on_data(self, data: memoryview) -> memoryview | bytes:
        """Count a received chunk; return the bytes to send back.

        When echoing, the result is ``data`` itself, usually a view of the
        caller's receive buffer: send or copy it before the next receive.
        """
        self.bytes_received += len(data)
        return data if self.echo else b""

    def on_eof(self) -> bytes:
        """The trailer owed once the peer has finished sending."""
        return encode_trailer(self.bytes_received)

    def on_sent(self, nbytes: int) -> None:
        """Count bytes the kernel accepted for sending."""
        self.bytes_sent += nbytes

    def record(self) -> dict[str, Any]:
        """This connection's entry of the result's ``per_connection``."""
        return {
            "peer": self.peer,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "start_s": round(self.start_s, 6),
            "end_s": None if self.end_s is None else round(self.end_s, 6),
            "closed_by": self.closed_by,
        }

