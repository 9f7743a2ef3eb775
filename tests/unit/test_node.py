"""`socklab node` (a node's engine API over its socket) and files carried in a log, without Docker.

The engine here is a small HTTP server on a unix socket that answers as
Docker's API does (exec create, start with its multiplexed stream, inspect;
kill). The same calls are made against the real engine in
tests/lab/test_swarm.py, by a task placed on the node.
"""

from __future__ import annotations

import json
import socketserver
import struct
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from socklab.errors import EngineError
from socklab.node import DockerSocket, demultiplex
from socklab.results import FILE_CHUNK_BYTES, emit_file, find_files


def frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(data)) + data


class FakeEngine(BaseHTTPRequestHandler):
    """Answers for one container, ``c1``, that runs; anything else is not there."""

    calls: list = []

    def _reply(self, status: int, body: bytes = b"", kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        FakeEngine.calls.append((self.path, body))
        if self.path == "/containers/c1/exec":
            return self._reply(201, json.dumps({"Id": "e1"}).encode())
        if self.path == "/exec/e1/start":
            stream = frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"more\n")
            return self._reply(200, stream, "application/vnd.docker.raw-stream")
        if self.path.startswith("/containers/c1/kill"):
            return self._reply(204)
        self._reply(404, json.dumps({"message": "No such container: gone"}).encode())

    def do_GET(self):
        FakeEngine.calls.append((self.path, None))
        if self.path == "/exec/e1/json":
            return self._reply(200, json.dumps({"Running": False, "ExitCode": 4}).encode())
        self._reply(404, b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def engine(tmp_path):
    path = str(tmp_path / "docker.sock")
    server = socketserver.ThreadingUnixStreamServer(path, FakeEngine)
    # BaseHTTPRequestHandler wants a client address pair; a unix socket has none.
    server.get_request = lambda: (server.socket.accept()[0], ("local", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeEngine.calls = []
    yield DockerSocket(path, timeout_s=5)
    server.shutdown()
    server.server_close()


def test_exec_creates_starts_and_reads_the_exit_status(engine):
    assert engine.exec("c1", ["sh", "-c", "exit 4"]) == (4, "out\nerr\nmore\n")
    assert [path for path, _ in FakeEngine.calls] == ["/containers/c1/exec", "/exec/e1/start", "/exec/e1/json"]
    assert FakeEngine.calls[0][1] == {"Cmd": ["sh", "-c", "exit 4"], "AttachStdout": True, "AttachStderr": True}


def test_exec_in_a_missing_container_says_what_the_engine_said(engine):
    with pytest.raises(EngineError, match=r"could not run true in gone: No such container: gone$"):
        engine.exec("gone", ["true"])


def test_kill_is_delivered_or_there_was_nothing_to_stop(engine):
    assert engine.kill("c1") is True
    assert FakeEngine.calls[-1][0] == "/containers/c1/kill?signal=SIGTERM"
    assert engine.kill("gone") is False


def test_an_engine_that_is_not_there_is_one_sentence(tmp_path):
    with pytest.raises(EngineError, match="the node's Docker engine at .* did not answer"):
        DockerSocket(str(tmp_path / "none.sock"), timeout_s=1).kill("c1")


def test_demultiplex_keeps_the_frames_order_and_drops_a_cut_header():
    assert demultiplex(frame(1, b"a") + frame(2, b"bc") + b"\x01\x00") == b"abc"


@pytest.mark.parametrize("size", [0, 1, FILE_CHUNK_BYTES, 5 * FILE_CHUNK_BYTES + 17])
def test_a_file_goes_through_a_log_and_comes_back_whole(tmp_path, capsys, size):
    path = tmp_path / "trace.gz"
    path.write_bytes(bytes((7 * n) % 256 for n in range(size)))
    print('{"socklab_result":1,"role":"client"}')
    assert emit_file(str(path))
    log = capsys.readouterr().out
    assert all(len(line) < 16 * 1024 for line in log.splitlines())  # Docker splits longer log lines
    assert find_files(log) == {str(path): path.read_bytes()}


def test_a_file_cut_short_in_the_log_is_not_found(tmp_path, capsys):
    path = tmp_path / "trace.gz"
    path.write_bytes(b"x" * (3 * FILE_CHUNK_BYTES))
    emit_file(str(path))
    lines = capsys.readouterr().out.splitlines()
    assert find_files("\n".join(lines[:1] + lines[2:])) == {}  # a chunk missing
    assert find_files("\n".join(lines[:-1])) == {}  # the end line missing
    assert not emit_file(str(tmp_path / "absent"))
