"""A Compose project of the lab: the boundary between socklab and `docker compose`.

Each case (and each lab test) runs in its own project, named uniquely, so runs
never share containers or networks and a teardown removes exactly one run's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from . import proc
from .engine.base import LAB_LABEL

# Compose writes terminal control sequences into `logs` even without a terminal.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
# compose.yaml's services: the server, and the gate that exits 0 once it listens.
SERVER_SERVICE = "server"
READY_SERVICE = "server-ready"
# The descriptors (RLIMIT_NOFILE, soft and hard) the lab asks for a container whose
# processes hold many connections, one descriptor each: Linux's default fs.nr_open,
# the most a process can be given. An engine may grant less (DockerAPI.nofile_allowed).
NOFILE_WANTED = 1_048_576
__all__ = ["COMPOSE_FILE", "ComposeProject", "LAB_LABEL", "NOFILE_WANTED", "REPO_ROOT", "nofile_ulimits"]


def nofile_ulimits(limit: int) -> dict:
    """A Compose service's keys that give its processes ``limit`` descriptors, soft and hard."""
    return {"ulimits": {"nofile": {"soft": limit, "hard": limit}}}


@dataclass
class ComposeProject:
    """`docker compose -p NAME -f compose.yaml [-f override]` with a fixed environment."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    files: Sequence[Path] = (COMPOSE_FILE,)

    def _argv(self, *args: str) -> list[str]:
        argv = ["docker", "compose", "-p", self.name]
        for path in self.files:
            argv += ["-f", str(path)]
        return argv + list(args)

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(extra or {})
        return env

    def compose(
        self, *args: str, env: Mapping[str, str] | None = None, check: bool = True,
        timeout_s: float | None = None,
    ) -> proc.Completed:
        """Run one `docker compose` subcommand in this project."""
        return proc.run(self._argv(*args), env=self._env(env), cwd=str(REPO_ROOT),
                        check=check, timeout_s=timeout_s)

    def build(self, *services: str, env: Mapping[str, str] | None = None) -> None:
        """Build the lab image (cached layers make a rebuild fast)."""
        self.compose("build", *services, env=env, timeout_s=900)

    def up(self, *services: str, env: Mapping[str, str] | None = None, wait: bool = True) -> None:
        """Start ``services`` detached; with ``wait``, until they run and the server (if
        among them) listens, which compose.yaml's gate waits for."""
        args = ["up", "-d", "--no-build"]
        if wait:
            args += ["--wait", "--wait-timeout", "60"]
        self.compose(*args, *services, env=env, timeout_s=120)
        if wait and SERVER_SERVICE in services:
            self.compose("run", "--rm", "--no-deps", READY_SERVICE, env=env, timeout_s=90)

    def run(
        self, service: str, *args: str, env: Mapping[str, str] | None = None,
        check: bool = True, timeout_s: float | None = 300, detach: bool = False,
        container_name: str | None = None,
    ) -> proc.Completed:
        """`docker compose run --rm SERVICE ARGS...` (or detached, kept by name)."""
        opts = ["run", "--use-aliases"]
        opts += ["-d"] if detach else ["--rm"]
        if container_name:
            opts += ["--name", container_name]
        return self.compose(*opts, service, *args, env=env, check=check, timeout_s=timeout_s)

    def exec(self, service: str, *argv: str, user: str | None = None, check: bool = True,
             timeout_s: float | None = 300) -> proc.Completed:
        """Run ``argv`` in the running container of ``service``."""
        opts = ["exec", "-T"] + (["-u", user] if user else [])
        return self.compose(*opts, service, *argv, check=check, timeout_s=timeout_s)

    def logs(self, *services: str) -> str:
        """Everything the services printed, without colour or prefixes."""
        out = self.compose("logs", "--no-color", "--no-log-prefix", *services, check=False).stdout
        return _ANSI_ESCAPE.sub("", out)

    def down(self) -> None:
        """Remove the project's containers, networks and volumes."""
        # Every profile: services that were started by name from an inactive
        # profile (the case's client groups) are otherwise left running.
        self.compose("down", "-v", "--remove-orphans", "-t", "5", env={"COMPOSE_PROFILES": "*"},
                     check=False, timeout_s=120)
