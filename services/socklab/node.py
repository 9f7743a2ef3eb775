"""The node's own Docker engine, asked from a task on that node.

    python -m socklab node kill CONTAINER [SIGNAL]     signal a container (SIGTERM)
    python -m socklab node exec CONTAINER CMD [ARGS ...] run a command in it

A swarm's manager lists every node's tasks and relays their logs, but it cannot
exec into a container on another node nor signal one. The orchestrator then
runs this role as a one-shot task placed on the container's node, with that
node's engine socket mounted: the engine API's own exec and kill, over the
socket, with the standard library only (the image builds without network).
The answer is one result line (role ``node``): the exit status and the output
of an exec, or that a kill was delivered.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import struct
import sys
from typing import Any, Sequence

from .cli import ArgumentParser
from .errors import EngineError, UsageError
from .results import emit_result

DOCKER_SOCKET = "/var/run/docker.sock"
API_TIMEOUT_S = 600.0


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the engine's API)."""

    def __init__(self, path: str, timeout_s: float):
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DockerSocket:
    """The few engine API calls a node task needs, over ``path``."""

    def __init__(self, path: str = DOCKER_SOCKET, timeout_s: float = API_TIMEOUT_S):
        self.path = path
        self.timeout_s = timeout_s

    def request(self, method: str, url: str, body: Any = None) -> tuple[int, bytes]:
        """One API call; its status and body. EngineError if the engine cannot be reached."""
        conn = _UnixConnection(self.path, self.timeout_s)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, url, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError as exc:
            raise EngineError(f"the node's Docker engine at {self.path} did not answer: {exc}") from None
        finally:
            conn.close()

    def _checked(self, method: str, url: str, body: Any, what: str, ok: Sequence[int]) -> bytes:
        status, data = self.request(method, url, body)
        if status not in ok:
            message = _message(data)
            raise EngineError(f"the node's Docker engine could not {what}: {message or f'HTTP {status}'}")
        return data

    def kill(self, container: str, signal: str = "SIGTERM") -> bool:
        """Send ``signal``; False if the container was not running (or is gone)."""
        status, data = self.request("POST", f"/containers/{container}/kill?signal={signal}")
        if status == 204:
            return True
        if status in (404, 409):  # gone, or not running: nothing to stop
            return False
        raise EngineError(f"the node's Docker engine could not signal {container}: {_message(data) or status}")

    def exec(self, container: str, argv: Sequence[str]) -> tuple[int, str]:
        """Run ``argv`` in ``container``; its exit status and combined output."""
        created = self._checked("POST", f"/containers/{container}/exec",
                                {"Cmd": list(argv), "AttachStdout": True, "AttachStderr": True},
                                f"run {' '.join(argv)} in {container}", (201,))
        exec_id = json.loads(created)["Id"]
        stream = self._checked("POST", f"/exec/{exec_id}/start", {"Detach": False, "Tty": False},
                               f"start {' '.join(argv)} in {container}", (200,))
        inspected = json.loads(self._checked("GET", f"/exec/{exec_id}/json", None,
                                             "read the command's exit status", (200,)))
        return int(inspected.get("ExitCode") or 0), demultiplex(stream).decode("utf-8", "replace")


def demultiplex(stream: bytes) -> bytes:
    """The payload of the engine's multiplexed stream (stdout and stderr frames, in order).

    Each frame: one byte of stream type, three of zero, a big-endian length, the data.
    """
    out, offset = [], 0
    while offset + 8 <= len(stream):
        (size,) = struct.unpack(">I", stream[offset + 4:offset + 8])
        out.append(stream[offset + 8:offset + 8 + size])
        offset += 8 + size
    return b"".join(out)


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", "")).strip()
    except (ValueError, AttributeError):
        return data.decode("utf-8", "replace").strip()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="socklab node", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    kill = sub.add_parser("kill", help="signal a container")
    kill.add_argument("container")
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    run = sub.add_parser("exec", help="run a command in a container")
    run.add_argument("container")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one node action; its result line on stdout."""
    args = build_parser().parse_args(list(argv))
    if args.action == "exec" and not args.argv:
        raise UsageError("socklab node exec: give the command to run in the container")
    engine = DockerSocket()
    if args.action == "kill":
        emit_result({"role": "node", "action": "kill", "container": args.container,
                     "delivered": engine.kill(args.container, args.signal)})
    else:
        code, output = engine.exec(args.container, args.argv)
        emit_result({"role": "node", "action": "exec", "container": args.container, "exit_code": code,
                     "output": output})
    sys.stdout.flush()
    return 0
