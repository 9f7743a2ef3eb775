"""The Swarm engine: a case's containers as one stack on the swarm the Docker client reaches.

The stack is made from the same service definitions the Compose engine runs:
compose.yaml plus the case's override, resolved by ``docker compose config``
and turned into a stack file by :func:`stack_file` (a pure function). Both
files are kept where the run directory keeps a case's definition. What differs
from Compose, and why:

- no ``depends_on`` in stacks: the clients' services are deployed with no
  replicas and scaled to theirs once the server's task listens (bounded
  waits on task states and on its listening socket);
- one-shot services (``restart_policy: none``) instead of swarm jobs, which
  Debian's 20.10 CLI lacks; tasks are addressed by DNS round robin
  (``endpoint_mode: dnsrr``), never through a VIP, whose load balancer would
  answer from the local node and skip the remote task's link;
- an internal attachable overlay per case (its MTU is 1450, not 1500).

Only the manager's engine is reached (local socket, DOCKER_HOST or a
context), so what the lab does with a task goes through the swarm wherever
the task runs: its state and exit status are the task's, its output is the
task's log (relayed by the manager), a file it leaves (a trace) comes back in
that log (the entrypoint prints it at the end, SOCKLAB_EMIT_FILES), and the
server's readiness is the line it prints once it listens. What the swarm
cannot do — exec into a container or signal it — is done on the container's
own node: through the SDK when that is the manager's node (:class:`SdkNode`),
else by a one-shot task placed there with the node's engine socket mounted,
which runs ``socklab node`` (:class:`TaskNode`).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence, TypeVar

import yaml
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from socklab.capture import CAPTURE_PATH
from socklab.entry import ENV_EMIT_FILES
from socklab.errors import UsageError
from socklab.results import find_files, find_results
from socklab.servers.lifecycle import LISTENING_LINE

from .. import proc
from ..compose import COMPOSE_FILE, READY_SERVICE, SERVER_SERVICE, ComposeProject
from ..scenario import SERVER_PORT, TRACE_PATH
from .base import LAB_LABEL, Finding, LabContainer, LabObject, RoleHandle
from .compose import ComposeEngine, SdkContainers, lab_image_ref
from .errors import ContainerGone, EngineError, LabEngineError, StartFailed

STACK_LABEL = "com.docker.stack.namespace"
NETWORK = "lab"
IMAGE_ENV = "SOCKLAB_IMAGE"  # what --image sets when it is not given on the command line
SCALE_KEY = "x-socklab-scale"  # the stack file's own note of the replicas set once the server listens
TASK_START_S = 60.0  # a task the scheduler has not given to a node (a placement no node meets)
NODE_START_S = 300.0  # tasks a node that is up holds and is still starting
NODE_TASK_S = 120.0  # a one-shot task on a node (doctor's probe, an exec or a signal there)
NODES_FRESH_S = 1.0  # how old the list of nodes (and which are down) may be
SERVER_LISTEN_S = 60.0
DOWN_S = 60.0
POLL_S = 0.25
# Task states (docker/swarmkit) once a task's container exists, and the ones that mean it never will.
STARTED_STATES = frozenset({"running", "complete", "failed", "shutdown"})
SCHEDULING_STATES = frozenset({"new", "allocated", "pending"})  # not yet on a node
REFUSED_STATES = frozenset({"rejected", "orphaned", "remove"})
ENDED_STATES = frozenset({"complete", "failed", "shutdown"}) | REFUSED_STATES
# The node's engine socket, mounted into a one-shot task that acts on a container there.
ENGINE_SOCKET = "/var/run/docker.sock"
# Keys of a resolved Compose service that a stack does not take (depends_on, build, healthcheck:
# readiness is waited for here) or that the stack sets itself (image, networks, deploy, labels).
_CARRIED = ("command", "environment", "cap_add", "init")
NO_SWARM = ("no swarm for --engine swarm: the Docker engine is not a swarm manager "
            "(`docker swarm init` makes it one, or point DOCKER_HOST at a manager)")

T = TypeVar("T")


def escape_dollars(value: str) -> str:
    """``value`` as a stack file must say it: ``docker stack deploy`` interpolates ``$``."""
    return value.replace("$", "$$")


def placement_of(service: Mapping[str, Any]) -> list[str]:
    """A resolved Compose service's placement constraints (the experiment's), or none."""
    return list(((service.get("deploy") or {}).get("placement") or {}).get("constraints") or [])


def spread_placement(services: Sequence[str], node_ids: Sequence[str]) -> dict[str, list[str]]:
    """Constraints that put the server on one node and the client services on the others.

    ``services``: those the experiment places nowhere itself (the server among
    them or not); ``node_ids``: the nodes that can take tasks, in a stable order.
    The server goes on the first, the client services round robin on the
    rest, so that their traffic crosses hosts. One node: no constraints.
    """
    if len(node_ids) < 2:
        return {}
    server_node, others = node_ids[0], node_ids[1:]
    clients = [s for s in services if s != SERVER_SERVICE]
    spread = {name: [f"node.id == {others[i % len(others)]}"] for i, name in enumerate(clients)}
    if SERVER_SERVICE in services:
        spread[SERVER_SERVICE] = [f"node.id == {server_node}"]
    return spread


def stack_file(resolved: Mapping[str, Any], services: Sequence[str], *, image: str,
               labels: Mapping[str, str], deferred: Sequence[str] = (),
               default_placement: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The stack file of a case, from its services as ``docker compose config`` resolved them.

    ``services``: the case's services (the override's); ``image``: what every
    task runs (stacks do not build); ``labels``: the lab's and owner's labels,
    on every service, its containers and the network; ``deferred``: services
    deployed with no replicas, scaled to theirs (recorded under ``x-socklab-scale``)
    once the server listens, since stacks ignore ``depends_on``; ``default_placement``:
    constraints for the services whose definition has none (see :func:`spread_placement`).
    """
    out: dict[str, Any] = {}
    scale: dict[str, int] = {}
    for name in services:
        spec = resolved["services"][name]
        replicas = int((spec.get("deploy") or {}).get("replicas") or 1)
        service: dict[str, Any] = {"image": image}
        for key in _CARRIED:
            if spec.get(key) is not None:
                service[key] = spec[key]
        if "command" in service:
            service["command"] = [escape_dollars(str(word)) for word in service["command"]]
        # A trace or capture comes back in the task's log: nothing can copy it off another node.
        service["environment"] = {**{k: escape_dollars("" if v is None else str(v))
                                     for k, v in (service.get("environment") or {}).items()},
                                  ENV_EMIT_FILES: f"{TRACE_PATH} {CAPTURE_PATH}"}
        service_labels = {**(spec.get("labels") or {}), **labels}
        service["labels"] = service_labels
        service["networks"] = [NETWORK]
        if name in deferred:
            scale[name] = replicas
        service["deploy"] = {"replicas": 0 if name in deferred else replicas,
                             "restart_policy": {"condition": "none"},
                             "endpoint_mode": "dnsrr", "labels": dict(service_labels)}
        constraints = placement_of(spec) or (default_placement or {}).get(name)
        if constraints:
            service["deploy"]["placement"] = {"constraints": list(constraints)}
        out[name] = service
    stack: dict[str, Any] = {
        "version": "3.8",
        "services": out,
        "networks": {NETWORK: {"driver": "overlay", "attachable": True, "internal": True,
                               "labels": dict(labels)}},
    }
    if scale:
        stack[SCALE_KEY] = scale
    return stack


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, *,
             poll_s: float | None = None, why: Callable[[], str] | None = None) -> T:
    """``probe()``'s first value that is not None, asked every ``poll_s`` (POLL_S) for up to ``timeout_s``.

    ``probe`` raises (StartFailed, ContainerGone) when waiting longer cannot
    help; after ``timeout_s`` StartFailed says it was ``what`` that did not
    happen, and ``why()``'s answer, if it has one.
    """
    retrying = Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(POLL_S if poll_s is None else poll_s),
                        retry=retry_if_result(lambda value: value is None))
    try:
        return retrying(probe)
    except RetryError:
        reason = why() if why else ""
        raise StartFailed(f"{what} within {timeout_s:g} s{f': {reason}' if reason else ''}") from None


def task_state(task: Mapping[str, Any] | None) -> str:
    """A task's state as the swarm last reported it ("" if it reported none)."""
    return ((task or {}).get("Status") or {}).get("State", "")


def task_container(task: Mapping[str, Any], stack: str, node_names: Mapping[str, str]) -> LabContainer | None:
    """A task as the orchestrator's container: None until its container exists.

    StartFailed if the swarm refused it (no node can take it, the image is
    missing): waiting cannot help then.
    """
    status = task.get("Status") or {}
    state = task_state(task)
    service = task.get("_service", "")
    short = service.removeprefix(f"{stack}_")
    if state in REFUSED_STATES:
        node = node_names.get(task.get("NodeID", ""), "")
        where = f" on node {node}" if node else ""
        raise StartFailed(f"the task {short}.{task.get('Slot')}{where} was {state}: "
                          f"{status.get('Err') or status.get('Message') or 'no reason given'}")
    container_id = (status.get("ContainerStatus") or {}).get("ContainerID")
    if state not in STARTED_STATES or not container_id:
        return None
    slot = int(task.get("Slot") or 1)
    return LabContainer(container_id, f"{service}.{slot}.{task['ID']}", short, slot,
                        node_names.get(task.get("NodeID", ""), ""))


# A task's states in the order it passes them (docker/swarmkit), for telling a slow start from a stall.
TASK_STATE_ORDER = ("new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting",
                    "running", "complete", "failed", "shutdown")


def task_progress(task: Mapping[str, Any]) -> int:
    """How far a task has come, as the rank of its state (0 for one unknown)."""
    state = task_state(task)
    return TASK_STATE_ORDER.index(state) + 1 if state in TASK_STATE_ORDER else 0


def task_exit_code(task: Mapping[str, Any] | None) -> int | None:
    """How a task's container ended: None while it has not (or never had one)."""
    if task_state(task) not in ENDED_STATES:
        return None
    code = (task["Status"].get("ContainerStatus") or {}).get("ExitCode")  # an ended task has a status
    return None if code is None else int(code)


@dataclass
class TaskRole:
    """A role that is its task's main process, on whichever node the task runs."""

    lab: "SwarmLab"
    container: LabContainer

    def _task(self) -> dict:
        """The task as the manager knows it now; ContainerGone if its node was lost before it ended
        (the task went with it) or the swarm forgot it."""
        task = self.lab.api.task(self.lab.task_of(self.container)["ID"])
        if task is None:
            raise ContainerGone(f"the task of {self.container.name} disappeared while its case ran "
                                "(its stack removed from outside the run?)")
        if task_state(task) not in ENDED_STATES:
            lost = self.lab.engine.lost_node(task.get("NodeID", ""))
            if lost:
                raise ContainerGone(f"node {lost} was lost while the case ran, and {self.container.service}'s "
                                    "task with it (the swarm says the node is down)")
        return task

    def running(self) -> bool:
        return task_state(self._task()) not in ENDED_STATES

    def exit_code(self) -> int | None:
        return task_exit_code(self._task())

    def stop(self) -> None:
        if self.running():
            self.lab.node_of(self.container).kill(self.container)

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def stdout(self) -> str:
        return self.lab.task_log(self.container, stderr=False)

    def output(self) -> str:
        return self.lab.task_log(self.container, stderr=True)


class SdkNode(SdkContainers):
    """The manager's own node: its containers through the Docker SDK, as Compose's are."""

    def __init__(self, api: Any):
        self.api = api

    def kill(self, container: LabContainer) -> None:
        self.api.kill(container, "SIGTERM")


@dataclass
class TaskNode:
    """Another node of the swarm: exec and signals by a one-shot task placed there (``socklab node``)."""

    engine: "SwarmEngine"
    node_id: str
    image: str
    lab: "SwarmLab"

    def _ask(self, argv: Sequence[str]) -> dict:
        out = self.engine.run_on_node(self.node_id, self.image, ["python3", "-m", "socklab", "node", *argv],
                                      mount_engine=True)
        answers = [r for r in find_results(out) if r.get("role") in ("node", "error")]
        if not answers or answers[-1].get("role") != "node":
            said = answers[-1].get("error") if answers else out.strip()[-300:]
            raise LabEngineError(f"the task sent to node {self.engine.node_names().get(self.node_id, self.node_id)} "
                                 f"could not {argv[0]} there: {said or 'it printed nothing'}")
        return answers[-1]

    def exec(self, container: LabContainer, argv: Sequence[str]) -> tuple[int, str]:
        answer = self._ask(["exec", container.id, *argv])
        return int(answer["exit_code"]), str(answer["output"])

    def kill(self, container: LabContainer) -> None:
        self._ask(["kill", container.id, "SIGTERM"])

    def read_file(self, container: LabContainer, path: str) -> bytes | None:
        """A file the task's entrypoint printed into its log once its role ended (SOCKLAB_EMIT_FILES)."""
        return find_files(self.lab.task_log(container, stderr=False)).get(path)

    def start_role(self, container: LabContainer, role_argv: Sequence[str], env: Mapping[str, str],
                   remove_first: Sequence[str] = ()) -> RoleHandle:
        raise LabEngineError(
            f"--reuse keeps containers and runs each case's roles in them by docker exec, which the swarm "
            f"cannot do on another node than the manager's ({container.name} is on {container.node}); "
            "run without --reuse, or place the experiment's services on the manager's node")


@dataclass
class SwarmLab:
    """One stack of the lab: tasks through the swarm, exec and signals on each task's own node."""

    engine: "SwarmEngine"
    name: str
    stack_path: Path | None = None
    _tasks_by_container: dict[str, dict] = field(default_factory=dict)

    @property
    def api(self) -> Any:
        return self.engine.api

    # ------------------------------------------------------------------ tasks

    def _services(self) -> list[Any]:
        return self.api.client.services.list(filters={"label": f"{STACK_LABEL}={self.name}"})

    def _tasks(self, short: str | None = None) -> list[dict]:
        tasks = []
        for service in self._services():
            if short is not None and service.name != f"{self.name}_{short}":
                continue
            for task in service.tasks():
                tasks.append({**task, "_service": service.name})
        return tasks

    def _containers_of(self, tasks: Sequence[dict], *, strict: bool) -> list[LabContainer]:
        """The tasks' containers, remembering each one's task; refused tasks raise if ``strict``."""
        nodes = self.engine.node_names()
        found = []
        for task in tasks:
            try:
                container = task_container(task, self.name, nodes)
            except StartFailed:
                if strict:
                    raise
                continue
            if container is not None:
                self._tasks_by_container[container.id] = task
                found.append(container)
        return found

    def _why_waiting(self, short: str) -> str:
        """What the swarm says of ``short``'s tasks that have not started (a placement no node meets)."""
        said = {(t.get("Status") or {}).get("Err") for t in self._tasks(short)
                if task_state(t) not in STARTED_STATES}
        return "; ".join(sorted(f"the swarm says {reason!r}" for reason in said if reason))

    def task_of(self, container: LabContainer) -> dict:
        """The task whose container ``container`` is (as last listed: its id and node do not change)."""
        task = self._tasks_by_container.get(container.id)
        if task is None:
            self.containers()
            task = self._tasks_by_container.get(container.id)
        if task is None:
            raise ContainerGone(f"no task of stack {self.name} has container {container.name}")
        return task

    def task_log(self, container: LabContainer, stderr: bool) -> str:
        """What ``container``'s task printed (stdout; with stderr too if asked), relayed by the manager.

        Empty when its node was lost: the log stayed there, and asking for it would only wait.
        """
        task = self.task_of(container)
        if self.engine.lost_node(task.get("NodeID", "")):
            return ""
        return self.api.task_logs(task["ID"], stderr=stderr)

    def node_of(self, container: LabContainer) -> "SdkNode | TaskNode":
        """How to reach ``container``'s node: the SDK on the manager's, a one-shot task on another."""
        node_id = self.task_of(container).get("NodeID", "")
        if node_id == self.engine.local_node_id():
            return SdkNode(self.api)
        return TaskNode(self.engine, node_id, self.image(), self)

    @functools.cached_property
    def _stack(self) -> dict[str, Any] | None:
        """The stack file as deployed (None for a lab attached by name)."""
        if self.stack_path is None:
            return None
        return yaml.safe_load(self.stack_path.read_text(encoding="utf-8"))

    def image(self) -> str:
        """The image of the stack's tasks (what a one-shot task on one of its nodes runs too)."""
        if self._stack is not None:
            return self._stack["services"][SERVER_SERVICE]["image"]
        return self.engine.lab_image()

    def start(self, services: Sequence[str]) -> None:
        stack = self._stack
        if stack is None:
            raise StartFailed(f"stack {self.name} has no stack file to deploy")
        try:
            # Never asks a registry for the image's digest: the image is local (or the user's to provide).
            proc.run(["docker", "stack", "deploy", "--resolve-image", "never", "--prune",
                      "-c", str(self.stack_path), self.name], timeout_s=120)
        except proc.CommandError as exc:
            raise StartFailed(str(exc)) from None
        # The server first: it must listen before a client connects (no depends_on in stacks).
        (server,) = self._wait_started(SERVER_SERVICE, 1)
        if SERVER_SERVICE in services and stack["services"][SERVER_SERVICE].get("command") != ["hold"]:
            wait_for(lambda: self._listening(server), SERVER_LISTEN_S,
                     f"the server did not listen on port {SERVER_PORT}")
        for short, replicas in (stack.get(SCALE_KEY) or {}).items():
            if short in services:
                self._scale(short, replicas)
        for short in services:
            replicas = int(stack["services"][short]["deploy"]["replicas"]) or \
                int((stack.get(SCALE_KEY) or {}).get(short, 0))
            self._wait_started(short, replicas)

    def _wait_started(self, short: str, count: int) -> list[LabContainer]:
        """Wait until ``count`` tasks of ``short`` have started, for as long as they make progress;
        their containers, by number.

        The bound is on a stall: StartFailed once no task of ``short`` has moved
        on a state for TASK_START_S while one still waits for the scheduler, or
        for NODE_START_S once every waiting task is on a node that is up, whose
        engine is creating and starting the containers: ten at once on one
        emulated CPU stay in "starting" for over 60 s, while a placement that no
        node meets stays "pending" for good. A node lost meanwhile fails the
        start at once, naming it. The server's one task is waited for alike: on a
        loaded host it was still starting on its node after 60 s.
        """
        progress, last_progress = -1, time.monotonic()
        while True:
            tasks = self._tasks(short)
            containers = self._containers_of(tasks, strict=True)
            started = len(containers)
            if started >= count:
                return sorted(containers, key=lambda c: c.number)
            waiting = [t for t in tasks if task_state(t) not in STARTED_STATES]
            for task in waiting:
                lost = self.engine.lost_node(task.get("NodeID", ""))
                if lost:
                    raise StartFailed(f"node {lost} was lost while the tasks of {short} started")
            now = sum(task_progress(t) for t in tasks)
            if now > progress:
                progress, last_progress = now, time.monotonic()
            else:
                scheduling = not waiting or any(task_state(t) in SCHEDULING_STATES for t in waiting)
                bound = TASK_START_S if scheduling else NODE_START_S
                if time.monotonic() - last_progress > bound:
                    why = self._why_waiting(short)
                    raise StartFailed(f"the tasks of {short} did not all start: {started} of {count}, and none "
                                      f"moved on within {bound:g} s{f': {why}' if why else ''}")
            time.sleep(POLL_S)

    def _listening(self, server: LabContainer) -> bool | None:
        """Whether the server said it listens (its log, from any node); StartFailed if it ended first."""
        role = TaskRole(self, server)
        if LISTENING_LINE in role.output():
            return True
        if not role.running():
            raise StartFailed("the server's task ended before it listened")
        return None

    def _scale(self, short: str, replicas: int) -> None:
        (service,) = [s for s in self._services() if s.name == f"{self.name}_{short}"]
        if not service.scale(replicas):
            raise StartFailed(f"the swarm did not scale {short} to {replicas}")

    # ------------------------------------------------------- the Lab interface

    def containers(self, service: str | None = None) -> list[LabContainer]:
        found = self._containers_of(self._tasks(service), strict=False)
        return sorted(found, key=lambda c: (c.service, c.number))

    def running(self, container: LabContainer) -> bool:
        return TaskRole(self, container).running()

    def main_role(self, container: LabContainer) -> RoleHandle:
        return TaskRole(self, container)

    def start_role(self, container: LabContainer, role_argv: Sequence[str], env: Mapping[str, str],
                   remove_first: Sequence[str] = ()) -> RoleHandle:
        return self.node_of(container).start_role(container, role_argv, env, remove_first)

    def exec(self, container: LabContainer, argv: Sequence[str]) -> tuple[int, str]:
        return self.node_of(container).exec(container, argv)

    def read_file(self, container: LabContainer, path: str) -> bytes | None:
        return self.node_of(container).read_file(container, path)

    def stream(self, container: LabContainer, argv: Sequence[str], sink: BinaryIO) -> tuple[int | None, str]:
        node = self.node_of(container)
        if not isinstance(node, SdkNode):
            raise LabEngineError(f"{container.name} runs on node {container.node}, and a live stream comes only "
                                 "from the manager's own node (a task sent to another node returns once it ends)")
        return node.stream(container, argv, sink)

    def down(self) -> None:
        proc.run(["docker", "stack", "rm", self.name], check=False, timeout_s=120)
        # `stack rm` returns before the tasks' containers are gone, and a network
        # with containers still attached cannot go: wait, then remove what is left.
        # A sparse listing: a full one inspects each container it found, and fails
        # on one that the swarm removes in between (seen in CI, on a resumed run).
        client = self.api.client
        flt = {"label": f"{STACK_LABEL}={self.name}"}
        try:
            wait_for(lambda: None if client.containers.list(all=True, filters=flt, sparse=True) else True, DOWN_S,
                     f"the containers of stack {self.name} were not removed")
        except StartFailed as exc:
            raise LabEngineError(str(exc)) from None
        for network in client.networks.list(filters=flt):
            self.engine.remove(LabObject("networks", network.name, {}, network.id))


class SwarmEngine:
    """Docker Swarm for a case's tasks (a stack per case); the Docker SDK for everything in them."""

    def __init__(self, api: Any = None, image: str | None = None):
        self._compose = ComposeEngine(api)
        self.image = image or os.environ.get(IMAGE_ENV) or None
        self._local_node_id: str | None = None
        self._nodes_seen: tuple[float, list[Any]] | None = None

    @property
    def api(self) -> Any:
        return self._compose.api

    def _swarm(self) -> dict:
        """The engine's swarm state; EngineError (exit 3) unless it is a swarm manager."""
        info = self.api.client.info().get("Swarm") or {}
        if info.get("LocalNodeState") != "active" or not info.get("ControlAvailable"):
            raise EngineError(NO_SWARM)
        return info

    def schedulable_nodes(self) -> list[str]:
        """The ids of the nodes that can take tasks (ready, active), ordered by hostname."""
        nodes = [n for n in self.api.client.nodes.list()
                 if n.attrs["Status"]["State"] == "ready" and n.attrs["Spec"].get("Availability") == "active"]
        return [n.id for n in sorted(nodes, key=lambda n: (n.attrs["Description"]["Hostname"], n.id))]

    def node_names(self) -> dict[str, str]:
        """Node id → hostname, for messages and records."""
        return {n.id: n.attrs["Description"]["Hostname"] for n in self._nodes()}

    def _nodes(self) -> list[Any]:
        """The swarm's nodes, asked at most once per NODES_FRESH_S: every running role asks of its node."""
        now = time.monotonic()
        if self._nodes_seen is None or now - self._nodes_seen[0] > NODES_FRESH_S:
            self._nodes_seen = (now, self.api.client.nodes.list())
        return self._nodes_seen[1]

    def lost_node(self, node_id: str) -> str:
        """The hostname of ``node_id`` if the swarm says it is down (or no longer knows it); else empty."""
        if not node_id:
            return ""
        for node in self._nodes():
            if node.id == node_id:
                return node.attrs["Description"]["Hostname"] if node.attrs["Status"]["State"] == "down" else ""
        return node_id

    def versions(self) -> dict[str, Any]:
        versions = self._compose.versions()
        info = self._swarm()
        versions["swarm"] = {"nodes": info.get("Nodes"), "managers": info.get("Managers"),
                             "node_id": info.get("NodeID")}
        return versions

    def lab_image(self) -> str:
        """The image every task runs: --image / SOCKLAB_IMAGE, else the one the Compose build makes."""
        return self.image or lab_image_ref()

    def health(self) -> list[Finding]:
        findings = self._compose.health()
        if not all(f.ok for f in findings):
            return findings
        try:
            info = self._swarm()
        except EngineError as exc:
            return findings + [Finding("swarm", False, str(exc))]
        findings.append(Finding("swarm", True, f"a manager; {info.get('Nodes')} node(s), "
                                               f"{info.get('Managers')} manager(s)"))
        image = self.lab_image()
        nodes = sorted(self.api.client.nodes.list(), key=lambda n: n.attrs["Description"]["Hostname"])

        def probed(node: Any) -> Finding:
            desc = node.attrs["Description"]
            state = node.attrs["Status"]["State"]
            try:
                kernel, caps = self.probe_node(node.id, image)
            except (StartFailed, LabEngineError) as exc:
                return Finding(f"node {desc['Hostname']}", False, f"{state}; the probe task failed: {exc}")
            return Finding(f"node {desc['Hostname']}", True, f"{state}, engine {desc['Engine']['EngineVersion']}, "
                                                           f"kernel {kernel}, backend {backend_of(caps)}, has {image}")

        # Each probe is a task on its node: side by side, doctor takes one task's time, not one per node.
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(nodes)))) as pool:
            findings += list(pool.map(probed, nodes))
        return findings

    def build_image(self) -> None:
        if self.image is None:  # an image named by the user is theirs to provide on every node
            self._compose.build_image()

    def create(self, definition: Mapping[str, Any], *, name_hint: str, record: Path) -> SwarmLab:
        mounting = [name for name, service in definition["services"].items()
                    if any(isinstance(v, Mapping) and v.get("type") == "bind" for v in service.get("volumes", ()))]
        if mounting:
            # A bind mount names a directory of this machine; a task on another node would
            # find it missing, or worse, a different one there.
            raise UsageError(f"{', '.join(mounting)} run a program of the user's, which the swarm engine cannot "
                             "carry yet: its tasks on other nodes cannot see the run directory; use --engine compose")
        override = record.with_name(record.name + ".yaml")
        override.write_text(yaml.safe_dump(dict(definition), sort_keys=False), encoding="utf-8")
        # The Compose gate shares the server's network namespace, which a stack
        # cannot; here the engine itself waits for the server to listen.
        services = [s for s in definition["services"] if s != READY_SERVICE]
        labels = {LAB_LABEL: "true"}
        for service in definition["services"].values():
            labels.update({k: v for k, v in (service.get("labels") or {}).items() if k.startswith("io.socklab.")})

        resolved = resolve([override])
        # The image Compose would run this case's server with, unless --image names another.
        image = self.image or resolved["services"][SERVER_SERVICE]["image"]
        unplaced = [s for s in services if not placement_of(resolved["services"][s])]
        stack = stack_file(resolved, services, image=image, labels=labels,
                           deferred=[s for s in services if s != SERVER_SERVICE],
                           default_placement=spread_placement(unplaced, self.schedulable_nodes()))
        path = record.with_name(record.name + ".stack.yaml")
        path.write_text(yaml.safe_dump(stack, sort_keys=False), encoding="utf-8")
        return SwarmLab(self, f"socklab-{name_hint}-{secrets.token_hex(3)}", path)

    def attach(self, name: str) -> SwarmLab:
        return SwarmLab(self, name)

    def local_node_id(self) -> str:
        """The id of the node whose engine the Docker client reaches (the manager's)."""
        if self._local_node_id is None:
            self._local_node_id = self._swarm().get("NodeID", "")
        return self._local_node_id

    def run_on_node(self, node_id: str, image: str, command: Sequence[str], *, mount_engine: bool = False) -> str:
        """Run ``command`` (instead of the entrypoint: no link, as root) once, as a task placed on
        ``node_id``; its stdout.

        ``mount_engine``: the node's engine socket is mounted (``socklab node``
        acts on a container there). StartFailed if the task is refused or does
        not end within NODE_TASK_S.
        """
        from docker.types import Mount, RestartPolicy

        mounts = [Mount(ENGINE_SOCKET, ENGINE_SOCKET, type="bind")] if mount_engine else []
        service = self.api.client.services.create(
            image, command=list(command), name=f"socklab-node-{secrets.token_hex(3)}",
            constraints=[f"node.id == {node_id}"], restart_policy=RestartPolicy(condition="none"),
            cap_add=["NET_ADMIN"], mounts=mounts, labels={LAB_LABEL: "true"}, container_labels={LAB_LABEL: "true"})
        try:
            def ended() -> str | None:
                for task in service.tasks():
                    state = task_state(task)
                    if state in REFUSED_STATES:
                        raise StartFailed(task["Status"].get("Err") or state)
                    if state in ENDED_STATES:
                        return task["ID"]
                return None

            task_id = wait_for(ended, NODE_TASK_S, f"the task on node {self.node_names().get(node_id, node_id)} "
                                                   "did not end")
            return self.api.task_logs(task_id, stderr=False)
        finally:
            service.remove()

    def probe_node(self, node_id: str, image: str) -> tuple[str, dict]:
        """The kernel release and ``shape caps`` of one node, from a one-shot task placed on it."""
        out = self.run_on_node(node_id, image, ["sh", "-c",
                                                "uname -r && exec python3 -m socklab entry shape caps --json"])
        kernel, _, caps = out.partition("\n")
        try:
            return kernel.strip(), json.loads(caps)
        except ValueError:
            raise StartFailed(f"the probe printed no capabilities: {out.strip()[-300:] or 'nothing'}") from None

    def probe(self, role_argv: Sequence[str]) -> str:
        info = self._swarm()
        if list(role_argv) != ["shape", "caps", "--json"]:
            raise LabEngineError("the swarm engine probes a node's kernel only (shape caps --json)")
        return json.dumps(self.probe_node(info["NodeID"], self.lab_image())[1])

    def objects(self, label: str = LAB_LABEL) -> list[LabObject]:
        """The lab's services, then its networks (a stack is no object of its own; its tasks go with them)."""
        client = self.api.client
        found = [LabObject("services", s.name, dict(s.attrs["Spec"].get("Labels") or {}), s.id)
                 for s in client.services.list(filters={"label": label})]
        found += [LabObject("networks", n.name, dict(n.attrs.get("Labels") or {}), n.id)
                  for n in client.networks.list(filters={"label": label, "driver": "overlay"})]
        return found

    def remove(self, obj: LabObject) -> bool:
        import docker.errors

        client = self.api.client
        try:
            if obj.kind == "services":
                client.services.get(obj.id or obj.name).remove()
                return True
            network = client.networks.get(obj.id or obj.name)
        except docker.errors.NotFound:
            return False

        def removed() -> bool | None:
            try:
                network.remove()
            except docker.errors.NotFound:
                return True
            except docker.errors.APIError as exc:
                if "active endpoints" in str(exc) or "in use by task" in str(exc):
                    return None  # its tasks' containers (here, or on another node) are still going away
                raise LabEngineError(f"Docker could not remove {obj.name}: {exc}") from None
            return True

        try:
            return wait_for(removed, DOWN_S, f"network {obj.name} was not removed")
        except StartFailed as exc:
            raise LabEngineError(str(exc)) from None


def resolve(files: Sequence[Path]) -> dict[str, Any]:
    """compose.yaml with ``files`` on top, as ``docker compose config`` resolves it (extends, variables)."""
    project = ComposeProject("socklab-swarm", files=(COMPOSE_FILE, *files))
    try:
        # Every profile: a client group extends compose.yaml's `client`, which is in an inactive one.
        out = project.compose("config", "--format", "json", env={"COMPOSE_PROFILES": "*"}, timeout_s=60).stdout
    except proc.CommandError as exc:
        raise LabEngineError(f"docker compose could not resolve the case's services: {exc}") from None
    return json.loads(out)


def backend_of(caps: Mapping[str, Any]) -> str:
    """The shaping backend a node's links get, from its ``shape caps`` (as doctor words it)."""
    if (caps.get("qdiscs") or {}).get("netem"):
        return "netem"
    return "userspace" if caps.get("nfqueue") else "rate only (no netem, no NFQUEUE)"


__all__ = ["ContainerGone", "SwarmEngine", "SwarmLab", "backend_of", "escape_dollars", "stack_file",
           "task_container", "task_state", "wait_for"]
