"""One reading of a server under load, as the scale benchmark takes it: one JSON line.

    python3 server_probe.py PIDFILE PORT

The connections to PORT (established, and those still waiting in the
listener's accept queue, which the kernel completes without the server), the
TCP listen-overflow counters of the network namespace, and the memory,
threads, descriptors, mappings and limits of the process whose pid PIDFILE
holds (``"pid": null`` when there is none). Run as the server's own user,
who may read its /proc files. Stdlib only, and `ss`.
"""

import json
import os
import subprocess
import sys

NETSTAT_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "SyncookiesRecv", "TCPReqQFullDrop")
LIMITS = (("Max open files", "nofile"), ("Max processes", "nproc"), ("Max stack size", "stack"))


def ss(*args):
    """Lines of `ss -tnH ARGS`."""
    return subprocess.run(["ss", "-tnH", *args], capture_output=True, text=True).stdout.splitlines()


def connections(port):
    """Established connections to ``port``, whether it is listened on, and its accept queue."""
    out = {"established": len(ss("state", "established", f"( sport = :{port} )"))}
    listening = ss("-l", f"( sport = :{port} )")
    out["listening"] = bool(listening)
    out["accept_queue"] = int(listening[0].split()[1]) if listening else 0
    return out


def netstat_counters(text):
    """The listen-overflow counters from /proc/net/netstat's text."""
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    counters = dict(zip(lines[0][1:], lines[1][1:]))
    return {key: int(counters.get(key, 0)) for key in NETSTAT_COUNTERS}


def process(pid):
    """Memory (KiB), threads, descriptors, mappings and limits of process ``pid``."""
    with open(f"/proc/{pid}/status") as status_file:
        status = dict(line.split(":", 1) for line in status_file)

    def kib(key):
        return int(status[key].split()[0])

    with open(f"/proc/{pid}/maps") as maps:
        mappings = sum(1 for _ in maps)
    out = {"pid": pid, "rss_kib": kib("VmRSS"), "hwm_kib": kib("VmHWM"), "vm_kib": kib("VmSize"),
           "threads": int(status["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd")), "maps": mappings}
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            for name, key in LIMITS:
                if line.startswith(name):
                    soft, hard = line[len(name):].split()[:2]
                    out[key] = [soft, hard]
    return out


def main(pidfile, port):
    out = connections(port)
    with open("/proc/net/netstat") as netstat:
        out["netstat"] = netstat_counters(netstat.read())
    try:
        with open(pidfile) as f:
            out.update(process(int(f.read())))
    except (OSError, ValueError, KeyError):
        out["pid"] = None
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
