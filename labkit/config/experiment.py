"""The typed model of an experiment: frozen objects with units in their field names.

Built by :mod:`labkit.config.builder` only; ``to_dict`` renders each object back
as config keys (``experiment.yaml`` loads again to an equal Experiment), and
``Experiment.setting`` reads a dotted setting key (matrix, ``--set``, ``when``).
A link keeps the values as written (top-level ones for both directions, ``up`` and
``down`` overrides) and resolves through the container's own link model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from socklab.capture import CaptureSettings
from socklab.shaping import LinkChanges, LinkShape, LinkSpec

from .. import expr
from .fields import (
    ALL_WORKLOAD_FIELDS, BACKEND_FIELD, BUILT_IN_ROLE_KEYS, CLIENT_FIELDS, LINK_FIELDS, PROGRAM_FIELDS,
    SERVER_FIELDS, TOP_FIELDS, WORKLOAD_FIELDS, DEFAULT_CONTAINER_MEMORY_BYTES, Field, render_fields,
    render_optional_fields, render_seconds,
)
from .raw import KeyPath, RawConfig, thaw

# Names the label of a link value for errors: (direction or None for both, key) -> label.
LinkLabel = Callable[[str | None, str], str]


@dataclass(frozen=True)
class LinkDirection:
    """The values written for one direction (or for both); None: not given."""

    rate_bps: int | None = None
    delay_ms: float | None = None
    jitter_ms: float | None = None
    loss_pct: float | None = None
    limit_packets: int | None = None

    @property
    def is_shaped(self) -> bool:
        """True when any value is given."""
        return any(getattr(self, f.attr) is not None for f in LINK_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """The given values as config keys and unit strings."""
        return render_fields(self, LINK_FIELDS, skip_none=True)


@dataclass(frozen=True)
class LinkConfig:
    """A link as written: values for both directions, ``up``/``down`` overrides, backend.

    ``spec`` is what the container makes of it (the shaping model's resolution).
    In a schedule step the same object describes a change: values left None
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
        """The values given for both directions."""
        return LinkDirection(**{f.attr: getattr(self, f.attr) for f in LINK_FIELDS})

    @property
    def is_shaped(self) -> bool:
        """True when any value is given, for either direction."""
        return self.both.is_shaped or self.up.is_shaped or self.down.is_shaped

    def changes(self, label: LinkLabel | None = None) -> LinkChanges:
        """The link's values as the shaping model's changes (``label`` names each for errors)."""
        changes = LinkChanges()
        for direction, values in ((None, self.both), ("up", self.up), ("down", self.down)):
            for spec in LINK_FIELDS:
                value = getattr(values, spec.attr)
                if value is not None:
                    changes.set(direction, spec.key, value, label(direction, spec.key) if label else None)
        return changes

    @property
    def spec(self) -> LinkSpec:
        """Both directions as the container resolves them (over an unshaped link)."""
        return self.changes().resolve()

    @property
    def effective_up(self) -> LinkShape:
        """Client → server shaping as resolved."""
        return self.spec.up

    @property
    def effective_down(self) -> LinkShape:
        """Server → client shaping as resolved."""
        return self.spec.down

    def to_dict(self) -> dict[str, Any]:
        """The link as config keys and unit strings (values not given left out)."""
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
        return {"kind": self.kind, **render_fields(self, WORKLOAD_FIELDS[self.kind])}


@dataclass(frozen=True)
class Program:
    """A user's own program, run as a role instead of a built-in mode and workload.

    Either a Python file (``path`` below the experiment's program root; for a
    directory, ``entry`` names the file in it to run) run by the image's python3,
    or ``command``: any executable in the image. ``args`` (of a file) and
    ``command`` may hold ``{host}`` and ``{port}``. ``trace`` is how its socket
    calls are recorded: ``python`` (the lab's tracer, injected at interpreter
    start), ``strace``, or ``none``.
    """

    path: str | None = None
    entry: str | None = None
    args: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    trace: str = "python"

    @property
    def script(self) -> str | None:
        """The file python3 runs, relative to the program root (None for a command)."""
        if self.path is None:
            return None
        return f"{self.path}/{self.entry}" if self.entry else self.path

    @property
    def name(self) -> str:
        """What results and plots call it: the file's name, or the command's executable."""
        if self.command is not None:
            return self.command[0].rsplit("/", 1)[-1]
        return self.script.rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        """The role keys that say it: ``program`` or ``command``, and ``trace`` where not the default."""
        if self.command is not None:
            result: dict[str, Any] = {"command": list(self.command)}
            return result if self.trace == "none" else {**result, "trace": self.trace}
        result = {"program": render_optional_fields(self, PROGRAM_FIELDS)}
        return result if self.trace == "python" else {**result, "trace": self.trace}


def program_dir_of(filename: str, program_root: str) -> Path:
    """Where programs' paths start: ``program_root`` from the directory of the experiment file
    ``filename`` (from the working directory for text that is not a file, e.g. ``<text>``)."""
    base = Path(filename).parent if filename and not filename.startswith("<") else Path.cwd()
    return (base / program_root).resolve()


def _role_dict(role: Any, fields: tuple[Field, ...]) -> dict[str, Any]:
    """A role's own keys; one that runs a program has none of the built-in role's mode and workload."""
    if role.program is None:
        return render_optional_fields(role, fields)
    kept = tuple(f for f in fields if f.key not in BUILT_IN_ROLE_KEYS)
    return {**render_optional_fields(role, kept), **role.program.to_dict()}


@dataclass(frozen=True)
class ServerConfig:
    """The server: I/O model, ``recv()`` size and its own access link — or a program of the user's.

    With ``program``, ``mode`` is the program's name (what results call it).
    """

    mode: str
    recv_size_bytes: int
    link: LinkConfig
    rcvbuf_bytes: int | None = None
    placement: tuple[str, ...] | None = None  # Swarm constraints; None: the engine decides
    program: Program | None = None
    capture: CaptureSettings | bool | None = None  # None: as the experiment says; False: none

    def to_dict(self) -> dict[str, Any]:
        """The server as config keys."""
        return {**_role_dict(self, SERVER_FIELDS), "link": self.link.to_dict()}


@dataclass(frozen=True)
class ClientGroup:
    """One client group: ``replicas`` containers × ``connections`` each (or × its program)."""

    name: str
    replicas: int
    connections: int
    mode: str
    socket_timeout_s: float
    workload: Workload
    link: LinkConfig
    sndbuf_bytes: int | None = None
    rcvbuf_bytes: int | None = None
    placement: tuple[str, ...] | None = None  # Swarm constraints; None: the engine decides
    # A program of the user's instead of a built-in mode and workload: then ``mode`` is
    # its name and ``workload`` is of kind "program".
    program: Program | None = None
    capture: CaptureSettings | bool | None = None  # None: as the experiment says; False: none

    def to_dict(self) -> dict[str, Any]:
        """The group as config keys."""
        if self.program is not None:
            return {**_role_dict(self, CLIENT_FIELDS), "link": self.link.to_dict()}
        return {**render_optional_fields(self, CLIENT_FIELDS), "workload": self.workload.to_dict(),
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
        return {"at": render_seconds(self.at_s), "target": self.target, "link": self.link.to_dict()}


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
    container_memory_bytes: int = DEFAULT_CONTAINER_MEMORY_BYTES
    # The directory programs' paths are relative to, as written (relative to the file).
    program_root: str = "."
    capture: CaptureSettings | bool | None = None  # every role's, unless its own says otherwise
    verify: str = "mark"  # what a link measured off its configuration does (see labkit.linkcheck)
    source: RawConfig | None = field(default=None, repr=False, compare=False)

    @property
    def programs(self) -> tuple[Program, ...]:
        """The programs of the user's that this experiment (as it stands, not its matrix) runs."""
        roles = (self.server, *self.clients)
        return tuple(role.program for role in roles if role.program is not None)

    @property
    def program_dir(self) -> Path:
        """The directory programs' paths are relative to: ``program_root`` from the file's directory."""
        return program_dir_of(self.source.filename if self.source is not None else "", self.program_root)

    def capture_of(self, role: ServerConfig | ClientGroup) -> CaptureSettings | None:
        """What of ``role``'s packets is captured: its own ``capture``, else the experiment's; None for none."""
        chosen = role.capture if role.capture is not None else self.capture
        return chosen or None

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

    def setting_field(self, key: str) -> Field:
        """The field description behind a dotted setting key."""
        return self._setting_owner(key)[1]

    def _setting_owner(self, key: str) -> tuple[Any, Field]:
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
        fields = ALL_WORKLOAD_FIELDS if isinstance(obj, Workload) else FIELDS_OF[type(obj)]
        spec = next(f for f in fields if f.key == rest[0])
        return obj, spec

    def to_dict(self) -> dict[str, Any]:
        """The resolved experiment as plain data in the config format (for
        ``experiment.yaml``); loading it again gives an equal Experiment."""
        result = render_optional_fields(self, TOP_FIELDS)
        result["server"] = self.server.to_dict()
        result["clients"] = [group.to_dict() for group in self.clients]
        if self.matrix:
            result["matrix"] = {axis.key: [thaw(v) for v in axis.values] for axis in self.matrix}
        if self.schedule:
            result["schedule"] = [step.to_dict() for step in self.schedule]
        if self.expect:
            result["expect"] = [e.to_dict(self) for e in self.expect]
        if self.program_root != ".":
            result["program_root"] = self.program_root
        return result


FIELDS_OF: dict[type, tuple[Field, ...]] = {
    Experiment: TOP_FIELDS,
    ServerConfig: SERVER_FIELDS,
    ClientGroup: CLIENT_FIELDS,
    LinkConfig: (*LINK_FIELDS, BACKEND_FIELD),
    LinkDirection: LINK_FIELDS,
    Program: PROGRAM_FIELDS,
}
