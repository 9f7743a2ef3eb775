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

A task's container is reached through the Docker SDK of the engine it runs
on; on a single-node swarm that is the manager's own engine (see
:meth:`SwarmLab.containers`).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import yaml
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from .. import proc
from ..compose import COMPOSE_FILE, READY_SERVICE, SERVER_SERVICE, ComposeProject
from ..scenario import SERVER_PORT
from .base import LAB_LABEL, Finding, LabContainer, LabObject
from .compose import ComposeEngine, SdkContainers
from .errors import ContainerGone, EngineError, LabEngineError, StartFailed

STACK_LABEL = "com.docker.stack.namespace"
NETWORK = "lab"
IMAGE_ENV = "SOCKLAB_IMAGE"  # what --image sets when it is not given on the command line
SCALE_KEY = "x-socklab-scale"  # the stack file's own note of the replicas set once the server listens
# compose.yaml's gate (`entry ready`), asked once per exec: whether the server's port listens yet.
SERVER_PORT_PROBE = ["python3", "-m", "socklab", "entry", "ready", str(SERVER_PORT), "0s"]
TASK_START_S = 60.0
SERVER_LISTEN_S = 60.0
DOWN_S = 60.0
POLL_S = 0.25
# Task states (docker/swarmkit) once a task's container exists, and the ones that mean it never will.
STARTED_STATES = frozenset({"running", "complete", "failed", "shutdown"})
REFUSED_STATES = frozenset({"rejected", "orphaned", "remove"})
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
        if "environment" in service:
            service["environment"] = {k: escape_dollars("" if v is None else str(v))
                                      for k, v in service["environment"].items()}
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


def task_container(task: Mapping[str, Any], stack: str, node_names: Mapping[str, str]) -> LabContainer | None:
    """A task as the orchestrator's container: None until its container exists.

    StartFailed if the swarm refused it (no node can take it, the image is
    missing): waiting cannot help then.
    """
    status = task.get("Status") or {}
    state = status.get("State", "")
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


@dataclass
class SwarmLab(SdkContainers):
    """One stack of the lab; its tasks' containers reached through the Docker SDK."""

    engine: "SwarmEngine"
    name: str
    stack_path: Path | None = None
    _containers: list[LabContainer] = field(default_factory=list)

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

    def _started(self, short: str, count: int) -> list[LabContainer] | None:
        """The containers of ``short``'s tasks once ``count`` have started; StartFailed if one was refused."""
        nodes = self.engine.node_names()
        found = [c for c in (task_container(t, self.name, nodes) for t in self._tasks(short)) if c]
        return sorted(found, key=lambda c: c.number) if len(found) >= count else None

    def _why_waiting(self, short: str) -> str:
        """What the swarm says of ``short``'s tasks that have not started (a placement no node meets)."""
        said = {(t.get("Status") or {}).get("Err") for t in self._tasks(short)
                if (t.get("Status") or {}).get("State") not in STARTED_STATES}
        return "; ".join(sorted(f"the swarm says {reason!r}" for reason in said if reason))

    def start(self, services: Sequence[str]) -> None:
        if self.stack_path is None:
            raise StartFailed(f"stack {self.name} has no stack file to deploy")
        stack = yaml.safe_load(self.stack_path.read_text(encoding="utf-8"))
        try:
            # Never asks a registry for the image's digest: the image is local (or the user's to provide).
            proc.run(["docker", "stack", "deploy", "--resolve-image", "never", "--prune",
                      "-c", str(self.stack_path), self.name], timeout_s=120)
        except proc.CommandError as exc:
            raise StartFailed(str(exc)) from None
        # The server first: it must listen before a client connects (no depends_on in stacks).
        (server,) = wait_for(lambda: self._started(SERVER_SERVICE, 1), TASK_START_S,
                             "the server's task did not start", why=lambda: self._why_waiting(SERVER_SERVICE))
        if SERVER_SERVICE in services and stack["services"][SERVER_SERVICE].get("command") != ["hold"]:
            wait_for(lambda: self._listening(server), SERVER_LISTEN_S,
                     f"the server did not listen on port {SERVER_PORT}")
        for short, replicas in (stack.get(SCALE_KEY) or {}).items():
            if short in services:
                self._scale(short, replicas)
        for short in services:
            replicas = int(stack["services"][short]["deploy"]["replicas"]) or \
                int((stack.get(SCALE_KEY) or {}).get(short, 0))
            wait_for(lambda short=short, replicas=replicas: self._started(short, replicas), TASK_START_S,
                     f"the tasks of {short} did not all start", why=lambda short=short: self._why_waiting(short))

    def _listening(self, server: LabContainer) -> bool | None:
        if not self.running(server):
            raise StartFailed("the server's task ended before it listened")
        code, _ = self.api.exec(server, SERVER_PORT_PROBE)
        return True if code == 0 else None

    def _scale(self, short: str, replicas: int) -> None:
        (service,) = [s for s in self._services() if s.name == f"{self.name}_{short}"]
        if not service.scale(replicas):
            raise StartFailed(f"the swarm did not scale {short} to {replicas}")

    # ------------------------------------------------------- the Lab interface

    def containers(self, service: str | None = None) -> list[LabContainer]:
        nodes = self.engine.node_names()
        found = []
        for task in self._tasks(service):
            try:
                container = task_container(task, self.name, nodes)
            except StartFailed:
                continue
            if container is not None:
                found.append(container)
        return sorted(found, key=lambda c: (c.service, c.number))

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
        return {n.id: n.attrs["Description"]["Hostname"] for n in self.api.client.nodes.list()}

    def versions(self) -> dict[str, Any]:
        versions = self._compose.versions()
        info = self._swarm()
        versions["swarm"] = {"nodes": info.get("Nodes"), "managers": info.get("Managers"),
                             "node_id": info.get("NodeID")}
        return versions

    def lab_image(self) -> str:
        """The image every task runs: --image / SOCKLAB_IMAGE, else the one the Compose build makes."""
        if self.image:
            return self.image
        return resolve([]).get("services", {}).get("server", {}).get("image", "socklab:latest")

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
        for node in self.api.client.nodes.list():
            desc = node.attrs["Description"]
            name = desc["Hostname"]
            state = node.attrs["Status"]["State"]
            try:
                kernel, caps = self.probe_node(node.id, image)
                detail = (f"{state}, engine {desc['Engine']['EngineVersion']}, kernel {kernel}, "
                          f"backend {backend_of(caps)}, has {image}")
                findings.append(Finding(f"node {name}", True, detail))
            except (StartFailed, ValueError) as exc:
                findings.append(Finding(f"node {name}", False, f"{state}; the probe task failed: {exc}"))
        return findings

    def build_image(self) -> None:
        if self.image is None:  # an image named by the user is theirs to provide on every node
            self._compose.build_image()

    def create(self, definition: Mapping[str, Any], *, name_hint: str, record: Path) -> SwarmLab:
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

    def probe_node(self, node_id: str, image: str) -> tuple[str, dict]:
        """The kernel release and ``shape caps`` of one node, from a one-shot task placed on it."""
        from docker.types import RestartPolicy

        script = "uname -r && exec python3 -m socklab entry shape caps --json"
        service = self.api.client.services.create(
            image, command=["sh", "-c", script], name=f"socklab-doctor-{secrets.token_hex(3)}",
            constraints=[f"node.id == {node_id}"], restart_policy=RestartPolicy(condition="none"),
            cap_add=["NET_ADMIN"], labels={LAB_LABEL: "true"}, container_labels={LAB_LABEL: "true"})
        try:
            def ended() -> bool | None:
                for task in service.tasks():
                    state = task["Status"]["State"]
                    if state in REFUSED_STATES or state == "failed":
                        raise StartFailed(task["Status"].get("Err") or state)
                    if state == "complete":
                        return True
                return None

            wait_for(ended, TASK_START_S, "the probe task did not end")
            out = b"".join(service.logs(stdout=True, stderr=False)).decode("utf-8", "replace")
        finally:
            service.remove()
        kernel, _, caps = out.partition("\n")
        return kernel.strip(), json.loads(caps)

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
                if "active endpoints" in str(exc):
                    return None  # its tasks' containers are still going away
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
           "task_container", "wait_for"]
