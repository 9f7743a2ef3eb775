"""Loads no container can carry: the memory model counted from the roles' code, and its bounds."""

from __future__ import annotations

import pytest

from labkit.config import ConfigError, load_experiment_text
from labkit.config import limits
from socklab import conns, workloads

KIB, MIB = 1024, 1024 * 1024


def group(text: str):
    exp = load_experiment_text(f"name: t\ncontainer_memory: 64GiB\nclients:\n  - name: g\n{text}", "t.yaml")
    return exp, exp.group("g")


def test_the_constants_are_the_roles_own():
    assert limits.CLIENT_RECV_BYTES == conns.RECV_BYTES
    assert limits.EPHEMERAL_PORTS == 60999 - 32768 + 1


@pytest.mark.parametrize("size", [13 * 1000, 13 * 1000 + 5, 1])
def test_the_payload_is_counted_as_make_payload_builds_it(size):
    pattern = "Hello Python\n"
    whole, rest = divmod(size, len(pattern))
    repeated = pattern.encode() * whole
    # With a rest, the repeated pattern and the result exist at once.
    peak = len(repeated) + (len(repeated) + rest if rest else 0)
    assert len(workloads.make_payload(size, pattern.encode())) == size
    assert limits._built_payload_bytes(size, pattern) == peak


@pytest.mark.parametrize("mode, per_connection, shared", [
    ("blocking", 64 * KIB + 20 * KIB, 0),
    ("timeout", 64 * KIB + 20 * KIB, 0),
    ("epoll", 1 * KIB, 64 * KIB),
    ("asyncio", 128 * KIB + 4 * KIB, 0),
])
def test_client_holding_is_the_shared_payload_and_each_connection(mode, per_connection, shared):
    _, g = group(f"    mode: {mode}\n    connections: 100\n    workload: {{kind: echo, size: 1300}}\n")
    holding = limits.client_holding(g)
    assert holding.total_bytes == 20 * MIB + 1300 + shared + 100 * per_connection


def test_server_holding_counts_echo_queues_only_where_the_server_queues():
    exp = load_experiment_text("name: t\nserver: {mode: epoll, recv_size: 4KiB}\ncontainer_memory: 64GiB\n"
                               "clients:\n  - {name: g, replicas: 3, connections: 10, mode: epoll, "
                               "workload: {kind: echo}}\n", "t.yaml")
    epoll = limits.server_holding(exp.server, 30, echo=True)
    assert epoll.total_bytes == 20 * MIB + 4 * KIB + 30 * (1 * KIB + 256 * KIB + 4 * KIB)
    from dataclasses import replace
    threaded = limits.server_holding(replace(exp.server, mode="threaded"), 30, echo=True)
    assert threaded.total_bytes == 20 * MIB + 30 * (4 * KIB + 20 * KIB)
    blocking = limits.server_holding(replace(exp.server, mode="blocking"), 30, echo=True)
    assert blocking.total_bytes == 20 * MIB + 4 * KIB


def test_the_bounds_are_inclusive():
    load_experiment_text("name: t\nclients:\n  - {name: g, connections: 28232, mode: epoll, "
                         "workload: {kind: connect}}\n", "t.yaml")
    load_experiment_text("name: t\nclients:\n  - {name: g, replicas: 1022, workload: {kind: connect}}\n", "t.yaml")
    with pytest.raises(ConfigError, match="1023 replicas make 1024 containers"):
        load_experiment_text("name: t\nclients:\n  - {name: g, replicas: 1023, workload: {kind: connect}}\n",
                             "t.yaml")


def test_a_bigger_budget_lets_a_bigger_payload_through():
    text = "name: t\n{budget}clients:\n  - name: g\n    workload: {{kind: bulk, bytes: 2GiB}}\n"
    with pytest.raises(ConfigError, match="more than the 1 GiB a container may hold"):
        load_experiment_text(text.format(budget=""), "t.yaml")
    exp = load_experiment_text(text.format(budget="container_memory: 5GiB\n"), "t.yaml")
    assert exp.group("g").workload.bytes == 2 << 30
