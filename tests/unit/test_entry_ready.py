"""The clients' gate (`entry ready PORT [SECONDS]`): a listening socket is seen in the
kernel's socket tables without connecting to it, and a port nobody listens on times out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from socklab import entry
from socklab.errors import UsageError

SERVICES = Path(__file__).resolve().parents[2] / "services"

# /proc/net/tcp's layout: port 0x1388 (5000) listening (0A), 0x1F90 (8080) established (01).
TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 20 4 30 10 -1
"""
TABLE6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000
"""


def test_listening_ports_come_from_both_tables_and_only_in_listen_state(tmp_path):
    (tmp_path / "tcp").write_text(TABLE)
    (tmp_path / "tcp6").write_text(TABLE6)
    ports = entry.listening_ports((str(tmp_path / "tcp"), str(tmp_path / "tcp6"), str(tmp_path / "absent")))
    assert ports == {5000, 22}


def test_a_socket_that_starts_listening_later_is_seen_without_a_connection():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Timer(0.3, server.listen).start()
    started = time.monotonic()
    try:
        assert entry.wait_listening(port, timeout_s=10)
        waited_s = time.monotonic() - started
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected to find out
            server.accept()
    finally:
        server.close()
    assert 0.3 <= waited_s < 0.3 + 10 * entry.READY_POLL_S


def test_nothing_listening_times_out_with_one_sentence_and_status_1():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: the port stays free
        port = unused.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "socklab", "entry", "ready", str(port), "0.3s"],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(SERVICES)})
        elapsed_s = time.monotonic() - started
    assert done.returncode == 1
    assert done.stderr.strip() == f"socklab: nothing listened on port {port} within 0.3 s"
    assert elapsed_s >= 0.3


@pytest.mark.parametrize("args", [[], ["http"], ["0"], ["70000"], ["5000", "soon"], ["5000", "1s", "x"]])
def test_bad_arguments_are_a_usage_error(args):
    with pytest.raises(UsageError):
        entry.ready(args)


def test_every_role_starts_with_its_soft_descriptor_limit_raised_to_the_hard_one():
    # In a child process: the limit is the process's own, and a lowered one must not leak into the tests.
    code = ("import resource; from socklab import entry\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "print(entry.raise_descriptor_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(SERVICES)})
    returned, soft, hard = (int(word) for word in done.stdout.split())
    assert returned == soft == hard > 256
