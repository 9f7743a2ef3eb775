"""Applying, changing and showing a container's link (the command line is in cli.py)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..atomic import write_atomic
from ..errors import EngineError, UsageError
from . import delayline
from .backends import Backend, choose_backend
from .caps import Capabilities, probe_capabilities
from .model import (
    ENV_DEV,
    ENV_IFB,
    ENV_STATE,
    LinkChanges,
    LinkSpec,
    backend_from_env,
    changes_from_env,
    parse_seed,
    seed_from_env,
)
from .plan import (
    CHAINS,
    DELAYLINE_COMMAND,
    IPTABLES_MANGLE,
    NETEM_HANDLE,
    ROOT_HANDLE,
    build_teardown,
    delay_line_teardown,
    qdisc_teardown,
)
from .runner import Runner, ShapingError, run
from .show import link_mtus, qdisc_stats

DEFAULT_DEV = "eth0"
DEFAULT_IFB = "ifb0"
# In the container's own /run (a tmpfs that dies with it), so a later
# `docker exec ... shape set` or `shape show` knows what `apply` did.
DEFAULT_STATE_PATH = "/run/socklab/link.json"
UNSHAPED = "none"
# Next to the state file: what the delay line, which has no terminal, has to say.
DELAYLINE_LOG = "delayline.log"
STOP_DELAYLINE = [*DELAYLINE_COMMAND, "stop"]

log = logging.getLogger("socklab.shaping")


def state_path_from(environ: Mapping[str, str], explicit: str | None = None) -> Path:
    """Where the applied link is remembered: explicit, else SOCKLAB_LINK_STATE, else the default."""
    return Path(explicit or environ.get(ENV_STATE, "").strip() or DEFAULT_STATE_PATH)


def read_state(path: Path) -> dict[str, Any] | None:
    """The last applied link, or None if nothing was applied here."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        state = json.loads(text)
        LinkSpec.from_dict(state["applied"])
        if state.get("seed") is not None:
            parse_seed(state["seed"], "seed")
        return state
    except (ValueError, KeyError, TypeError, UsageError) as exc:
        raise EngineError(f"{path}: not a socklab link state file ({exc}); remove it and apply again") from None


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """Replace the state file atomically, so a concurrent `show` never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(state, indent=1) + "\n")


@contextlib.contextmanager
def changing(state_path: Path) -> Iterator[None]:
    """Hold the link's lock: one apply or set at a time per state file.

    A ``docker exec ... shape set`` can arrive while the entrypoint is still
    applying the container's link (the userspace backend takes a moment to
    start its delay line); without the lock both would tear down and build at once.
    """
    state_path.parent.mkdir(parents=True, exist_ok=True)
    with open(state_path.with_name(state_path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _check_ifname(name: str, what: str) -> str:
    # The kernel's limit is 15 bytes; tc and ip would also take a name with a
    # slash or blank as something else, so refuse early with the reason.
    if not name or len(name.encode()) > 15 or any(c in name for c in "/ \t\n:") or name in (".", ".."):
        raise UsageError(f"{what} {name!r} is not a network device name (1-15 characters, no '/', ':' or blanks)")
    return name


def teardown(runner: Runner, dev: str, ifb: str) -> None:
    """Remove every qdisc, filter and device a plan can have added, verified.

    The commands fail harmlessly for parts that were never added, so success is
    judged by what is left afterwards; if something is, the first failure is
    reported. The delay line's part runs only when there may be one: stopping
    it starts Python, which would slow every container's start for nothing.
    """
    failures = []
    left = []
    for argv in build_teardown(dev, ifb) if _delay_line_present(runner) else qdisc_teardown(dev, ifb):
        try:
            runner(argv)
        except ShapingError as exc:
            failures.append(exc)
            if argv == STOP_DELAYLINE:
                # It says "not running" with success, so a failure means it is still there.
                left.append("the delay line")
    for qdisc in qdisc_stats(runner, dev):
        if qdisc["parent"] == "root" and qdisc["handle"] in (ROOT_HANDLE, NETEM_HANDLE):
            left.append(f"the {qdisc['kind']} qdisc at the root of {dev}")
        if qdisc["kind"] == "ingress":
            left.append(f"the ingress qdisc of {dev}")
    if ifb in link_mtus(runner):
        left.append(f"the device {ifb}")
    left += [f"the iptables chain {chain}" for chain in _delay_line_chains(runner)]
    if left:
        cause = f": {failures[0]}" if failures else ""
        raise EngineError(f"could not remove the old shaping ({', '.join(left)} remained){cause}")


def _delay_line_present(runner: Runner) -> bool:
    """Whether a delay line's rules or its process may be there (its control socket is listed)."""
    if _delay_line_chains(runner):
        return True
    try:
        sockets = runner(["cat", "/proc/net/unix"])
    except ShapingError:
        return True  # cannot tell: look for one the slow way
    return f"@{delayline.CONTROL_NAME}" in sockets


def _delay_line_chains(runner: Runner) -> list[str]:
    """Which of the delay line's iptables chains exist."""
    try:
        listing = runner([*IPTABLES_MANGLE, "-S"])
    except ShapingError:
        # No iptables (or no mangle table) here: then no chain of ours can exist.
        return []
    defined = {line.split()[1] for line in listing.splitlines() if line.startswith("-N ")}
    return [chain for chain in CHAINS.values() if chain in defined]


def _summary(dev: str, spec: LinkSpec, backend: str, commands: list[list[str]], method: str) -> str:
    if not spec.shaped:
        return f"link {dev}: unshaped ({method})"
    return f"link {dev}: {spec.describe()} (backend {backend}, {method}, {len(commands)} commands)"


def _run_all(runner: Runner, commands: list[list[str]]) -> None:
    for argv in commands:
        runner(argv)


def apply_spec(
    spec: LinkSpec,
    requested_backend: str = "auto",
    *,
    runner: Runner = run,
    dev: str = DEFAULT_DEV,
    ifb: str = DEFAULT_IFB,
    state_path: Path | str = DEFAULT_STATE_PATH,
    caps: Capabilities | None = None,
    method: str = "applied",
    seed: int | None = None,
) -> dict[str, Any]:
    """Shape ``dev`` as ``spec`` says, from scratch, and remember it in the state file.

    The kernel is probed (unless ``caps`` is given) and the backend chosen before
    anything is touched, so a link the kernel cannot do fails with EngineError
    and leaves the current shaping as it was. If a command fails half way, the
    half-built shaping is removed and the error raised: never a silently
    unshaped or half-shaped link. ``method`` is the word the summary uses;
    ``seed`` seeds the delay line's draws (None: unseeded).
    Returns the summary dict (see ``_record``).
    """
    _check_ifname(dev, "device")
    _check_ifname(ifb, "ifb device")
    backend_name = UNSHAPED
    commands: list[list[str]] = []
    if spec.shaped:
        caps = caps or probe_capabilities(runner)
        backend = choose_backend(requested_backend, caps, spec)
        backend_name = backend.name
        commands = backend.plan(spec, dev, ifb, seed)
    teardown(runner, dev, ifb)
    try:
        _run_all(runner, commands)
    except ShapingError:
        teardown(runner, dev, ifb)
        raise
    return _record(Path(state_path), spec, backend_name, dev, ifb, caps, commands, method, requested_backend, seed)


def _record(
    path: Path,
    spec: LinkSpec,
    backend: str,
    dev: str,
    ifb: str,
    caps: Capabilities | None,
    commands: list[list[str]],
    method: str,
    requested: str = "auto",
    seed: int | None = None,
) -> dict[str, Any]:
    """Write the state file; return {backend, dev, ifb, applied, commands, method, summary}.

    The state also keeps the backend that was asked for, so that a later
    ``set`` chooses again the same way (an 'auto' link that gains a delay may
    need another backend than its rate alone did), and the seed, so that a
    ``set`` that rebuilds the link starts its delay line seeded as before.
    """
    result = {
        "backend": backend,
        "dev": dev,
        "ifb": ifb,
        "applied": spec.to_dict(),
        "commands": commands,
        "method": method,
        "summary": _summary(dev, spec, backend, commands, method),
    }
    # Capabilities do not change during a container's life: `set` reuses them
    # instead of probing again in the middle of a running case.
    write_state(path, {**result, "requested": requested, "caps": caps.to_dict() if caps else None, "seed": seed})
    return result


def set_link(
    changes: LinkChanges,
    requested_backend: str | None = None,
    *,
    runner: Runner = run,
    dev: str | None = None,
    ifb: str | None = None,
    state_path: Path | str = DEFAULT_STATE_PATH,
) -> dict[str, Any]:
    """Change a running link: ``changes`` on top of what was applied last.

    Top-level values set both directions, ``up.*``/``down.*`` one. When the new
    link has the same qdisc layout as the old (say, only the rate or the delay
    changes) the qdiscs are retuned in place with ``tc qdisc change``: queued
    packets and connections carry on, as on a real link whose speed changes.
    Otherwise (a direction becomes shaped or unshaped, netem joins or leaves)
    everything is torn down and applied afresh. If an in-place change fails half
    way, the link is rebuilt from scratch.
    """
    path = Path(state_path)
    state = read_state(path) or {}
    current = LinkSpec.from_dict(state.get("applied") or {})
    dev = _check_ifname(dev or state.get("dev") or DEFAULT_DEV, "device")
    ifb = _check_ifname(ifb or state.get("ifb") or DEFAULT_IFB, "ifb device")
    old_backend = state.get("backend", UNSHAPED)
    requested = requested_backend or state.get("requested") or (old_backend if old_backend != UNSHAPED else "auto")
    new = changes.resolve(current)
    caps = Capabilities.from_dict(state["caps"]) if state.get("caps") else None
    seed = state.get("seed")

    if not new.shaped:
        if not current.shaped and state:
            return _record(path, new, UNSHAPED, dev, ifb, caps, [], "unchanged", requested, seed)
        teardown(runner, dev, ifb)
        return _record(path, new, UNSHAPED, dev, ifb, caps, [], "removed", requested, seed)

    caps = caps or probe_capabilities(runner)
    backend: Backend = choose_backend(requested, caps, new)
    if new == current and backend.name == old_backend:
        return _record(path, new, backend.name, dev, ifb, caps, [], "unchanged", requested, seed)
    if current.shaped and backend.name == old_backend:
        in_place = backend.plan_change(current, new, dev, ifb)
        if in_place is not None:
            try:
                _run_all(runner, in_place)
                return _record(path, new, backend.name, dev, ifb, caps, in_place, "changed in place", requested, seed)
            except ShapingError as exc:
                log.debug("in-place change failed (%s); rebuilding the link", exc)
    # The same request on the same capabilities chooses the same backend again.
    return apply_spec(new, requested, runner=runner, dev=dev, ifb=ifb, state_path=path, caps=caps, method="rebuilt",
                      seed=seed)


def show_link(
    runner: Runner = run,
    *,
    dev: str | None = None,
    ifb: str | None = None,
    state_path: Path | str = DEFAULT_STATE_PATH,
    delay_line: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """{"backend", "applied": {"up", "down"}, "qdisc": {dev: [...], ifb: [...]}, "delay_line", "mtu"}.

    ``applied`` is what the last apply/set asked for (from the state file);
    ``qdisc`` is what the kernel has now, with counters. ``delay_line`` is null
    unless the userspace backend runs one: then its counters per direction
    (``delay_line`` given: those, e.g. the final ones ``stop_delay_line`` returned),
    or {"running": false, "error": ...} when it cannot be reached. ``mtu`` is the device's
    (1500 on a bridge, 1450 on an overlay): a link's TCP ceiling follows from it.
    """
    state = read_state(Path(state_path)) or {}
    dev = _check_ifname(dev or state.get("dev") or DEFAULT_DEV, "device")
    ifb = _check_ifname(ifb or state.get("ifb") or DEFAULT_IFB, "ifb device")
    qdiscs = {dev: qdisc_stats(runner, dev)}
    devices = link_mtus(runner)
    qdiscs[ifb] = qdisc_stats(runner, ifb) if ifb in devices else []
    if delay_line is None and _runs_delay_line(state):
        delay_line = _delay_line_stats(runner)
    return {
        "backend": state.get("backend", UNSHAPED),
        "applied": LinkSpec.from_dict(state.get("applied") or {}).to_dict(),
        "qdisc": qdiscs,
        "delay_line": dict(delay_line) if delay_line is not None else None,
        "mtu": devices.get(dev),
    }


def _runs_delay_line(state: Mapping[str, Any]) -> bool:
    return state.get("backend") == "userspace" and LinkSpec.from_dict(state.get("applied") or {}).needs_netem


def _delay_line_stats(runner: Runner) -> dict[str, Any]:
    try:
        answer = json.loads(runner([*DELAYLINE_COMMAND, "stats"]))
    except (ShapingError, ValueError) as exc:
        return {"running": False, "error": str(exc)}
    return answer if answer is not None else {"running": False, "error": "the delay line is not running"}


def stop_delay_line(runner: Runner = run, *, state_path: Path | str = DEFAULT_STATE_PATH) -> dict[str, Any] | None:
    """Unhook and stop the delay line of a userspace link; its final counters, or None if none ran.

    For the end of a container's life: the rules go first, then the delay line
    lets what it holds go on time and exits. The qdiscs stay, with their counters.
    """
    state = read_state(Path(state_path)) or {}
    if not _runs_delay_line(state):
        return None
    *unhook, stop = delay_line_teardown(_check_ifname(state.get("dev") or DEFAULT_DEV, "device"))
    for argv in unhook:
        try:
            runner(argv)
        except ShapingError as exc:  # a rule already gone is what was wanted
            log.debug("unhooking the delay line: %s", exc)
    return json.loads(runner(stop))


def apply_from_env(environ: Mapping[str, str], runner: Runner = run) -> dict[str, Any]:
    """Apply the link that ``SOCKLAB_LINK_*`` describes (the container entrypoint's call).

    Reads the link values, SOCKLAB_LINK_BACKEND (auto|netem|userspace),
    SOCKLAB_LINK_DEV (eth0), SOCKLAB_LINK_IFB (ifb0), SOCKLAB_LINK_STATE and
    SOCKLAB_LINK_SEED (the delay line's seed; unset: unseeded).
    Must run as root (NET_ADMIN). Raises UsageError for bad values and
    EngineError when the kernel cannot shape the link; returns the summary dict
    whose "summary" entry is a one-line description to print.
    """
    spec = changes_from_env(environ).resolve()
    # Parsed before anything is touched, so a bad seed leaves the link as it was.
    seed = seed_from_env(environ)
    state_path = state_path_from(environ)
    with changing(state_path):
        return apply_spec(
            spec,
            backend_from_env(environ),
            runner=runner,
            dev=environ.get(ENV_DEV, "").strip() or DEFAULT_DEV,
            ifb=environ.get(ENV_IFB, "").strip() or DEFAULT_IFB,
            state_path=state_path,
            caps=read_caps(state_path),
            seed=seed,
        )


def _caps_path(state_path: Path) -> Path:
    return state_path.with_name("caps.json")


def read_caps(state_path: Path) -> Capabilities | None:
    """What an earlier link in this container found the kernel can do (see :func:`remove_link`)."""
    try:
        return Capabilities.from_dict(json.loads(_caps_path(state_path).read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def remove_link(runner: Runner = run, *, state_path: Path | str = DEFAULT_STATE_PATH) -> None:
    """Remove the applied link and its state, keeping what the kernel was found to do.

    For a container kept between cases: the next case applies its link from
    nothing, but need not probe the kernel again (it cannot change while the
    container lives; the probe is a dozen tc commands).
    """
    state_path = Path(state_path)
    with changing(state_path):
        state = read_state(state_path) or {}
        teardown(runner, state.get("dev", DEFAULT_DEV), state.get("ifb", DEFAULT_IFB))
        if state.get("caps"):
            _caps_path(state_path).write_text(json.dumps(state["caps"]), encoding="utf-8")
        state_path.unlink(missing_ok=True)
