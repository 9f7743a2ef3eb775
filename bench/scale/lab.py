"""The scale benchmark's lab: one long-lived server container whose server processes start on demand.

Servers and probes run in it by exec, as the unprivileged workload user, so a
step costs a process start, not a container.
"""

from __future__ import annotations

import json
import threading
import time

from experiments import probe_command
from labkit.compose import ComposeProject
from labkit.docker_api import DockerAPI, LabContainer
from socklab.entry import WORKLOAD_USER

from .plan import PIDFILE, PORT, server_command


class Lab:
    """The benchmark's Compose project: a server container that runs server processes on demand."""

    def __init__(self, project: ComposeProject, api: DockerAPI) -> None:
        self.project = project
        self.api = api
        self.server: LabContainer = api.containers(project.name, "server")[0]

    def sh(self, script: str, *args: str, user: str = WORKLOAD_USER) -> tuple[int, str]:
        """Run ``sh -c script`` in the server container; exit code and output."""
        return self.api.exec(self.server, ["sh", "-c", script, "sh", *args], user=user)

    def probe(self) -> dict:
        """The connections to the port and the running server process, as the server container sees them."""
        code, out = self.api.exec(self.server, probe_command("server_probe", PIDFILE, PORT), user=WORKLOAD_USER)
        if code != 0:
            raise RuntimeError(f"probe failed ({code}): {out[-400:]}")
        return json.loads(out.strip().splitlines()[-1])

    def container_limits(self) -> dict:
        """Kernel and cgroup limits that bound connections, threads and descriptors."""
        code, out = self.api.exec(self.server, probe_command("container_limits"))
        return json.loads(out) if code == 0 else {"error": out[-400:]}

    def kill_clients(self) -> None:
        """Kill the one-off client containers: every connection they hold closes at once."""
        for container in self.api.containers(self.project.name, "client"):
            self.api.kill(container, "SIGKILL")


class Background:
    """A call run in a thread; its return value (or exception) once joined."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.value = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.value = fn(*args, **kwargs)
            except BaseException as exc:  # reported by join(), in the caller's thread
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        """Whether the call is still running."""
        return self.thread.is_alive()

    def join(self, timeout_s: float | None = None):
        """The call's return value; raises what it raised."""
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError("background call did not finish")
        if self.error is not None:
            raise self.error
        return self.value


def accepted(probe: dict) -> int:
    """Connections the server has taken: established ones not waiting in the accept queue."""
    return max(0, probe["established"] - probe["accept_queue"])


def start_server(lab: Lab, mode: str) -> tuple[Background, dict]:
    """Start a ``mode`` server process; it, and the first reading once it listens (the idle baseline)."""
    lab.sh(f"rm -f {PIDFILE}")
    server = Background(lab.project.exec, "server", *probe_command("launch", PIDFILE, *server_command(mode)),
                        user=WORKLOAD_USER, check=False, timeout_s=900)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.alive():
        probe = lab.probe()
        if probe["listening"] and probe.get("pid"):
            return server, probe
        time.sleep(0.1)
    if server.alive():  # a server that never listened must not hold the port for the next step
        lab.sh(f'kill -KILL "$(cat {PIDFILE})" 2>/dev/null')
    done = server.join(60)
    raise RuntimeError(f"{mode} server did not start listening: {done.stderr[-400:]}")


def stop_server(lab: Lab, server: Background, signal: str = "TERM"):
    """Signal the server process (on SIGTERM the lab's servers print their result); its completed exec."""
    lab.sh(f'kill -{signal} "$(cat {PIDFILE})" 2>/dev/null')
    try:
        return server.join(90)
    except TimeoutError:
        lab.sh(f'kill -KILL "$(cat {PIDFILE})" 2>/dev/null')
        return server.join(30)
