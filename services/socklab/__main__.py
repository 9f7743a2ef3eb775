"""python -m socklab ROLE ...  — dispatch to the role's own main."""

from __future__ import annotations

import importlib
import sys

from .cli import run_main
from .errors import UsageError

# role -> module whose main(argv) runs it; imported lazily so that a role does
# not pay for the others' imports.
ROLES = {
    "server": "socklab.servers",
    "client": "socklab.clients",
    "shape": "socklab.shaping",
    "entry": "socklab.entry",
    "summary": "socklab.summary",
    "node": "socklab.node",
    "program": "socklab.program",
    "probe": "socklab.linkprobe",
}


def main(argv: list[str]) -> int:
    """Dispatch ``argv[0]`` to its role."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m socklab {" + ",".join(ROLES) + "} ...")
        return 0 if argv else 2
    role, rest = argv[0], argv[1:]
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    module = importlib.import_module(ROLES[role])
    return module.main(rest)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
