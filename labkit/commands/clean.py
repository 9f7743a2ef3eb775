"""`lab.py clean`: remove what the lab left behind, never what a live run still uses."""

from __future__ import annotations

from .. import engine as engines
from .. import owner
from .common import say

KINDS = ("services", "containers", "networks", "volumes")  # services: a swarm's


def cmd_clean(args) -> int:
    """Remove every container, network and volume carrying the lab's label whose run has ended.

    What is left is said, grouped by why (its run is still going, or its owner
    cannot be checked from this host); ``--force`` removes those too.
    """
    engine = engines.open_engine(args.engine)
    host = owner.this_host()
    removed: dict[str, list[str]] = {kind: [] for kind in KINDS}
    left: dict[str, dict[str, list[str]]] = {}
    for obj in engine.objects():
        verdict = owner.judge(obj.labels, host=host, started_of=owner.process_started, force=args.force)
        if not verdict.remove:
            left.setdefault(verdict.reason, {kind: [] for kind in KINDS})[obj.kind].append(obj.name)
        elif engine.remove(obj):
            removed[obj.kind].append(obj.name)
    for kind, names in removed.items():
        if kind == "services" and not names and args.engine != "swarm":
            continue  # Compose makes none: its output stays as it was
        say(f"removed {len(names)} {kind}" + (f": {', '.join(names)}" if names else ""))
    for reason, by_kind in left.items():
        counts = ", ".join(f"{len(names)} {kind}" for kind, names in by_kind.items() if names)
        names = ", ".join(name for kind in KINDS for name in by_kind[kind])
        say(f"left {counts}, because {reason}: {names}")
    if left:
        say("(`lab.py clean --force` removes those too)")
    return 0
