"""The lab's tiny wire protocol between clients and servers.

Payload bytes are opaque. When a server sees a connection's EOF (the client's
``shutdown(SHUT_WR)``) it has already echoed everything (echo workload) or
discarded it (every other workload); it then writes one trailer line with the
number of bytes it received on that connection, and closes. The client reads to
EOF: the trailer gives ``bytes_delivered`` and the EOF marks the delivery time.

Every client ends this way in every mode, because a container's network dies
with its last process: a client that exits right after a non-blocking ``send()``
loses what is still in its send buffer (see SPEC.md, pitfalls).
"""

from __future__ import annotations

import re

TRAILER_PREFIX = b"SOCKLAB-RCVD "
_TRAILER_RE = re.compile(rb"SOCKLAB-RCVD (\d+)\n\Z")
# The longest trailer a server can send; clients keep at least this many of the
# last bytes they read so the trailer can be found after an echo stream.
TRAILER_MAX_LEN = len(TRAILER_PREFIX) + 20 + 1


def encode_trailer(bytes_received: int) -> bytes:
    """The trailer a server sends after a connection's EOF."""
    return TRAILER_PREFIX + str(bytes_received).encode("ascii") + b"\n"


def parse_trailer(tail: bytes) -> int | None:
    """Bytes the server confirmed, from the last bytes read before EOF; None if absent."""
    m = _TRAILER_RE.search(tail[-TRAILER_MAX_LEN:])
    return int(m.group(1)) if m else None
