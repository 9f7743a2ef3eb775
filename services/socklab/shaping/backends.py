"""Shaping backends: which kernel features a link needs, and the plan that uses them.

A backend says whether it can shape a given link on a given kernel (one
sentence when not) and builds the commands. ``netem`` does everything in the
kernel; ``userspace`` keeps rate in the kernel (tbf) and does delay, jitter and
loss with an NFQUEUE delay line (delayline.py), for kernels built without
sch_netem. ``auto`` tries them in that order.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import EngineError, UsageError
from .caps import MODULES, Capabilities
from .model import BACKEND_CHOICES, LinkShape, LinkSpec
from . import plan as tcplan
from .. import units


class Backend(Protocol):
    """What the chooser and the executor need from a backend."""

    name: str

    def supports(self, spec: LinkSpec, caps: Capabilities) -> str | None:
        """None when this backend can shape ``spec`` here, else why not (one clause)."""

    def plan(self, spec: LinkSpec, dev: str, ifb: str, seed: int | None = None) -> list[list[str]]:
        """The commands that shape a freshly torn-down ``dev``; ``seed`` for random draws, if it makes any."""

    def plan_change(self, old: LinkSpec, new: LinkSpec, dev: str, ifb: str) -> list[list[str]] | None:
        """Commands that turn ``old`` into ``new`` in place, or None if it must be rebuilt."""


class NetemBackend:
    """Rate with tbf, delay/jitter/loss with the kernel's netem, down via ifb."""

    name = "netem"

    def supports(self, spec: LinkSpec, caps: Capabilities) -> str | None:
        """Checks per direction; the first missing feature is the answer."""
        for direction, shape in spec.directions():
            problem = _rate_problem(direction, shape, caps)
            if problem:
                return problem
            if shape.needs_netem and not caps.netem:
                return (
                    f"the link asks for {_and(shape.netem_wants())} ({direction}) but this kernel has "
                    f"no netem qdisc (kernel module {MODULES['netem']})"
                )
        return _ifb_problem(spec, caps) if spec.down.shaped else None

    def plan(self, spec: LinkSpec, dev: str, ifb: str, seed: int | None = None) -> list[list[str]]:
        """See plan.netem_tbf_plan. ``seed`` is not used: netem draws in the kernel, from its own generator."""
        return tcplan.netem_tbf_plan(spec, dev, ifb)

    def plan_change(self, old: LinkSpec, new: LinkSpec, dev: str, ifb: str) -> list[list[str]] | None:
        """See plan.netem_tbf_change."""
        return tcplan.netem_tbf_change(old, new, dev, ifb)


class UserspaceBackend:
    """Rate with tbf (down via ifb), delay/jitter/loss by the NFQUEUE delay line."""

    name = "userspace"

    def supports(self, spec: LinkSpec, caps: Capabilities) -> str | None:
        """Checks per direction; the first missing feature is the answer."""
        for direction, shape in spec.directions():
            problem = _rate_problem(direction, shape, caps)
            if problem:
                return problem
            if shape.needs_netem and not caps.nfqueue:
                return (
                    f"the link asks for {_and(shape.netem_wants())} ({direction}), which the userspace backend "
                    f"does with an NFQUEUE delay line, but this kernel lacks NFQUEUE (kernel modules "
                    f"{MODULES['nfqueue']})"
                )
        # Down is delayed after the ingress hook, so only a down rate needs ifb.
        return _ifb_problem(spec, caps) if spec.down.rate_bps is not None else None

    def plan(self, spec: LinkSpec, dev: str, ifb: str, seed: int | None = None) -> list[list[str]]:
        """See plan.userspace_plan."""
        return tcplan.userspace_plan(spec, dev, ifb, seed)

    def plan_change(self, old: LinkSpec, new: LinkSpec, dev: str, ifb: str) -> list[list[str]] | None:
        """See plan.userspace_change."""
        return tcplan.userspace_change(old, new, dev, ifb)


def _rate_problem(direction: str, shape: LinkShape, caps: Capabilities) -> str | None:
    if shape.rate_bps is not None and not caps.tbf:
        return (
            f"the link asks for rate {units.format_rate(shape.rate_bps)} ({direction}) but this "
            f"kernel has no tbf qdisc (kernel module {MODULES['tbf']})"
        )
    return None


def _ifb_problem(spec: LinkSpec, caps: Capabilities) -> str | None:
    missing = caps.missing("ifb", "ingress", "u32", "mirred")
    if missing:
        return (
            f"the link shapes the down direction ({spec.down.describe()}), which needs an ifb device "
            f"fed by an ingress u32 filter with a mirred redirect, but this kernel lacks {_and(missing)}"
        )
    return None


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# In order of preference for `auto`: the kernel's netem when it has one.
BACKENDS: dict[str, Backend] = {"netem": NetemBackend(), "userspace": UserspaceBackend()}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; 'auto' means the preferred one (for dry runs)."""
    if name == "auto":
        return next(iter(BACKENDS.values()))
    if name in BACKENDS:
        return BACKENDS[name]
    raise UsageError(f"{name!r} is not a shaping backend: use {', '.join(BACKEND_CHOICES)}")


def choose_backend(requested: str, caps: Capabilities, spec: LinkSpec) -> Backend:
    """The backend that will shape ``spec`` on a kernel with ``caps``.

    ``requested`` is auto|netem|userspace. Raises EngineError with one sentence
    when no backend here can do what the link asks: a link is never left
    unshaped silently.
    """
    candidates = list(BACKENDS.values()) if requested == "auto" else [get_backend(requested)]
    problems = []
    for backend in candidates:
        problem = backend.supports(spec, caps)
        if problem is None:
            return backend
        problems.append(problem)
    sentence = problems[0]
    if requested == "auto":
        for backend, problem in zip(candidates[1:], problems[1:]):
            if problem != problems[0]:
                sentence += f"; nor can the {backend.name} backend: {problem}"
    else:
        others = [b.name for b in BACKENDS.values() if b.name != requested and b.supports(spec, caps) is None]
        if others:
            sentence += f"; backend auto or {others[0]} can shape this link here"
    raise EngineError(sentence)


def build_plan(
    spec: LinkSpec, backend: str | Backend = "netem", dev: str = "eth0", ifb: str = "ifb0", seed: int | None = None,
) -> list[list[str]]:
    """The argv lists that shape a freshly torn-down ``dev`` (and ``ifb`` for down).

    Pure: runs nothing. An unshaped direction adds nothing; an unshaped link
    gives []. ``seed`` seeds the userspace delay line's draws.
    """
    chosen = get_backend(backend) if isinstance(backend, str) else backend
    return chosen.plan(spec, dev, ifb, seed)
