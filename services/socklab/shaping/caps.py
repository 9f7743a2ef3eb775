"""What this kernel can do for shaping, found by trying it (never by guessing).

The probe builds and tears down each feature on a throwaway ifb device, so it
works inside a container with only NET_ADMIN (no /proc/modules, no modprobe)
and never touches the container's real interfaces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import EngineError
from .runner import Runner, ShapingError

PROBE_DEV = "socklab-probe0"
PROBE_CHAIN = "socklab-probe"

# Kernel module behind each capability, for messages that say what is missing.
MODULES = {
    "netem": "sch_netem",
    "tbf": "sch_tbf",
    "htb": "sch_htb",
    "ingress": "sch_ingress",
    "ifb": "ifb",
    "u32": "cls_u32",
    "mirred": "act_mirred",
    "nfqueue": "nfnetlink_queue / xt_NFQUEUE",
}


_QDISCS = ("netem", "tbf", "htb", "ingress")


@dataclass(frozen=True)
class Capabilities:
    """Each field: the kernel accepted that feature when the probe tried it."""

    netem: bool = False
    tbf: bool = False
    htb: bool = False
    ingress: bool = False
    ifb: bool = False
    u32: bool = False
    mirred: bool = False
    nfqueue: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (also kept in the state file): the qdiscs grouped,
        e.g. {"qdiscs": {"netem": false, "tbf": true, ...}, "ifb": true, ...}."""
        flat = asdict(self)
        qdiscs = {name: flat.pop(name) for name in _QDISCS}
        return {"qdiscs": qdiscs, **flat}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Capabilities":
        """Inverse of ``to_dict``; keys it does not know (from a newer version) are ignored."""
        flat = {**data.get("qdiscs", {}), **{k: v for k, v in data.items() if k != "qdiscs"}}
        return cls(**{k: bool(flat[k]) for k in cls.__dataclass_fields__ if k in flat})

    def missing(self, *names: str) -> list[str]:
        """Of ``names``, those absent, each as 'name (kernel module M)'."""
        return [f"{n} (kernel module {MODULES[n]})" for n in names if not getattr(self, n)]

    def describe(self) -> str:
        """'netem no, tbf yes, ...' in one line."""
        return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in asdict(self).items())


def _accepts(runner: Runner, argv: list[str]) -> bool:
    try:
        runner(argv)
    except ShapingError:
        return False
    return True


def _quietly(runner: Runner, argv: list[str]) -> None:
    # Clean-up of a probe artefact that may not exist; its own failure says nothing.
    _accepts(runner, argv)


def probe_capabilities(runner: Runner) -> Capabilities:
    """Try each qdisc, filter, action and NFQUEUE for real and report what worked.

    Raises EngineError when not even a throwaway device can be made (no
    NET_ADMIN, or no ifb module), since then nothing can be probed.
    """
    _quietly(runner, ["ip", "link", "del", "dev", PROBE_DEV])  # left by an interrupted probe
    try:
        runner(["ip", "link", "add", PROBE_DEV, "type", "ifb"])
    except ShapingError as exc:
        raise EngineError(
            f"cannot probe traffic control: creating a throwaway ifb device failed ({exc}); "
            "shaping needs the NET_ADMIN capability and the kernel's ifb module"
        ) from None
    try:
        found = {"ifb": True}
        for kind, args in (
            ("netem", ["delay", "1ms"]),
            ("tbf", ["rate", "1mbit", "burst", "16000", "limit", "32000"]),
            ("htb", ["default", "1"]),
        ):
            found[kind] = _accepts(runner, ["tc", "qdisc", "add", "dev", PROBE_DEV, "root", "handle", "1:", kind, *args])
            if found[kind]:
                runner(["tc", "qdisc", "del", "dev", PROBE_DEV, "root"])
        found["ingress"] = _accepts(runner, ["tc", "qdisc", "add", "dev", PROBE_DEV, "handle", "ffff:", "ingress"])
        # The classifier first on its own, then with the redirect action, so a
        # missing act_mirred is not blamed on cls_u32. mirred needs a classifier
        # to hang on, so without ingress or u32 it cannot be tried and counts as absent.
        base = ["tc", "filter", "add", "dev", PROBE_DEV, "parent", "ffff:", "protocol", "all"]
        found["u32"] = found["ingress"] and _accepts(runner, [*base, "prio", "1", "u32", "match", "u32", "0", "0"])
        found["mirred"] = found["u32"] and _accepts(
            runner,
            [*base, "prio", "2", "u32", "match", "u32", "0", "0",
             "action", "mirred", "egress", "redirect", "dev", PROBE_DEV],
        )
    finally:
        _quietly(runner, ["ip", "link", "del", "dev", PROBE_DEV])
    found["nfqueue"] = _probe_nfqueue(runner)
    return Capabilities(**found)


def _probe_nfqueue(runner: Runner) -> bool:
    """An NFQUEUE rule in an unreferenced chain: accepted by the kernel, seen by no packet."""
    iptables = ["iptables", "-w", "-t", "mangle"]
    _quietly(runner, [*iptables, "-F", PROBE_CHAIN])
    _quietly(runner, [*iptables, "-X", PROBE_CHAIN])
    if not _accepts(runner, [*iptables, "-N", PROBE_CHAIN]):
        return False
    try:
        return _accepts(runner, [*iptables, "-A", PROBE_CHAIN, "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"])
    finally:
        _quietly(runner, [*iptables, "-F", PROBE_CHAIN])
        _quietly(runner, [*iptables, "-X", PROBE_CHAIN])
