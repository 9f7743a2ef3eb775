"""The link model: what one container's link looks like in each direction.

A link description (an experiment's ``link:`` mapping, the ``SOCKLAB_LINK_*``
environment or ``KEY=VALUE`` words) has top-level values that apply to both
directions and optional ``up``/``down`` overrides. It resolves into a
``LinkSpec`` of two immutable ``LinkShape`` values; everything downstream (plans,
state, results) works on resolved shapes only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ..errors import UsageError
from .. import units

FIELDS = ("rate", "delay", "jitter", "loss", "limit")
DIRECTIONS = ("up", "down")
BACKEND_CHOICES = ("auto", "netem", "userspace")

# Description key -> LinkShape attribute, so that error messages use the words
# the user wrote while the model keeps its units in its names.
_ATTR = {
    "rate": "rate_bps",
    "delay": "delay_ms",
    "jitter": "jitter_ms",
    "loss": "loss_pct",
    "limit": "limit_pkts",
}
# Words that clear an optional value (no rate limit, default queue), so that a
# running link's rate can be lifted again with `shape set rate=none`.
_NONE_WORDS = ("none", "off")


@dataclass(frozen=True)
class LinkShape:
    """One direction of a link. Zero / None everywhere means unshaped."""

    rate_bps: int | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    limit_pkts: int | None = None

    def __post_init__(self) -> None:
        if self.rate_bps is not None and (
            isinstance(self.rate_bps, bool) or not isinstance(self.rate_bps, int) or self.rate_bps <= 0
        ):
            raise UsageError(f"rate_bps {self.rate_bps!r} must be a whole number of bits per second above zero")
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UsageError(f"{name} {value!r} must be a number of milliseconds of at least zero")
        if (
            isinstance(self.loss_pct, bool)
            or not isinstance(self.loss_pct, (int, float))
            or not 0 <= self.loss_pct <= 100
        ):
            raise UsageError(f"loss_pct {self.loss_pct!r} must be a percentage from 0 to 100")
        if self.limit_pkts is not None and (
            isinstance(self.limit_pkts, bool) or not isinstance(self.limit_pkts, int) or self.limit_pkts < 1
        ):
            raise UsageError(f"limit_pkts {self.limit_pkts!r} must be a whole number of packets, at least 1")

    @property
    def shaped(self) -> bool:
        """True when this direction needs any qdisc at all."""
        return self.rate_bps is not None or self.needs_netem

    @property
    def needs_netem(self) -> bool:
        """True when this direction asks for something only a delay line can do."""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss_pct > 0

    def netem_wants(self) -> list[str]:
        """The delay-line features asked for, in the user's words ('delay 20ms')."""
        wants = []
        if self.delay_ms > 0:
            wants.append(f"delay {units.format_duration(self.delay_ms / 1000)}")
        if self.jitter_ms > 0:
            wants.append(f"jitter {units.format_duration(self.jitter_ms / 1000)}")
        if self.loss_pct > 0:
            wants.append(f"loss {format_percent(self.loss_pct)}")
        return wants

    def describe(self) -> str:
        """One human-readable phrase: 'rate 10mbit delay 20ms' or 'unshaped'."""
        words = []
        if self.rate_bps is not None:
            words.append(f"rate {units.format_rate(self.rate_bps)}")
        words.extend(self.netem_wants())
        if self.limit_pkts is not None:
            words.append(f"limit {self.limit_pkts}")
        return " ".join(words) if words else "unshaped"

    def to_dict(self) -> dict[str, Any]:
        """The values that are set, JSON-friendly; {} for an unshaped direction."""
        out: dict[str, Any] = {}
        if self.rate_bps is not None:
            out["rate_bps"] = self.rate_bps
        for name in ("delay_ms", "jitter_ms", "loss_pct"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.limit_pkts is not None:
            out["limit_pkts"] = self.limit_pkts
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LinkShape":
        """Inverse of ``to_dict`` (used for the state file)."""
        unknown = set(data) - set(_ATTR.values())
        if unknown:
            raise UsageError(f"unknown link fields {sorted(unknown)}: expected {', '.join(_ATTR.values())}")
        return cls(**dict(data))


@dataclass(frozen=True)
class LinkSpec:
    """Both directions of a container's link: up = egress, down = ingress."""

    up: LinkShape = field(default_factory=LinkShape)
    down: LinkShape = field(default_factory=LinkShape)

    @property
    def shaped(self) -> bool:
        """True when either direction needs a qdisc."""
        return self.up.shaped or self.down.shaped

    @property
    def needs_netem(self) -> bool:
        """True when either direction asks for delay, jitter or loss."""
        return self.up.needs_netem or self.down.needs_netem

    def directions(self) -> Iterator[tuple[str, LinkShape]]:
        """('up', shape), ('down', shape)."""
        yield "up", self.up
        yield "down", self.down

    def round_trip_ms(self) -> float:
        """The configured part of the round trip: both delays plus both jitters."""
        return self.up.delay_ms + self.down.delay_ms + self.up.jitter_ms + self.down.jitter_ms

    def describe(self) -> str:
        """'up rate 10mbit delay 20ms, down unshaped', or 'unshaped'."""
        if not self.shaped:
            return "unshaped"
        return ", ".join(f"{name} {shape.describe()}" for name, shape in self.directions())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{'up': {...}, 'down': {...}} with only the values that are set."""
        return {"up": self.up.to_dict(), "down": self.down.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LinkSpec":
        """Inverse of ``to_dict``."""
        return cls(up=LinkShape.from_dict(data.get("up") or {}), down=LinkShape.from_dict(data.get("down") or {}))


def format_percent(pct: float) -> str:
    """0.1 -> '0.1%' without float noise or exponents (tc reads it back)."""
    text = f"{pct:.6f}".rstrip("0").rstrip(".")
    return f"{text}%"


class LinkValueError(UsageError):
    """A link value or combination the model refuses; ``label`` names where it came from.

    ``reason`` is the sentence without the label, for callers (the experiment
    loader) that name the place their own way (file, line, key); ``candidates``
    are the labels of every value given that takes part, ``label`` first.
    """

    def __init__(self, label: str, reason: str, candidates: tuple[str, ...] = ()):
        super().__init__(f"{label}: {reason}")
        self.label = label
        self.reason = reason
        self.candidates = candidates or (label,)


def parse_value(key: str, value: object) -> Any:
    """One link value (``key`` one of FIELDS) -> the LinkShape attribute's unit.

    ``rate`` and ``limit`` also take ``none``/``off`` (and None): no rate limit,
    the default queue. Raises UsageError saying what is allowed.
    """
    if key in ("rate", "limit") and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if key == "rate":
        return units.parse_rate_bps(value)
    if key in ("delay", "jitter"):
        ms = units.parse_duration_s(value) * 1000
        # tc (and netem) work in whole microseconds; rounding here keeps the
        # recorded spec equal to what the kernel is told.
        return round(ms, 3)
    if key == "loss":
        return units.parse_percent(value)
    return _parse_limit(value)


def format_value(key: str, value: Any) -> str:
    """A parsed link value as the text ``parse_value`` reads back to the same value.

    The one renderer of link values: the ``SOCKLAB_LINK_*`` variables, the
    ``shape set`` words and the experiment as written all use it.
    """
    if value is None:
        return _NONE_WORDS[0]
    if key == "rate":
        return units.format_rate(value)
    if key in ("delay", "jitter"):
        return f"{units.format_number(value)}ms"
    if key == "loss":
        return f"{units.format_number(value)}%"
    return str(value)


def _parse_limit(value: object) -> int:
    allowed = "a whole number of packets, at least 1 (e.g. 1000)"
    if isinstance(value, bool):
        raise UsageError(f"{value!r} is not a queue length: use {allowed}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise UsageError(f"{value!r} is not a queue length: use {allowed}")
    if value < 1:
        raise UsageError(f"{value} is too small: use {allowed}")
    return value


def parse_backend(value: object, label: str) -> str:
    """'auto' | 'netem' | 'userspace' (case-insensitive); anything else is a UsageError."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in BACKEND_CHOICES:
        raise UsageError(f"{label}: {value!r} is not a shaping backend: use {', '.join(BACKEND_CHOICES)}")
    return text


_SEED_ALLOWED = "an integer such as 42, or leave it unset for different draws on every run"


def parse_seed(value: object, label: str) -> int:
    """A delay-line seed: an int or its decimal digits (optionally signed); else a UsageError naming ``label``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # int() alone would also take '1_000' or non-ASCII digits, which no one means as a seed.
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value.strip())
    raise UsageError(f"{label}: {value!r} is not a seed: use {_SEED_ALLOWED}")


@dataclass
class LinkChanges:
    """Parsed but unresolved link values: top-level ones and per-direction ones.

    Values are already in LinkShape units, keyed by LinkShape attribute; a key
    present with None clears that value. ``labels`` name, per (direction, key),
    where each value came from, for error messages.
    """

    top: dict[str, Any] = field(default_factory=dict)
    per_direction: dict[str, dict[str, Any]] = field(default_factory=lambda: {d: {} for d in DIRECTIONS})
    labels: dict[tuple[str, str], str] = field(default_factory=dict)

    def put(self, direction: str | None, key: str, value: object, label: str) -> None:
        """Parse and record one value; ``direction`` None means both directions."""
        try:
            parsed = parse_value(key, value)
        except UsageError as exc:
            raise LinkValueError(label, str(exc)) from None
        self.set(direction, key, parsed, label)

    def set(self, direction: str | None, key: str, parsed: Any, label: str | None = None) -> None:
        """Record one value already in LinkShape units (as ``parse_value`` returns it)."""
        target = self.top if direction is None else self.per_direction[direction]
        target[_ATTR[key]] = parsed
        if label is None:
            return
        for d in DIRECTIONS if direction is None else (direction,):
            # The most specific source names the value in later error messages.
            if direction is not None or (d, key) not in self.labels:
                self.labels[(d, key)] = label

    def items(self) -> Iterator[tuple[str | None, str, Any]]:
        """(direction or None for both, key, value) for every value given, top-level first."""
        for direction, values in ((None, self.top), *((d, self.per_direction[d]) for d in DIRECTIONS)):
            for key in FIELDS:
                if _ATTR[key] in values:
                    yield direction, key, values[_ATTR[key]]

    def overlay(self, other: "LinkChanges") -> "LinkChanges":
        """These changes with ``other``'s on top (other wins at the same level)."""
        merged = LinkChanges()
        merged.top = {**self.top, **other.top}
        merged.per_direction = {d: {**self.per_direction[d], **other.per_direction[d]} for d in DIRECTIONS}
        merged.labels = {**self.labels, **other.labels}
        return merged

    def resolve(self, base: LinkSpec | None = None) -> LinkSpec:
        """Apply to ``base`` (default unshaped): top-level values, then each direction's own.

        A result no link can have raises LinkValueError labelled with the value
        of these changes that makes it so (see ``_blame``).
        """
        base = base or LinkSpec()
        shapes = {}
        for direction in DIRECTIONS:
            values = {**vars(getattr(base, direction)), **self.top, **self.per_direction[direction]}
            try:
                shape = LinkShape(**values)
            except UsageError as exc:  # only reachable with values set() was given unparsed
                raise LinkValueError(f"{direction} link", str(exc)) from None
            self._check(direction, shape)
            shapes[direction] = shape
        return LinkSpec(**shapes)

    def _refuse(self, direction: str, keys: tuple[str, ...], reason: str) -> LinkValueError:
        """The error for a rule on ``keys`` broken in ``direction``, blaming the first
        of them these changes set.

        Over a valid base, a result that breaks a rule must involve a value
        these changes set, so a change (a schedule step) is always blamed for
        what it does to the link it changes, never the link's own keys.
        """
        candidates = tuple(dict.fromkeys(self.labels[(direction, key)] for key in keys
                                         if (direction, key) in self.labels))
        return LinkValueError(candidates[0] if candidates else f"{direction} {keys[0]}", reason, candidates)

    def _check(self, direction: str, shape: LinkShape) -> None:
        if shape.jitter_ms > shape.delay_ms:
            raise self._refuse(
                direction, ("jitter", "delay"),
                f"jitter {units.format_duration(shape.jitter_ms / 1000)} is larger than the "
                f"{direction} delay {units.format_duration(shape.delay_ms / 1000)}; a packet cannot leave "
                "before it was sent, so the delay must be at least the jitter"
            )
        if shape.limit_pkts is not None and not shape.shaped:
            raise self._refuse(
                direction, ("limit", "rate", "delay", "jitter", "loss"),
                f"limit {shape.limit_pkts} has no effect on the {direction} direction without "
                "rate, delay, jitter or loss, because a queue only fills behind a rate limit or a delay"
            )


_MAPPING_KEYS = FIELDS + DIRECTIONS


def changes_from_mapping(description: object, where: str = "link") -> LinkChanges:
    """Parse a ``link:`` mapping into unresolved changes (see ``link_spec_from_mapping``)."""
    if not isinstance(description, Mapping):
        raise UsageError(f"{where}: expected a mapping with keys {', '.join(_MAPPING_KEYS)}, got {description!r}")
    changes = LinkChanges()
    for key, value in description.items():
        if key in DIRECTIONS:
            continue
        if key not in FIELDS:
            raise UsageError(f"{where}: unknown key {key!r}; allowed keys are {', '.join(_MAPPING_KEYS)}")
        changes.put(None, key, value, f"{where}.{key}")
    for direction in DIRECTIONS:
        sub = description.get(direction)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            raise UsageError(f"{where}.{direction}: expected a mapping with keys {', '.join(FIELDS)}, got {sub!r}")
        for key, value in sub.items():
            if key not in FIELDS:
                raise UsageError(
                    f"{where}.{direction}: unknown key {key!r}; allowed keys are {', '.join(FIELDS)}"
                )
            changes.put(direction, key, value, f"{where}.{direction}.{key}")
    return changes


def link_spec_from_mapping(description: object, where: str = "link") -> LinkSpec:
    """Resolve a description such as ``{"rate": "10mbit", "delay": "20ms", "up": {"rate": "1mbit"}}``.

    Top-level rate/delay/jitter/loss/limit apply to both directions; ``up`` and
    ``down`` override them for one direction. Unknown keys and bad values raise
    UsageError naming ``where`` and the key.
    """
    return changes_from_mapping(description, where).resolve()


ENV_PREFIX = "SOCKLAB_LINK_"
ENV_BACKEND = ENV_PREFIX + "BACKEND"
ENV_DEV = ENV_PREFIX + "DEV"
ENV_IFB = ENV_PREFIX + "IFB"
ENV_STATE = ENV_PREFIX + "STATE"
ENV_SEED = ENV_PREFIX + "SEED"
_ENV_SETTINGS = (ENV_BACKEND, ENV_DEV, ENV_IFB, ENV_STATE, ENV_SEED)


def _env_name(direction: str | None, key: str) -> str:
    middle = f"{direction.upper()}_" if direction else ""
    return f"{ENV_PREFIX}{middle}{key.upper()}"


def env_from_changes(changes: LinkChanges, backend: str = "auto") -> dict[str, str]:
    """The ``SOCKLAB_LINK_*`` variables that make a container shape ``changes`` (the inverse
    of ``changes_from_env`` and ``backend_from_env``).

    Every link variable is present, empty when unset, so nothing from a base
    compose file or the user's environment leaks into the link.
    """
    env = {_env_name(d, k): "" for d in (None, *DIRECTIONS) for k in FIELDS}
    for direction, key, value in changes.items():
        env[_env_name(direction, key)] = format_value(key, value)
    env[ENV_BACKEND] = parse_backend(backend, "backend")
    return env


def changes_from_env(environ: Mapping[str, str]) -> LinkChanges:
    """Parse ``SOCKLAB_LINK_*`` into unresolved changes (see ``link_spec_from_env``)."""
    known = {_env_name(d, k): (d, k) for d in (None, *DIRECTIONS) for k in FIELDS}
    for name in environ:
        # A misspelt variable would otherwise leave the link silently unshaped.
        if name.startswith(ENV_PREFIX) and name not in known and name not in _ENV_SETTINGS:
            raise UsageError(
                f"{name}: unknown link setting; use {ENV_PREFIX}{{RATE,DELAY,JITTER,LOSS,LIMIT}}, "
                f"{ENV_PREFIX}UP_* or {ENV_PREFIX}DOWN_* for one direction, or {', '.join(_ENV_SETTINGS)}"
            )
    changes = LinkChanges()
    for name, (direction, key) in known.items():
        value = environ.get(name, "")
        # Compose passes `${X:-}` through as an empty string: that means unset.
        if value.strip() != "":
            changes.put(direction, key, value, name)
    return changes


def link_spec_from_env(environ: Mapping[str, str]) -> LinkSpec:
    """Resolve ``SOCKLAB_LINK_{RATE,DELAY,JITTER,LOSS,LIMIT}`` and ``SOCKLAB_LINK_{UP,DOWN}_*``.

    Empty values count as unset. Unknown ``SOCKLAB_LINK_*`` names are errors.
    """
    return changes_from_env(environ).resolve()


def backend_from_env(environ: Mapping[str, str]) -> str:
    """``SOCKLAB_LINK_BACKEND`` (auto|netem|userspace), 'auto' when unset or empty."""
    value = environ.get(ENV_BACKEND, "").strip()
    return parse_backend(value, ENV_BACKEND) if value else "auto"


def seed_from_env(environ: Mapping[str, str]) -> int | None:
    """``SOCKLAB_LINK_SEED``: the delay line's seed, or None (unseeded) when unset or empty."""
    value = environ.get(ENV_SEED, "").strip()
    return parse_seed(value, ENV_SEED) if value else None


def assignments_from_changes(changes: LinkChanges, backend: str | None = None) -> list[str]:
    """``shape set`` words for ``changes`` (the inverse of ``changes_from_assignments``)."""
    words = [f"{direction}.{key}={format_value(key, value)}" if direction else f"{key}={format_value(key, value)}"
             for direction, key, value in changes.items()]
    if backend is not None:
        words.append(f"backend={parse_backend(backend, 'backend')}")
    return words


def changes_from_assignments(words: list[str]) -> tuple[LinkChanges, str | None]:
    """``['rate=10mbit', 'up.delay=20ms', 'backend=netem']`` -> (changes, backend or None)."""
    changes = LinkChanges()
    backend = None
    allowed = f"{', '.join(FIELDS)}, up.KEY, down.KEY or backend"
    for word in words:
        key, sep, value = word.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{word!r} is not KEY=VALUE (e.g. rate=10mbit, up.delay=20ms)")
        if key == "backend":
            backend = parse_backend(value, key)
            continue
        direction, dot, name = key.rpartition(".")
        if (dot and direction not in DIRECTIONS) or name not in FIELDS:
            raise UsageError(f"{key}: unknown link key; use {allowed}")
        changes.put(direction or None, name, value, key)
    return changes, backend
