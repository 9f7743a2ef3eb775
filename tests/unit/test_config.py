"""Experiment files: good ones load with units parsed; bad ones name file, line, key."""

import re
from pathlib import Path

import pytest
import yaml

from labkit.config import (
    ConfigError, LinkDirection, apply_overrides, build_experiment, load_experiment,
    load_experiment_text, parse_raw,
)
from socklab.errors import UsageError
from socklab.shaping import LinkShape

ROOT = Path(__file__).resolve().parents[2]

# The example experiment from SPEC.md, verbatim.
SPEC_EXAMPLE = """\
name: seed-demo                 # required, [a-z0-9-]+
description: One line shown by `lab.py list`.
repeat: 3                       # repetitions of every case (default 1)
timeout: 120s                   # per case; a case past it is stopped and marked "timeout"
server:
  mode: blocking                # blocking | threaded | select | poll | epoll | asyncio
  recv_size: 1024
  link: {rate: 1gbit}           # the server's own access link (optional)
clients:                        # one or more client groups; each group is its own service
  - name: sender
    replicas: 1                 # containers in this group
    connections: 1              # concurrent connections per container
    mode: blocking              # blocking | nonblocking | nonblocking-spin | select | poll | epoll | asyncio | timeout
    workload:
      kind: bulk                # bulk | echo | connect | slow
      bytes: 136314880
      pattern: "Hello Python\\n"
    link:
      rate: 10mbit              # tc units: kbit, mbit, gbit
      delay: 20ms
      jitter: 5ms
      loss: 0.1%
      limit: 1000               # queue length in packets
      up:   {rate: 1mbit}       # optional per-direction overrides (client → server)
      down: {rate: 20mbit}      # (server → client, shaped on ingress)
matrix:                         # every combination of these values is one case
  clients.sender.mode: [blocking, nonblocking]
  clients.sender.link.rate: [1mbit, 10mbit]
schedule:                       # link changes while a case runs
  - at: 5s
    target: clients.sender
    link: {rate: 1mbit}
expect:                         # checks evaluated on every case's results
  - name: non-blocking send returns at once with a partial count
    when: {clients.sender.mode: nonblocking}
    check: "sender.send_calls == 1 and sender.bytes_accepted < sender.bytes_requested"
"""

MINIMAL = "name: t\nclients:\n  - name: sender\n"


def load(text, overrides=()):
    return load_experiment_text(text, "configs/t.yaml", overrides)


def test_the_spec_example_loads():
    exp = load(SPEC_EXAMPLE)
    assert exp.name == "seed-demo" and exp.repeat == 3 and exp.timeout_s == 120.0
    assert exp.server.mode == "blocking" and exp.server.recv_size_bytes == 1024
    assert exp.server.link.rate_bps == 1_000_000_000
    sender = exp.group("sender")
    assert (sender.replicas, sender.connections, sender.mode) == (1, 1, "blocking")
    assert sender.workload.kind == "bulk" and sender.workload.bytes == 136314880
    assert sender.workload.pattern == "Hello Python\n" and sender.workload.chunk_bytes is None
    link = sender.link
    assert (link.rate_bps, link.delay_ms, link.jitter_ms, link.loss_pct, link.limit_packets) == (
        10_000_000, 20.0, 5.0, 0.1, 1000)
    assert link.up.rate_bps == 1_000_000 and link.down.rate_bps == 20_000_000
    assert [a.key for a in exp.matrix] == ["clients.sender.mode", "clients.sender.link.rate"]
    assert exp.schedule[0].at_s == 5.0 and exp.schedule[0].group == "sender"
    assert exp.schedule[0].link.rate_bps == 1_000_000 and exp.schedule[0].link.delay_ms is None
    assert exp.expect[0].check.names == (
        "sender.send_calls", "sender.bytes_accepted", "sender.bytes_requested")


def test_defaults_fill_a_minimal_experiment():
    exp = load(MINIMAL)
    assert (exp.description, exp.repeat, exp.timeout_s) == ("", 1, 300.0)
    assert (exp.server.mode, exp.server.recv_size_bytes, exp.server.link.is_shaped) == ("blocking", 1024, False)
    sender = exp.group("sender")
    assert (sender.replicas, sender.connections, sender.mode, sender.socket_timeout_s) == (1, 1, "blocking", 1.0)
    assert sender.workload.kind == "bulk" and sender.workload.bytes == 136314880
    assert sender.workload.pattern == "Hello Python\n"
    assert sender.link.backend == "auto" and not sender.link.is_shaped
    assert exp.matrix == exp.schedule == exp.expect == ()


@pytest.mark.parametrize("workload, expected", [
    ("{kind: bulk, bytes: 64KiB, chunk: 1500}", {"bytes": 65536, "chunk_bytes": 1500}),
    ("{kind: bulk, bytes: 128MiB, chunk: all}", {"bytes": 134217728, "chunk_bytes": None}),
    ("{kind: echo}", {"requests": 1000, "size_bytes": 1024, "think_s": 0.0, "bytes": None}),
    ("{kind: echo, requests: 10, size: 1500, think: 20ms}", {"requests": 10, "size_bytes": 1500, "think_s": 0.02}),
    ("{kind: connect}", {"attempts": 5, "cancel_after_s": None, "connect_timeout_s": None}),
    ("{kind: connect, cancel_after: 1.5s, connect_timeout: none}", {"cancel_after_s": 1.5, "connect_timeout_s": None}),
    ("{kind: connect, connect_timeout: 2s, cancel_after: null}", {"connect_timeout_s": 2.0, "cancel_after_s": None}),
    ("{kind: slow}", {"rate_bytes_per_s": 100, "hold_s": 10.0}),
    ("{kind: slow, rate: 1KiB/s, hold: 2m}", {"rate_bytes_per_s": 1024, "hold_s": 120.0}),
])
def test_workload_units_and_defaults(workload, expected):
    exp = load(f"name: t\nclients:\n  - name: c\n    workload: {workload}\n")
    got = exp.group("c").workload
    for attr, value in expected.items():
        assert getattr(got, attr) == value, attr


@pytest.mark.parametrize("link, attr, value", [
    ("{rate: 512kbit}", "rate_bps", 512_000),
    ("{rate: 1gbit}", "rate_bps", 1_000_000_000),
    ("{delay: 1.5s}", "delay_ms", 1500.0),
    ("{delay: 250us}", "delay_ms", 0.25),
    ("{delay: 1.1ms}", "delay_ms", 1.1),
    ("{jitter: 0}", "jitter_ms", 0.0),
    ("{loss: 0.1%}", "loss_pct", 0.1),
    ("{loss: 100%}", "loss_pct", 100.0),
    ("{loss: 5}", "loss_pct", 5.0),
    ("{rate: 1mbit, limit: 50}", "limit_packets", 50),
    ("{backend: userspace}", "backend", "userspace"),
])
def test_link_units(link, attr, value):
    exp = load(f"name: t\nclients:\n  - name: c\n    link: {link}\n")
    assert getattr(exp.group("c").link, attr) == value


def test_timeout_units():
    assert load("name: t\ntimeout: 2m\nclients: [{name: c}]\n").timeout_s == 120.0
    assert load("name: t\ntimeout: 1500ms\nclients: [{name: c}]\n").timeout_s == 1.5


def test_per_direction_overrides_merge_over_shared_parameters():
    exp = load("name: t\nclients:\n  - name: c\n    link: {rate: 10mbit, delay: 20ms, up: {rate: 1mbit}, "
               "down: {loss: 1%}}\n")
    link = exp.group("c").link
    # Resolved by the container's own link model.
    assert link.spec.up == link.effective_up == LinkShape(rate_bps=1_000_000, delay_ms=20.0)
    assert link.spec.down == link.effective_down == LinkShape(rate_bps=10_000_000, delay_ms=20.0, loss_pct=1.0)
    assert link.up == LinkDirection(rate_bps=1_000_000) and link.both.delay_ms == 20.0


def test_anchors_and_merge_keys_work():
    exp = load("name: t\nclients:\n  - name: a\n    link: &slow {rate: 1mbit, delay: 50ms}\n"
               "  - name: b\n    link: {<<: *slow, delay: 10ms}\n")
    assert exp.group("b").link.rate_bps == 1_000_000 and exp.group("b").link.delay_ms == 10.0


def test_resolved_experiment_renders_to_a_config_that_loads_back_equal():
    for text in (SPEC_EXAMPLE, MINIMAL,
                 "name: t\nclients:\n  - name: c\n    workload: {kind: connect, cancel_after: 250ms}\n"
                 "    link: {delay: 1.1ms, jitter: 0.25ms, loss: 0.001%}\n  - name: d\n    workload: {kind: slow}\n"):
        exp = load(text)
        rendered = yaml.safe_dump(exp.to_dict(), sort_keys=False)
        assert load(rendered) == exp, rendered


def test_rendering_fills_defaults_in_config_spelling():
    data = load(MINIMAL).to_dict()
    assert data["timeout"] == "300s"
    assert data["clients"][0]["workload"] == {"kind": "bulk", "bytes": 136314880, "pattern": "Hello Python\n",
                                              "chunk": "all"}
    assert data["server"] == {"mode": "blocking", "recv_size": 1024, "link": {"backend": "auto"}}


def test_file_is_read_and_named_in_errors(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: t\nclients:\n  - name: sender\n    link: {rate: 10mbps}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(info.value).startswith(f"{path}:4: clients[0].link.rate: ")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="there is no such file"):
        load_experiment(tmp_path / "nope.yaml")


def test_config_error_is_a_usage_error_with_exit_code_2():
    assert issubclass(ConfigError, UsageError) and ConfigError.exit_code == 2


# Each row: the file, the line the error must name, and a fragment of its sentence.
BAD = [
    ("name: t\nclients:\n  - name: sender\n    link:\n      rate: 10mbps\n", 5,
     "clients[0].link.rate: '10mbps' is not a rate: use a number with bit, kbit, mbit or gbit (e.g. 10mbit)"),
    ("name: t\nclients:\n  - name: sender\nrepeats: 3\n", 4,
     "repeats: unknown key for an experiment: use name, description, repeat, timeout, server, clients"),
    ("name: Seed_Demo\nclients:\n  - name: sender\n", 1,
     "name: 'Seed_Demo' is not a valid experiment name: use lower-case letters, digits and -"),
    ("description: x\nclients:\n  - name: sender\n", 1, "name is missing: it is required"),
    ("name: t\nrepeat: 0\nclients:\n  - name: sender\n", 2, "repeat: 0 is too small: use an integer of at least 1"),
    ("name: t\nrepeat: three\nclients:\n  - name: sender\n", 2, "repeat: 'three' is not a whole number"),
    ("name: t\ntimeout: 120\nclients:\n  - name: sender\n", 2, "timeout: 120 is not a duration: use a number with"),
    ("name: t\ntimeout: 0s\nclients:\n  - name: sender\n", 2, "timeout: '0s' is too short"),
    ("name: t\nserver:\n  mode: fork\nclients:\n  - name: sender\n", 3,
     "server.mode: 'fork' is not a server mode: use one of blocking, threaded, select, poll, epoll, asyncio"),
    ("name: t\nserver:\n  recv_size: 0\nclients:\n  - name: sender\n", 3, "server.recv_size: 0 is too small"),
    ("name: t\nserver:\n  idle: 5s\nclients:\n  - name: sender\n", 3,
     "server.idle: unknown key for the server: use mode, recv_size, rcvbuf, placement, capture, link"),
    ("name: t\nclients:\n  - name: sender\n    mode: async\n", 4,
     "clients[0].mode: 'async' is not a client mode: use one of blocking, nonblocking, nonblocking-spin, select, "
     "poll, epoll, asyncio, timeout"),
    ("name: t\nclients:\n  - name: sender\n    replicas: 0\n", 4, "clients[0].replicas: 0 is too small"),
    ("name: t\nclients:\n  - name: sender\n    connections: many\n", 4,
     "clients[0].connections: 'many' is not a whole number"),
    ("name: t\nclients:\n  - name: sender\n    connections: 2.5\n", 4, "2.5 is not a whole number"),
    ("name: t\nclients:\n  - name: sender\n    link: {loss: 150%}\n", 4,
     "clients[0].link.loss: '150%' is not a percentage: use a percentage from 0% to 100%"),
    ("name: t\nclients:\n  - name: sender\n    link:\n      delay: 20\n", 5,
     "clients[0].link.delay: 20 is not a duration"),
    ("name: t\nclients:\n  - name: sender\n    link:\n      bandwidth: 1mbit\n", 5,
     "clients[0].link.bandwidth: unknown key for a link: use rate, delay, jitter, loss, limit, up, down, backend"),
    ("name: t\nclients:\n  - name: sender\n    link:\n      up:\n        backend: netem\n", 6,
     "clients[0].link.up.backend: unknown key for a link's up direction: use rate, delay, jitter, loss, limit"),
    ("name: t\nclients:\n  - name: sender\n    link: {backend: tc}\n", 4,
     "'tc' is not a shaping backend: use one of auto, netem, userspace"),
    ("name: t\nclients:\n  - name: sender\n    link: {limit: 0}\n", 4, "clients[0].link.limit: 0 is too small"),
    ("name: t\nclients:\n  - name: sender\n    link: 10mbit\n", 4,
     "clients[0].link: is '10mbit', but a link is a mapping with keys rate"),
    ("name: t\nclients:\n  - name: sender\n    workload:\n      kind: stream\n", 5,
     "clients[0].workload.kind: 'stream' is not a workload kind: use one of bulk, echo, connect, slow"),
    ("name: t\nclients:\n  - name: sender\n    workload:\n      kind: bulk\n      requests: 10\n", 6,
     "clients[0].workload.requests: is a key of the echo workload, not of bulk: use kind, bytes, pattern, chunk"),
    ("name: t\nclients:\n  - name: sender\n    workload:\n      kind: echo\n      speed: 1\n", 6,
     "clients[0].workload.speed: unknown key for the echo workload: use kind, requests, size, think"),
    ("name: t\nclients:\n  - name: sender\n    workload:\n      bytes: 0\n", 5,
     "clients[0].workload.bytes: 0 is too small: use at least 1 byte"),
    ("name: t\nclients:\n  - name: sender\n    workload:\n      pattern: 123\n", 5,
     "clients[0].workload.pattern: 123 is not text: put it in quotes"),
    ("name: t\nclients:\n  - name: sender\n    workload: {kind: echo, size: 1KiBs}\n", 4,
     "clients[0].workload.size: '1KiBs' is not a size"),
    ("name: t\nclients:\n  - name: sender\n    workload: {kind: slow, rate: 10kbit}\n", 4,
     "clients[0].workload.rate: '10kbit' is not a size"),
    ("name: t\nclients:\n  - name: sender\n    workload: {kind: connect, cancel_after: 0s}\n", 4,
     "clients[0].workload.cancel_after: '0s' is too short"),
    ("name: t\nclients:\n  - name: sender\n  - name: other\n  - name: sender\n", 5,
     "clients[2].name: 'sender' names two client groups"),
    ("name: t\nclients:\n  - name: slow-peer\n", 3,
     "clients[0].name: 'slow-peer' is not a valid client group name"),
    ("name: t\nclients:\n  - name: server\n", 3, "'server' is not a valid client group name"),
    ("name: t\nclients:\n  - replicas: 2\n", 3, "clients[0]: name is missing: it is required"),
    ("name: t\nclients: {name: sender}\n", 2, "clients: is a mapping, but clients is a list"),
    ("name: t\nclients: []\n", 2, "clients: is empty: give at least one client group"),
    ("name: t\n", 1, "clients is missing"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.sender.speed: [1, 2]\n", 5,
     "matrix.clients.sender.speed: is not a setting of a client group: use clients.NAME. followed by replicas"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.bob.mode: [blocking]\n", 5,
     "matrix.clients.bob.mode: there is no client group named 'bob': the groups are sender"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  name: [a, b]\n", 5,
     "matrix.name: does not name a setting: use timeout, server.KEY or clients.NAME.KEY"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.sender.link.rate:\n    - 1mbit\n    - 10mbps\n", 7,
     "matrix.clients.sender.link.rate[1]: '10mbps' is not a rate"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.sender.mode: [blocking, turbo]\n", 5,
     "matrix.clients.sender.mode[1]: 'turbo' is not a client mode"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.sender.workload.requests: [10]\n", 5,
     "matrix.clients.sender.workload.requests[0]: is a key of the echo workload, not of bulk"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.sender.mode: blocking\n", 5,
     "matrix.clients.sender.mode: needs a non-empty list of values"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.sender.mode: [blocking, select, blocking]\n", 5,
     "matrix.clients.sender.mode[2]: 'blocking' is listed twice"),
    ("name: t\nclients:\n  - name: sender\nmatrix:\n  clients.sender.link.up.rate:\n    - {rate: 1mbit}\n", 6,
     "matrix.clients.sender.link.up.rate[0]: is a mapping: matrix values are single values"),
    ("name: t\ntimeout: 60s\nclients:\n  - name: sender\nschedule:\n  - at: 5s\n    target: clients.bob\n"
     "    link: {rate: 1mbit}\n", 7,
     "schedule[0].target: 'clients.bob' is not a client group or the server: use one of server, clients.sender"),
    ("name: t\ntimeout: 60s\nclients:\n  - name: sender\nschedule:\n  - at: 90s\n    target: server\n"
     "    link: {rate: 1mbit}\n", 6, "schedule[0].at: 90s is not before the case timeout (60s)"),
    ("name: t\nclients:\n  - name: sender\nschedule:\n  - at: 1s\n    target: server\n    link:\n"
     "      backend: netem\n", 8, "schedule[0].link.backend: unknown key for a link change (the backend cannot change"),
    ("name: t\nclients:\n  - name: sender\nschedule:\n  - at: 1s\n    link: {rate: 1mbit}\n", 5,
     "schedule[0]: target is missing: a schedule step needs at, target and link"),
    ("name: t\nclients:\n  - name: sender\nschedule:\n  - at: 1s\n    target: server\n    link: {}\n", 7,
     "schedule[0].link: changes nothing"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n    check: \"__import__('os') == 0\"\n", 6,
     "expect[0].check: \"__import__('os') == 0\": function calls are not allowed"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n    check: receiver.bytes_accepted > 0\n", 6,
     "expect[0].check: receiver.bytes_accepted does not start with a client group, server or case"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n    check: sender.bytes_sent > 0\n", 6,
     "sender.bytes_sent is not a result of client group sender"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n    check: sender.bytes_accepted\n", 6,
     "is a number, not a condition"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n    when: {clients.sender.mode: fast}\n"
     "    check: sender.send_calls > 0\n", 6, "expect[0].when.clients.sender.mode: 'fast' is not a client mode"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n    when: {sender.mode: select}\n"
     "    check: sender.send_calls > 0\n", 6, "expect[0].when.sender.mode: does not name a setting"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n", 5, "expect[0]: check is missing"),
    ("name: t\nclients:\n  - name: sender\nexpect:\n  - name: x\n    check: case.wall_s > 0\n"
     "  - name: x\n    check: case.wall_s > 1\n", 7, "expect[1].name: 'x' names two expectations"),
    ("name: t\nclients:\n  - name: sender\n    mode: select\n    mode: poll\n", 5,
     "clients[0].mode: this key is given twice in the same mapping"),
    ("name: t\nclients:\n  - name: sender\n    link: {rate: 1mbit\n", 5, "this is not valid YAML"),
    ("name: t\nclients:\n  - name: sender\n   mode: select\n", 4, "this is not valid YAML"),
    ("name: t\nclients:\n  - name: !!python/object/apply:os.system [true]\n", 3,
     "clients[0].name: the tag tag:yaml.org,2002:python/object/apply:os.system is not allowed here"),
    ("name: t\nclients:\n  - name: !!python/name:os.system ''\n", 3,
     "this is not valid YAML: could not determine a constructor"),
    # Links the container would refuse, refused at load by its own link model.
    ("name: t\nclients:\n  - name: sender\n    link: {delay: 5ms, jitter: 10ms}\n", 4,
     "clients[0].link.jitter: jitter 10ms is larger than the up delay 5ms; a packet cannot leave before it was sent, so the delay must be at least the jitter"),
    ("name: t\nclients:\n  - name: sender\n    link:\n      delay: 5ms\n      up: {jitter: 10ms}\n", 6,
     "clients[0].link.up.jitter: jitter 10ms is larger than the up delay 5ms; a packet cannot leave before it was sent, so the delay must be at least the jitter"),
    ("name: t\nclients:\n  - name: sender\n    link:\n      delay: 20ms\n      jitter: 10ms\n      down:\n"
     "        delay: 2ms\n", 6, "clients[0].link.jitter: jitter 10ms is larger than the down delay 2ms; a packet cannot leave before it was sent, so the delay must be at least the jitter"),
    ("name: t\nserver:\n  link: {jitter: 1ms}\nclients:\n  - name: sender\n", 3,
     "server.link.jitter: jitter 1ms is larger than the up delay 0ms; a packet cannot leave before it was sent, so the delay must be at least the jitter"),
    ("name: t\nclients:\n  - name: sender\n    link: {limit: 100}\n", 4,
     "clients[0].link.limit: limit 100 has no effect on the up direction without rate, delay, jitter or loss, because a queue only fills behind"),
    ("name: t\nclients:\n  - name: sender\n    link:\n      down: {rate: 1mbit}\n      up: {limit: 100}\n", 6,
     "clients[0].link.up.limit: limit 100 has no effect on the up direction without rate, delay, jitter or loss, because a queue only fills behind"),
    ("name: t\nserver:\n  link: {limit: 10}\nclients:\n  - name: sender\n", 3, "server.link.limit: limit 10 has no effect on the up direction without rate, delay, jitter or loss, because a queue only fills behind"),
    ("name: t\nclients:\n  - name: sender\n    link: {rate: none}\n", 4,
     "clients[0].link.rate: 'none' is not a rate: use a number with bit, kbit, mbit or gbit (e.g. 10mbit), "
     "or leave rate out for no limit"),
    ("name: t\nclients:\n  - name: sender\n    link: {delay: 20ms, jitter: 5ms}\nmatrix:\n"
     "  clients.sender.link.delay: [20ms, 2ms]\n", 6,
     "matrix.clients.sender.link.delay[1]: jitter 5ms is larger than the up delay 2ms; a packet cannot leave before it was sent, so the delay must be at least the jitter"),
    ("name: t\nclients:\n  - name: sender\n    link: {delay: 20ms}\nmatrix:\n"
     "  clients.sender.link.up.jitter: [1ms, 25ms]\n", 6,
     "matrix.clients.sender.link.up.jitter[1]: jitter 25ms is larger than the up delay 20ms; a packet cannot leave before it was sent, so the delay must be at least the jitter"),
    ("name: t\nclients:\n  - name: sender\n    link: {rate: 1mbit, limit: 100}\nmatrix:\n"
     "  clients.sender.link.rate: [10mbit]\n  clients.sender.link.up.rate: [none]\n", 7,
     "matrix.clients.sender.link.up.rate[0]: 'none' is not a rate"),
    # Schedule steps, over the link as it is when they run (earlier steps on it, in `at` order).
    ("name: t\nclients:\n  - name: sender\n    link: {delay: 20ms, jitter: 5ms}\nschedule:\n  - at: 1s\n"
     "    target: clients.sender\n    link: {delay: 10ms}\n  - at: 2s\n    target: clients.sender\n    link:\n"
     "      up: {delay: 2ms}\n", 12,
     "schedule[1].link.up.delay: jitter 5ms is larger than the up delay 2ms; a packet cannot leave before it was sent, so the delay must be at least the jitter (at 2s this step changes the "
     "link of clients.sender, which is then: up delay 10ms jitter 5ms, down delay 10ms jitter 5ms)"),
    ("name: t\nclients:\n  - name: sender\n    link: {delay: 20ms}\nschedule:\n  - at: 3s\n"
     "    target: clients.sender\n    link: {delay: 1ms}\n  - at: 1s\n    target: clients.sender\n"
     "    link: {jitter: 5ms}\n", 8,
     "schedule[0].link.delay: jitter 5ms is larger than the up delay 1ms; a packet cannot leave before it was sent, so the delay must be at least the jitter (at 3s this step changes the "
     "link of clients.sender, which is then: up delay 20ms jitter 5ms, down delay 20ms jitter 5ms)"),
    ("name: t\nserver:\n  link: {delay: 5ms, limit: 100}\nclients:\n  - name: sender\nschedule:\n  - at: 1s\n"
     "    target: server\n    link: {delay: 0ms}\n", 9, "schedule[0].link.delay: limit 100 has no effect on the up direction without rate, delay, jitter or loss, because a queue only fills behind"),
    ("name: t\nclients:\n  - name: sender\nschedule:\n  - at: 1s\n    target: clients.sender\n"
     "    link: {jitter: 1ms}\n", 7, "schedule[0].link.jitter: jitter 1ms is larger than the up delay 0ms"),
    # Loads no container can carry.
    ("name: t\nclients:\n  - name: sender\n    connections: 28233\n    workload: {kind: connect}\n", 4,
     "clients[0].connections: 28233 connections from one container need as many ephemeral ports, and one source "
     "address has 28232 towards the server's port (net.ipv4.ip_local_port_range 32768-60999): use at most 28232 "
     "per container and more replicas"),
    ("name: t\nclients:\n  - name: a\n    replicas: 1000\n    workload: {kind: connect}\n  - name: b\n"
     "    replicas: 23\n    workload: {kind: connect}\n", 7,
     "clients[1].replicas: 23 replicas make 1024 containers in a case, and Compose puts them on one bridge network, "
     "which takes at most 1023 (the server and 1022 client replicas in all)"),
    ("name: t\nclients:\n  - name: sender\n    workload: {kind: bulk, bytes: 600MB}\n", 4,
     "clients[0].workload.bytes: a container of group sender would hold about 1.137 GiB (the interpreter 20 MiB, "
     "the 572.2 MiB payload every connection shares, 1.118 GiB while it is built, 1 connection(s) × 84 KiB "
     "(a 64 KiB receive and a thread)), more than the 1 GiB a container may hold (container_memory; raise it if the host has more)"),
    ("name: t\nclients:\n  - name: sender\n    connections: 20000\n    workload: {kind: echo}\n", 4,
     "clients[0].connections: a container of group sender would hold about 1.622 GiB (the interpreter 20 MiB, the 1 KiB "
     "payload every connection shares, 1.99 KiB while it is built, 20000 connection(s) × 84 KiB"),
    ("name: t\nserver: {mode: epoll}\nclients:\n  - name: a\n    replicas: 10\n    connections: 400\n"
     "    mode: epoll\n    workload: {kind: echo}\n", 6,
     "clients[0].connections: the server container would hold about 1.004 GiB (the interpreter 20 MiB, one 1 KiB "
     "recv buffer, 4000 connection(s) × 258 KiB (bookkeeping, up to 256 KiB of echo output queued and one read "
     "past it)) for the 4000 connections of the client groups up to a, more than the 1 GiB a container may hold (container_memory; raise it if the host has more)"),
    ("name: t\nserver: {mode: threaded, recv_size: 16MiB}\nclients:\n  - name: a\n    connections: 100\n"
     "    mode: epoll\n    workload: {kind: echo}\n", 2,
     "server.recv_size: the server container would hold about 1.584 GiB (the interpreter 20 MiB, 100 connection(s) "
     "× 16.02 MiB (its own 16 MiB recv buffer and thread))"),
    ("name: t\ncontainer_memory: 64MiB\nclients:\n  - name: sender\n    workload: {kind: bulk, bytes: 64MiB}\n",
     5, "clients[0].workload.bytes: a container of group sender would hold about 148.1 MiB (the interpreter 20 MiB, "
     "the 64 MiB payload every connection shares, 128 MiB while it is built, 1 connection(s) × 84 KiB (a 64 KiB "
     "receive and a thread)), more than the 64 MiB a container may hold (container_memory; raise it if the host"),
    ("name: t\ncontainer_memory: lots\nclients:\n  - name: sender\n", 2,
     "container_memory: 'lots' is not a size: use a whole number of bytes or one with B, KB, KiB"),
    ("name: t\nclients:\n  - name: sender\n    workload: {kind: bulk, bytes: 1KiB}\nmatrix:\n"
     "  clients.sender.connections: [1, 30000]\n", 6,
     "matrix.clients.sender.connections[1]: 30000 connections from one container need as many ephemeral ports"),
    ("- name: t\n", 1, "the file must be a mapping of keys"),
    ("# nothing here\n", None, "the file is empty"),
    # Swarm placement: what Swarm itself would refuse only when the stack is deployed.
    ("name: t\nserver:\n  placement: {node.hostname: vm1}\nclients:\n  - name: sender\n", 3,
     "server.placement: a mapping is not a list of placement constraints: give one or more, each a "
     "'- ' item (use ATTRIBUTE == VALUE or ATTRIBUTE != VALUE, with node.id, node.hostname, node.role"),
    ("name: t\nclients:\n  - name: sender\n    placement: [node.hostname = vm2]\n", 4,
     "clients[0].placement: 'node.hostname = vm2' is not a placement constraint: use ATTRIBUTE == VALUE or "
     "ATTRIBUTE != VALUE, with node.id, node.hostname, node.role, node.platform.os, node.platform.arch, "
     "node.labels.NAME or engine.labels.NAME (e.g. node.hostname == vm2)"),
    ("name: t\nclients:\n  - name: sender\n    placement: [host == vm2]\n", 4,
     "clients[0].placement: 'host == vm2' is not a placement constraint"),
    ("name: t\nclients:\n  - name: sender\n    placement: ['node.role == leader']\n", 4,
     "clients[0].placement: 'node.role == leader' is not a placement constraint: node.role is manager or worker"),
    ("name: t\nclients:\n  - name: sender\n    placement: []\n", 4,
     "clients[0].placement: the list of placement constraints is empty: give one or more, or leave placement out"),
    # Captures and link verification.
    ("name: t\ncapture: yes please\nclients:\n  - name: sender\n", 2,
     "capture: 'yes please' is not a capture setting: use true"),
    ("name: t\nclients:\n  - name: sender\n    capture: {snaplen: 10}\n", 4,
     "clients[0].capture: snaplen 10 is out of range: use 64 to 262144 bytes"),
    ("name: t\nclients:\n  - name: sender\n    capture: {snaplen: 128, cap: 1KiB}\n", 4,
     "clients[0].capture: cap 1024 is too small: use at least 65536 bytes"),
    ("name: t\nserver:\n  capture: {depth: 3}\nclients:\n  - name: sender\n", 3,
     "server.capture: 'depth' is not a capture key"),
    ("name: t\nserver:\n  capture: {snaplen: 1.5}\nclients:\n  - name: sender\n", 3,
     "snaplen 1.5 is not a whole number of bytes"),
    ("name: t\nverify: always\nclients:\n  - name: sender\n", 2,
     "verify: 'always' is not a link verification: use one of mark, strict, off"),
]


@pytest.mark.parametrize("text, line, fragment", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_bad_configs_name_file_line_key_and_what_is_allowed(text, line, fragment):
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert fragment in message
    assert info.value.line == line
    expected_prefix = f"configs/t.yaml:{line}: " if line else "configs/t.yaml: "
    assert message.startswith(expected_prefix), message
    assert "\n" not in message and "Traceback" not in message


def test_the_error_table_is_large():
    assert len(BAD) >= 20


def test_overrides_set_values_by_group_name():
    exp = load(SPEC_EXAMPLE, ["clients.sender.replicas=3", "repeat=5", "server.link.delay=10ms",
                              "clients.sender.workload.bytes=1MiB", "description=a: b"])
    assert exp.group("sender").replicas == 3 and exp.repeat == 5
    assert exp.server.link.delay_ms == 10.0 and exp.group("sender").workload.bytes == 1 << 20
    assert exp.description == "a: b"


def test_override_creates_missing_sections():
    exp = load(MINIMAL, ["clients.sender.link.up.rate=1mbit", "server.mode=epoll", "timeout=30s"])
    assert exp.group("sender").link.up.rate_bps == 1_000_000
    assert exp.server.mode == "epoll" and exp.timeout_s == 30.0


def test_override_of_a_swept_key_narrows_the_matrix_to_that_value():
    exp = load(SPEC_EXAMPLE, ["clients.sender.mode=nonblocking"])
    assert exp.matrix[0].values == ("nonblocking",)
    assert exp.matrix[1].values == ("1mbit", "10mbit")


@pytest.mark.parametrize("override, fragment", [
    ("clients.sender.link.rate=10mbps",
     "configs/t.yaml: --set clients.sender.link.rate: '10mbps' is not a rate"),
    ("clients.sender.mode=turbo", "configs/t.yaml: --set clients.sender.mode: 'turbo' is not a client mode"),
    ("clients.bob.mode=select", "--set clients.bob.mode: there is no client group named 'bob': the groups are sender"),
    ("clients.sender.speed=1", "--set clients.sender.speed: is not a setting of a client group"),
    ("matrix=1", "--set matrix: does not name a setting: use name, description, repeat, timeout"),
    ("repeat", "--set repeat: use KEY=VALUE"),
    ("repeat=0", "--set repeat: 0 is too small"),
])
def test_bad_overrides_name_the_set_option(override, fragment):
    with pytest.raises(ConfigError) as info:
        load(SPEC_EXAMPLE, [override])
    assert fragment in str(info.value)
    assert info.value.line is None


def test_overrides_leave_the_raw_config_unchanged():
    raw = parse_raw(MINIMAL, "configs/t.yaml")
    changed = apply_overrides(raw, ["clients.sender.mode=select"])
    assert build_experiment(raw).group("sender").mode == "blocking"
    assert build_experiment(changed).group("sender").mode == "select"


def test_raw_tree_is_read_only():
    raw = parse_raw(MINIMAL, "configs/t.yaml")
    with pytest.raises(TypeError):
        raw.tree["name"] = "x"  # type: ignore[index]
    assert isinstance(raw.tree["clients"], tuple)


def test_experiment_objects_are_frozen():
    exp = load(MINIMAL)
    with pytest.raises(AttributeError):
        exp.repeat = 2  # type: ignore[misc]


def test_when_conditions_compare_parsed_values():
    exp = load(SPEC_EXAMPLE.replace("when: {clients.sender.mode: nonblocking}",
                                    "when: {clients.sender.link.rate: 10000kbit}"))
    assert exp.expect[0].applies_to(exp)
    assert exp.setting("clients.sender.link.rate") == 10_000_000
    assert exp.setting("clients.sender.workload.requests") is None
    assert exp.setting("timeout") == 120.0


def test_aliases_cannot_blow_up():
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 7):
        text += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]\n"
    with pytest.raises(ConfigError, match="expands to more than"):
        load(text)


def test_messages_follow_file_line_key_message():
    pattern = re.compile(r"^configs/t\.yaml:\d+: [\w.\[\]]+: .+")
    for text, line, _ in BAD:
        if line is None:
            continue
        with pytest.raises(ConfigError) as info:
            load(text)
        if "YAML" not in str(info.value) and "missing" not in str(info.value) and "mapping of keys" not in str(info.value):
            assert pattern.match(str(info.value)), str(info.value)


def test_when_accepts_a_list_of_values():
    text = ("name: t\nserver: {mode: blocking}\nclients:\n  - {name: c}\n"
            "matrix:\n  server.mode: [blocking, epoll, asyncio]\n"
            "expect:\n  - name: x\n    when: {server.mode: [epoll, asyncio]}\n    check: 'c.wall_s > 0'\n")
    experiment = load_experiment_text(text, "t.yaml")
    from labkit.matrix import expand_cases
    applies = [experiment.expect[0].applies_to(case.experiment) for case in expand_cases(experiment)]
    assert applies == [False, True, True]
    assert experiment.to_dict()["expect"][0]["when"] == {"server.mode": ["epoll", "asyncio"]}
    with pytest.raises(ConfigError, match=r"t.yaml:9: expect\[0\].when.server.mode\[1\]: .*server mode"):
        load_experiment_text(text.replace("[epoll, asyncio]", "[epoll, async]"), "t.yaml")


@pytest.mark.parametrize("argv", [["check"], ["run", "--dry-run"]])
def test_check_and_dry_run_refuse_a_link_the_container_would_refuse_by_file_line_key(argv, tmp_path, capsys):
    from labkit import cli
    path = tmp_path / "jitter.yaml"
    path.write_text("name: t\nclients:\n  - name: sender\n    link: {delay: 5ms, jitter: 10ms}\n")
    assert cli.main([*argv, str(path)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line == (f"lab.py: {path}:4: clients[0].link.jitter: jitter 10ms is larger than the up delay 5ms; "
                    "a packet cannot leave before it was sent, so the delay must be at least the jitter")
    assert "SOCKLAB_" not in captured.err + captured.out


def test_dry_run_of_a_matrix_combination_names_the_matrix_not_a_variable(tmp_path, capsys):
    from labkit import cli
    path = tmp_path / "combo.yaml"
    path.write_text("name: t\nclients:\n  - name: a\n    link: {delay: 10ms}\nmatrix:\n"
                    "  clients.a.link.delay: [10ms, 1ms]\n  clients.a.link.jitter: [0ms, 5ms]\n")
    assert cli.main(["run", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lab.py: {path}:7: matrix.clients.a.link.jitter[1]: jitter 5ms is larger than the up "
                          "delay 1ms") and "SOCKLAB_" not in err


def test_container_memory_is_a_setting_that_round_trips():
    exp = load("name: t\ncontainer_memory: 8GiB\nclients:\n  - name: sender\n    workload: {bytes: 600MB}\n")
    assert exp.container_memory_bytes == 8 << 30 and exp.to_dict()["container_memory"] == "8GiB"
    assert load(yaml.safe_dump(exp.to_dict(), sort_keys=False)) == exp
    assert load(MINIMAL).to_dict()["container_memory"] == "1GiB"
    assert load(MINIMAL, ["container_memory=1500MiB"]).container_memory_bytes == 1500 << 20
    with pytest.raises(ConfigError, match=r"^configs/t.yaml: --set container_memory: 'x' is not a size"):
        load(MINIMAL, ["container_memory=x"])
    with pytest.raises(ConfigError, match=r"workload.bytes: a container of group sender would hold"):
        load(MINIMAL, ["clients.sender.workload.bytes=600MB"])


def test_a_schedule_step_that_becomes_valid_through_an_earlier_step_loads():
    exp = load("name: t\nclients:\n  - name: sender\n    link: {delay: 20ms, jitter: 5ms}\nschedule:\n"
               "  - {at: 2s, target: clients.sender, link: {delay: 4ms}}\n"
               "  - {at: 1s, target: clients.sender, link: {jitter: 1ms}}\n")
    assert [s.at_s for s in exp.schedule] == [2.0, 1.0]


def test_dry_run_prints_every_service_of_a_case_and_where_a_swarm_places_it(capsys):
    from labkit import cli
    assert cli.main(["run", "--dry-run", str(ROOT / "configs" / "seed-demo.yaml"),
                     "--set", "server.placement=node.role==manager"]) == 0
    out = capsys.readouterr().out
    case = out[out.index("case sender.mode=blocking:"):out.index("case sender.mode=nonblocking:")]
    assert "  server: server --mode blocking --port 5000 " in case
    assert "  server: on a swarm, placed by node.role == manager\n" in case
    assert "  server-ready: as compose.yaml defines it\n" in case
    assert "  client-sender: client --mode blocking --host server --port 5000 " in case


def test_capture_and_verify_are_set_from_the_command_line_like_any_top_key():
    experiment = load("name: t\nclients:\n  - name: sender\n    capture: {snaplen: 256, cap: 64MiB}\n",
                      overrides=["capture=true", "verify=strict"])
    assert experiment.verify == "strict"
    assert experiment.capture_of(experiment.server).snaplen_bytes == 128  # the experiment's: the defaults
    own = experiment.capture_of(experiment.clients[0])
    assert (own.snaplen_bytes, own.cap_bytes) == (256, 64 << 20)
    # Rendered back as written: experiment.yaml reruns the same captures.
    assert experiment.to_dict()["capture"] is True
    assert experiment.to_dict()["clients"][0]["capture"] == {"snaplen": 256, "cap": "64MiB"}
    off = load("name: t\ncapture: true\nclients:\n  - name: sender\n    capture: false\n")
    assert off.capture_of(off.clients[0]) is None and off.capture_of(off.server) is not None
