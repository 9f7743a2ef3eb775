"""Resident memory per idle connection of one server process, on loopback: the scale figure in seconds.

    python3 idle_memory.py COUNT PORT -- SERVER_ARGV...

Starts SERVER_ARGV (which must listen on 127.0.0.1:PORT), reads its VmRSS
once it listens, opens COUNT connections to it from this process and holds
them idle, waits until the server holds a descriptor for each, reads VmRSS
again and prints one JSON line: ``{"connections", "rss_idle_kib",
"rss_held_kib", "bytes_per_connection"}``. The server is then terminated.
Like bench/scale, but without containers: for comparing a change against
bench/probes/hold_epoll.py or hold_asyncio.py run the same way, e.g.

    python3 idle_memory.py 10000 5000 -- python3 hold_epoll.py 5000 4096 127.0.0.1

Needs a descriptor limit above COUNT (raised to the hard limit here, and
inherited by the server). Stdlib only.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time

SETTLE_S = 1.0
WAIT_S = 60.0


def rss_kib(pid):
    """The process's resident set size (VmRSS), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def descriptors(pid):
    """How many descriptors the process holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_listening(port, deadline):
    """Wait until something accepts on 127.0.0.1:``port``."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def measure(count, port, argv):
    """Start the server, hold ``count`` idle connections to it; the reading."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held = []
    try:
        wait_listening(port, time.monotonic() + WAIT_S)
        time.sleep(SETTLE_S)  # the probe connection's close, and start-up, behind us
        idle, base_fds = rss_kib(server.pid), descriptors(server.pid)
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.monotonic() + WAIT_S
        while descriptors(server.pid) < base_fds + count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(SETTLE_S)
        accepted = descriptors(server.pid) - base_fds
        rss = rss_kib(server.pid)
    finally:
        server.terminate()
        server.wait()
        for sock in held:
            sock.close()
    return {"connections": accepted, "rss_idle_kib": idle, "rss_held_kib": rss,
            "bytes_per_connection": round((rss - idle) * 1024 / accepted) if accepted else None}


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__.split("\n\n")[1])
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]), sys.argv[4:])), flush=True)
