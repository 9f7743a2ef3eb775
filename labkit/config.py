"""Experiment files (`configs/*.yaml`): load, validate, resolve into typed objects.

The YAML is composed into nodes (PyYAML's SafeLoader, so no Python objects can
be constructed) and walked by hand, which keeps each value's line so that every
error names the file, the line and the key, and says what is allowed::

    configs/x.yaml:12: clients[0].link.rate: '10mbps' is not a rate: use a number with bit, kbit, mbit or gbit (e.g. 10mbit)

The walk yields a :class:`RawConfig` (the data as written, frozen, plus lines);
:func:`build_experiment` validates it into an :class:`Experiment` whose values are
parsed into numbers with their unit in the field name (``timeout_s``,
``rate_bps``, ``delay_ms``, ``loss_pct``, ``recv_size_bytes``). Units are parsed by
``socklab.units`` only.

Settings are addressed by dotted keys in the matrix, ``expect.when`` and
``--set``: ``timeout``, ``server.mode``, ``server.link.rate``,
``clients.NAME.mode``, ``clients.NAME.workload.bytes``,
``clients.NAME.link.up.rate`` — a client group by its name, not its position.

Defaults not fixed by SPEC.md are chosen here: ``timeout`` 300s; a client's
``workload`` is bulk (the tutorial) and its ``socket_timeout`` (the timeout of
the ``timeout`` mode's ``settimeout()``, a key this module adds) 1s; the slow
workload trickles 100 bytes per second (``rate``, a size per second such as
``100``, ``1KiB`` or ``1KiB/s``) and holds the connection 10s.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import yaml

from socklab import units
from socklab.errors import UsageError

from . import expr, stats

SERVER_MODES = ("blocking", "threaded", "select", "poll", "epoll", "asyncio")
CLIENT_MODES = ("blocking", "nonblocking", "nonblocking-spin", "select", "poll",
                "epoll", "asyncio", "timeout")
WORKLOAD_KINDS = ("bulk", "echo", "connect", "slow")
LINK_BACKENDS = ("auto", "netem", "userspace")

KeyPath = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Anchors and aliases can make a small file expand into a huge tree ("billion
# laughs"); no real experiment comes near this many values.
_MAX_NODES = 100_000
_EXPERIMENT_NAME = re.compile(r"[a-z0-9-]+")
# Group names appear in checks as `NAME.field`, so they must be identifiers.
_GROUP_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED_GROUP_NAMES = ("server", "case")
_MISSING = object()


class ConfigError(UsageError):
    """A bad experiment file or override; the message is the sentence to show.

    ``filename``, ``line`` (None when the value came from ``--set``) and ``key``
    (the dotted key as shown) are kept for callers and tests.
    """

    def __init__(self, message: str, *, filename: str | None = None,
                 line: int | None = None, key: str | None = None):
        super().__init__(message)
        self.filename = filename
        self.line = line
        self.key = key


# --------------------------------------------------------------------------- raw

@dataclass(frozen=True)
class Origin:
    """Where a value that was not written at its place came from (matrix, --set)."""

    line: int | None
    label: str


@dataclass(frozen=True)
class RawConfig:
    """An experiment file as written: frozen YAML data and where each value is.

    ``tree`` holds mappings as read-only mappings and lists as tuples. ``lines``
    maps a key path (e.g. ``("clients", 0, "link", "rate")``) to its 1-based
    line; ``origins`` marks values substituted by the matrix or ``--set``.
    """

    filename: str
    tree: Mapping[str, Any]
    lines: Mapping[KeyPath, int]
    origins: Mapping[KeyPath, Origin] = field(default_factory=lambda: MappingProxyType({}))


def read_raw(path: str | Path) -> RawConfig:
    """Read and compose an experiment file; YAML errors become ConfigError."""
    filename = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{filename}: there is no such file", filename=filename) from None
    except IsADirectoryError:
        raise ConfigError(f"{filename}: is a directory, not an experiment file", filename=filename) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{filename}: is not UTF-8 text", filename=filename) from None
    except OSError as exc:
        raise ConfigError(f"{filename}: cannot be read ({exc.strerror})", filename=filename) from None
    return parse_raw(text, filename)


def parse_raw(text: str, filename: str) -> RawConfig:
    """Compose YAML ``text`` into a RawConfig; ``filename`` is used in messages."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{filename}: the file is empty: an experiment needs at least "
                              "name and clients", filename=filename)
        lines: dict[KeyPath, int] = {(): node.start_mark.line + 1}
        tree = _YamlWalk(loader, filename, lines).walk(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        where = f"{filename}:{line}" if line else filename
        raise ConfigError(f"{where}: this is not valid YAML: {exc.problem or exc.context}",
                          filename=filename, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: this is not valid YAML: {exc}", filename=filename) from None
    finally:
        loader.dispose()
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{filename}:{lines[()]}: the file must be a mapping of keys "
                          f"(name, clients, ...), not {_kind_of(tree)}", filename=filename, line=lines[()])
    return RawConfig(filename, tree, MappingProxyType(lines))


class _YamlWalk:
    """Turns composed YAML nodes into frozen data, recording every key's line."""

    def __init__(self, loader: yaml.SafeLoader, filename: str, lines: dict[KeyPath, int]):
        self.loader = loader
        self.filename = filename
        self.lines = lines
        self.active: set[int] = set()
        self.count = 0

    def fail(self, node: yaml.Node, path: KeyPath, message: str) -> NoReturn:
        line = node.start_mark.line + 1
        key = _render_path(path)
        prefix = f"{key}: " if key else ""
        raise ConfigError(f"{self.filename}:{line}: {prefix}{message}",
                          filename=self.filename, line=line, key=key)

    def walk(self, node: yaml.Node, path: KeyPath) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            self.fail(node, path, f"the file expands to more than {_MAX_NODES} values: "
                                  "check its anchors and aliases")
        if id(node) in self.active:
            self.fail(node, path, "an alias refers to a value that contains it")
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ_TAG:
                    self.fail(node, path, f"the tag {node.tag} is not allowed here: write a plain list")
                items = []
                for index, item in enumerate(node.value):
                    self.lines[path + (index,)] = item.start_mark.line + 1
                    items.append(self.walk(item, path + (index,)))
                return tuple(items)
            if node.tag != _MAP_TAG:
                self.fail(node, path, f"the tag {node.tag} is not allowed here: write a plain mapping")
            written: set[str] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.fail(key_node, path, "a key must be plain text, not a list or mapping")
                if key_node.tag == _MERGE_TAG:
                    continue
                if key_node.value in written:
                    self.fail(key_node, path + (key_node.value,), "this key is given twice in the same mapping")
                written.add(key_node.value)
            # Resolves `<<:` merge keys: merged pairs come first, so keys written
            # here override them, as YAML intends.
            self.loader.flatten_mapping(node)
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                self.lines[child] = key_node.start_mark.line + 1
                result[key_node.value] = self.walk(value_node, child)
            return MappingProxyType(result)
        finally:
            self.active.discard(id(node))


# ------------------------------------------------------------------ value types

@dataclass(frozen=True)
class LinkDirection:
    """Shaping of one direction; None leaves a parameter unset (not shaped)."""

    rate_bps: int | None = None
    delay_ms: float | None = None
    jitter_ms: float | None = None
    loss_pct: float | None = None
    limit_packets: int | None = None

    def merged_over(self, base: LinkDirection) -> LinkDirection:
        """This direction's values where set, ``base``'s elsewhere."""
        return LinkDirection(**{
            f.attr: getattr(base, f.attr) if getattr(self, f.attr) is None else getattr(self, f.attr)
            for f in _LINK_DIRECTION_FIELDS})

    @property
    def is_shaped(self) -> bool:
        """True when any parameter is set."""
        return any(getattr(self, f.attr) is not None for f in _LINK_DIRECTION_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """The set parameters as config keys and unit strings."""
        return _render_fields(self, _LINK_DIRECTION_FIELDS, skip_none=True)


@dataclass(frozen=True)
class LinkConfig:
    """A link: parameters for both directions, per-direction overrides, backend.

    In a schedule step the same object describes a change: parameters left None
    keep their current value, and ``backend`` is None (it cannot change).
    """

    rate_bps: int | None = None
    delay_ms: float | None = None
    jitter_ms: float | None = None
    loss_pct: float | None = None
    limit_packets: int | None = None
    up: LinkDirection = LinkDirection()
    down: LinkDirection = LinkDirection()
    backend: str | None = "auto"

    @property
    def both(self) -> LinkDirection:
        """The parameters given for both directions."""
        return LinkDirection(**{f.attr: getattr(self, f.attr) for f in _LINK_DIRECTION_FIELDS})

    @property
    def effective_up(self) -> LinkDirection:
        """Client → server shaping: ``up`` over the shared parameters."""
        return self.up.merged_over(self.both)

    @property
    def effective_down(self) -> LinkDirection:
        """Server → client shaping: ``down`` over the shared parameters."""
        return self.down.merged_over(self.both)

    @property
    def is_shaped(self) -> bool:
        """True when either direction has any parameter set."""
        return self.effective_up.is_shaped or self.effective_down.is_shaped

    def to_dict(self) -> dict[str, Any]:
        """The link as config keys and unit strings (unset parameters left out)."""
        result = self.both.to_dict()
        for key in ("up", "down"):
            direction = getattr(self, key)
            if direction.is_shaped:
                result[key] = direction.to_dict()
        if self.backend is not None:
            result["backend"] = self.backend
        return result


@dataclass(frozen=True)
class Workload:
    """What a client group does. Only the fields of ``kind`` are set; the others
    are None. For bulk, ``chunk_bytes`` None means one ``send()`` of everything;
    for connect, None ``cancel_after_s``/``connect_timeout_s`` mean never."""

    kind: str
    bytes: int | None = None
    pattern: str | None = None
    chunk_bytes: int | None = None
    requests: int | None = None
    size_bytes: int | None = None
    think_s: float | None = None
    attempts: int | None = None
    cancel_after_s: float | None = None
    connect_timeout_s: float | None = None
    rate_bytes_per_s: int | None = None
    hold_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The workload as config keys: ``kind`` and every key of that kind."""
        return {"kind": self.kind, **_render_fields(self, _WORKLOAD_FIELDS[self.kind])}


@dataclass(frozen=True)
class ServerConfig:
    """The server: I/O model, ``recv()`` size and its own access link."""

    mode: str
    recv_size_bytes: int
    link: LinkConfig
    rcvbuf_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The server as config keys."""
        return {**_render_optional_fields(self, _SERVER_FIELDS), "link": self.link.to_dict()}


@dataclass(frozen=True)
class ClientGroup:
    """One client group: ``replicas`` containers × ``connections`` each."""

    name: str
    replicas: int
    connections: int
    mode: str
    socket_timeout_s: float
    workload: Workload
    link: LinkConfig
    sndbuf_bytes: int | None = None
    rcvbuf_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The group as config keys."""
        return {**_render_optional_fields(self, _CLIENT_FIELDS), "workload": self.workload.to_dict(),
                "link": self.link.to_dict()}


@dataclass(frozen=True)
class ScheduleStep:
    """A link change ``at_s`` seconds into a case, on ``target``
    ("server" or "clients.NAME")."""

    at_s: float
    target: str
    link: LinkConfig

    @property
    def group(self) -> str | None:
        """The client group's name, or None when the target is the server."""
        return self.target.split(".", 1)[1] if self.target.startswith("clients.") else None

    def to_dict(self) -> dict[str, Any]:
        """The step as config keys."""
        return {"at": _render_seconds(self.at_s), "target": self.target, "link": self.link.to_dict()}


@dataclass(frozen=True)
class Condition:
    """The dotted setting ``key`` has one of ``values`` (parsed); a YAML list in
    ``when`` gives several, a single value one."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Expectation:
    """A named check, evaluated on the cases whose settings match all of ``when``."""

    name: str
    check: expr.Check
    when: tuple[Condition, ...] = ()

    def applies_to(self, experiment: Experiment) -> bool:
        """True when every ``when`` condition holds for this (case's) experiment."""
        return all(experiment.setting(c.key) in c.values for c in self.when)

    def to_dict(self, experiment: Experiment) -> dict[str, Any]:
        """The expectation as config keys (``experiment`` renders ``when`` values)."""
        result: dict[str, Any] = {"name": self.name}
        if self.when:
            result["when"] = {}
            for c in self.when:
                rendered = [experiment.setting_field(c.key).render(v) for v in c.values]
                result["when"][c.key] = rendered[0] if len(rendered) == 1 else rendered
        result["check"] = self.check.text
        return result


@dataclass(frozen=True)
class MatrixAxis:
    """One swept setting: its dotted key as written, its tree path, its values
    as written (scalars)."""

    key: str
    path: KeyPath
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Experiment:
    """A validated experiment with every default filled in.

    ``source`` is the RawConfig it was built from, kept so that cases can be
    resolved by substituting matrix values where they belong.
    """

    name: str
    description: str
    repeat: int
    timeout_s: float
    server: ServerConfig
    clients: tuple[ClientGroup, ...]
    matrix: tuple[MatrixAxis, ...] = ()
    schedule: tuple[ScheduleStep, ...] = ()
    expect: tuple[Expectation, ...] = ()
    source: RawConfig | None = field(default=None, repr=False, compare=False)

    def group(self, name: str) -> ClientGroup:
        """The client group called ``name`` (KeyError if there is none)."""
        for group in self.clients:
            if group.name == name:
                return group
        raise KeyError(name)

    def setting(self, key: str) -> Any:
        """The resolved value of a dotted setting key (``clients.sender.link.rate``
        -> its ``rate_bps``); None for a workload key of another kind."""
        owner, spec = self._setting_owner(key)
        return getattr(owner, spec.attr)

    def setting_field(self, key: str) -> _Field:
        """The field description behind a dotted setting key."""
        return self._setting_owner(key)[1]

    def _setting_owner(self, key: str) -> tuple[Any, _Field]:
        parts = key.split(".")
        if parts[0] == "clients":
            obj: Any = self.group(parts[1])
            rest = parts[2:]
        elif parts[0] == "server":
            obj, rest = self.server, parts[1:]
        else:
            obj, rest = self, parts
        while len(rest) > 1:
            obj, rest = getattr(obj, rest[0]), rest[1:]
        fields = _ALL_WORKLOAD_FIELDS if isinstance(obj, Workload) else _FIELDS_OF[type(obj)]
        spec = next(f for f in fields if f.key == rest[0])
        return obj, spec

    def to_dict(self) -> dict[str, Any]:
        """The resolved experiment as plain data in the config format (for
        ``experiment.yaml``); loading it again gives an equal Experiment."""
        result = _render_fields(self, _TOP_FIELDS)
        result["server"] = self.server.to_dict()
        result["clients"] = [group.to_dict() for group in self.clients]
        if self.matrix:
            result["matrix"] = {axis.key: [_thaw(v) for v in axis.values] for axis in self.matrix}
        if self.schedule:
            result["schedule"] = [step.to_dict() for step in self.schedule]
        if self.expect:
            result["expect"] = [e.to_dict(self) for e in self.expect]
        return result


# ---------------------------------------------------------------- field parsers

def _whole(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{value!r} is not a whole number: use an integer of at least {minimum}")
        if value < minimum:
            raise UsageError(f"{value} is too small: use an integer of at least {minimum}")
        return value
    return parse


def _choice(what: str, options: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in options or not isinstance(value, str):
            raise UsageError(f"{value!r} is not {what}: use one of {', '.join(options)}")
        return value
    return parse


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{value!r} is not text: put it in quotes")
    return value


def _nonempty_text(value: object) -> str:
    if _text(value) == "":
        raise UsageError("the text is empty: give at least one character")
    return value


def _experiment_name(value: object) -> str:
    if not isinstance(value, str) or not _EXPERIMENT_NAME.fullmatch(value):
        raise UsageError(f"{value!r} is not a valid experiment name: use lower-case letters, "
                         "digits and - (e.g. seed-demo)")
    return value


def _group_name(value: object) -> str:
    if (not isinstance(value, str) or not _GROUP_NAME.fullmatch(value)
            or keyword.iskeyword(value) or value in _RESERVED_GROUP_NAMES):
        raise UsageError(f"{value!r} is not a valid client group name: start with a lower-case "
                         "letter and use lower-case letters, digits and _ (it is used in checks "
                         "as NAME.field; server and case are taken)")
    return value


def _size(value: object) -> int:
    size = units.parse_size_bytes(value)
    if size < 1:
        raise UsageError(f"{value!r} is too small: use at least 1 byte")
    return size


def _chunk(value: object) -> int | None:
    return None if value == "all" else _size(value)


def _bytes_per_s(value: object) -> int:
    if isinstance(value, str) and value.strip().endswith("/s"):
        value = value.strip()[:-2]
    return _size(value)


def _seconds(value: object) -> float:
    # Rounded to the microsecond so that rendering and re-reading is exact.
    return round(units.parse_duration_s(value), 6)


def _positive_seconds(value: object) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise UsageError(f"{value!r} is too short: use a duration above zero (e.g. 1s)")
    return seconds


def _milliseconds(value: object) -> float:
    # tc's time resolution is the microsecond.
    return round(units.parse_duration_s(value) * 1000, 3)


def _optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def parse_optional(value: object) -> Any:
        return None if value is None or value == "none" else parse(value)
    return parse_optional


def _plain_number(number: float) -> str:
    # Decimal(repr()) gives the shortest exact digits without an exponent, which
    # units' parsers do not accept.
    text = format(Decimal(repr(float(number))), "f")
    return text[:-2] if text.endswith(".0") else text


def _render_seconds(seconds: float) -> str:
    return f"{_plain_number(seconds)}s"


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Field:
    """A config key: its attribute (unit in the name), parser, default, renderer."""

    key: str
    attr: str
    parse: Callable[[object], Any]
    default: Any = None
    render: Callable[[Any], Any] = _identity


_REQUIRED = object()

_TOP_FIELDS = (
    _Field("name", "name", _experiment_name, _REQUIRED),
    _Field("description", "description", _text, ""),
    _Field("repeat", "repeat", _whole(1), 1),
    _Field("timeout", "timeout_s", _positive_seconds, 300.0, _render_seconds),
)
_SERVER_FIELDS = (
    _Field("mode", "mode", _choice("a server mode", SERVER_MODES), "blocking"),
    _Field("recv_size", "recv_size_bytes", _size, 1024),
    # SO_RCVBUF of every accepted connection: the receive window a sender meets.
    _Field("rcvbuf", "rcvbuf_bytes", _optional(_size), None),
)
_CLIENT_FIELDS = (
    _Field("name", "name", _group_name, _REQUIRED),
    _Field("replicas", "replicas", _whole(1), 1),
    _Field("connections", "connections", _whole(1), 1),
    _Field("mode", "mode", _choice("a client mode", CLIENT_MODES), "blocking"),
    _Field("socket_timeout", "socket_timeout_s", _positive_seconds, 1.0, _render_seconds),
    # SO_SNDBUF sets what one non-blocking send() can take; SO_RCVBUF the window.
    _Field("sndbuf", "sndbuf_bytes", _optional(_size), None),
    _Field("rcvbuf", "rcvbuf_bytes", _optional(_size), None),
)
_LINK_DIRECTION_FIELDS = (
    _Field("rate", "rate_bps", units.parse_rate_bps, None, units.format_rate),
    _Field("delay", "delay_ms", _milliseconds, None, lambda ms: f"{_plain_number(ms)}ms"),
    _Field("jitter", "jitter_ms", _milliseconds, None, lambda ms: f"{_plain_number(ms)}ms"),
    _Field("loss", "loss_pct", units.parse_percent, None, lambda pct: f"{_plain_number(pct)}%"),
    _Field("limit", "limit_packets", _whole(1), None),
)
_BACKEND_FIELD = _Field("backend", "backend", _choice("a shaping backend", LINK_BACKENDS), "auto")
_WORKLOAD_KIND_FIELD = _Field("kind", "kind", _choice("a workload kind", WORKLOAD_KINDS), "bulk")
_WORKLOAD_FIELDS = {
    "bulk": (
        _Field("bytes", "bytes", _size, 136314880),
        _Field("pattern", "pattern", _nonempty_text, "Hello Python\n"),
        _Field("chunk", "chunk_bytes", _chunk, None, lambda b: "all" if b is None else b),
    ),
    "echo": (
        _Field("requests", "requests", _whole(1), 1000),
        _Field("size", "size_bytes", _size, 1024),
        _Field("think", "think_s", _seconds, 0.0, _render_seconds),
    ),
    "connect": (
        _Field("attempts", "attempts", _whole(1), 5),
        _Field("cancel_after", "cancel_after_s", _optional(_positive_seconds), None,
               lambda s: None if s is None else _render_seconds(s)),
        _Field("connect_timeout", "connect_timeout_s", _optional(_positive_seconds), None,
               lambda s: None if s is None else _render_seconds(s)),
    ),
    "slow": (
        _Field("rate", "rate_bytes_per_s", _bytes_per_s, 100),
        _Field("hold", "hold_s", _positive_seconds, 10.0, _render_seconds),
    ),
}
_ALL_WORKLOAD_FIELDS = (_WORKLOAD_KIND_FIELD, *(f for fs in _WORKLOAD_FIELDS.values() for f in fs))
_FIELDS_OF: dict[type, tuple[_Field, ...]] = {
    Experiment: _TOP_FIELDS,
    ServerConfig: _SERVER_FIELDS,
    ClientGroup: _CLIENT_FIELDS,
    LinkConfig: (*_LINK_DIRECTION_FIELDS, _BACKEND_FIELD),
    LinkDirection: _LINK_DIRECTION_FIELDS,
}
_LINK_KEYS = (*(f.key for f in _LINK_DIRECTION_FIELDS), "up", "down", "backend")
_TOP_KEYS = ("name", "description", "repeat", "timeout", "server", "clients", "matrix",
             "schedule", "expect")


def _render_optional_fields(obj: Any, fields: Iterable[_Field]) -> dict[str, Any]:
    """Fields as config keys, leaving out the optional ones (default None) that are unset."""
    return {key: value for key, value in _render_fields(obj, fields).items()
            if not (value is None and next(f for f in fields if f.key == key).default is None)}


def _render_fields(obj: Any, fields: Iterable[_Field], skip_none: bool = False) -> dict[str, Any]:
    result = {}
    for spec in fields:
        value = getattr(obj, spec.attr)
        if value is None and skip_none:
            continue
        result[spec.key] = spec.render(value)
    return result


# ---------------------------------------------------------------- locations

def _render_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _locate(raw: RawConfig, path: KeyPath) -> tuple[int | None, str]:
    """(line, key as shown) of ``path``, following matrix/--set substitutions."""
    for cut in range(len(path), -1, -1):
        origin = raw.origins.get(path[:cut])
        if origin is not None:
            rest = _render_path(path[cut:])
            return origin.line, origin.label + (f".{rest}" if rest and not rest.startswith("[") else rest)
    for cut in range(len(path), -1, -1):
        if path[:cut] in raw.lines:
            return raw.lines[path[:cut]], _render_path(path)
    return None, _render_path(path)


def _fail(raw: RawConfig, path: KeyPath, message: str) -> NoReturn:
    line, key = _locate(raw, path)
    where = f"{raw.filename}:{line}" if line is not None else raw.filename
    text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
    raise ConfigError(text, filename=raw.filename, line=line, key=key)


def _kind_of(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, tuple):
        return "a list"
    if value is None:
        return "empty (null)"
    return repr(value)


# ---------------------------------------------------------------- tree edits

def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _set_in(raw: RawConfig, tree: Any, path: KeyPath, value: Any, done: KeyPath = ()) -> Any:
    """A copy of ``tree`` with ``path`` set to ``value``, creating missing mappings."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(tree)
        items[head] = _set_in(raw, items[head], rest, value, done + (head,))
        return tuple(items)
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        _fail(raw, done, f"is {_kind_of(tree)}, not a mapping, so {_render_path(path)} cannot be set in it")
    updated = dict(tree)
    updated[head] = _set_in(raw, tree.get(head), rest, value, done + (head,))
    return MappingProxyType(updated)


def _without(tree: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return MappingProxyType({k: v for k, v in tree.items() if k != key})


def _group_index(tree: Mapping[str, Any], name: str, fail: Callable[[str], NoReturn]) -> int:
    clients = tree.get("clients")
    names = []
    if isinstance(clients, tuple):
        for index, group in enumerate(clients):
            if isinstance(group, Mapping):
                if group.get("name") == name:
                    return index
                names.append(str(group.get("name")))
    fail(f"there is no client group named {name!r}: the groups are {', '.join(names) or 'none'}")


def _setting_path(tree: Mapping[str, Any], key: str, top_keys: Sequence[str],
                  fail: Callable[[str], NoReturn]) -> tuple[KeyPath, _Field]:
    """Resolve a dotted setting key to its tree path and field, or ``fail``.

    ``top_keys`` are the top-level settings this use allows (the matrix and
    `when` can address ``timeout``; ``--set`` also name, description, repeat).
    """
    parts = key.split(".")
    if parts[0] == "clients" and len(parts) >= 3:
        prefix: KeyPath = ("clients", _group_index(tree, parts[1], fail))
        rest = parts[2:]
        own = [f for f in _CLIENT_FIELDS if f.key != "name"]
        spec = None
        if rest[0] == "workload" and len(rest) == 2:
            spec = next((f for f in _ALL_WORKLOAD_FIELDS if f.key == rest[1]), None)
        elif rest[0] == "link":
            spec = _link_setting(rest[1:])
        elif len(rest) == 1:
            spec = next((f for f in own if f.key == rest[0]), None)
        if spec is None:
            fail(f"is not a setting of a client group: use clients.NAME. followed by "
                 f"{', '.join(f.key for f in own)}, workload.KEY or link.KEY")
        return prefix + tuple(rest), spec
    if parts[0] == "server" and len(parts) >= 2:
        if parts[1] == "link":
            spec = _link_setting(parts[2:])
        else:
            spec = next((f for f in _SERVER_FIELDS if f.key == parts[1]), None) if len(parts) == 2 else None
        if spec is None:
            fail("is not a setting of the server: use server.mode, server.recv_size or server.link.KEY")
        return tuple(parts), spec
    if len(parts) == 1 and parts[0] in top_keys:
        return (parts[0],), next(f for f in _TOP_FIELDS if f.key == parts[0])
    fail(f"does not name a setting: use {', '.join(top_keys)}, server.KEY or clients.NAME.KEY "
         "(e.g. clients.sender.link.rate)")


def _link_setting(parts: Sequence[str]) -> _Field | None:
    if len(parts) == 1:
        return next((f for f in (*_LINK_DIRECTION_FIELDS, _BACKEND_FIELD) if f.key == parts[0]), None)
    if len(parts) == 2 and parts[0] in ("up", "down"):
        return next((f for f in _LINK_DIRECTION_FIELDS if f.key == parts[1]), None)
    return None


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


# ---------------------------------------------------------------- overrides

def apply_overrides(raw: RawConfig, overrides: Iterable[str]) -> RawConfig:
    """Apply ``--set KEY=VALUE`` overrides to a RawConfig, returning a new one.

    KEY is a dotted setting key (``repeat``, ``timeout``, ``server.mode``,
    ``clients.sender.link.rate``: a group by its name, as in the matrix). VALUE is
    read as a YAML scalar (``3`` is a number, ``10mbit`` text, ``null`` none);
    anything that is not a single YAML value is taken as plain text. A key the
    matrix sweeps is narrowed to that one value, so case ids keep their form.
    Values are validated later, with the rest, and errors name the ``--set``.
    """
    tree = raw.tree
    origins = dict(raw.origins)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {override}: use KEY=VALUE (e.g. clients.sender.mode=nonblocking)",
                              filename=raw.filename, key=override)
        value = _scalar_from_text(text)
        label = f"--set {key}"
        matrix = tree.get("matrix")
        if isinstance(matrix, Mapping) and key in matrix:
            target: KeyPath = ("matrix", key)
            value = (value,)
            origins[target + (0,)] = Origin(None, label)
        else:
            def fail(message: str, label: str = label) -> NoReturn:
                raise ConfigError(f"{raw.filename}: {label}: {message}", filename=raw.filename, key=label)
            target, _ = _setting_path(tree, key, ("name", "description", "repeat", "timeout"), fail)
            origins[target] = Origin(None, label)
        tree = _set_in(raw, tree, target, value)
    return RawConfig(raw.filename, tree, raw.lines, MappingProxyType(origins))


def _scalar_from_text(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if _is_scalar(value) else text


# ---------------------------------------------------------------- building

def load_experiment(path: str | Path, overrides: Iterable[str] = ()) -> Experiment:
    """Read, override (``--set``) and validate an experiment file."""
    return build_experiment(apply_overrides(read_raw(path), overrides))


def load_experiment_text(text: str, filename: str = "<text>", overrides: Iterable[str] = ()) -> Experiment:
    """As :func:`load_experiment`, from text; ``filename`` is used in messages."""
    return build_experiment(apply_overrides(parse_raw(text, filename), overrides))


def build_experiment(raw: RawConfig) -> Experiment:
    """Validate a RawConfig into an Experiment; raise ConfigError at the first problem.

    Every matrix value is validated by substituting it where its key points and
    validating the result, exactly as if it had been written there.
    """
    experiment = _Builder(raw).experiment()
    for axis in experiment.matrix:
        for index in range(len(axis.values)):
            build_experiment(substitute(experiment, [(axis, index)]))
    return experiment


def substitute(experiment: Experiment, choices: Sequence[tuple[MatrixAxis, int]]) -> RawConfig:
    """The experiment's RawConfig without its matrix and with each axis set to
    its chosen value (by index); errors in the result point at the matrix."""
    raw = experiment.source
    assert raw is not None, "an Experiment built by build_experiment keeps its source"
    tree = _without(raw.tree, "matrix")
    origins = dict(raw.origins)
    for axis, index in choices:
        line, label = _locate(raw, ("matrix", axis.key, index))
        tree = _set_in(raw, tree, axis.path, axis.values[index])
        origins[axis.path] = Origin(line, label)
    return RawConfig(raw.filename, tree, raw.lines, MappingProxyType(origins))


class _Builder:
    """Validates one RawConfig; every failure names its location."""

    def __init__(self, raw: RawConfig):
        self.raw = raw

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        _fail(self.raw, path, message)

    def failer(self, path: KeyPath) -> Callable[[str], NoReturn]:
        """``fail`` bound to ``path``, for helpers that only know the message."""
        def fail(message: str) -> NoReturn:
            _fail(self.raw, path, message)
        return fail

    def get(self, path: KeyPath) -> Any:
        node: Any = self.raw.tree
        for part in path:
            if isinstance(part, int):
                node = node[part]
            elif isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                return _MISSING
        return node

    def mapping(self, path: KeyPath, allowed: Sequence[str], what: str, null_ok: bool = True) -> Mapping[str, Any]:
        value = self.get(path)
        if value is _MISSING or (value is None and null_ok):
            return MappingProxyType({})
        if not isinstance(value, Mapping):
            self.fail(path, f"is {_kind_of(value)}, but {what} is a mapping with keys {', '.join(allowed)}")
        for key in value:
            if key not in allowed:
                self.fail(path + (key,), f"unknown key for {what}: use {', '.join(allowed)}")
        return value

    def sequence(self, path: KeyPath, what: str) -> tuple[Any, ...]:
        value = self.get(path)
        if value is _MISSING or value is None:
            return ()
        if not isinstance(value, tuple):
            self.fail(path, f"is {_kind_of(value)}, but {what} is a list (one '- ' item per entry)")
        return value

    def value(self, path: KeyPath, spec: _Field) -> Any:
        value = self.get(path)
        if value is _MISSING:
            if spec.default is _REQUIRED:
                self.fail(path[:-1], f"{spec.key} is missing: it is required")
            return spec.default
        try:
            return spec.parse(value)
        except UsageError as exc:
            self.fail(path, str(exc))

    def fields(self, path: KeyPath, fields: Iterable[_Field]) -> dict[str, Any]:
        return {spec.attr: self.value(path + (spec.key,), spec) for spec in fields}

    def experiment(self) -> Experiment:
        self.mapping((), _TOP_KEYS, "an experiment")
        top = self.fields((), _TOP_FIELDS)
        server = self.server(("server",))
        clients = self.clients(("clients",))
        names = [group.name for group in clients]
        schedule = tuple(self.step(("schedule", i), names, top["timeout_s"])
                         for i in range(len(self.sequence(("schedule",), "the schedule"))))
        expect = self.expectations(("expect",), names)
        matrix = self.matrix(("matrix",))
        return Experiment(server=server, clients=clients, matrix=matrix, schedule=schedule,
                          expect=expect, source=self.raw, **top)

    def server(self, path: KeyPath) -> ServerConfig:
        self.mapping(path, (*(f.key for f in _SERVER_FIELDS), "link"), "the server")
        return ServerConfig(**self.fields(path, _SERVER_FIELDS), link=self.link(path + ("link",)))

    def clients(self, path: KeyPath) -> tuple[ClientGroup, ...]:
        if self.get(path) is _MISSING:
            self.fail((), "clients is missing: give at least one client group (- name: sender ...)")
        items = self.sequence(path, "clients")
        if not items:
            self.fail(path, "is empty: give at least one client group (- name: sender ...)")
        groups: list[ClientGroup] = []
        for index in range(len(items)):
            item = path + (index,)
            self.mapping(item, (*(f.key for f in _CLIENT_FIELDS), "workload", "link"), "a client group",
                         null_ok=False)
            group = ClientGroup(**self.fields(item, _CLIENT_FIELDS), workload=self.workload(item + ("workload",)),
                                link=self.link(item + ("link",)))
            if any(g.name == group.name for g in groups):
                self.fail(item + ("name",), f"{group.name!r} names two client groups: give each group its own name")
            groups.append(group)
        return tuple(groups)

    def workload(self, path: KeyPath) -> Workload:
        value = self.get(path)
        kind = _WORKLOAD_KIND_FIELD.default
        if isinstance(value, Mapping) and "kind" in value:
            kind = self.value(path + ("kind",), _WORKLOAD_KIND_FIELD)
        fields = _WORKLOAD_FIELDS[kind]
        allowed = ("kind", *(f.key for f in fields))
        if isinstance(value, Mapping):
            for key in value:
                other = next((k for k, fs in _WORKLOAD_FIELDS.items() if key not in allowed
                              and any(f.key == key for f in fs)), None)
                if other:
                    self.fail(path + (key,), f"is a key of the {other} workload, not of {kind}: "
                                             f"use {', '.join(allowed)} (or kind: {other})")
        self.mapping(path, allowed, f"the {kind} workload")
        return Workload(kind=kind, **self.fields(path, fields))

    def link(self, path: KeyPath, in_schedule: bool = False) -> LinkConfig:
        allowed = tuple(k for k in _LINK_KEYS if not (in_schedule and k == "backend"))
        what = "a link change (the backend cannot change while a case runs)" if in_schedule else "a link"
        self.mapping(path, allowed, what)
        directions = {}
        for key in ("up", "down"):
            self.mapping(path + (key,), tuple(f.key for f in _LINK_DIRECTION_FIELDS), f"a link's {key} direction")
            directions[key] = LinkDirection(**self.fields(path + (key,), _LINK_DIRECTION_FIELDS))
        backend = None if in_schedule else self.value(path + ("backend",), _BACKEND_FIELD)
        return LinkConfig(**self.fields(path, _LINK_DIRECTION_FIELDS), **directions, backend=backend)

    def step(self, path: KeyPath, groups: Sequence[str], timeout_s: float) -> ScheduleStep:
        self.mapping(path, ("at", "target", "link"), "a schedule step", null_ok=False)
        for key in ("at", "target", "link"):
            if self.get(path + (key,)) is _MISSING:
                self.fail(path, f"{key} is missing: a schedule step needs at, target and link")
        at_s = self.value(path + ("at",), _Field("at", "at_s", _seconds))
        if at_s >= timeout_s:
            self.fail(path + ("at",), f"{_render_seconds(at_s)} is not before the case timeout "
                                      f"({_render_seconds(timeout_s)}), so the step could never run")
        target = self.get(path + ("target",))
        targets = ["server", *(f"clients.{g}" for g in groups)]
        if target not in targets:
            self.fail(path + ("target",), f"{target!r} is not a client group or the server: "
                                          f"use one of {', '.join(targets)}")
        link = self.link(path + ("link",), in_schedule=True)
        if not link.is_shaped:
            self.fail(path + ("link",), "changes nothing: give at least one of rate, delay, jitter, loss, limit")
        return ScheduleStep(at_s, target, link)

    def expectations(self, path: KeyPath, groups: Sequence[str]) -> tuple[Expectation, ...]:
        result: list[Expectation] = []
        for index in range(len(self.sequence(path, "expect"))):
            item = path + (index,)
            self.mapping(item, ("name", "when", "check"), "an expectation", null_ok=False)
            name = self.value(item + ("name",), _Field("name", "name", _nonempty_text, _REQUIRED))
            if any(e.name == name for e in result):
                self.fail(item + ("name",), f"{name!r} names two expectations: give each its own name")
            text = self.value(item + ("check",), _Field("check", "check", _text, _REQUIRED))
            try:
                check = expr.compile_check(text)
            except expr.ExpressionError as exc:
                self.fail(item + ("check",), str(exc))
            for used in check.names:
                problem = stats.explain_unknown_name(used, groups)
                if problem:
                    self.fail(item + ("check",), problem)
            result.append(Expectation(name, check, self.conditions(item + ("when",))))
        return tuple(result)

    def conditions(self, path: KeyPath) -> tuple[Condition, ...]:
        value = self.get(path)
        if value is _MISSING or value is None:
            return ()
        if not isinstance(value, Mapping):
            self.fail(path, f"is {_kind_of(value)}, but when is a mapping of setting: value "
                            "(e.g. clients.sender.mode: nonblocking)")
        conditions = []
        for key, wanted in value.items():
            _, spec = _setting_path(self.raw.tree, key, ("timeout",), self.failer(path + (key,)))
            listed = isinstance(wanted, (list, tuple))
            if listed and not wanted:
                self.fail(path + (key,), "is an empty list: give a value or a list of values")
            parsed = []
            for index, one in enumerate(wanted if listed else [wanted]):
                try:
                    parsed.append(spec.parse(one))
                except UsageError as exc:
                    self.fail(path + (key, index) if listed else path + (key,), str(exc))
            conditions.append(Condition(key, tuple(parsed)))
        return tuple(conditions)

    def matrix(self, path: KeyPath) -> tuple[MatrixAxis, ...]:
        value = self.get(path)
        if value is _MISSING or value is None:
            return ()
        if not isinstance(value, Mapping):
            self.fail(path, f"is {_kind_of(value)}, but the matrix is a mapping of setting: [values] "
                            "(e.g. clients.sender.mode: [blocking, nonblocking])")
        axes = []
        for key, values in value.items():
            tree_path, _ = _setting_path(self.raw.tree, key, ("timeout",), self.failer(path + (key,)))
            if not isinstance(values, tuple) or not values:
                self.fail(path + (key,), "needs a non-empty list of values (e.g. [1mbit, 10mbit])")
            for index, item in enumerate(values):
                if not _is_scalar(item):
                    self.fail(path + (key, index), f"is {_kind_of(item)}: matrix values are single values; "
                                                   "sweep each inner key on its own")
                if item in values[:index]:
                    self.fail(path + (key, index), f"{item!r} is listed twice")
            axes.append(MatrixAxis(key, tree_path, values))
        return tuple(axes)
