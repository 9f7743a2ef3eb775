"""The Swarm engine without a swarm: the stack file it builds, and how it waits for tasks and fails."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field

import docker
import pytest
import yaml

from labkit import scenario
from labkit.cli import build_parser
from labkit.engine import LAB_LABEL, ContainerGone, LabEngineError, StartFailed, open_engine
from labkit.engine import swarm
from labkit.engine.swarm import (NO_SWARM, SCALE_KEY, SwarmEngine, SwarmLab, spread_placement, stack_file,
                                 task_container, task_state, wait_for)
from labkit.config import load_experiment
from labkit.rundir import RunDir
from labkit.runner import CaseRunner
from socklab.entry import ENV_EMIT_FILES
from socklab.errors import EngineError, UsageError
from socklab.results import emit_file
from socklab.servers.lifecycle import LISTENING_LINE

from .fake_engine import FakeEngine, real_like
from .test_runner import cases

OWNER = {"io.socklab.owner.host": "h", "io.socklab.owner.pid": "1"}


def resolved_case() -> dict:
    """What `docker compose config` makes of compose.yaml and a case's override (its shape, abridged)."""
    common = {"build": {"context": "services"}, "cap_add": ["NET_ADMIN"], "init": True, "image": "socklab:h7",
              "networks": {"lab": None}, "volumes": [{"type": "volume", "source": "results", "target": "/results"}]}
    return {"name": "x", "services": {
        "server": {**common, "command": ["server", "--mode", "blocking", "--port", "5000"],
                   "environment": {"SOCKLAB_LINK_RATE": "", "SOCKLAB_RESULT_RESET": "0"},
                   "healthcheck": {"test": ["CMD", "sh", "-c", "ss -ltnH 'sport = :5000' | grep -q ."]},
                   "labels": {LAB_LABEL: "true", scenario.CASE_LABEL: "c1"}},
        "client-sender": {**common, "command": ["client", "--pattern", "costs $5\n"],
                          "environment": {"SOCKLAB_LINK_RATE": "100mbit", "SOCKLAB_LINK_DELAY": None},
                          "depends_on": {"server": {"condition": "service_healthy", "required": True}},
                          "deploy": {"replicas": 3}, "profiles": ["manual"],
                          "labels": {LAB_LABEL: "true", scenario.CASE_LABEL: "c1"}},
        "summary": {**common, "command": ["summary"]},
    }}


def build(**kwargs) -> dict:
    labels = {LAB_LABEL: "true", **OWNER}
    return stack_file(resolved_case(), ["server", "client-sender"], image="socklab:pinned",
                      labels=labels, **kwargs)


def test_the_stack_holds_the_cases_services_only_with_the_fixed_image():
    stack = build()
    assert stack["version"] == "3.8"
    assert list(stack["services"]) == ["server", "client-sender"]
    assert {s["image"] for s in stack["services"].values()} == {"socklab:pinned"}


def test_each_service_is_a_one_shot_task_addressed_by_dns_on_the_cases_overlay():
    stack = build()
    for service in stack["services"].values():
        assert service["deploy"]["restart_policy"] == {"condition": "none"}
        assert service["deploy"]["endpoint_mode"] == "dnsrr"
        assert service["cap_add"] == ["NET_ADMIN"]
        assert service["networks"] == ["lab"]
        # What stacks ignore or cannot do is not carried: readiness is waited for by the engine.
        assert not {"build", "depends_on", "healthcheck", "volumes", "profiles"} & set(service)
    assert stack["networks"] == {"lab": {"driver": "overlay", "attachable": True, "internal": True,
                                         "labels": {LAB_LABEL: "true", **OWNER}}}
    assert stack["services"]["client-sender"]["deploy"]["replicas"] == 3
    assert stack["services"]["server"]["deploy"]["replicas"] == 1


def test_labels_go_on_services_and_their_containers_with_the_owner():
    stack = build()
    for service in stack["services"].values():
        expected = {LAB_LABEL: "true", scenario.CASE_LABEL: "c1", **OWNER}
        assert service["labels"] == expected
        assert service["deploy"]["labels"] == expected


def test_dollars_are_escaped_and_unset_variables_are_empty():
    sender = build()["services"]["client-sender"]
    assert sender["command"] == ["client", "--pattern", "costs $$5\n"]
    assert sender["environment"] == {"SOCKLAB_LINK_RATE": "100mbit", "SOCKLAB_LINK_DELAY": "",
                                     ENV_EMIT_FILES: f"{scenario.TRACE_PATH} {scenario.CAPTURE_PATH}"}
    # The stack file survives YAML as it is saved into the run directory.
    assert yaml.safe_load(yaml.safe_dump(build()))["services"]["client-sender"]["command"][2] == "costs $$5\n"


def test_deferred_services_start_with_no_replicas_and_say_how_many_they_get():
    stack = build(deferred=["client-sender"])
    assert stack["services"]["client-sender"]["deploy"]["replicas"] == 0
    assert stack[SCALE_KEY] == {"client-sender": 3}
    assert SCALE_KEY not in build()


# ------------------------------------------------------------------ waiting

def test_without_placement_the_server_and_the_clients_go_on_different_nodes():
    services = ["server", "client-a", "client-b", "client-c"]
    assert spread_placement(services, ["n1"]) == {}  # one node: nothing to spread
    assert spread_placement(services, ["n1", "n2", "n3"]) == {
        "server": ["node.id == n1"], "client-a": ["node.id == n2"], "client-b": ["node.id == n3"],
        "client-c": ["node.id == n2"]}
    # The server placed by the experiment: the clients still keep off the first node.
    assert spread_placement(["client-a"], ["n1", "n2"]) == {"client-a": ["node.id == n2"]}


def test_the_experiments_placement_wins_over_the_spread():
    resolved = resolved_case()
    resolved["services"]["client-sender"]["deploy"]["placement"] = {"constraints": ["node.labels.zone == b"]}
    stack = stack_file(resolved, ["server", "client-sender"], image="socklab:pinned", labels={LAB_LABEL: "true"},
                       default_placement={"server": ["node.id == n1"], "client-sender": ["node.id == n2"]})
    assert stack["services"]["server"]["deploy"]["placement"] == {"constraints": ["node.id == n1"]}
    assert stack["services"]["client-sender"]["deploy"]["placement"] == {"constraints": ["node.labels.zone == b"]}
    assert "placement" not in build()["services"]["server"]["deploy"]


def test_only_ready_active_nodes_take_tasks_in_hostname_order():
    @dataclass
    class Node:
        id: str
        attrs: dict

    def node(node_id, hostname, state="ready", availability="active"):
        return Node(node_id, {"Description": {"Hostname": hostname}, "Status": {"State": state},
                              "Spec": {"Availability": availability}})

    nodes = [node("c", "vm2"), node("a", "vm3"), node("d", "vm0", state="down"),
             node("e", "vm4", availability="drain"), node("b", "vm1")]

    class Client:
        class nodes:  # noqa: N801 (the SDK's attribute)
            @staticmethod
            def list():
                return nodes

    class API:
        client = Client

    assert SwarmEngine(API()).schedulable_nodes() == ["b", "c", "a"]


def test_wait_for_returns_the_first_answer():
    answers = iter([None, None, "ready"])
    assert wait_for(lambda: next(answers), 5, "x", poll_s=0.001) == "ready"


def test_wait_for_is_bounded_and_says_what_did_not_happen():
    started = time.monotonic()
    with pytest.raises(StartFailed, match=r"^the server did not listen within 0.2 s$"):
        wait_for(lambda: None, 0.2, "the server did not listen", poll_s=0.02)
    assert time.monotonic() - started < 2


def test_wait_for_stops_at_once_when_waiting_cannot_help():
    calls = []

    def probe():
        calls.append(1)
        raise StartFailed("refused")

    with pytest.raises(StartFailed, match="refused"):
        wait_for(probe, 30, "x", poll_s=0.001)
    assert len(calls) == 1


def task(state: str, *, slot: int = 1, container: str | None = "c0ffee", err: str = "") -> dict:
    status = {"State": state, "Err": err}
    if container:
        status["ContainerStatus"] = {"ContainerID": container}
    return {"ID": f"t{slot}", "Slot": slot, "NodeID": "n1", "Status": status, "_service": "st_client-a"}


def test_a_tasks_state_is_what_the_swarm_last_reported_or_empty():
    assert task_state(task("starting")) == "starting"
    assert task_state({"ID": "t1"}) == task_state({"Status": None}) == task_state(None) == ""


def test_a_task_is_a_container_once_its_container_exists():
    assert task_container(task("pending", container=None), "st", {}) is None
    assert task_container(task("starting"), "st", {}) is None
    found = task_container(task("complete", slot=2), "st", {"n1": "vm2"})
    assert (found.id, found.service, found.number, found.name, found.node) == \
        ("c0ffee", "client-a", 2, "st_client-a.2.t2", "vm2")


def test_a_refused_task_fails_the_start_with_its_node_and_reason():
    with pytest.raises(StartFailed, match=r"client-a\.1 on node vm2 was rejected: No such image: socklab:x"):
        task_container(task("rejected", err="No such image: socklab:x"), "st", {"n1": "vm2"})


# --------------------------------------------------------- a fake swarm API

@dataclass
class FakeService:
    name: str
    states: list  # the states its tasks go through, one per look
    replicas: int = 1
    looks: int = 0
    err: str = ""  # what the swarm says of its tasks

    def tasks(self):
        found = self.current()
        self.looks += 1
        return found

    def current(self):
        state = self.states[min(self.looks, len(self.states) - 1)]
        return [{**task(state, slot=n + 1, container=f"{self.name}-{n}", err=self.err), "ID": f"{self.name}-t{n}"}
                for n in range(self.replicas)]

    def scale(self, replicas):
        self.replicas = replicas
        return True


@dataclass
class FakeNode:
    id: str
    state: str

    @property
    def attrs(self):
        return {"Description": {"Hostname": f"vm-{self.id}"}, "Status": {"State": self.state},
                "Spec": {"Availability": "active"}}


@dataclass
class FakeClient:
    services_by_name: dict
    swarm: dict = field(default_factory=lambda: {"LocalNodeState": "active", "ControlAvailable": True,
                                                 "NodeID": "n1"})

    @property
    def services(self):
        client = self

        class Services:
            def list(self, filters):
                return list(client.services_by_name.values())

        return Services()

    down: set = field(default_factory=set)  # the nodes the swarm says are down

    @property
    def nodes(self):
        client = self

        class Nodes:
            def list(self):
                return [FakeNode(node_id, "down" if node_id in client.down else "ready")
                        for node_id in ("n1", "n2")]

        return Nodes()

    def info(self):
        return {"Swarm": self.swarm}

    container_listings: int = 0

    @property
    def containers(self):
        client = self

        class Containers:
            """A stack's last task container, removed by the swarm while it is being listed:
            a full listing inspects it afterwards and meets NotFound; a sparse one does not."""

            def list(self, all, filters, sparse=False):
                client.container_listings += 1
                if not sparse:
                    raise docker.errors.NotFound("No such container: 8977")
                return [] if client.container_listings > 1 else ["a container on its way out"]

        return Containers()

    @property
    def networks(self):
        class Networks:
            def list(self, filters):
                return []

        return Networks()


@dataclass
class FakeAPI:
    client: FakeClient
    listening_after: int = 0  # how many reads of the server's log come before it says it listens
    server_running: bool = True
    probes: int = 0
    logs: dict = field(default_factory=dict)  # a task's stdout, by task id
    execs: list = field(default_factory=list)

    def task_logs(self, task_id, stderr=True):
        if task_id.startswith("st_server"):
            self.probes += 1
            return f"{LISTENING_LINE} 0.0.0.0:5000 mode=blocking\n" if self.probes > self.listening_after else ""
        return self.logs.get(task_id, "")

    def task(self, task_id):
        for service in self.client.services_by_name.values():
            for found in service.current():
                if found["ID"] == task_id:
                    if service.name == "st_server" and not self.server_running:
                        found["Status"] = {**found["Status"], "State": "complete",
                                           "ContainerStatus": {"ContainerID": "x", "ExitCode": 1}}
                    return found
        return None

    def exec(self, container, argv):
        self.execs.append((container.id, list(argv)))
        return 0, "through the SDK"


def fake_lab(tmp_path, monkeypatch, api: FakeAPI) -> SwarmLab:
    deployed = []
    monkeypatch.setattr(swarm.proc, "run", lambda argv, **kw: deployed.append(argv))
    monkeypatch.setattr(swarm, "POLL_S", 0.001)
    path = tmp_path / "case.stack.yaml"
    path.write_text(yaml.safe_dump(build(deferred=["client-sender"])))
    lab = SwarmLab(SwarmEngine(api=api), "st", path)
    lab.deployed = deployed
    return lab


def swarm_of(server_states, client_states) -> FakeClient:
    return FakeClient({"server": FakeService("st_server", server_states),
                       "client-sender": FakeService("st_client-sender", client_states, replicas=0)})


def test_start_deploys_waits_for_the_server_to_listen_then_scales_the_clients(tmp_path, monkeypatch):
    client = swarm_of(["pending", "starting", "running"], ["running"])
    api = FakeAPI(client, listening_after=2)
    lab = fake_lab(tmp_path, monkeypatch, api)
    lab.start(["server", "client-sender"])
    (deploy,) = lab.deployed
    assert deploy[:3] == ["docker", "stack", "deploy"] and "--resolve-image" in deploy and deploy[-1] == "st"
    assert api.probes == 3  # asked until it listened
    assert client.services_by_name["client-sender"].replicas == 3
    assert [c.number for c in lab.containers("client-sender")] == [1, 2, 3]


def test_a_server_that_ends_before_it_listens_fails_the_start(tmp_path, monkeypatch):
    client = swarm_of(["running"], ["running"])
    api = FakeAPI(client, listening_after=10**6, server_running=False)
    lab = fake_lab(tmp_path, monkeypatch, api)
    with pytest.raises(StartFailed, match="the server's task ended before it listened"):
        lab.start(["server", "client-sender"])
    assert client.services_by_name["client-sender"].replicas == 0  # no client was started


def test_a_server_task_that_never_starts_fails_within_the_bound(tmp_path, monkeypatch):
    client = swarm_of(["pending"], ["running"])
    lab = fake_lab(tmp_path, monkeypatch, FakeAPI(client))
    monkeypatch.setattr(swarm, "TASK_START_S", 0.1)
    with pytest.raises(StartFailed, match=r"^the tasks of server did not all start: 0 of 1, and none moved on "
                                          r"within 0\.1 s$"):
        lab.start(["server", "client-sender"])
    assert client.services_by_name["client-sender"].replicas == 0  # no client was started


def test_a_server_task_that_keeps_starting_on_its_node_is_waited_for_past_the_bound(tmp_path, monkeypatch):
    # As the clients' tasks are: on a loaded host the server's was still starting after 60 s.
    client = swarm_of(["running"], ["running"])
    api = FakeAPI(client)
    lab = fake_lab(tmp_path, monkeypatch, api)
    monkeypatch.setattr(swarm, "TASK_START_S", 0.3)
    looks = iter(["pending", "assigned", "preparing", "preparing", "starting", "starting", "starting"])
    server = client.services_by_name["server"]

    def tasks():
        state = next(looks, "running")
        time.sleep(0.1)
        return [{**task(state, slot=1, container="c-server" if state == "running" else None), "ID": "st_server-t0"}]

    server.tasks = tasks
    started = time.monotonic()
    lab.start(["server", "client-sender"])  # 0.8 s in all, past the 0.3 s bound: never stalled that long
    assert time.monotonic() - started >= 0.7
    assert client.services_by_name["client-sender"].replicas == 3


def test_a_placement_no_node_meets_fails_the_start_with_what_the_swarm_says(tmp_path, monkeypatch):
    reason = "no suitable node (scheduling constraints not satisfied on 1 node)"
    client = swarm_of(["pending"], ["running"])
    client.services_by_name["server"].err = reason
    lab = fake_lab(tmp_path, monkeypatch, FakeAPI(client))
    monkeypatch.setattr(swarm, "TASK_START_S", 0.1)
    with pytest.raises(StartFailed) as failed:
        lab.start(["server", "client-sender"])
    assert str(failed.value) == (f"the tasks of server did not all start: 0 of 1, and none moved on within 0.1 s: "
                                 f"the swarm says {reason!r}")


def test_a_refused_client_task_fails_the_start(tmp_path, monkeypatch):
    client = swarm_of(["running"], ["rejected"])
    lab = fake_lab(tmp_path, monkeypatch, FakeAPI(client))
    with pytest.raises(StartFailed, match=r"client-sender\.1 on node vm-n1 was rejected"):
        lab.start(["server", "client-sender"])


# ------------------------------------------------------- no swarm, and picking

def test_an_engine_that_is_not_a_manager_is_no_swarm():
    client = FakeClient({}, swarm={"LocalNodeState": "inactive", "ControlAvailable": False})
    engine = SwarmEngine(api=FakeAPI(client))
    with pytest.raises(EngineError, match="^no swarm for --engine swarm") as caught:
        engine._swarm()
    assert caught.value.exit_code == 3 and str(caught.value) == NO_SWARM


def test_engine_option_picks_the_engine():
    args = build_parser().parse_args(["run", "x.yaml", "--engine", "swarm", "--image", "reg/socklab:1"])
    engine = open_engine(args.engine, image=args.image)
    assert isinstance(engine, SwarmEngine) and engine.image == "reg/socklab:1"
    assert type(open_engine(build_parser().parse_args(["clean"]).engine)).__name__ == "ComposeEngine"
    assert build_parser().parse_args(["doctor", "--engine", "swarm"]).engine == "swarm"


# ------------------------------------------------- what the runner records

@pytest.mark.parametrize("mtu", [1500, 1450])
def test_the_record_carries_the_lab_devices_mtu(tmp_path, mtu):
    engine = FakeEngine(functools.partial(real_like, mtu=mtu))
    (case,) = cases()
    record = CaseRunner(engine, RunDir.create(tmp_path, "fake"), lambda text: None).run(case, 0)
    assert record["status"] == "ok" and record["link"]["mtu"] == mtu
    assert "nodes" not in record  # the fake's containers, like Compose's, are on no node of their own


def test_down_waits_for_the_tasks_containers_without_inspecting_vanishing_ones(tmp_path, monkeypatch):
    client = swarm_of(["running"], ["running"])
    lab = fake_lab(tmp_path, monkeypatch, FakeAPI(client))
    monkeypatch.setattr(swarm, "DOWN_S", 5.0)
    lab.down()
    assert lab.deployed == [["docker", "stack", "rm", "st"]]
    assert client.container_listings == 2  # listed until the container was gone


# ------------------------------------------- tasks on the manager's node and others

def lab_on(tmp_path, monkeypatch, local_node: str) -> tuple[SwarmLab, FakeAPI, list]:
    """A started lab whose tasks run on node n1, seen from a manager that is node ``local_node``."""
    client = swarm_of(["running"], ["running"])
    client.swarm["NodeID"] = local_node
    api = FakeAPI(client)
    lab = fake_lab(tmp_path, monkeypatch, api)
    asked = []

    def run_on_node(node_id, image, command, *, mount_engine=False):
        asked.append((node_id, image, list(command), mount_engine))
        action = command[4]
        answer = {"exit_code": 7, "output": "by a task there"} if action == "exec" else {"delivered": True}
        return '{"socklab_result":1,"role":"node","action":"%s",%s}\n' % (action, json.dumps(answer)[1:-1])

    monkeypatch.setattr(lab.engine, "run_on_node", run_on_node)
    lab.start(["server", "client-sender"])
    return lab, api, asked


def test_a_role_is_its_task_its_output_the_tasks_log_wherever_it_runs(tmp_path, monkeypatch):
    lab, api, _ = lab_on(tmp_path, monkeypatch, local_node="n2")
    sender = lab.containers("client-sender")[0]
    api.logs["st_client-sender-t0"] = '{"socklab_result":1,"role":"client"}\n'
    role = lab.main_role(sender)
    assert role.running() and role.exit_code() is None
    api.client.services_by_name["client-sender"].states = ["failed"]
    api.client.services_by_name["client-sender"].current = lambda: [
        {**task("failed", slot=1, container="st_client-sender-0"), "ID": "st_client-sender-t0",
         "Status": {"State": "failed", "ContainerStatus": {"ContainerID": "st_client-sender-0", "ExitCode": 3}}}]
    assert not role.running() and role.exit_code() == 3
    assert role.stdout() == '{"socklab_result":1,"role":"client"}\n'


def test_on_the_managers_node_exec_goes_through_the_sdk(tmp_path, monkeypatch):
    lab, api, asked = lab_on(tmp_path, monkeypatch, local_node="n1")
    sender = lab.containers("client-sender")[0]
    assert lab.exec(sender, ["true"]) == (0, "through the SDK")
    assert api.execs == [("st_client-sender-0", ["true"])] and asked == []


def test_on_another_node_exec_and_signals_go_by_a_task_placed_there(tmp_path, monkeypatch):
    lab, api, asked = lab_on(tmp_path, monkeypatch, local_node="n2")
    sender = lab.containers("client-sender")[0]
    assert lab.exec(sender, ["python3", "-m", "socklab", "shape", "set", "delay=5ms"]) == (7, "by a task there")
    lab.main_role(sender).stop()
    assert api.execs == []
    assert asked == [
        ("n1", "socklab:pinned", ["python3", "-m", "socklab", "node", "exec", "st_client-sender-0", "python3", "-m",
                                  "socklab", "shape", "set", "delay=5ms"], True),
        ("n1", "socklab:pinned", ["python3", "-m", "socklab", "node", "kill", "st_client-sender-0", "SIGTERM"], True)]


def test_a_trace_on_another_node_comes_back_in_the_tasks_log(tmp_path, monkeypatch, capsys):
    lab, api, _ = lab_on(tmp_path, monkeypatch, local_node="n2")
    sender = lab.containers("client-sender")[0]
    trace = tmp_path / "trace.gz"
    trace.write_bytes(bytes(range(256)) * 40)
    assert emit_file(str(trace))
    printed = capsys.readouterr().out
    api.logs["st_client-sender-t0"] = '{"socklab_result":1,"role":"client"}\n' + printed
    assert lab.read_file(sender, str(trace)) == trace.read_bytes()
    assert lab.read_file(sender, "/tmp/not-printed") is None


def test_reuse_on_another_node_is_refused_with_why(tmp_path, monkeypatch):
    lab, _, _ = lab_on(tmp_path, monkeypatch, local_node="n2")
    sender = lab.containers("client-sender")[0]
    with pytest.raises(LabEngineError, match=r"^--reuse keeps containers .* on another node than the manager's"):
        lab.start_role(sender, ["client"], {})


def test_a_role_on_a_lost_node_is_gone_with_the_nodes_name_and_its_log_is_not_waited_for(tmp_path, monkeypatch):
    lab, api, _ = lab_on(tmp_path, monkeypatch, local_node="n2")
    monkeypatch.setattr(swarm, "NODES_FRESH_S", 0.0)
    role = lab.main_role(lab.containers("client-sender")[0])
    api.logs["st_client-sender-t0"] = "never read"
    api.client.down.add("n1")
    with pytest.raises(ContainerGone, match=r"^node vm-n1 was lost while the case ran, and client-sender's task"):
        role.running()
    assert role.stdout() == "" and lab.read_file(role.container, scenario.TRACE_PATH) is None


def test_client_tasks_that_keep_starting_are_waited_for_past_the_bound_and_a_stall_is_not(tmp_path, monkeypatch):
    client = swarm_of(["running"], ["running"])
    lab = fake_lab(tmp_path, monkeypatch, FakeAPI(client))
    monkeypatch.setattr(swarm, "TASK_START_S", 0.4)
    sender = client.services_by_name["client-sender"]
    # None runs for a long time while the three move on through their states (one look each 0.1 s).
    looks = iter(["pending", "pending", "assigned", "assigned", "preparing", "preparing", "preparing",
                  "starting", "starting", "starting"])

    def tasks():
        state = next(looks, "running")
        time.sleep(0.1)
        return [{**task(state, slot=i + 1, container=f"c{i}" if state == "running" else None),
                 "ID": f"st_client-sender-t{i}"} for i in range(3)]

    sender.tasks = tasks
    lab.start(["server", "client-sender"])  # 1 s in all, past the 0.4 s bound: never stalled that long
    sender.tasks = lambda: [task("pending", slot=1, container=None)] * 3
    with pytest.raises(StartFailed, match=r"^the tasks of client-sender did not all start: 0 of 3, and none moved on "
                                          r"within 0\.4 s"):
        lab._wait_started("client-sender", 3)


def test_tasks_a_node_holds_are_waited_for_longer_than_ones_no_node_took(tmp_path, monkeypatch):
    client = swarm_of(["running"], ["running"])
    lab = fake_lab(tmp_path, monkeypatch, FakeAPI(client))
    monkeypatch.setattr(swarm, "TASK_START_S", 0.2)
    monkeypatch.setattr(swarm, "NODE_START_S", 0.6)
    sender = client.services_by_name["client-sender"]
    sender.tasks = lambda: [{**task("starting", slot=i + 1, container=None), "ID": f"t{i}"} for i in range(3)]
    started = time.monotonic()
    with pytest.raises(StartFailed, match=r"^the tasks of client-sender did not all start: 0 of 3, and none moved on "
                                          r"within 0\.6 s"):
        lab._wait_started("client-sender", 3)
    assert 0.6 <= time.monotonic() - started < 2.0
    # One still pending keeps the scheduler's shorter bound.
    sender.tasks = lambda: [{**task(state, slot=i + 1, container=None), "ID": f"t{i}"}
                            for i, state in enumerate(["starting", "starting", "pending"])]
    started = time.monotonic()
    with pytest.raises(StartFailed, match=r"within 0\.2 s"):
        lab._wait_started("client-sender", 3)
    assert time.monotonic() - started < 0.6


def test_a_node_lost_while_its_tasks_start_fails_the_start_naming_it(tmp_path, monkeypatch):
    client = swarm_of(["running"], ["running"])
    lab = fake_lab(tmp_path, monkeypatch, FakeAPI(client))
    monkeypatch.setattr(swarm, "NODES_FRESH_S", 0.0)
    sender = client.services_by_name["client-sender"]
    sender.tasks = lambda: [{**task("starting", slot=1, container=None), "ID": "t0"}]
    client.down.add("n1")
    with pytest.raises(StartFailed, match=r"^node vm-n1 was lost while the tasks of client-sender started$"):
        lab._wait_started("client-sender", 1)


def test_a_program_of_the_users_is_refused_before_anything_is_deployed(tmp_path):
    """A bind mount names a directory of this machine, which a task on another node cannot see."""
    text = ("name: t\nprogram_root: .\nserver:\n  program: {path: server.py}\n"
            "clients:\n  - name: s\n")
    (tmp_path / "server.py").write_text("")
    (tmp_path / "t.yaml").write_text(text)
    experiment = load_experiment(tmp_path / "t.yaml")
    definition = scenario.compose_override(experiment, "c", programs_dir=tmp_path)
    with pytest.raises(UsageError, match="server run a program of the user's, which the swarm engine cannot "
                                         "carry yet.*use --engine compose"):
        SwarmEngine(api=object()).create(definition, name_hint="t", record=tmp_path / "record")
    assert not list(tmp_path.glob("record*"))
