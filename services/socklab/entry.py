"""The container entrypoint: shape the link as root, then run the role unprivileged.

    python -m socklab entry ROLE [ARGS ...]     ROLE: server, client, summary, shape
    python -m socklab entry exec CMD [ARGS ...]  any program (iperf3), same treatment

The link comes from ``SOCKLAB_LINK_*`` environment variables (see shaping.py).
When the kernel cannot do what the link asks, the container stops here with one
sentence and a non-zero status: it never runs unshaped silently. The workload
then runs as the ``socklab`` user, so the program under study has no privileges
(root is kept only for ``shape``, which changes the link).
"""

from __future__ import annotations

import os
import pwd
import sys

from .errors import UsageError

WORKLOAD_USER = "socklab"
# Roles that run as root because their job is the link itself.
_ROOT_ROLES = {"shape"}


def drop_privileges(user: str = WORKLOAD_USER) -> None:
    """Become ``user`` for good: supplementary groups, gid, then uid.

    Leaving uid 0 clears the capability sets, so the workload loses NET_ADMIN too.
    """
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = "/tmp"
    os.environ["USER"] = user


def prepare_result_dir(path: str, reset: bool) -> None:
    """Make the shared result directory writable by the workload user.

    ``reset`` clears earlier results, so a summary never shows a stale run.
    """
    os.makedirs(path, exist_ok=True)
    if reset:
        for name in os.listdir(path):
            if name.endswith(".json"):
                os.unlink(os.path.join(path, name))
    entry = pwd.getpwnam(WORKLOAD_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def main(argv: list[str]) -> int:
    """Shape, prepare, drop privileges and exec the role named in ``argv``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    role, args = argv[0], argv[1:]
    if role == "exec":
        if not args:
            raise UsageError("entry exec needs a command to run")
        command = args
    else:
        command = [sys.executable, "-m", "socklab", role, *args]

    if os.geteuid() == 0:
        from . import shaping

        applied = shaping.apply_from_env(os.environ, shaping.run)
        print(f"socklab: {applied['summary']}", file=sys.stderr, flush=True)
        result_dir = os.environ.get("SOCKLAB_RESULT_DIR")
        if result_dir:
            prepare_result_dir(result_dir, os.environ.get("SOCKLAB_RESULT_RESET") == "1")
        if role not in _ROOT_ROLES:
            drop_privileges()
    os.execvp(command[0], command)
    return 127  # not reached: execvp replaces this process or raises
