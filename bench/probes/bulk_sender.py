"""Send NBYTES with sendall() the way the lab's bulk protocol wants: profile_bulk's yardstick.

    python3 bulk_sender.py HOST PORT NBYTES whole|tiled|reused

``whole`` sends from one payload buffer as large as the transfer, plain bytes
(what the lab's bulk workload did before its payload was tiled); ``tiled`` from
the lab's own payload (socklab.payload: one buffer whose pages repeat a small
tile, what the bulk workload sends now); ``reused`` sends a 128 KiB buffer again
and again (what iperf3 does). Then shuts down the write side, reads the server's
trailer to its EOF and prints ``SENT KIND BYTES SECONDS``. Stdlib only, but for
``tiled`` (the lab image has socklab).
"""

import socket
import sys
import time

PATTERN = b"Hello Python\n"
BLOCK_BYTES = 131072


def send(host, port, nbytes, kind):
    """Bytes sent and seconds from the first send to the server's EOF."""
    block = PATTERN * (BLOCK_BYTES // len(PATTERN)) if kind == "reused" else None
    payload = memoryview(PATTERN * (nbytes // len(PATTERN))) if kind == "whole" else None
    if kind == "tiled":
        from socklab.payload import Payload
        payload = Payload(nbytes // len(PATTERN) * len(PATTERN), PATTERN).view
    sock = socket.create_connection((host, port))
    started = time.perf_counter()
    if payload is not None:
        sock.sendall(payload)
        sent = len(payload)
    else:
        sent = 0
        while sent + len(block) <= nbytes:
            sock.sendall(block)
            sent += len(block)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    sock.close()
    return sent, time.perf_counter() - started


if __name__ == "__main__":
    kind = sys.argv[4]
    sent, seconds = send(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), kind)
    print("SENT %s %d %.6f" % (kind, sent, seconds))
