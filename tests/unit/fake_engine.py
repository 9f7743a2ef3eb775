"""An in-memory engine: the second implementation of labkit.engine's interface, for unit tests.

Its containers run no processes: each role follows a :class:`Script` (how long
it runs, what it prints, how it ends), and prints the result lines the real
roles print, in the same format (``socklab.results``), so the runner collects,
judges and records them exactly as it does a real case's. Containers can
vanish, roles can outlive a timeout, exit non-zero or print nothing. Every
command run in a container is kept (``FakeLab.execs``) with the time it came,
so a test can see which link change reached which container when.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from labkit import scenario
from labkit.engine import (LAB_LABEL, ContainerGone, Finding, ImageBuildFailed, LabContainer, LabObject,
                           StartFailed)
from socklab import RESULT_KEY, RESULT_SCHEMA
from socklab.servers.lifecycle import LISTENING_LINE

LINK_APPLIED = {"up": {"rate_bps": 10_000_000}, "down": {"rate_bps": 10_000_000}}


def line(role: str, **fields: Any) -> str:
    """A result line as a role prints it."""
    return json.dumps({RESULT_KEY: RESULT_SCHEMA, "role": role, **fields})


def link_line(backend: str = "netem", mtu: int = 1500) -> str:
    """The entrypoint's ``link`` line: the link as applied, its counters, its device's MTU."""
    return line("link", backend=backend, applied=LINK_APPLIED,
                qdisc={"eth0": [{"kind": "tbf", "bytes": 1000}]}, delay_line=None, mtu=mtu)


def failure_line(failed: str, error: str, exit_code: int) -> str:
    """The line a role prints when it fails under the entrypoint."""
    return line("error", failed=failed, error=error, exit_code=exit_code)


def _option(argv: Sequence[str], flag: str, default: str = "") -> str:
    return argv[argv.index(flag) + 1] if flag in argv else default


def client_line(argv: Sequence[str], errors: Sequence[str] = ()) -> str:
    """A bulk client's result line for these role arguments: everything it asked for arrived."""
    requested = int(_option(argv, "--bytes", "1000"))
    delivered = 0 if errors else requested
    return line("client", mode=_option(argv, "--mode"), workload=_option(argv, "--workload"),
                connections=int(_option(argv, "--connections", "1")), bytes_requested=requested,
                bytes_accepted=delivered, bytes_delivered=delivered, send_calls=1, eagain=0,
                blocked_s=0.01, wall_s=0.05, cpu_s=0.01, goodput_bps=8e6, connect_s=0.001, latency_ms=None,
                tcp=None, errors=list(errors))


def server_line(argv: Sequence[str], bytes_received: int) -> str:
    """The server's result line."""
    return line("server", mode=_option(argv, "--mode"), connections=1, bytes_received=bytes_received,
                cpu_s=0.01, max_concurrent=1)


@dataclass
class Script:
    """What one fake role does.

    ``duration_s`` None: it runs until stopped (a server). ``stdout`` is
    printed when it ends by itself, ``on_stop`` when it is stopped (SIGTERM);
    ``stderr`` at once. ``vanish_after_s``: its container is removed from
    outside that long after the role started.
    """

    duration_s: float | None = 0.05
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    exit_code: int = 0
    on_stop: list[str] = field(default_factory=list)
    stop_exit_code: int = 143
    trace: bytes | None = None
    vanish_after_s: float | None = None


def real_like(container: LabContainer, argv: Sequence[str], mtu: int = 1500) -> Script:
    """What the real roles do in a case that goes well (on a lab device of this MTU)."""
    banner = ["socklab: link eth0: rate 10mbit (backend netem, applied)"]
    if argv[0] == "server":
        return Script(duration_s=None, stderr=banner + [f"{LISTENING_LINE} 0.0.0.0:5000 mode=x"],
                      on_stop=[server_line(argv, 1000), link_line(mtu=mtu)], stop_exit_code=0)
    trace = gzip.compress(b'{"mode": "blocking"}\n') if "--trace" in argv else None
    return Script(duration_s=0.05, stderr=banner, stdout=[client_line(argv), link_line(mtu=mtu)], trace=trace,
                  on_stop=[failure_line("client", "the client was killed by SIGTERM", 143), link_line(mtu=mtu)])


class FakeRole:
    """A role following its script in real time (the runner's own clock)."""

    def __init__(self, lab: "FakeLab", container: "FakeContainer", argv: Sequence[str], script: Script,
                 env: Mapping[str, str] | None = None, main: bool = True):
        self.lab = lab
        self.container = container.handle
        self.fake = container
        self.argv = list(argv)
        self.script = script
        self.env = dict(env or {})
        self.main = main
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.code: int | None = None
        self.lines_out: list[str] = []
        self.stops = 0
        if script.vanish_after_s is not None:
            container.vanish_at = self.started_at + script.vanish_after_s

    def _end(self, code: int, lines: Sequence[str]) -> None:
        self.ended_at = time.monotonic()
        self.code = code
        self.lines_out += lines
        if self.script.trace is not None and code == 0:
            self.fake.files[scenario.TRACE_PATH] = self.script.trace

    def _settle(self) -> None:
        if self.ended_at is not None:
            return
        if self.fake.gone() or self.lab.downed:
            self.ended_at, self.code = time.monotonic(), 137
            return
        due = self.script.duration_s
        if due is not None and time.monotonic() >= self.started_at + due:
            self._end(self.script.exit_code, self.script.stdout)

    def running(self) -> bool:
        if self.main and self.fake.gone():
            raise ContainerGone(f"container {self.container.name} disappeared while its case ran")
        self._settle()
        return self.ended_at is None

    def exit_code(self) -> int | None:
        if self.fake.gone():
            raise ContainerGone(f"container {self.container.name} disappeared while its case ran")
        self._settle()
        return self.code

    def stop(self) -> None:
        self.stops += 1
        self._settle()
        if self.ended_at is None:
            self._end(self.script.stop_exit_code, self.script.on_stop)

    def wait(self, timeout_s: float) -> None:
        until = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < until:
            time.sleep(0.005)

    def stdout(self) -> str:
        self._settle()
        return "" if self.fake.gone() else "".join(f"{text}\n" for text in self.lines_out)

    def output(self) -> str:
        if self.fake.gone():
            return ""
        return "".join(f"{text}\n" for text in self.script.stderr) + self.stdout()


@dataclass
class FakeContainer:
    handle: LabContainer
    command: list[str]
    files: dict[str, bytes] = field(default_factory=dict)
    vanish_at: float | None = None
    main: FakeRole | None = None

    def gone(self) -> bool:
        return self.vanish_at is not None and time.monotonic() >= self.vanish_at


class FakeLab:
    """One lab of the fake engine: its containers, the roles it ran and every command it was sent."""

    def __init__(self, engine: "FakeEngine", definition: Mapping[str, Any], name: str):
        self.engine = engine
        self.definition = definition
        self.name = name
        self.fakes: list[FakeContainer] = []
        self.roles: list[FakeRole] = []
        self.execs: list[tuple[float, str, list[str]]] = []
        self.started_at: float | None = None
        self.downed = False

    def start(self, services: Sequence[str]) -> None:
        self.started_at = time.monotonic()
        for service in services:
            spec = self.definition["services"][service]
            for number in range(1, spec.get("deploy", {}).get("replicas", 1) + 1):
                handle = LabContainer(f"id-{self.name}-{service}-{number}", f"{self.name}-{service}-{number}",
                                      service, number)
                fake = FakeContainer(handle, list(spec["command"]))
                self.fakes.append(fake)
                if fake.command != ["hold"]:
                    fake.main = FakeRole(self, fake, fake.command, self.engine.behave(handle, fake.command))
                    fake.files[scenario.LINK_STATE_PATH] = b"{}"
                    self.roles.append(fake.main)
        if self.engine.start_fails:
            raise StartFailed(f"`docker compose up` of {self.name} failed: {self.engine.start_fails}")

    def _fake(self, container: LabContainer) -> FakeContainer:
        fake = next(f for f in self.fakes if f.handle == container)
        if fake.gone():
            raise ContainerGone(f"container {container.name} disappeared while its case ran")
        return fake

    def containers(self, service: str | None = None) -> list[LabContainer]:
        present = [f.handle for f in self.fakes if not f.gone() and service in (None, f.handle.service)]
        return sorted(present, key=lambda c: (c.service, c.number))

    def running(self, container: LabContainer) -> bool:
        fake = self._fake(container)
        return not self.downed and (fake.main is None or fake.main.running())

    def main_role(self, container: LabContainer) -> FakeRole:
        fake = next(f for f in self.fakes if f.handle == container)
        if fake.main is None:  # a kept container's main process holds: it never ends by itself
            fake.main = FakeRole(self, fake, ["hold"], Script(duration_s=None))
        return fake.main

    def start_role(self, container: LabContainer, role_argv: Sequence[str], env: Mapping[str, str],
                   remove_first: Sequence[str] = ()) -> FakeRole:
        fake = self._fake(container)
        for path in remove_first:
            fake.files.pop(path, None)
        fake.files[scenario.LINK_STATE_PATH] = b"{}"
        role = FakeRole(self, fake, role_argv, self.engine.behave(container, role_argv), env, main=False)
        self.roles.append(role)
        return role

    def exec(self, container: LabContainer, argv: Sequence[str]) -> tuple[int, str]:
        fake = self._fake(container)
        self.execs.append((time.monotonic(), container.name, list(argv)))
        if list(argv[:2]) == ["test", "-e"]:
            return (0 if argv[2] in fake.files else 1), ""
        if list(argv[:5]) == ["python3", "-m", "socklab", "shape", "set"]:
            return self.engine.shape_set(container, list(argv[5:]))
        return 127, f"fake engine: no such command {argv[0]}"

    def read_file(self, container: LabContainer, path: str) -> bytes | None:
        fake = next(f for f in self.fakes if f.handle == container)
        return None if fake.gone() else fake.files.get(path)

    def stream(self, container: LabContainer, argv: Sequence[str], sink) -> tuple[int | None, str]:
        code, out = self.exec(container, argv)
        sink.write(out.encode())
        return code, ""

    def down(self) -> None:
        self.downed = True
        self.engine.downs.append(self.name)


class FakeEngine:
    """The engine interface in memory. ``behave(container, role_argv)`` scripts every role."""

    def __init__(self, behave: Callable[[LabContainer, Sequence[str]], Script] = real_like, *,
                 findings: Sequence[Finding] | None = None, build_error: str | None = None,
                 caps: Mapping[str, Any] | None = None, objects: Sequence[LabObject] = ()):
        self.behave = behave
        self.labs: list[FakeLab] = []
        self.downs: list[str] = []
        self.builds = 0
        self.start_fails: str | None = None
        self.findings = list(findings if findings is not None else [
            Finding("Docker daemon", True, "engine 27.0-fake, API 1.46"), Finding("Compose v2", True, "2.29-fake")])
        self.build_error = build_error
        self.caps = caps
        self.stored = list(objects)
        self.removed: list[LabObject] = []

    def shape_set(self, container: LabContainer, words: list[str]) -> tuple[int, str]:
        """What `shape set` answers in a container (overridable)."""
        return 0, f"link eth0: {' '.join(words)} (applied)"

    def versions(self) -> dict[str, Any]:
        return {"host_kernel": "6.1.0-fake", "docker": {"engine": "27.0-fake", "api": "1.46", "kernel": "6.1.0-fake"},
                "compose": "2.29-fake"}

    def health(self) -> list[Finding]:
        return list(self.findings)

    def build_image(self) -> None:
        self.builds += 1
        if self.build_error:
            raise ImageBuildFailed(self.build_error)

    def create(self, definition: Mapping[str, Any], *, name_hint: str, record: Path) -> FakeLab:
        record.with_name(record.name + ".json").write_text(json.dumps(definition), encoding="utf-8")
        lab = FakeLab(self, definition, f"socklab-{name_hint}-{len(self.labs)}")
        self.labs.append(lab)
        return lab

    def attach(self, name: str) -> FakeLab:
        return next(lab for lab in self.labs if lab.name == name)

    def probe(self, role_argv: Sequence[str]) -> str:
        assert list(role_argv) == ["shape", "caps", "--json"]
        return json.dumps(self.caps)

    def objects(self, label: str = LAB_LABEL) -> list[LabObject]:
        return [o for o in self.stored if label in o.labels]

    def remove(self, obj: LabObject) -> bool:
        if obj not in self.stored:
            return False
        self.stored.remove(obj)
        self.removed.append(obj)
        return True
