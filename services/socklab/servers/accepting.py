"""What the strategies share about accepting: accept errors, the accept batch, accepted-socket setup."""

from __future__ import annotations

import errno
import socket
import struct

from .lifecycle import ServerConfig

# Out of descriptors or threads in a blocking accept loop: nothing to wait on
# but time.
EXHAUSTED_RETRY_S = 0.05
# Connections a loop-based mode accepts per readiness of the listener before
# it serves the others again. It also bounds what a burst of connects costs
# at once: asyncio, for one, makes a task per connection accepted in a batch.
ACCEPTS_PER_WAKEUP = 64

# Errors accept() reports for one failed connection, not for the listener
# (accept(2), "Error handling"): take the next connection.
TRANSIENT_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
        "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "EPERM",
    ) if hasattr(errno, name)
)
# The process or system is out of descriptors or memory: retrying at once
# would spin; wait until a connection has ended.
EXHAUSTED_ACCEPT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def _timeval(seconds: float) -> bytes:
    # A zero timeval means "never time out": round tiny timeouts up, not to zero.
    total_us = max(1, round(seconds * 1_000_000))
    return struct.pack("@ll", total_us // 1_000_000, total_us % 1_000_000)


def configure_accepted(sock: socket.socket, config: ServerConfig, *, blocking: bool) -> None:
    """Set up an accepted socket: no Nagle; the idle timeout (blocking) or non-blocking mode.

    Blocking sockets get the idle timeout as SO_RCVTIMEO/SO_SNDTIMEO (see blocking.py).
    """
    # Echo replies and the trailer are small writes that follow unacknowledged
    # data; Nagle plus the peer's delayed ACK would hold them ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if blocking:
        timeout = _timeval(config.idle_timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
    else:
        sock.setblocking(False)
