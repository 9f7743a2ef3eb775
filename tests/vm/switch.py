"""A learning Ethernet switch for the test VMs, on a unix socket (stdlib only).

Each VM's virtio-net NIC is a QEMU ``-netdev stream`` connected to this socket;
QEMU frames every Ethernet frame with a 4-byte big-endian length. The switch
learns which connection each source MAC came from, forwards a frame to the
port its destination was learnt on, and floods broadcasts, multicasts and
unknown destinations to every other port. Nothing here routes anywhere: the
VMs' only network is each other.

    python3 tests/vm/switch.py SOCKET_PATH
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import sys

LENGTH = struct.Struct(">I")
BROADCAST = b"\xff" * 6


def frames_in(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete length-prefixed frames at the start of ``buffer``, and the rest."""
    frames, offset = [], 0
    while len(buffer) - offset >= LENGTH.size:
        (size,) = LENGTH.unpack_from(buffer, offset)
        end = offset + LENGTH.size + size
        if end > len(buffer):
            break
        frames.append(buffer[offset + LENGTH.size:end])
        offset = end
    return frames, buffer[offset:]


def frame_bytes(frame: bytes) -> bytes:
    """``frame`` as it goes on a stream netdev: its length, then the frame."""
    return LENGTH.pack(len(frame)) + frame


class LearningTable:
    """Where each MAC address was last seen, and where a frame must go."""

    def __init__(self) -> None:
        self._port_of: dict[bytes, object] = {}

    def route(self, frame: bytes, ingress: object, ports: list[object]) -> list[object]:
        """The ports ``frame`` (arrived on ``ingress``) goes out of; learns its source."""
        if len(frame) < 14:
            return []
        dst, src = frame[0:6], frame[6:12]
        if not src[0] & 1:  # a multicast source is bogus: never learn it
            self._port_of[src] = ingress
        known = self._port_of.get(dst)
        if dst != BROADCAST and not dst[0] & 1 and known is not None and known in ports:
            return [] if known is ingress else [known]
        return [port for port in ports if port is not ingress]

    def forget(self, port: object) -> None:
        """Drop every address learnt on ``port`` (its VM went away)."""
        for mac in [mac for mac, where in self._port_of.items() if where is port]:
            del self._port_of[mac]


def serve(path: str) -> None:
    """Switch frames between every connection to ``path`` until SIGTERM."""
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    table = LearningTable()
    buffers: dict[socket.socket, bytes] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def drop(conn: socket.socket) -> None:
        if conn not in buffers:
            return
        selector.unregister(conn)
        buffers.pop(conn, None)
        table.forget(conn)
        conn.close()

    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                buffers[conn] = b""
                selector.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            if conn not in buffers:  # dropped earlier in this round
                continue
            try:
                data = conn.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                drop(conn)
                continue
            frames, buffers[conn] = frames_in(buffers[conn] + data)
            for frame in frames:
                for out in table.route(frame, conn, list(buffers)):
                    try:
                        # Blocking send: a slow VM slows the switch, as a full link would.
                        out.sendall(frame_bytes(frame))
                    except OSError:
                        drop(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: switch.py SOCKET_PATH")
    serve(sys.argv[1])
