"""Profile a server until SIGTERM, then print every function's figures: the echo benchmark's profiler.

    python3 profile_server.py lab SERVER_ARGS ...       the lab's server (socklab.servers)
    python3 profile_server.py reference SOURCE PORT     a program given as source (the reference)

Prints one line, ``profile {"total_s": ..., "rows": [[function, calls,
own_s, cumulative_s], ...]}``. The lab's server stops cleanly on SIGTERM by
itself; the reference is stopped by the KeyboardInterrupt raised here. The
timer is CPU time, so that waiting in epoll/select is not counted as work.
Stdlib only (and socklab, for ``lab``).
"""

import cProfile
import json
import os
import pstats
import signal
import sys
import time


def interrupt(signum, frame):
    raise KeyboardInterrupt


def function_name(key):
    """A profile key as one readable name: ``file.py:line(function)``, or a built-in's own name."""
    path, line, func = key
    return func if path == "~" else f"{os.path.basename(path)}:{line}({func})"


def profile(kind, args):
    """Run the server under a CPU-time profiler until SIGTERM; its statistics."""
    signal.signal(signal.SIGTERM, interrupt)
    profiler = cProfile.Profile(time.process_time)
    try:
        if kind == "lab":
            from socklab import servers
            profiler.runcall(servers.main, args)
        else:
            sys.argv = ["reference_echo.py", *args[1:]]
            profiler.runcall(exec, compile(args[0], "reference_echo.py", "exec"), {"__name__": "__main__"})
    except KeyboardInterrupt:
        pass
    return pstats.Stats(profiler)


def summary(stats):
    """The statistics as the line's JSON document."""
    return {"total_s": stats.total_tt, "rows": [[function_name(k), nc, tt, ct]
                                                for k, (cc, nc, tt, ct, callers) in stats.stats.items()]}


if __name__ == "__main__":
    print("profile " + json.dumps(summary(profile(sys.argv[1], sys.argv[2:]))), flush=True)
