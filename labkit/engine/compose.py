"""The Compose engine: a case's containers as a Compose project, watched through the Docker SDK.

A lab is one project, named uniquely (``socklab-<hint>-<hex>``), whose override
file (the case's service definitions) is written where the run directory
keeps it, so ``docker compose -f compose.yaml -f compose/X.yaml up`` reproduces
the case. One ``compose up`` starts every service: the clients' ``depends_on``
holds them until compose.yaml's gate, ``server-ready``, has seen the server
listen and exited, which costs less than two invocations and, unlike a
healthcheck, asks nothing of the server once the case runs.

A role started in a kept container writes its process id to a file of its
own first, so that it can be signalled later: ``docker exec`` has no way to
signal what it started.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import yaml

from .. import proc
from ..compose import COMPOSE_FILE, READY_SERVICE, ComposeProject
from .base import LAB_LABEL, Finding, LabContainer, LabObject, RoleHandle, entry_command
from .errors import EngineError, ImageBuildFailed, LabEngineError, StartFailed

BUILD_PROJECT = "socklab-build"
PROBE_PROJECT = "socklab-doctor"
DEFAULT_BASE_IMAGE = "python:3.12-slim"  # compose.yaml's default for BASE_IMAGE
# The lab image is labelled with a digest of what it was built from, so that a run whose
# sources have not changed does not build at all: a cached `docker compose build` still
# costs seconds on a host, and half a minute in an emulated VM.
SOURCES_DIGEST_ENV = "SOCKLAB_SOURCES_DIGEST"  # compose.yaml gives it to the build as this label:
SOURCES_DIGEST_LABEL = "io.socklab.sources"
BUILD_CONTEXT = COMPOSE_FILE.parent / "services"
# Where a role started in a kept container writes its process id.
PID_DIR = "/run/socklab"
# What a build prints when it cannot fetch its base image: lookups, pulls and
# the network errors under them (BuildKit and the classic builder word them differently).
_BASE_IMAGE_UNREACHABLE = re.compile(
    r"load metadata for|failed to resolve source metadata|pull access denied|failed to do request|"
    r"failed to fetch (anonymous|oauth) token|failed to authorize|dial tcp|no such host|i/o timeout|"
    r"TLS handshake timeout|connection refused|manifest unknown|Pulling from|repository does not exist",
    re.IGNORECASE)


def base_image_ref() -> str:
    """The image compose.yaml builds the lab image from: ${BASE_IMAGE:-python:3.12-slim}."""
    return os.environ.get("BASE_IMAGE") or DEFAULT_BASE_IMAGE


def lab_image_ref() -> str:
    """The lab image compose.yaml builds and runs: socklab:${SOCKLAB_IMAGE_TAG:-latest}."""
    return f"socklab:{os.environ.get('SOCKLAB_IMAGE_TAG') or 'latest'}"


def sources_digest(context: Path, base_image_id: str) -> str:
    """A digest of what the lab image is built from: every file of the build context (its
    relative path and bytes, bytecode left out) and the base image's id."""
    digest = hashlib.sha256(f"base {base_image_id}\n".encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        relative = path.relative_to(context)
        if "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        content = path.read_bytes()
        digest.update(f"{relative.as_posix()} {len(content)} {path.stat().st_mode & 0o111:o}\n".encode())
        digest.update(content)
    return digest.hexdigest()


def build_failure_reason(output: str, base_image: str) -> str:
    """Why the lab image did not build, as a sentence with what to do (from the build's output)."""
    if _BASE_IMAGE_UNREACHABLE.search(output):
        return (f"the lab image cannot be built: its base image {base_image} is not on this engine and "
                "could not be fetched (no registry reachable?); set BASE_IMAGE to an image the engine has "
                "(`docker images`), e.g. BASE_IMAGE=socklab-base:bookworm as .ci/prepare-host.sh makes it")
    tail = "\n".join(output.strip().splitlines()[-6:])
    return f"the lab image cannot be built:\n{tail}" if tail else "the lab image cannot be built"


@dataclass
class ContainerRole:
    """A role that is its container's main process (a container per case)."""

    api: Any  # DockerAPI
    container: LabContainer
    # Its state once it has exited: a main process without a restart policy ends once, so a
    # case of fifty clients asks no more after that (the drive's last poll, then the collection).
    _exited: dict | None = field(default=None, init=False, repr=False, compare=False)

    def _state(self) -> dict:
        if self._exited is not None:
            return self._exited
        state = self.api.state(self.container)
        if state.get("Status") in ("exited", "dead"):
            self._exited = state
        return state

    def running(self) -> bool:
        return bool(self._state().get("Running"))

    def exit_code(self) -> int | None:
        state = self._state()
        return None if state.get("Running") else state.get("ExitCode")

    def stop(self) -> None:
        self.api.kill(self.container, "SIGTERM")

    def wait(self, timeout_s: float) -> None:
        self.api.wait(self.container, timeout_s)

    def stdout(self) -> str:
        return self.api.logs(self.container, stderr=False)

    def output(self) -> str:
        return self.api.logs(self.container)


@dataclass
class ExecRole:
    """A role run by `docker exec` in a kept container; stopped through its pid file."""

    api: Any  # DockerAPI
    job: Any  # ExecJob
    pid_path: str

    @property
    def container(self) -> LabContainer:
        return self.job.container

    def running(self) -> bool:
        return self.job.running()

    def exit_code(self) -> int | None:
        return self.job.wait(0)

    def stop(self) -> None:
        if self.job.running():
            self.api.exec(self.container, ["sh", "-c", f"kill -TERM $(cat {self.pid_path}) 2>/dev/null"])

    def wait(self, timeout_s: float) -> None:
        self.job.wait(timeout_s)

    def stdout(self) -> str:
        return self.job.stdout

    def output(self) -> str:
        return self.job.output


class SdkContainers:
    """What a lab does with its containers through the Docker SDK (``self.api``), whoever made them.

    Shared by the Compose and Swarm labs: their containers differ in how they
    come and go, not in how a role runs in one.
    """

    api: Any  # DockerAPI

    def running(self, container: LabContainer) -> bool:
        return bool(self.api.state(container).get("Running"))

    def main_role(self, container: LabContainer) -> RoleHandle:
        return ContainerRole(self.api, container)

    def start_role(self, container: LabContainer, role_argv: Sequence[str], env: Mapping[str, str],
                   remove_first: Sequence[str] = ()) -> RoleHandle:
        pid_path = posixpath.join(PID_DIR, f"{secrets.token_hex(4)}.pid")
        steps = [f"mkdir -p {PID_DIR}", f"echo $$ > {pid_path}"]
        if remove_first:
            steps.append("rm -f " + " ".join(remove_first))
        script = " && ".join(steps + [f"exec {entry_command(role_argv)}"])
        job = self.api.start_exec(container, ["sh", "-c", script], dict(env))
        return ExecRole(self.api, job, pid_path)

    def exec(self, container: LabContainer, argv: Sequence[str]) -> tuple[int, str]:
        return self.api.exec(container, argv)

    def read_file(self, container: LabContainer, path: str) -> bytes | None:
        return self.api.read_file(container, path)

    def stream(self, container: LabContainer, argv: Sequence[str], sink: BinaryIO) -> tuple[int | None, str]:
        return self.api.stream_exec(container, argv, sink)


@dataclass
class ComposeLab(SdkContainers):
    """One Compose project of the lab, its containers reached through the Docker SDK."""

    api: Any  # DockerAPI
    project: ComposeProject
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.project.name

    def start(self, services: Sequence[str]) -> None:
        try:
            self.project.up(*services, wait=False)
        except proc.CommandError as exc:
            raise StartFailed(str(exc)) from None

    def containers(self, service: str | None = None) -> list[LabContainer]:
        # The gate (compose.yaml's server-ready) is how this engine orders a start, not a role.
        return [c for c in self.api.containers(self.name, service) if c.service != READY_SERVICE]

    def down(self) -> None:
        # Through the SDK: `compose down` costs a command's start and stops each container before
        # removing it, several times as long for a lab whose roles have ended. Compose is the way
        # out when something is left (a container an interrupted `up` created meanwhile).
        try:
            self.api.remove_project(self.name)
            if not self.api.containers(self.name):
                return
        except LabEngineError:
            pass
        self.project.down()


class ComposeEngine:
    """Docker Compose v2 for a lab's containers, the Docker SDK for everything in them."""

    def __init__(self, api: Any = None):
        self._api = api

    @property
    def api(self):
        """The Docker SDK boundary, opened on first use (so doctor can report a missing daemon)."""
        if self._api is None:
            from ..docker_api import DockerAPI

            self._api = DockerAPI()
        return self._api

    @staticmethod
    def compose_version() -> str:
        """`docker compose version --short`; EngineError if Compose v2 is missing."""
        try:
            return proc.run(["docker", "compose", "version", "--short"], timeout_s=30).stdout.strip()
        except proc.CommandError:
            raise EngineError("Docker Compose v2 is missing: `docker compose version` failed; "
                              "install the Compose plugin") from None

    def versions(self) -> dict[str, Any]:
        docker_versions = self.api.versions()
        return {"host_kernel": docker_versions["kernel"], "docker": docker_versions,
                "compose": self.compose_version()}

    def health(self) -> list[Finding]:
        findings = []
        try:
            v = self.api.versions()
            findings.append(Finding("Docker daemon", True, f"engine {v['engine']}, API {v['api']}"))
            findings.append(Finding("host kernel", True, v["kernel"]))
        except EngineError as exc:
            findings.append(Finding("Docker daemon", False, str(exc)))
        try:
            findings.append(Finding("Compose v2", True, self.compose_version()))
        except EngineError as exc:
            findings.append(Finding("Compose v2", False, str(exc)))
        return findings

    def build_image(self) -> None:
        """Build the lab image, unless the one there was built from the same sources and base image."""
        base = base_image_ref()
        found = self.api.image(base)
        digest = sources_digest(BUILD_CONTEXT, found[0] if found else "")
        built = self.api.image(lab_image_ref())
        if built and found and built[1].get(SOURCES_DIGEST_LABEL) == digest:
            return
        try:
            ComposeProject(BUILD_PROJECT).build("server", env={SOURCES_DIGEST_ENV: digest})
        except proc.CommandError as exc:
            raise ImageBuildFailed(build_failure_reason(exc.stdout + "\n" + exc.stderr, base)) from None

    def create(self, definition: Mapping[str, Any], *, name_hint: str, record: Path) -> ComposeLab:
        path = record.with_name(record.name + ".yaml")
        path.write_text(yaml.safe_dump(dict(definition), sort_keys=False), encoding="utf-8")
        project = ComposeProject(f"socklab-{name_hint}-{secrets.token_hex(3)}", files=(COMPOSE_FILE, path))
        return ComposeLab(self.api, project)

    def attach(self, name: str) -> ComposeLab:
        return ComposeLab(self.api, ComposeProject(name))

    def probe(self, role_argv: Sequence[str]) -> str:
        project = ComposeProject(PROBE_PROJECT)
        try:
            return project.run("client", *role_argv, env={"CLIENT_LINK_RATE": ""}).stdout
        finally:
            project.down()

    def objects(self, label: str = LAB_LABEL) -> list[LabObject]:
        return self.api.objects(label)

    def remove(self, obj: LabObject) -> bool:
        return self.api.remove_object(obj)
