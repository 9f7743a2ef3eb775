"""The kernel's and the container's limits that bound a thread or descriptor count: one JSON line.

    python3 container_limits.py

Each value as the file holds it (None where the file is absent: cgroup v1 and
v2 keep them in different places). Stdlib only.
"""

import json

FILES = {
    "somaxconn": ("/proc/sys/net/core/somaxconn",),
    "vm.max_map_count": ("/proc/sys/vm/max_map_count",),
    "kernel.threads-max": ("/proc/sys/kernel/threads-max",),
    "kernel.pid_max": ("/proc/sys/kernel/pid_max",),
    "cgroup pids.max": ("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"),
    "cgroup memory limit": ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
}


def read(path):
    """The file's text, stripped; None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def limits():
    """Every limit, from the first of its files that can be read."""
    return {name: next((value for value in map(read, paths) if value), None) for name, paths in FILES.items()}


if __name__ == "__main__":
    print(json.dumps(limits()))
