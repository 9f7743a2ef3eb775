"""The YAML walk: an experiment file as frozen data, every value with its line.

The YAML is composed into nodes (PyYAML's SafeLoader, so no Python objects can
be constructed) and walked by hand, which keeps each value's line so that every
error names the file, the line and the key. Also here: finding a key path's
line (following matrix and ``--set`` substitutions) and copying the frozen tree
with one value changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NoReturn

import yaml

from .errors import ConfigError

KeyPath = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Anchors and aliases can make a small file expand into a huge tree ("billion
# laughs"); no real experiment comes near this many values.
_MAX_NODES = 100_000


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
                          f"(name, clients, ...), not {kind_of(tree)}", filename=filename, line=lines[()])
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
        key = render_path(path)
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



# ---------------------------------------------------------------- locations

def render_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def locate(raw: RawConfig, path: KeyPath) -> tuple[int | None, str]:
    """(line, key as shown) of ``path``, following matrix/--set substitutions."""
    for cut in range(len(path), -1, -1):
        origin = raw.origins.get(path[:cut])
        if origin is not None:
            rest = render_path(path[cut:])
            return origin.line, origin.label + (f".{rest}" if rest and not rest.startswith("[") else rest)
    for cut in range(len(path), -1, -1):
        if path[:cut] in raw.lines:
            return raw.lines[path[:cut]], render_path(path)
    return None, render_path(path)


def fail_at(raw: RawConfig, path: KeyPath, message: str) -> NoReturn:
    line, key = locate(raw, path)
    where = f"{raw.filename}:{line}" if line is not None else raw.filename
    text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
    raise ConfigError(text, filename=raw.filename, line=line, key=key)


def kind_of(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, tuple):
        return "a list"
    if value is None:
        return "empty (null)"
    return repr(value)



# ---------------------------------------------------------------- tree edits

def thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def set_in(raw: RawConfig, tree: Any, path: KeyPath, value: Any, done: KeyPath = ()) -> Any:
    """A copy of ``tree`` with ``path`` set to ``value``, creating missing mappings."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(tree)
        items[head] = set_in(raw, items[head], rest, value, done + (head,))
        return tuple(items)
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        fail_at(raw, done, f"is {kind_of(tree)}, not a mapping, so {render_path(path)} cannot be set in it")
    updated = dict(tree)
    updated[head] = set_in(raw, tree.get(head), rest, value, done + (head,))
    return MappingProxyType(updated)


def without(tree: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return MappingProxyType({k: v for k, v in tree.items() if k != key})

