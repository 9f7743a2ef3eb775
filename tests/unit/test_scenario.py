"""A case as containers: override file, role argv, link variables, dry-run plans."""

from __future__ import annotations

import pytest

from labkit import scenario
from labkit.config import load_experiment_text
from labkit.matrix import expand_cases
from socklab import shaping
from socklab.errors import UsageError

BASE = """
name: t
server: {mode: epoll, recv_size: 4096, link: {rate: 1gbit}}
clients:
  - name: sender
    replicas: 3
    connections: 4
    mode: select
    workload: {kind: bulk, bytes: 1MiB, chunk: 64KiB}
    link:
      rate: 10mbit
      delay: 20ms
      loss: 0.5%
      up: {rate: 1mbit}
      down: {delay: 5ms}
schedule:
  - {at: 2s, target: clients.sender, link: {rate: 2mbit, up: {delay: 7ms}}}
"""


def experiment(text: str = BASE):
    return load_experiment_text(text, "t.yaml")


def test_link_env_sets_every_variable_and_only_what_the_link_says():
    env = scenario.link_env(experiment().group("sender").link)
    assert env["SOCKLAB_LINK_RATE"] == "10mbit"
    assert env["SOCKLAB_LINK_DELAY"] == "20ms"
    assert env["SOCKLAB_LINK_LOSS"] == "0.5%"
    assert env["SOCKLAB_LINK_UP_RATE"] == "1mbit"
    assert env["SOCKLAB_LINK_DOWN_DELAY"] == "5ms"
    assert env["SOCKLAB_LINK_JITTER"] == env["SOCKLAB_LINK_UP_DELAY"] == ""
    assert env["SOCKLAB_LINK_BACKEND"] == "auto"
    assert len(env) == 16


def test_link_env_round_trips_through_the_container_side_parser():
    spec = shaping.link_spec_from_env(scenario.link_env(experiment().group("sender").link))
    assert spec.up.rate_bps == 1_000_000 and spec.up.delay_ms == 20 and spec.up.loss_pct == 0.5
    assert spec.down.rate_bps == 10_000_000 and spec.down.delay_ms == 5


def test_schedule_change_becomes_shape_set_words():
    step = experiment().schedule[0]
    assert scenario.link_assignments(step.link) == ["rate=2mbit", "up.delay=7ms"]


def test_override_declares_server_and_groups_with_replicas():
    override = scenario.compose_override(experiment(), "default")
    server = override["services"]["server"]
    assert server["command"] == ["server", "--mode", "epoll", "--port", "5000", "--recv-size", "4096",
                                 "--workload", "bulk", "--idle-timeout", "60s"]
    assert server["environment"]["SOCKLAB_LINK_RATE"] == "1gbit"
    group = override["services"]["client-sender"]
    assert group["deploy"] == {"replicas": 3}
    assert group["depends_on"] == {"server-ready": {"condition": "service_completed_successfully"}}
    assert group["labels"] == {"io.socklab.lab": "true", "io.socklab.case": "default"}
    # The gate carries the case's labels like every other container of it.
    assert override["services"]["server-ready"] == {"labels": group["labels"]}
    assert group["command"] == [
        "client", "--mode", "select", "--host", "server", "--port", "5000", "--workload", "bulk",
        "--connections", "4", "--bytes", "1048576", "--pattern", "Hello Python\n",
        "--chunk", "65536", "--trace", "/tmp/socklab-trace.gz"]


def test_placement_goes_into_each_roles_deploy_and_nowhere_else():
    override = scenario.compose_override(experiment(
        "name: t\nserver: {placement: [node.hostname == vm1]}\nclients:\n"
        "  - {name: near, replicas: 2, placement: ['node.labels.zone == a', 'node.role != manager']}\n"
        "  - {name: far}\n"), "c1")
    services = override["services"]
    assert services["server"]["deploy"] == {"placement": {"constraints": ["node.hostname == vm1"]}}
    assert services["client-near"]["deploy"] == {
        "replicas": 2, "placement": {"constraints": ["node.labels.zone == a", "node.role != manager"]}}
    assert services["client-far"]["deploy"] == {"replicas": 1}  # the engine decides
    assert "deploy" not in services["server-ready"]
    # Placement is part of what the containers are: other constraints, other kept containers.
    elsewhere = scenario.compose_override(experiment(
        "name: t\nserver: {placement: [node.hostname == vm2]}\nclients:\n"
        "  - {name: near, replicas: 2, placement: ['node.labels.zone == a', 'node.role != manager']}\n"
        "  - {name: far}\n"), "c1")
    assert scenario.containers_key(override) != scenario.containers_key(elsewhere)


@pytest.mark.parametrize("workload,expected", [
    ("{kind: echo, requests: 10, size: 2KiB, think: 5ms}",
     ["--requests", "10", "--size", "2048", "--think", "0.005s"]),
    ("{kind: connect, attempts: 3, cancel_after: 200ms}", ["--attempts", "3", "--cancel-after", "0.2s"]),
    ("{kind: slow, rate: 50, hold: 2s}", ["--rate", "50", "--hold", "2s"]),
])
def test_each_workload_kind_passes_its_keys(workload, expected):
    exp = experiment(f"name: t\nclients:\n  - name: c\n    workload: {workload}\n")
    argv = scenario.client_argv(exp.group("c"), trace=False)
    assert argv[argv.index("--connections") + 2:] == expected


def test_timeout_mode_passes_its_socket_timeout():
    exp = experiment("name: t\nclients:\n  - {name: c, mode: timeout, socket_timeout: 250ms}\n")
    argv = scenario.client_argv(exp.group("c"), trace=False)
    assert argv[-2:] == ["--timeout", "0.25s"]


def test_echo_and_bulk_groups_cannot_share_a_server():
    exp = experiment("name: t\nclients:\n  - {name: a, workload: {kind: echo}}\n"
                     "  - {name: b, workload: {kind: bulk}}\n")
    with pytest.raises(UsageError, match="cannot share one server"):
        scenario.server_workload(exp)


def test_slow_peers_share_an_echo_server():
    exp = experiment("name: t\nclients:\n  - {name: a, workload: {kind: echo}}\n"
                     "  - {name: b, workload: {kind: slow}}\n")
    assert scenario.server_workload(exp) == "echo"


def test_dry_run_plans_are_the_containers_own_plans():
    (case,) = expand_cases(experiment())
    plans = scenario.shaping_plans(case.experiment)
    env = scenario.link_env(case.experiment.group("sender").link)
    assert plans["client-sender"] == shaping.build_plan(shaping.link_spec_from_env(env), "netem")
    assert ["tc", "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress"] in plans["server"]


def test_socket_buffers_reach_the_roles():
    exp = experiment("name: t\nserver: {rcvbuf: 64KiB}\n"
                     "clients:\n  - {name: c, sndbuf: 32KiB, rcvbuf: 1MiB}\n")
    assert scenario.server_argv(exp)[-2:] == ["--rcvbuf", "65536"]
    argv = scenario.client_argv(exp.group("c"), trace=False)
    assert argv[-4:] == ["--sndbuf", "32768", "--rcvbuf", "1048576"]
    again = load_experiment_text(__import__("yaml").safe_dump(exp.to_dict()), "again.yaml")
    assert again == exp


def test_cases_share_kept_containers_when_only_role_arguments_differ():
    cases = expand_cases(experiment(BASE + "matrix:\n  clients.sender.mode: [select, epoll]\n"
                                           "  server.mode: [epoll, threaded]\n"
                                           "  clients.sender.link.rate: [10mbit, 20mbit]\n"))

    def key(case):
        return scenario.containers_key(scenario.compose_override(case.experiment, case.id))

    keys = {case.id: key(case) for case in cases}
    by_rate = {}
    for case in cases:
        by_rate.setdefault(case.params["clients.sender.link.rate"], []).append(keys[case.id])
    # Modes (server's or client's) only change arguments; a rate changes the container's link.
    assert all(all(k == ks[0] for k in ks) for ks in by_rate.values())
    assert by_rate["10mbit"][0] != by_rate["20mbit"][0]
    fewer_replicas = expand_cases(experiment(BASE.replace("replicas: 3", "replicas: 2")))[0]
    assert key(fewer_replicas) != key(expand_cases(experiment())[0])


def test_kept_containers_hold_and_have_no_gate_to_wait_for():
    (case,) = expand_cases(experiment())
    kept = scenario.kept_override(scenario.compose_override(case.experiment, case.id))["services"]
    assert {name: service["command"] for name, service in kept.items()} == {
        "server": ["hold"], "client-sender": ["hold"]}
    assert "healthcheck" not in kept["server"]
    assert kept["client-sender"]["depends_on"] == {"server": {"condition": "service_started"}}
    assert kept["client-sender"]["deploy"] == {"replicas": 3}
    assert kept["client-sender"]["environment"]["SOCKLAB_LINK_RATE"] == "10mbit"


def test_link_variables_and_step_words_are_the_models_rendering_of_the_resolved_link():
    exp = experiment()
    link = exp.group("sender").link
    env = scenario.link_env(link)
    assert env == shaping.env_from_changes(link.changes(), "auto")
    assert shaping.changes_from_env(env).resolve() == link.spec
    step = exp.schedule[0]
    words, backend = shaping.changes_from_assignments(scenario.link_assignments(step.link))
    assert backend is None and words.resolve(link.spec) == step.link.changes().resolve(link.spec)
    plans = scenario.shaping_plans(exp)
    assert plans["client-sender"] == shaping.build_plan(link.spec, "netem")
