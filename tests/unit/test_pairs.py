"""Every server mode against every client mode, bulk and echo, over loopback.

One server per (server mode, workload) serves the eight client modes in turn;
what each client's send() calls accepted must be what the server counted on
that connection — for the tutorial's single non-blocking send() too, since
shutdown() still flushes what the kernel accepted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from socklab import clients, servers
from socklab.results import find_results

SERVICES = Path(__file__).resolve().parents[2] / "services"
ENV = {**os.environ, "PYTHONPATH": str(SERVICES)}
LOOPBACK = "127.0.0.1"
WORKLOAD_ARGS = {
    "bulk": ["--bytes", "3MiB"],
    "echo": ["--requests", "40", "--size", "2KiB"],
}


def start_server(mode: str, workload: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "socklab", "server", "--mode", mode, "--host", LOOPBACK, "--port", "0",
         "--workload", workload], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    match = re.search(r"listening on [^:]+:(\d+)", line)
    assert match, line + proc.stderr.read()
    return proc, int(match.group(1))


@pytest.mark.parametrize("workload", sorted(WORKLOAD_ARGS))
@pytest.mark.parametrize("server_mode", servers.MODES)
def test_every_client_mode_against_this_server(server_mode, workload):
    server, port = start_server(server_mode, workload)
    results = []
    try:
        for client_mode in clients.MODES:
            done = subprocess.run(
                [sys.executable, "-m", "socklab", "client", "--mode", client_mode, "--host", LOOPBACK,
                 "--port", str(port), "--workload", workload, *WORKLOAD_ARGS[workload]],
                env=ENV, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"{client_mode}: {done.stderr}"
            (result,) = find_results(done.stdout)
            results.append((client_mode, result))
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    (summary,) = find_results(out)
    per_connection = summary["per_connection"]
    assert [c["closed_by"] for c in per_connection] == ["eof"] * len(clients.MODES)

    for (client_mode, result), conn in zip(results, per_connection):
        what = f"{client_mode} client, {server_mode} server, {workload}"
        assert conn["bytes_received"] == result["bytes_accepted"] == result["bytes_delivered"], what
        if client_mode == "nonblocking" and workload == "bulk":
            assert result["send_calls"] == 1 and 0 < result["bytes_accepted"] <= 3 * 2**20, what
        else:
            assert result["bytes_accepted"] == result["bytes_requested"], what
        if workload == "echo":
            assert result["latency_ms"]["count"] == 40, what
            # The echo server sends back what it received, then the trailer.
            assert conn["bytes_sent"] > conn["bytes_received"], what
