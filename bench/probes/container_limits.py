"""The kernel's and the container's limits that bound a thread, descriptor or connection count: one JSON line.

    python3 container_limits.py

Each value as the file holds it (None where the file is absent: cgroup v1 and
v2 keep them in different places). Stdlib only.
"""

import json
import resource

FILES = {
    "somaxconn": ("/proc/sys/net/core/somaxconn",),
    "vm.max_map_count": ("/proc/sys/vm/max_map_count",),
    "kernel.threads-max": ("/proc/sys/kernel/threads-max",),
    "kernel.pid_max": ("/proc/sys/kernel/pid_max",),
    "cgroup pids.max": ("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"),
    "cgroup memory limit": ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
    # What bounds connections once descriptors do not: the most a process may be given,
    # the ports of one source address and the connection tracking table (the host's,
    # shared by every container).
    "fs.nr_open": ("/proc/sys/fs/nr_open",),
    "ip_local_port_range": ("/proc/sys/net/ipv4/ip_local_port_range",),
    "nf_conntrack_max": ("/proc/sys/net/netfilter/nf_conntrack_max",),
}


def read(path):
    """The file's text, stripped; None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def limits():
    """Every limit, from the first of its files that can be read, and this process's descriptor limit."""
    found = {name: next((value for value in map(read, paths) if value), None) for name, paths in FILES.items()}
    found["RLIMIT_NOFILE"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return found


if __name__ == "__main__":
    print(json.dumps(limits()))
