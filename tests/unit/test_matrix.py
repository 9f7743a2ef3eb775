"""Case expansion: counts, ids, order, stability, resolution and bad combinations."""

import pytest

from labkit.config import ConfigError, load_experiment_text
from labkit.matrix import DEFAULT_CASE_ID, case_id, expand_cases, expand_runs

BASE = """\
name: m
repeat: 2
clients:
  - name: sender
    mode: blocking
    link: {rate: 10mbit, delay: 20ms}
"""


def load(text, overrides=()):
    return load_experiment_text(text, "configs/m.yaml", overrides)


def with_matrix(matrix, extra=""):
    return BASE + extra + "matrix:\n" + "".join(f"  {k}: {v}\n" for k, v in matrix.items())


def test_no_matrix_is_one_default_case():
    exp = load(BASE)
    cases = expand_cases(exp)
    assert len(cases) == 1
    assert cases[0].id == DEFAULT_CASE_ID == "default"
    assert dict(cases[0].params) == {}
    assert cases[0].experiment == exp


def test_cartesian_product_in_file_order_first_key_slowest():
    exp = load(with_matrix({"clients.sender.mode": "[blocking, nonblocking]",
                            "clients.sender.link.rate": "[1mbit, 10mbit, 100mbit]"}))
    ids = [case.id for case in expand_cases(exp)]
    assert ids == [
        "sender.mode=blocking,sender.link.rate=1mbit",
        "sender.mode=blocking,sender.link.rate=10mbit",
        "sender.mode=blocking,sender.link.rate=100mbit",
        "sender.mode=nonblocking,sender.link.rate=1mbit",
        "sender.mode=nonblocking,sender.link.rate=10mbit",
        "sender.mode=nonblocking,sender.link.rate=100mbit",
    ]


def test_key_order_follows_the_file_not_the_alphabet():
    exp = load(with_matrix({"clients.sender.link.rate": "[1mbit, 10mbit]",
                            "clients.sender.mode": "[blocking, nonblocking]"}))
    assert expand_cases(exp)[1].id == "sender.link.rate=1mbit,sender.mode=nonblocking"


def test_params_keep_full_keys_and_values_as_written():
    exp = load(with_matrix({"clients.sender.mode": "[nonblocking]", "clients.sender.link.rate": "[1000kbit]",
                            "clients.sender.connections": "[4]"}))
    case = expand_cases(exp)[0]
    assert dict(case.params) == {"clients.sender.mode": "nonblocking", "clients.sender.link.rate": "1000kbit",
                                 "clients.sender.connections": 4}
    assert case.id == "sender.mode=nonblocking,sender.link.rate=1000kbit,sender.connections=4"


def test_each_case_carries_its_resolved_experiment():
    exp = load(with_matrix({"clients.sender.mode": "[blocking, nonblocking]",
                            "clients.sender.link.rate": "[1mbit, 10mbit]"}))
    for case in expand_cases(exp):
        sender = case.experiment.group("sender")
        assert sender.mode == case.params["clients.sender.mode"]
        assert sender.link.rate_bps == {"1mbit": 1_000_000, "10mbit": 10_000_000}[case.params["clients.sender.link.rate"]]
        assert sender.link.delay_ms == 20.0  # untouched settings stay
        assert case.experiment.matrix == ()


def test_server_and_timeout_keys_keep_their_prefix_in_ids():
    exp = load(with_matrix({"server.mode": "[select, epoll]", "timeout": "[10s, 1m]"}))
    cases = expand_cases(exp)
    assert [c.id for c in cases] == ["server.mode=select,timeout=10s", "server.mode=select,timeout=1m",
                                     "server.mode=epoll,timeout=10s", "server.mode=epoll,timeout=1m"]
    assert cases[1].experiment.timeout_s == 60.0 and cases[2].experiment.server.mode == "epoll"


def test_a_swept_setting_that_was_not_written_is_created():
    exp = load(with_matrix({"clients.sender.link.up.loss": "[0%, 1%]", "server.link.delay": "[5ms]"}))
    cases = expand_cases(exp)
    assert cases[1].experiment.group("sender").link.effective_up.loss_pct == 1.0
    assert cases[0].experiment.server.link.delay_ms == 5.0


def test_ids_are_stable_across_loads():
    text = with_matrix({"clients.sender.mode": "[select, poll, epoll]", "clients.sender.replicas": "[1, 2]"})
    first = [(c.index, c.id, dict(c.params)) for c in expand_cases(load(text))]
    second = [(c.index, c.id, dict(c.params)) for c in expand_cases(load(text))]
    assert first == second
    assert [index for index, _, _ in first] == list(range(6))
    assert len({case_id for _, case_id, _ in first}) == 6
    cases = expand_cases(load(text))
    assert len(set(cases)) == 6  # cases can key dicts of results


def test_case_id_spells_null_and_booleans_as_yaml():
    assert case_id({"clients.c.workload.cancel_after": None}) == "c.workload.cancel_after=null"
    assert case_id({}) == DEFAULT_CASE_ID


def test_null_is_a_sweepable_value_where_null_is_allowed():
    exp = load(with_matrix({"clients.sender.workload.connect_timeout": "[null, 2s]"}).replace(
        "    mode: blocking\n", "    mode: blocking\n    workload: {kind: connect}\n"))
    cases = expand_cases(exp)
    assert [c.id for c in cases] == ["sender.workload.connect_timeout=null", "sender.workload.connect_timeout=2s"]
    assert cases[0].experiment.group("sender").workload.connect_timeout_s is None
    assert cases[1].experiment.group("sender").workload.connect_timeout_s == 2.0


def test_repetitions_run_case_by_case():
    exp = load(with_matrix({"clients.sender.mode": "[blocking, nonblocking]"}))
    cases = expand_cases(exp)
    assert [c.repetitions for c in cases] == [2, 2]
    runs = [(case.id, repetition) for case, repetition in expand_runs(cases)]
    assert runs == [("sender.mode=blocking", 0), ("sender.mode=blocking", 1),
                    ("sender.mode=nonblocking", 0), ("sender.mode=nonblocking", 1)]


def test_repeat_override_changes_the_run_count():
    exp = load(with_matrix({"clients.sender.mode": "[blocking, nonblocking]"}), ["repeat=3"])
    assert len(expand_runs(expand_cases(exp))) == 6


def test_set_on_a_swept_key_keeps_only_that_case():
    text = with_matrix({"clients.sender.mode": "[blocking, nonblocking]", "clients.sender.link.rate": "[1mbit, 10mbit]"})
    ids = [c.id for c in expand_cases(load(text, ["clients.sender.mode=nonblocking"]))]
    assert ids == ["sender.mode=nonblocking,sender.link.rate=1mbit", "sender.mode=nonblocking,sender.link.rate=10mbit"]


def test_set_on_a_swept_key_is_validated_like_the_matrix():
    text = with_matrix({"clients.sender.mode": "[blocking, nonblocking]"})
    with pytest.raises(ConfigError, match=r"^configs/m\.yaml: --set clients.sender.mode: 'turbo' is not a client mode"):
        load(text, ["clients.sender.mode=turbo"])


def test_expectations_apply_by_the_cases_settings():
    text = with_matrix({"clients.sender.mode": "[blocking, nonblocking]"}) + (
        "expect:\n  - name: nb\n    when: {clients.sender.mode: nonblocking}\n    check: sender.send_calls == 1\n"
        "  - name: all\n    check: sender.bytes_delivered == sender.bytes_requested\n")
    cases = expand_cases(load(text))
    assert [[e.name for e in c.experiment.expect if e.applies_to(c.experiment)] for c in cases] == [
        ["all"], ["nb", "all"]]


@pytest.mark.parametrize("matrix, line, fragment", [
    ({"clients.sender.link.rate": "[1mbit, 10mbps]"}, 8, "matrix.clients.sender.link.rate[1]: '10mbps' is not a rate"),
    ({"clients.sender.replicas": "[1, 0]"}, 8, "matrix.clients.sender.replicas[1]: 0 is too small"),
    ({"clients.sender.link.loss": "[1%, 101%]"}, 8, "matrix.clients.sender.link.loss[1]: '101%' is not a percentage"),
    ({"timeout": "[10s, 20]"}, 8, "matrix.timeout[1]: 20 is not a duration"),
    ({"server.mode": "[select, nonblocking]"}, 8, "matrix.server.mode[1]: 'nonblocking' is not a server mode"),
    ({"clients.sender.workload.kind": "[bulk, turbo]"}, 8, "matrix.clients.sender.workload.kind[1]: 'turbo' is not a workload kind"),
    ({"clients.sender.mode": "[]"}, 8, "matrix.clients.sender.mode: needs a non-empty list of values"),
])
def test_invalid_matrix_values_are_caught_at_load_where_they_are_written(matrix, line, fragment):
    with pytest.raises(ConfigError) as info:
        load(with_matrix(matrix))
    assert str(info.value).startswith(f"configs/m.yaml:{line}: {fragment}")
    assert info.value.line == line


def test_a_matrix_value_that_conflicts_with_the_file_is_caught_at_load():
    text = with_matrix({"timeout": "[1m, 5s]"}, extra="schedule:\n  - {at: 10s, target: server, link: {rate: 1mbit}}\n")
    with pytest.raises(ConfigError) as info:
        load(text)
    assert "schedule[0].at: 10s is not before the case timeout (5s)" in str(info.value)


def test_an_invalid_combination_of_valid_values_fails_expansion_naming_the_matrix():
    text = with_matrix({"clients.sender.workload.kind": "[bulk, connect]", "clients.sender.workload.bytes": "[100]"})
    exp = load(text)  # each value is valid on its own
    with pytest.raises(ConfigError) as info:
        expand_cases(exp)
    assert "matrix.clients.sender.workload.bytes[0]: is a key of the bulk workload, not of connect" in str(info.value)
    assert info.value.line == 9


@pytest.mark.parametrize("matrix, line, fragment", [
    # Each value is valid over the file's link; together they make a jitter above the delay.
    ({"clients.sender.link.delay": "[20ms, 1ms]", "clients.sender.link.jitter": "[0ms, 5ms]"}, 10,
     "matrix.clients.sender.link.jitter[1]: jitter 5ms is larger than the up delay 1ms"),
    # An epoll echo server may queue 256 KiB for each of 4 × 1000 connections: past 1 GiB; a blocking one is not.
    ({"clients.sender.workload.kind": "[bulk, echo]", "clients.sender.connections": "[1, 1000]",
      "server.mode": "[blocking, epoll]"}, 10,
     "matrix.clients.sender.connections[1]: the server container would hold about 1.004 GiB"),
])
def test_a_combination_the_container_would_refuse_fails_expansion_naming_the_matrix(matrix, line, fragment):
    exp = load(with_matrix(matrix, extra="server: {mode: blocking}\n").replace("    mode: blocking\n    link",
                                                                               "    replicas: 4\n    link"))
    with pytest.raises(ConfigError) as info:
        expand_cases(exp)
    assert str(info.value).startswith(f"configs/m.yaml:{line}: {fragment}"), str(info.value)
    assert info.value.line == line
