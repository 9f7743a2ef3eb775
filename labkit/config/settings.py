"""Dotted setting keys: how the matrix, ``--set`` and ``expect.when`` address a value.

``timeout``, ``server.mode``, ``server.link.rate``, ``clients.NAME.mode``,
``clients.NAME.workload.bytes``, ``clients.NAME.link.up.rate`` — a client group
by its name, not its position. A key resolves to its path in the raw tree and
the field that parses it; ``--set`` and the matrix substitute values there.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import yaml

from .errors import ConfigError
from .experiment import Experiment, MatrixAxis
from .fields import (ALL_WORKLOAD_FIELDS, BACKEND_FIELD, CLIENT_FIELDS, LINK_FIELDS, PROGRAM_FIELDS, SERVER_FIELDS,
                     TOP_FIELDS, Field)
from .raw import KeyPath, Origin, RawConfig, locate, set_in, without

# The top-level settings `--set` may change; the matrix and `when` address only timeout.
OVERRIDE_TOP_KEYS = ("name", "description", "repeat", "timeout", "container_memory", "capture", "verify")


def group_index(tree: Mapping[str, Any], name: str, fail: Callable[[str], NoReturn]) -> int:
    clients = tree.get("clients")
    names = []
    if isinstance(clients, tuple):
        for index, group in enumerate(clients):
            if isinstance(group, Mapping):
                if group.get("name") == name:
                    return index
                names.append(str(group.get("name")))
    fail(f"there is no client group named {name!r}: the groups are {', '.join(names) or 'none'}")


def setting_path(tree: Mapping[str, Any], key: str, top_keys: Sequence[str],
                  fail: Callable[[str], NoReturn]) -> tuple[KeyPath, Field]:
    """Resolve a dotted setting key to its tree path and field, or ``fail``.

    ``top_keys`` are the top-level settings this use allows (the matrix and
    `when` can address ``timeout``; ``--set`` also name, description, repeat).
    """
    parts = key.split(".")
    if parts[0] == "clients" and len(parts) >= 3:
        prefix: KeyPath = ("clients", group_index(tree, parts[1], fail))
        rest = parts[2:]
        own = [f for f in CLIENT_FIELDS if f.key != "name"]
        spec = None
        if rest[0] == "workload" and len(rest) == 2:
            spec = next((f for f in ALL_WORKLOAD_FIELDS if f.key == rest[1]), None)
        elif rest[0] == "program":
            spec = program_setting(rest[1:])
        elif rest[0] == "link":
            spec = link_setting(rest[1:])
        elif len(rest) == 1:
            spec = next((f for f in own if f.key == rest[0]), None)
        if spec is None:
            fail(f"is not a setting of a client group: use clients.NAME. followed by "
                 f"{', '.join(f.key for f in own)}, workload.KEY, program.path, program.entry or link.KEY")
        return prefix + tuple(rest), spec
    if parts[0] == "server" and len(parts) >= 2:
        if parts[1] == "link":
            spec = link_setting(parts[2:])
        elif parts[1] == "program":
            spec = program_setting(parts[2:])
        else:
            spec = next((f for f in SERVER_FIELDS if f.key == parts[1]), None) if len(parts) == 2 else None
        if spec is None:
            fail("is not a setting of the server: use server.mode, server.recv_size, server.program.path, "
                 "server.program.entry or server.link.KEY")
        return tuple(parts), spec
    if len(parts) == 1 and parts[0] in top_keys:
        return (parts[0],), next(f for f in TOP_FIELDS if f.key == parts[0])
    fail(f"does not name a setting: use {', '.join(top_keys)}, server.KEY or clients.NAME.KEY "
         "(e.g. clients.sender.link.rate)")


def link_setting(parts: Sequence[str]) -> Field | None:
    if len(parts) == 1:
        return next((f for f in (*LINK_FIELDS, BACKEND_FIELD) if f.key == parts[0]), None)
    if len(parts) == 2 and parts[0] in ("up", "down"):
        return next((f for f in LINK_FIELDS if f.key == parts[1]), None)
    return None


def program_setting(parts: Sequence[str]) -> Field | None:
    """A program's key that one value can set (``path``, ``entry``; not the list ``args``)."""
    if len(parts) == 1 and parts[0] in ("path", "entry"):
        return next(f for f in PROGRAM_FIELDS if f.key == parts[0])
    return None


def is_scalar(value: Any) -> bool:
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
        value = scalar_from_text(text)
        label = f"--set {key}"
        matrix = tree.get("matrix")
        if isinstance(matrix, Mapping) and key in matrix:
            target: KeyPath = ("matrix", key)
            value = (value,)
            origins[target + (0,)] = Origin(None, label)
        else:
            def fail(message: str, label: str = label) -> NoReturn:
                raise ConfigError(f"{raw.filename}: {label}: {message}", filename=raw.filename, key=label)
            target, _ = setting_path(tree, key, OVERRIDE_TOP_KEYS, fail)
            origins[target] = Origin(None, label)
        tree = set_in(raw, tree, target, value)
    return RawConfig(raw.filename, tree, raw.lines, MappingProxyType(origins))


def scalar_from_text(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if is_scalar(value) else text



def substitute(experiment: Experiment, choices: Sequence[tuple[MatrixAxis, int]]) -> RawConfig:
    """The experiment's RawConfig without its matrix and with each axis set to
    its chosen value (by index); errors in the result point at the matrix."""
    raw = experiment.source
    assert raw is not None, "an Experiment built by build_experiment keeps its source"
    tree = without(raw.tree, "matrix")
    origins = dict(raw.origins)
    for axis, index in choices:
        line, label = locate(raw, ("matrix", axis.key, index))
        tree = set_in(raw, tree, axis.path, axis.values[index])
        origins[axis.path] = Origin(line, label)
    return RawConfig(raw.filename, tree, raw.lines, MappingProxyType(origins))

