"""The echo benchmark's containers: servers started one by one, one client kept throughout.

Each is a container of the benchmark's project started detached and reached
by its unique name (benchlab.start_container), never by the service's alias.
"""

from __future__ import annotations

import os
import time

from benchlab import engine, exec_in, remove_container, start_container
from experiments import link_env
from labkit.compose import ComposeProject
from labkit.scenario import SERVER_PORT as PORT
from socklab.entry import WORKLOAD_USER
from socklab.results import find_results

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Container:
    """A container of the benchmark's project, on an unshaped link, reached by its name."""

    def __init__(self, lab: ComposeProject, service: str, name: str, command: list[str]) -> None:
        self.name = name
        self.container = start_container(lab, service, name, command, link_env())
        try:
            self._wait_ready()
        except BaseException:
            self.remove()
            raise

    def _wait_ready(self) -> None:
        """Return once the container can be used (at once, unless a subclass knows what to wait for)."""

    def _fail(self, what: str) -> None:
        logs = engine().logs(self.container)
        raise RuntimeError(f"{self.name} {what}: {logs[-600:]}")

    def stop(self) -> str:
        """SIGTERM, wait for the exit, remove; what the container printed on stdout."""
        engine().kill(self.container, "SIGTERM")
        engine().wait(self.container, timeout_s=60)
        out = engine().logs(self.container, stderr=False)
        self.remove()
        return out

    def remove(self) -> None:
        """Remove the container whatever its state."""
        remove_container(self.container)


class ServerContainer(Container):
    """A server container (the lab's server or the reference) listening on the lab's port."""

    def __init__(self, lab: ComposeProject, name: str, command: list[str]) -> None:
        super().__init__(lab, "server", name, command)

    def _wait_ready(self, timeout_s: float = 60) -> None:
        # The entrypoint's gate reads the socket tables: connecting to ask would
        # count as one of the server's connections.
        code, _ = exec_in(self.container, ["python3", "-m", "socklab", "entry", "ready", str(PORT), f"{timeout_s:g}s"],
                          user=WORKLOAD_USER)
        if code != 0:
            self._fail("did not start listening")

    def cpu_s(self) -> float:
        """CPU seconds used so far by the processes in the container (the server, its supervisor)."""
        # The shell and cat reading it add a few milliseconds at most, lost in the rounding to ticks.
        _, stat = exec_in(self.container, ["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null"])
        ticks = 0
        for line in stat.splitlines():
            fields = line.rpartition(")")[2].split()
            if len(fields) > 12:
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / CLK_TCK


class ClientContainer(Container):
    """One client container kept for the whole benchmark; each client run is an exec in it.

    A fresh container per run would add over a second to each (create, set up
    the link, start, remove), about as long as the load itself. Every run is
    still a fresh client process, unprivileged as the entrypoint runs one.
    """

    def __init__(self, lab: ComposeProject, name: str) -> None:
        super().__init__(lab, "client", name, ["exec", "sh", "-c", "touch /tmp/ready && exec sleep infinity"])

    def _wait_ready(self, timeout_s: float = 60) -> None:
        # The marker appears once the entrypoint has set the link up.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if exec_in(self.container, ["test", "-e", "/tmp/ready"])[0] == 0:
                return
            time.sleep(0.1)
        self._fail("did not become ready")

    def client(self, command: str, timeout_s: float = 600) -> tuple[dict | None, str]:
        """Run one client (a shell command) as the workload user; its result line, and its output's end."""
        results, output = self.clients(command, timeout_s)
        return (results[0] if results else None), output

    def clients(self, command: str, timeout_s: float = 600) -> tuple[list[dict], str]:
        """Run clients (a shell command, see roles.load_command) as the workload user; every client's
        result line, and the output's end."""
        _, output = exec_in(self.container, ["sh", "-c", command], user=WORKLOAD_USER, timeout_s=timeout_s)
        return [r for r in find_results(output) if r.get("role") == "client"], output[-300:]
