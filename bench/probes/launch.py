"""Run a server process as the scale benchmark needs it: descriptors raised, its pid kept.

    python3 launch.py PIDFILE PROGRAM [ARGS ...]

Raises the soft descriptor limit to the hard one (a container's soft limit can
be as low as 1024, whatever its hard limit allows), writes this process's pid
to PIDFILE for the probes, and becomes PROGRAM (same pid). Stdlib only.
"""

import os
import resource
import sys


def raise_descriptor_limit():
    """Soft RLIMIT_NOFILE up to the hard one; the new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main(pidfile, argv):
    raise_descriptor_limit()
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
