"""The builder: a RawConfig validated into an Experiment, every failure located.

Links go through the container's own link model (``socklab.shaping.model``):
whatever a container would refuse — a jitter above its delay, a queue limit with
nothing to queue behind, in a link, a direction, a matrix value or a schedule
step over the link as it is at that moment — is refused here, naming the
file, the line and the key. Loads no container can carry are refused by
:mod:`labkit.config.limits`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

from socklab.errors import UsageError
from socklab.shaping import LinkSpec, LinkValueError

from .. import expr, stats
from . import limits
from .experiment import (ClientGroup, Condition, Expectation, Experiment, LinkConfig, LinkDirection,
                         MatrixAxis, Program, ScheduleStep, ServerConfig, Workload, program_dir_of)
from .fields import (BACKEND_FIELD, BUILT_IN_ROLE_KEYS, CLIENT_FIELDS, LINK_FIELDS, LINK_KEYS, PROGRAM_FIELDS,
                     PROGRAM_ROOT_FIELD, REQUIRED, SERVER_FIELDS, TOP_FIELDS, TOP_KEYS, TRACE_CHOICES,
                     WORKLOAD_FIELDS, WORKLOAD_KIND_FIELD, Field, choice_parser, parse_command, parse_nonempty_text,
                     parse_seconds, parse_text, render_seconds)
from .raw import KeyPath, RawConfig, fail_at, kind_of, parse_raw, read_raw, render_path
from .settings import apply_overrides, is_scalar, setting_path, substitute

_MISSING = object()
# The keys that make a role run a program of the user's.
PROGRAM_ROLE_KEYS = ("program", "command", "trace")


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


class _Builder:
    """Validates one RawConfig; every failure names its location."""

    def __init__(self, raw: RawConfig):
        self.raw = raw

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        fail_at(self.raw, path, message)

    def failer(self, path: KeyPath) -> Callable[[str], NoReturn]:
        """``fail`` bound to ``path``, for helpers that only know the message."""
        def fail(message: str) -> NoReturn:
            fail_at(self.raw, path, message)
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
            self.fail(path, f"is {kind_of(value)}, but {what} is a mapping with keys {', '.join(allowed)}")
        for key in value:
            if key not in allowed:
                self.fail(path + (key,), f"unknown key for {what}: use {', '.join(allowed)}")
        return value

    def sequence(self, path: KeyPath, what: str) -> tuple[Any, ...]:
        value = self.get(path)
        if value is _MISSING or value is None:
            return ()
        if not isinstance(value, tuple):
            self.fail(path, f"is {kind_of(value)}, but {what} is a list (one '- ' item per entry)")
        return value

    def value(self, path: KeyPath, spec: Field) -> Any:
        value = self.get(path)
        if value is _MISSING:
            if spec.default is REQUIRED:
                self.fail(path[:-1], f"{spec.key} is missing: it is required")
            return spec.default
        try:
            return spec.parse(value)
        except UsageError as exc:
            self.fail(path, str(exc))

    def fields(self, path: KeyPath, fields: Iterable[Field]) -> dict[str, Any]:
        return {spec.attr: self.value(path + (spec.key,), spec) for spec in fields}

    def experiment(self) -> Experiment:
        self.mapping((), TOP_KEYS, "an experiment")
        top = self.fields((), TOP_FIELDS)
        top["program_root"] = self.value(("program_root",), PROGRAM_ROOT_FIELD)
        program_dir = self.program_dir(top["program_root"])
        server = self.server(("server",), program_dir)
        clients = self.clients(("clients",), program_dir)
        names = [group.name for group in clients]
        schedule = tuple(self.step(("schedule", i), names, top["timeout_s"])
                         for i in range(len(self.sequence(("schedule",), "the schedule"))))
        self.schedule_links(schedule, server, clients)
        limits.check_loads(server, clients, top["container_memory_bytes"], self.failer)
        expect = self.expectations(("expect",), names)
        matrix = self.matrix(("matrix",))
        return Experiment(server=server, clients=clients, matrix=matrix, schedule=schedule,
                          expect=expect, source=self.raw, **top)

    def program_dir(self, program_root: str) -> Path:
        """Where programs' paths start: ``program_root`` from the experiment file's directory."""
        where = program_dir_of(self.raw.filename, program_root)
        if self.get(("program_root",)) is not _MISSING and not where.is_dir():
            self.fail(("program_root",), f"there is no directory {where}")
        return where

    def server(self, path: KeyPath, program_dir: Path) -> ServerConfig:
        self.mapping(path, (*(f.key for f in SERVER_FIELDS), "link", *PROGRAM_ROLE_KEYS), "the server")
        program = self.program(path, program_dir, "the server")
        if program is None:
            return ServerConfig(**self.fields(path, SERVER_FIELDS), link=self.link(path + ("link",)))
        own = self.fields(path, [f for f in SERVER_FIELDS if f.key not in BUILT_IN_ROLE_KEYS])
        return ServerConfig(mode=program.name, recv_size_bytes=1024, link=self.link(path + ("link",)),
                            program=program, **own)

    def program(self, path: KeyPath, program_dir: Path, what: str) -> Program | None:
        """The role's ``program`` or ``command`` (with ``trace``), checked; None for a built-in role.

        A program's file must be there and readable now, so that a run never starts
        to find it missing; a built-in role's keys beside it are refused.
        """
        given = [key for key in ("program", "command") if self.get(path + (key,)) is not _MISSING]
        if not given:
            if self.get(path + ("trace",)) is not _MISSING:
                self.fail(path + ("trace",), f"applies to a program or command only: {what} runs a built-in mode, "
                                             "which the lab always traces")
            return None
        if len(given) == 2:
            self.fail(path + ("command",), "is given with program: give one, program (a Python file) or "
                                           "command (any other executable in the image)")
        kind = given[0]
        for key in BUILT_IN_ROLE_KEYS:
            if self.get(path + (key,)) is not _MISSING:
                self.fail(path + (key,), f"is a key of a built-in role, and {what} runs a {kind} of its own: "
                                         f"its I/O is the {kind}'s; remove {key} or {kind}")
        choices = TRACE_CHOICES[kind]
        trace = self.value(path + ("trace",), Field("trace", "trace", choice_parser(
            f"a way to trace a {kind}", choices), choices[0]))
        if kind == "command":
            return Program(command=self.value(path + ("command",), Field("command", "command", parse_command)),
                           trace=trace)
        at = path + ("program",)
        self.mapping(at, tuple(f.key for f in PROGRAM_FIELDS), "a program", null_ok=False)
        fields = self.fields(at, PROGRAM_FIELDS)
        program = Program(trace=trace, **fields)
        where = program_dir / program.path
        if where.is_dir():
            if program.entry is None:
                self.fail(at + ("path",), f"{program.path!r} is a directory ({where}): add entry: naming the "
                                          "file in it to run")
            where = where / program.entry
            at = at + ("entry",)
        elif program.entry is not None:
            self.fail(at + ("entry",), f"applies to a directory, and {program.path!r} is not one ({where})")
        else:
            at = at + ("path",)
        if not where.is_file():
            self.fail(at, f"there is no file {where}")
        if not os.access(where, os.R_OK):
            self.fail(at, f"{where} cannot be read: make it readable (chmod a+r)")
        return program

    def clients(self, path: KeyPath, program_dir: Path) -> tuple[ClientGroup, ...]:
        if self.get(path) is _MISSING:
            self.fail((), "clients is missing: give at least one client group (- name: sender ...)")
        items = self.sequence(path, "clients")
        if not items:
            self.fail(path, "is empty: give at least one client group (- name: sender ...)")
        groups: list[ClientGroup] = []
        for index in range(len(items)):
            item = path + (index,)
            self.mapping(item, (*(f.key for f in CLIENT_FIELDS), "workload", "link", *PROGRAM_ROLE_KEYS),
                         "a client group", null_ok=False)
            name = self.value(item + ("name",), CLIENT_FIELDS[0])
            program = self.program(item, program_dir, f"client group {name}")
            if program is None:
                group = ClientGroup(**self.fields(item, CLIENT_FIELDS), workload=self.workload(item + ("workload",)),
                                    link=self.link(item + ("link",)))
            else:
                own = self.fields(item, [f for f in CLIENT_FIELDS if f.key not in BUILT_IN_ROLE_KEYS])
                group = ClientGroup(**own, connections=1, mode=program.name, socket_timeout_s=1.0,
                                    workload=Workload(kind="program"), link=self.link(item + ("link",)),
                                    program=program)
            if any(g.name == group.name for g in groups):
                self.fail(item + ("name",), f"{group.name!r} names two client groups: give each group its own name")
            groups.append(group)
        return tuple(groups)

    def workload(self, path: KeyPath) -> Workload:
        value = self.get(path)
        kind = WORKLOAD_KIND_FIELD.default
        if isinstance(value, Mapping) and "kind" in value:
            kind = self.value(path + ("kind",), WORKLOAD_KIND_FIELD)
        fields = WORKLOAD_FIELDS[kind]
        allowed = ("kind", *(f.key for f in fields))
        if isinstance(value, Mapping):
            for key in value:
                other = next((k for k, fs in WORKLOAD_FIELDS.items() if key not in allowed
                              and any(f.key == key for f in fs)), None)
                if other:
                    self.fail(path + (key,), f"is a key of the {other} workload, not of {kind}: "
                                             f"use {', '.join(allowed)} (or kind: {other})")
        self.mapping(path, allowed, f"the {kind} workload")
        return Workload(kind=kind, **self.fields(path, fields))

    def link(self, path: KeyPath, in_schedule: bool = False) -> LinkConfig:
        allowed = tuple(k for k in LINK_KEYS if not (in_schedule and k == "backend"))
        what = "a link change (the backend cannot change while a case runs)" if in_schedule else "a link"
        self.mapping(path, allowed, what)
        directions = {}
        for key in ("up", "down"):
            self.mapping(path + (key,), tuple(f.key for f in LINK_FIELDS), f"a link's {key} direction")
            directions[key] = LinkDirection(**self.fields(path + (key,), LINK_FIELDS))
        backend = None if in_schedule else self.value(path + ("backend",), BACKEND_FIELD)
        link = LinkConfig(**self.fields(path, LINK_FIELDS), **directions, backend=backend)
        if not in_schedule:
            self.resolve_link(path, link)
        return link

    def resolve_link(self, path: KeyPath, link: LinkConfig, base: LinkSpec | None = None,
                     context: str = "") -> LinkSpec:
        """``link`` resolved over ``base`` by the container's link model, or a failure
        naming the key of ``link`` the model blames (``context`` ends the sentence)."""
        paths: dict[str, KeyPath] = {}

        def label(direction: str | None, key: str) -> str:
            at = path + ((direction,) if direction else ()) + (key,)
            paths[render_path(at)] = at
            return render_path(at)

        try:
            return link.changes(label).resolve(base)
        except LinkValueError as exc:
            # A value the matrix or --set put there is what made this case's link
            # impossible (the file alone was checked without it): name that one.
            blamed = [paths[c] for c in exc.candidates if c in paths]
            substituted = [p for p in blamed if any(p[:cut] in self.raw.origins for cut in range(len(p) + 1))]
            self.fail((substituted or blamed or [path])[0], exc.reason + context)

    def schedule_links(self, steps: Sequence[ScheduleStep], server: ServerConfig,
                       clients: Sequence[ClientGroup]) -> None:
        """Each step over its target's link as the container has it then: the configured
        link with the earlier steps on it (in `at` order, as they run) — what `shape set` does."""
        current = {"server": server.link.spec, **{f"clients.{g.name}": g.link.spec for g in clients}}
        for index, step in sorted(enumerate(steps), key=lambda item: item[1].at_s):
            before = current[step.target]
            context = (f" (at {render_seconds(step.at_s)} this step changes the link of {step.target}, "
                       f"which is then: {before.describe()})")
            current[step.target] = self.resolve_link(("schedule", index, "link"), step.link, before, context)

    def step(self, path: KeyPath, groups: Sequence[str], timeout_s: float) -> ScheduleStep:
        self.mapping(path, ("at", "target", "link"), "a schedule step", null_ok=False)
        for key in ("at", "target", "link"):
            if self.get(path + (key,)) is _MISSING:
                self.fail(path, f"{key} is missing: a schedule step needs at, target and link")
        at_s = self.value(path + ("at",), Field("at", "at_s", parse_seconds))
        if at_s >= timeout_s:
            self.fail(path + ("at",), f"{render_seconds(at_s)} is not before the case timeout "
                                      f"({render_seconds(timeout_s)}), so the step could never run")
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
            name = self.value(item + ("name",), Field("name", "name", parse_nonempty_text, REQUIRED))
            if any(e.name == name for e in result):
                self.fail(item + ("name",), f"{name!r} names two expectations: give each its own name")
            text = self.value(item + ("check",), Field("check", "check", parse_text, REQUIRED))
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
            self.fail(path, f"is {kind_of(value)}, but when is a mapping of setting: value "
                            "(e.g. clients.sender.mode: nonblocking)")
        conditions = []
        for key, wanted in value.items():
            _, spec = setting_path(self.raw.tree, key, ("timeout",), self.failer(path + (key,)))
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
            self.fail(path, f"is {kind_of(value)}, but the matrix is a mapping of setting: [values] "
                            "(e.g. clients.sender.mode: [blocking, nonblocking])")
        axes = []
        for key, values in value.items():
            tree_path, _ = setting_path(self.raw.tree, key, ("timeout",), self.failer(path + (key,)))
            if not isinstance(values, tuple) or not values:
                self.fail(path + (key,), "needs a non-empty list of values (e.g. [1mbit, 10mbit])")
            for index, item in enumerate(values):
                if not is_scalar(item):
                    self.fail(path + (key, index), f"is {kind_of(item)}: matrix values are single values; "
                                                   "sweep each inner key on its own")
                if item in values[:index]:
                    self.fail(path + (key, index), f"{item!r} is listed twice")
            axes.append(MatrixAxis(key, tree_path, values))
        return tuple(axes)
