"""Who owns the lab's objects, and whether that owner is still alive.

Every container, network and volume a run creates carries its orchestrator's
identity as labels: the host, the process id, and the process's start (the
kernel's boot id and the start time in clock ticks since boot, from /proc),
which no later process with a reused pid shares. ``lab.py clean`` removes an
object only when its owner has ended: :func:`judge` decides, from the labels and
what this host says about the process, with no side effects of its own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

OWNER_HOST = "io.socklab.owner.host"
OWNER_PID = "io.socklab.owner.pid"
OWNER_STARTED = "io.socklab.owner.started"
PROC = Path("/proc")


@dataclass(frozen=True)
class Owner:
    """A run's orchestrator: the host it runs on, its pid and when that process started."""

    host: str
    pid: int
    started: str  # "<boot id>:<start time in clock ticks>"; unique to one process of one boot

    def labels(self) -> dict[str, str]:
        """The owner as object labels."""
        return {OWNER_HOST: self.host, OWNER_PID: str(self.pid), OWNER_STARTED: self.started}

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> "Owner | None":
        """The owner an object's labels name, or None if they name none (or not readably)."""
        try:
            return cls(labels[OWNER_HOST], int(labels[OWNER_PID]), labels[OWNER_STARTED])
        except (KeyError, ValueError):
            return None


def process_started(pid: int, proc: Path = PROC) -> str | None:
    """When process ``pid`` of this host started ("<boot id>:<ticks>"), or None if there is none."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        boot_id = (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return f"{boot_id}:{fields[19]}"  # field 22 of stat, starttime


def this_host() -> str:
    """The name this host's runs put in their labels."""
    return socket.gethostname()


def current_owner() -> Owner:
    """This process, as the owner of what it creates."""
    pid = os.getpid()
    return Owner(this_host(), pid, process_started(pid) or "unknown")


@dataclass(frozen=True)
class Verdict:
    """Whether clean may remove an object, and why (said when it is left)."""

    remove: bool
    reason: str


def judge(labels: Mapping[str, str], *, host: str, started_of: Callable[[int], str | None],
          force: bool = False) -> Verdict:
    """May ``lab.py clean`` remove an object with these labels?

    Not while the run that made it is alive: same host, and the pid still
    belongs to the process that started then. An owner on another host cannot
    be checked from here, so its objects stay too. ``force`` overrides.
    """
    if force:
        return Verdict(True, "--force")
    owner = Owner.from_labels(labels)
    if owner is None:
        return Verdict(True, "no run owns it (made by `docker compose up`, or by a lab.py before owners were recorded)")
    if owner.host != host:
        return Verdict(False, f"its run's lab.py runs on host {owner.host}, whose processes this host "
                              "cannot check")
    started = started_of(owner.pid)
    if started is None:
        return Verdict(True, f"its run (lab.py pid {owner.pid}) has ended")
    if started != owner.started:
        return Verdict(True, f"its run (lab.py pid {owner.pid}) has ended; that pid is another process now")
    return Verdict(False, f"its run is still going (lab.py pid {owner.pid} on this host)")
