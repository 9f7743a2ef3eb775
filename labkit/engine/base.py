"""What the orchestrator needs from a container engine, written down as Protocols.

:class:`~labkit.runner.CaseRunner` and the commands of ``lab.py`` see an engine
only through these three interfaces:

- :class:`Engine` — the engine itself: the versions a run records, the lab
  image, a case's containers brought up from the service definitions
  ``scenario`` builds, the objects the lab left behind (by label), a one-off
  probe for ``doctor``.
- :class:`Lab` — the containers of one case (or of consecutive cases that share
  them): start them, list them, run a role in one, run a short command in one,
  read a file out of one, take them all down.
- :class:`RoleHandle` — one role (the server, or one container's client), as
  the case's lifecycle sees it: is it running, stop it, wait for it, what did
  it print, how did it end.

Compose with the Docker SDK (:mod:`labkit.engine.compose`) is one
implementation; the fake engine of the unit tests is another. A new engine is
a new implementation of these, never a branch in the runner.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Protocol, Sequence, runtime_checkable

# Every container, network and volume the lab creates carries this label, so
# `lab.py clean` can find them and nothing else.
LAB_LABEL = "io.socklab.lab"


@dataclass(frozen=True)
class LabContainer:
    """One container of a lab, as the orchestrator needs to see it."""

    id: str
    name: str
    service: str
    number: int
    node: str = ""  # the host it runs on, where the engine spans several (a swarm's node); else empty


@dataclass(frozen=True)
class LabObject:
    """Something the lab made on the engine (a container, network or volume), with its labels."""

    kind: str  # "containers", "networks" or "volumes" (as clean reports them)
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    id: str = ""  # the engine's own id, where names need not be unique (networks)


@dataclass(frozen=True)
class Finding:
    """One line of ``doctor``: what was checked, whether it is fine, and what was found."""

    name: str
    ok: bool
    detail: str


def entry_argv(role_argv: Sequence[str]) -> list[str]:
    """The argv that runs a role through the image's entrypoint (what an exec in a kept container runs)."""
    return ["python3", "-m", "socklab", "entry", *role_argv]


def entry_command(role_argv: Sequence[str]) -> str:
    """:func:`entry_argv` as one shell command."""
    return shlex.join(entry_argv(role_argv))


@runtime_checkable
class RoleHandle(Protocol):
    """A role of a case as the lifecycle sees it, wherever it runs."""

    container: LabContainer

    def running(self) -> bool:
        """Whether the role has not ended yet."""

    def exit_code(self) -> int | None:
        """How it ended (None while it runs); 128+N when signal N killed it."""

    def stop(self) -> None:
        """Ask it to end (SIGTERM); a role that has ended is left alone."""

    def wait(self, timeout_s: float) -> None:
        """Return once it has ended, or after ``timeout_s``."""

    def stdout(self) -> str:
        """What it printed on stdout (its result lines)."""

    def output(self) -> str:
        """Everything it printed, stdout and stderr."""


@runtime_checkable
class Lab(Protocol):
    """The containers of one case, or of consecutive cases that share them."""

    name: str

    def start(self, services: Sequence[str]) -> None:
        """Create and start the containers of ``services``; the server's must listen before the others start.

        Containers whose definition runs a role start it as their main process;
        kept containers (``hold``) wait for :meth:`start_role`. Raises
        :class:`~labkit.engine.errors.StartFailed` when one does not start.
        """

    def containers(self, service: str | None = None) -> list[LabContainer]:
        """Its containers (of one service), ordered by service and number."""

    def running(self, container: LabContainer) -> bool:
        """Whether ``container`` runs; ContainerGone if it vanished."""

    def main_role(self, container: LabContainer) -> RoleHandle:
        """The role that is ``container``'s main process."""

    def start_role(self, container: LabContainer, role_argv: Sequence[str], env: Mapping[str, str],
                   remove_first: Sequence[str] = ()) -> RoleHandle:
        """Start a role in a kept container, through the entrypoint, after removing ``remove_first``
        (files a previous case left there); its output is collected as it runs."""

    def exec(self, container: LabContainer, argv: Sequence[str]) -> tuple[int, str]:
        """Run a short command in a running container; its exit status and output."""

    def read_file(self, container: LabContainer, path: str) -> bytes | None:
        """A file out of a running or ended container (a trace); None if it is not there."""

    def stream(self, container: LabContainer, argv: Sequence[str], sink: BinaryIO) -> tuple[int | None, str]:
        """Run ``argv`` in a running container, its stdout written to ``sink`` as it comes
        (``lab.py capture``); its exit status and stderr once it ends."""

    def down(self) -> None:
        """Remove every container, network and volume of this lab (whatever state they are in)."""


@runtime_checkable
class Engine(Protocol):
    """A container engine the lab runs on."""

    def versions(self) -> dict[str, Any]:
        """What meta.json records of the engine, by its key (host_kernel, docker, compose, ...).

        Raises EngineError when the engine cannot be reached.
        """

    def health(self) -> list[Finding]:
        """Doctor's lines about the engine itself (is it reachable, are its tools there); never raises."""

    def build_image(self) -> None:
        """Build the lab image (cached layers make a rebuild quick); ImageBuildFailed says why not."""

    def create(self, definition: Mapping[str, Any], *, name_hint: str, record: Path) -> Lab:
        """A lab for these service definitions (as ``scenario`` builds them), not started yet.

        ``record``: where to keep the engine's own description of the lab, for a
        user to reproduce it by hand (a path without suffix: the engine adds its
        own). ``name_hint`` goes into the lab's unique name.
        """

    def attach(self, name: str) -> Lab:
        """A lab that is already running, by name (``lab.py link``)."""

    def probe(self, role_argv: Sequence[str]) -> str:
        """Run a role once in a fresh, unshaped lab container and return what it printed on stdout."""

    def objects(self, label: str = LAB_LABEL) -> list[LabObject]:
        """Every container, network and volume carrying ``label``, containers first."""

    def remove(self, obj: LabObject) -> bool:
        """Remove one object (a container with its anonymous volumes); False if it was gone already."""
