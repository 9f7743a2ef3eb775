#!/usr/bin/env python3
"""The guest agent of a socklab test VM, and the protocol it speaks (stdlib only).

The host reaches a VM only through a virtio-serial port: one request per line,
one reply per line, both JSON, bytes in base64. Requests carry an ``id`` the
reply repeats, so a reply left over from an earlier, abandoned request (the
host's connection closed mid-way) is recognisable and skipped. Requests:

- ``{"op": "ping"}`` -> ``{"pong": true}``
- ``{"op": "exec", "argv": [...], "timeout_s": T, "env": {...}, "cwd": DIR, "stdin": B64}``
  -> ``{"rc": N, "stdout": B64, "stderr": B64, "timed_out": bool, "duration_s": S}``
- ``{"op": "put", "path": P, "data": B64, "mode": 0o644}`` -> ``{"ok": true}``
- ``{"op": "get", "path": P}`` -> ``{"data": B64}``

A request that cannot be served gets ``{"error": "one sentence"}``. The same file
runs in the guest (``socklab-agent PORT``) and is imported by the host's client
for ``encode``/``decode``, so both ends share one definition.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

# One request at a time; a line longer than this is a bug, not a file to copy.
MAX_LINE_BYTES = 512 * 1024 * 1024


def encode(message: dict) -> bytes:
    """One protocol line for ``message``."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """The message of one protocol line; ValueError when it is not one."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("id"), int):
        raise ValueError(f"not a protocol message: {line[:80]!r}")
    return message


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def split_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in ``buffer`` and what is left after the last newline."""
    *lines, rest = buffer.split(b"\n")
    return [line for line in lines if line.strip()], rest


def run_exec(request: dict) -> dict:
    """Run ``argv`` in its own process group; past ``timeout_s`` the whole group is killed."""
    env = dict(os.environ, **request.get("env", {}))
    started = time.monotonic()
    proc = subprocess.Popen(request["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=request.get("cwd"), env=env,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(unb64(request.get("stdin", "")), timeout=request.get("timeout_s"))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return {"rc": proc.returncode, "stdout": b64(out), "stderr": b64(err), "timed_out": timed_out,
            "duration_s": round(time.monotonic() - started, 3)}


def serve_one(request: dict) -> dict:
    """The reply to one request (without its id)."""
    op = request.get("op")
    try:
        if op == "ping":
            return {"pong": True}
        if op == "exec":
            return run_exec(request)
        if op == "put":
            path = request["path"]
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "wb") as out:
                out.write(unb64(request["data"]))
            os.chmod(path, request.get("mode", 0o644))
            return {"ok": True}
        if op == "get":
            with open(request["path"], "rb") as src:
                return {"data": b64(src.read())}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return {"error": f"{op} failed: {exc}"}
    return {"error": f"unknown op {op!r}: use ping, exec, put or get"}


def serve(port_path: str) -> None:
    """Serve requests on the virtio-serial port forever.

    While no host is connected a read returns nothing at once, so the loop
    sleeps briefly instead of spinning.
    """
    serve_fd(os.open(port_path, os.O_RDWR))


def serve_fd(fd: int, stop_on_eof: bool = False) -> None:
    """Serve requests on an open descriptor (the port, or a socket in tests).

    Forever, unless ``stop_on_eof``: then until the peer closes.
    """
    # A port hands over a few KiB per read: a request of megabytes arrives in
    # thousands of pieces, so it is gathered in a bytearray and split only
    # when a newline has come (a bytes concatenation per piece was quadratic).
    buffer = bytearray()
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            if stop_on_eof:
                return
            time.sleep(0.1)
            continue
        buffer += chunk
        if b"\n" not in chunk:
            if len(buffer) > MAX_LINE_BYTES:
                buffer.clear()
            continue
        lines, rest = split_lines(bytes(buffer))
        buffer = bytearray(rest)
        for line in lines:
            try:
                request = decode(line)
            except ValueError:
                continue
            reply = encode({"id": request["id"], **serve_one(request)})
            view = memoryview(reply)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except (BrokenPipeError, ConnectionResetError):
                # The asker left before its reply: nobody is owed it. A port
                # keeps serving the next host that opens it; a socket is done.
                if stop_on_eof:
                    return


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1]:
        sys.exit("usage: socklab-agent VIRTIO_SERIAL_PORT")
    serve(sys.argv[1])
