"""Field parsers: each config key's parser, default and renderer, by kind of value.

Units are parsed by ``socklab.units`` only, and link values by the container's
own link model (``socklab.shaping.model``), so a value means the same thing in
the experiment file, in ``--set``, in ``expect.when`` and inside the container.
"""

from __future__ import annotations

import keyword
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from socklab import units
from socklab.capture import DEFAULT_CAP_BYTES, DEFAULT_SNAPLEN, CaptureSettings
from socklab.errors import UsageError
from socklab.shaping import model as link_model

from ..linkcheck import VERIFY_CHOICES

SERVER_MODES = ("blocking", "threaded", "select", "poll", "epoll", "asyncio")
CLIENT_MODES = ("blocking", "nonblocking", "nonblocking-spin", "select", "poll",
                "epoll", "asyncio", "timeout")
WORKLOAD_KINDS = ("bulk", "echo", "connect", "slow")
LINK_BACKENDS = link_model.BACKEND_CHOICES
# What one container may hold unless the experiment says otherwise (`container_memory`).
DEFAULT_CONTAINER_MEMORY_BYTES = 1 << 30

_EXPERIMENT_NAME = re.compile(r"[a-z0-9-]+")
# Group names appear in checks as `NAME.field`, so they must be identifiers.
_GROUP_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED_GROUP_NAMES = ("server", "case")


def _whole(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{value!r} is not a whole number: use an integer of at least {minimum}")
        if value < minimum:
            raise UsageError(f"{value} is too small: use an integer of at least {minimum}")
        return value
    return parse


def choice_parser(what: str, options: Sequence[str]) -> Callable[[object], str]:
    """A parser that takes one of ``options`` (text) and refuses anything else, naming ``what``."""
    def parse(value: object) -> str:
        if value not in options or not isinstance(value, str):
            raise UsageError(f"{value!r} is not {what}: use one of {', '.join(options)}")
        return value
    return parse


def parse_text(value: object) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{value!r} is not text: put it in quotes")
    return value


def parse_nonempty_text(value: object) -> str:
    if parse_text(value) == "":
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


# What Docker Swarm can place a task by: <attribute> == or != <value>.
_PLACEMENT = re.compile(r"\s*(node\.(?:id|hostname|role|platform\.os|platform\.arch|labels\.[A-Za-z0-9_.-]+)"
                        r"|engine\.labels\.[A-Za-z0-9_.-]+)\s*(==|!=)\s*(\S(?:.*\S)?)\s*")
_PLACEMENT_ALLOWED = ("use ATTRIBUTE == VALUE or ATTRIBUTE != VALUE, with node.id, node.hostname, node.role, "
                      "node.platform.os, node.platform.arch, node.labels.NAME or engine.labels.NAME "
                      "(e.g. node.hostname == vm2)")


def _placement(value: object) -> tuple[str, ...]:
    """Docker Swarm placement constraints, each checked as Swarm would read it, spaced one way.

    One constraint may be given as text alone (``--set server.placement=node.role == manager``).
    """
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (list, tuple)) and not value:
        raise UsageError("the list of placement constraints is empty: give one or more, or leave placement out")
    if not isinstance(value, (list, tuple)):
        shown = "a mapping" if isinstance(value, Mapping) else repr(value)
        raise UsageError(f"{shown} is not a list of placement constraints: give one or more, "
                         f"each a '- ' item ({_PLACEMENT_ALLOWED})")
    constraints = []
    for item in value:
        found = _PLACEMENT.fullmatch(item) if isinstance(item, str) else None
        if not found:
            raise UsageError(f"{item!r} is not a placement constraint: {_PLACEMENT_ALLOWED}")
        attribute, operator, wanted = found.groups()
        if attribute == "node.role" and wanted not in ("manager", "worker"):
            raise UsageError(f"{item!r} is not a placement constraint: node.role is manager or worker")
        constraints.append(f"{attribute} {operator} {wanted}")
    return tuple(constraints)


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


def parse_seconds(value: object) -> float:
    # Rounded to the microsecond so that rendering and re-reading is exact.
    return round(units.parse_duration_s(value), 6)


def parse_positive_seconds(value: object) -> float:
    seconds = parse_seconds(value)
    if seconds <= 0:
        raise UsageError(f"{value!r} is too short: use a duration above zero (e.g. 1s)")
    return seconds


_LINK_ALLOWED = {
    "rate": "a rate: use a number with bit, kbit, mbit or gbit (e.g. 10mbit), or leave rate out for no limit",
    "limit": "a queue length: use a whole number of packets, at least 1 (e.g. 1000), or leave limit out",
}


def _link_value(key: str) -> Callable[[object], Any]:
    """A link value parsed by the container's link model; ``none`` stays refused
    here, where leaving the key out says the same."""
    def parse(value: object) -> Any:
        parsed = link_model.parse_value(key, value)
        if parsed is None:
            raise UsageError(f"{value!r} is not {_LINK_ALLOWED[key]}")
        return parsed
    return parse


def _render_link_value(key: str) -> Callable[[Any], Any]:
    # A queue length stays a YAML number; the others are spelt as the model spells them.
    return _identity if key == "limit" else lambda value: link_model.format_value(key, value)


def render_size(size_bytes: int) -> int | str:
    """Bytes in the largest binary unit that is exact ('1GiB'), else the bare number."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return size_bytes


def _optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def parse_optional(value: object) -> Any:
        return None if value is None or value == "none" else parse(value)
    return parse_optional


def render_seconds(seconds: float) -> str:
    return f"{units.format_number(seconds)}s"


def _identity(value: Any) -> Any:
    return value


_CAPTURE_KEYS = ("snaplen", "cap")
_CAPTURE_ALLOWED = ("use true (headers of every packet, at most 32 MiB a container), false, or a mapping with "
                    "snaplen (bytes kept of each packet) and cap (the most one container's capture may hold), "
                    "e.g. {snaplen: 256, cap: 64MiB}")


def _capture(value: object) -> CaptureSettings | bool | None:
    """``capture``: true (defaults), false (none, whatever the experiment says), or
    ``{snaplen: BYTES, cap: SIZE}``; None (null) is unset."""
    if value is None or value is False:
        return value
    if value is True:
        return CaptureSettings(DEFAULT_SNAPLEN, DEFAULT_CAP_BYTES)
    if not isinstance(value, Mapping):
        raise UsageError(f"{value!r} is not a capture setting: {_CAPTURE_ALLOWED}")
    unknown = [k for k in value if k not in _CAPTURE_KEYS]
    if unknown:
        raise UsageError(f"{unknown[0]!r} is not a capture key: {_CAPTURE_ALLOWED}")
    snaplen = value.get("snaplen", DEFAULT_SNAPLEN)
    if isinstance(snaplen, bool) or not isinstance(snaplen, int):
        raise UsageError(f"snaplen {snaplen!r} is not a whole number of bytes: {_CAPTURE_ALLOWED}")
    cap = units.parse_size_bytes(value["cap"]) if "cap" in value else DEFAULT_CAP_BYTES
    return CaptureSettings.checked(snaplen, cap)


def _render_capture(settings: CaptureSettings | bool | None) -> Any:
    if settings is None or settings is False:
        return settings
    if (settings.snaplen_bytes, settings.cap_bytes) == (DEFAULT_SNAPLEN, DEFAULT_CAP_BYTES):
        return True
    return {"snaplen": settings.snaplen_bytes, "cap": render_size(settings.cap_bytes)}


@dataclass(frozen=True)
class Field:
    """A config key: its attribute (unit in the name), parser, default, renderer."""

    key: str
    attr: str
    parse: Callable[[object], Any]
    default: Any = None
    render: Callable[[Any], Any] = _identity


REQUIRED = object()
# A pcap of a role's packets (see socklab.capture); a role's unset: the experiment's.
CAPTURE_FIELD = Field("capture", "capture", _capture, None, _render_capture)

TOP_FIELDS = (
    Field("name", "name", _experiment_name, REQUIRED),
    Field("description", "description", parse_text, ""),
    Field("repeat", "repeat", _whole(1), 1),
    Field("timeout", "timeout_s", parse_positive_seconds, 300.0, render_seconds),
    Field("container_memory", "container_memory_bytes", _size, DEFAULT_CONTAINER_MEMORY_BYTES, render_size),
    # Every role's packets (a role's own `capture` says otherwise for it).
    CAPTURE_FIELD,
    # What a link measured off its configuration does to the case: mark it, fail it, or measure nothing.
    Field("verify", "verify", choice_parser("a link verification", VERIFY_CHOICES), "mark"),
)

# Where a swarm runs a role's tasks (the Compose engine has one host and ignores it).
PLACEMENT_FIELD = Field("placement", "placement", _optional(_placement), None,
                        lambda constraints: None if constraints is None else list(constraints))
SERVER_FIELDS = (
    Field("mode", "mode", choice_parser("a server mode", SERVER_MODES), "blocking"),
    Field("recv_size", "recv_size_bytes", _size, 1024),
    # SO_RCVBUF of every accepted connection: the receive window a sender meets.
    Field("rcvbuf", "rcvbuf_bytes", _optional(_size), None),
    PLACEMENT_FIELD,
    CAPTURE_FIELD,
)
CLIENT_FIELDS = (
    Field("name", "name", _group_name, REQUIRED),
    Field("replicas", "replicas", _whole(1), 1),
    Field("connections", "connections", _whole(1), 1),
    Field("mode", "mode", choice_parser("a client mode", CLIENT_MODES), "blocking"),
    Field("socket_timeout", "socket_timeout_s", parse_positive_seconds, 1.0, render_seconds),
    # SO_SNDBUF sets what one non-blocking send() can take; SO_RCVBUF the window.
    Field("sndbuf", "sndbuf_bytes", _optional(_size), None),
    Field("rcvbuf", "rcvbuf_bytes", _optional(_size), None),
    PLACEMENT_FIELD,
    CAPTURE_FIELD,
)
LINK_FIELDS = tuple(
    Field(key, attr, _link_value(key), None, _render_link_value(key))
    for key, attr in (("rate", "rate_bps"), ("delay", "delay_ms"), ("jitter", "jitter_ms"),
                      ("loss", "loss_pct"), ("limit", "limit_packets")))
BACKEND_FIELD = Field("backend", "backend", choice_parser("a shaping backend", LINK_BACKENDS), "auto")
WORKLOAD_KIND_FIELD = Field("kind", "kind", choice_parser("a workload kind", WORKLOAD_KINDS), "bulk")
WORKLOAD_FIELDS = {
    "bulk": (
        Field("bytes", "bytes", _size, 136314880),
        Field("pattern", "pattern", parse_nonempty_text, "Hello Python\n"),
        Field("chunk", "chunk_bytes", _chunk, None, lambda b: "all" if b is None else b),
    ),
    "echo": (
        Field("requests", "requests", _whole(1), 1000),
        Field("size", "size_bytes", _size, 1024),
        Field("think", "think_s", parse_seconds, 0.0, render_seconds),
    ),
    "connect": (
        Field("attempts", "attempts", _whole(1), 5),
        Field("cancel_after", "cancel_after_s", _optional(parse_positive_seconds), None,
               lambda s: None if s is None else render_seconds(s)),
        Field("connect_timeout", "connect_timeout_s", _optional(parse_positive_seconds), None,
               lambda s: None if s is None else render_seconds(s)),
    ),
    "slow": (
        Field("rate", "rate_bytes_per_s", _bytes_per_s, 100),
        Field("hold", "hold_s", parse_positive_seconds, 10.0, render_seconds),
    ),
}
ALL_WORKLOAD_FIELDS = (WORKLOAD_KIND_FIELD, *(f for fs in WORKLOAD_FIELDS.values() for f in fs))
LINK_KEYS = (*(f.key for f in LINK_FIELDS), "up", "down", "backend")
TOP_KEYS = ("name", "description", "repeat", "timeout", "server", "clients", "matrix", "schedule", "expect",
            "container_memory", "program_root", "capture", "verify")

# ------------------------------------------------------------ a user's own program
# What a program's or command's arguments may name: the server's host name and the
# port the lab gives it.
PROGRAM_PLACEHOLDERS = ("host", "port")
# The first of each is the default.
TRACE_CHOICES = {"program": ("python", "strace", "none"), "command": ("none", "strace")}


def _placeholders_checked(text: str) -> str:
    """``text`` if every ``{name}`` in it is a placeholder the lab fills ({{ and }} are literal braces)."""
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise UsageError(f"{text!r} has a stray brace ({exc}): write {{{{ or }}}} for a literal one") from None
    for name in names:
        if name not in PROGRAM_PLACEHOLDERS:
            raise UsageError(f"{text!r} uses {{{name}}}, which the lab does not fill: use "
                             f"{', '.join('{' + p + '}' for p in PROGRAM_PLACEHOLDERS)}")
    return text


def _argv_words(value: object, what: str, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{value!r} is not a list: give {what} as a list (e.g. [\"{{host}}\", \"{{port}}\"])")
    if not value and not allow_empty:
        raise UsageError(f"the list is empty: give {what}")
    words = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise UsageError(f"{item!r} is not a word of {what}: use text or numbers")
        words.append(_placeholders_checked(str(item)))
    return tuple(words)


def parse_program_args(value: object) -> tuple[str, ...]:
    """A program's arguments: words, where {host} and {port} are filled by the lab."""
    return _argv_words(value, "the program's arguments", allow_empty=True)


def parse_command(value: object) -> tuple[str, ...]:
    """A command's argv: the executable (in the image) and its arguments."""
    words = _argv_words(value, "the command (the executable, then its arguments)", allow_empty=False)
    if not words[0].strip():
        raise UsageError("the command's first word is empty: name the executable (e.g. nc)")
    return words


def parse_relative_path(value: object) -> str:
    """A path below the program root, written with / (the run directory keeps a copy at the same place)."""
    text = parse_nonempty_text(value)
    parts = text.replace("\\", "/").split("/")
    if text.startswith("/") or ".." in parts:
        raise UsageError(f"{text!r} leaves the program root: give a path relative to the experiment file, "
                         "below its directory (or set program_root to a directory above both)")
    return "/".join(p for p in parts if p not in ("", "."))


PROGRAM_FIELDS = (
    Field("path", "path", parse_relative_path, REQUIRED),
    # For a directory: the file in it to run.
    Field("entry", "entry", _optional(parse_relative_path), None),
    Field("args", "args", parse_program_args, (), list),
)
# Keys of the server or a client group that a role running a program (or command) does without.
BUILT_IN_ROLE_KEYS = ("mode", "workload", "connections", "socket_timeout", "sndbuf", "rcvbuf", "recv_size")
PROGRAM_ROOT_FIELD = Field("program_root", "program_root", parse_nonempty_text, ".")


def render_optional_fields(obj: Any, fields: Iterable[Field]) -> dict[str, Any]:
    """Fields as config keys, leaving out the optional ones (default None) that are unset."""
    return {key: value for key, value in render_fields(obj, fields).items()
            if not (value is None and next(f for f in fields if f.key == key).default is None)}


def render_fields(obj: Any, fields: Iterable[Field], skip_none: bool = False) -> dict[str, Any]:
    result = {}
    for spec in fields:
        value = getattr(obj, spec.attr)
        if value is None and skip_none:
            continue
        result[spec.key] = spec.render(value)
    return result

