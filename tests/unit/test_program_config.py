"""A program of the user's as a role: loading, checking, its containers' argv, its run directory copy."""

import os
from pathlib import Path

import pytest
import yaml

from labkit import records, scenario
from labkit.commands.run import new_rundir
from labkit.commands.trial import link_mapping, try_experiment
from labkit.config import ConfigError, load_experiment, load_experiment_text
from labkit.matrix import expand_cases
from labkit.rundir import program_digest
from socklab.errors import UsageError

TUTORIAL = """\
name: mine
program_root: ../programs
server:
  program: {path: tutorial/block_server.py, args: ["{port}"]}
clients:
  - name: mine
    program: {path: tutorial/non_blocking_client.py, args: ["{host}", "{port}"]}
    link: {rate: 10mbit}
matrix:
  clients.mine.program.path: [tutorial/block_client.py, tutorial/non_blocking_client.py]
expect:
  - name: blocking send takes everything
    when: {clients.mine.program.path: tutorial/block_client.py}
    check: "mine.bytes_accepted == 136314880"
"""


@pytest.fixture
def tree(tmp_path):
    """An experiment directory beside a program directory, as in the repository."""
    programs = tmp_path / "programs" / "tutorial"
    programs.mkdir(parents=True)
    for name in ("block_server.py", "block_client.py", "non_blocking_client.py"):
        (programs / name).write_text(f"print({name!r})\n")
    package = tmp_path / "programs" / "package"
    package.mkdir()
    (package / "main.py").write_text("import helper\n")
    (package / "helper.py").write_text("")
    (tmp_path / "configs").mkdir()
    return tmp_path


def write(tree, text, name="x.yaml"):
    path = tree / "configs" / name
    path.write_text(text)
    return path


def test_program_roles_load_with_their_file_as_their_mode(tree):
    experiment = load_experiment(write(tree, TUTORIAL))
    assert experiment.server.program.script == "tutorial/block_server.py"
    assert experiment.server.mode == "block_server.py"
    (group,) = experiment.clients
    assert group.mode == "non_blocking_client.py" and group.workload.kind == "program"
    assert group.program.args == ("{host}", "{port}") and group.program.trace == "python"
    assert experiment.program_dir == (tree / "programs").resolve()


def test_a_swept_program_path_is_a_case_each_and_when_matches_it(tree):
    cases = expand_cases(load_experiment(write(tree, TUTORIAL)))
    assert [c.experiment.group("mine").program.script for c in cases] == [
        "tutorial/block_client.py", "tutorial/non_blocking_client.py"]
    assert [len([e for e in c.experiment.expect if e.applies_to(c.experiment)]) for c in cases] == [1, 0]
    assert scenario.program_files(cases[0].experiment) == ["tutorial/block_server.py", "tutorial/block_client.py"]
    assert scenario.program_files(load_experiment(write(tree, TUTORIAL))) == [
        "tutorial/block_server.py", "tutorial/block_client.py", "tutorial/non_blocking_client.py"]


def test_a_directory_runs_its_entry_and_a_command_is_untraced_by_default(tree):
    experiment = load_experiment(write(tree, """\
name: d
program_root: ../programs
server: {command: [nc, -l, "{port}"]}
clients:
  - name: pkg
    program: {path: package, entry: main.py}
    trace: strace
"""))
    assert experiment.server.program.command == ("nc", "-l", "{port}") and experiment.server.program.trace == "none"
    assert experiment.server.mode == "nc"
    assert experiment.group("pkg").program.script == "package/main.py"
    assert experiment.group("pkg").program.trace == "strace"


def test_a_program_experiment_renders_to_keys_that_load_back_equal(tree):
    experiment = load_experiment(write(tree, TUTORIAL))
    rendered = experiment.to_dict()
    assert "mode" not in rendered["server"] and "workload" not in rendered["clients"][0]
    assert rendered["program_root"] == "../programs"
    again = load_experiment(write(tree, yaml.safe_dump(rendered, sort_keys=False), "again.yaml"))
    assert again.server == experiment.server and again.clients == experiment.clients
    assert again.matrix == experiment.matrix


def test_the_run_directory_keeps_the_programs_and_reruns_from_its_copy(tree):
    experiment = load_experiment(write(tree, TUTORIAL))
    rundir = new_rundir(experiment, tree / "results")
    copied = sorted(p.relative_to(rundir.programs).as_posix() for p in rundir.programs.rglob("*") if p.is_file())
    assert copied == ["tutorial/block_client.py", "tutorial/block_server.py", "tutorial/non_blocking_client.py"]
    for path in rundir.programs.rglob("*"):
        assert os.stat(path).st_mode & 0o005 == 0o005 if path.is_dir() else os.stat(path).st_mode & 0o004
    again = load_experiment(rundir.path / "experiment.yaml")
    assert again.program_dir == rundir.programs.resolve()
    assert again.clients == experiment.clients and again.server == experiment.server
    source = tree / "programs" / "tutorial" / "block_client.py"
    assert rundir.program_digest("tutorial/block_client.py") == program_digest(source)
    import hashlib
    assert program_digest(source) == hashlib.sha256(source.read_bytes()).hexdigest()


def test_a_directory_digest_changes_with_any_file(tree):
    package = tree / "programs" / "package"
    before = program_digest(package)
    (package / "helper.py").write_text("x = 1\n")
    assert program_digest(package) != before


PROGRAM_BAD = [
    ("server:\n  program: {path: tutorial/missing.py}\n", 4, "server.program.path: there is no file"),
    ("server:\n  program: {path: package}\n", 4, "server.program.path: 'package' is a directory"),
    ("server:\n  program: {path: tutorial/block_server.py, entry: main.py}\n", 4,
     "server.program.entry: applies to a directory"),
    ("server:\n  program: {path: tutorial/block_server.py, args: [\"{hots}\"]}\n", 4,
     "server.program.args: '{hots}' uses {hots}, which the lab does not fill: use {host}, {port}"),
    ("server:\n  program: {path: tutorial/block_server.py, args: \"{port}\"}\n", 4, "is not a list"),
    ("server:\n  mode: epoll\n  program: {path: tutorial/block_server.py}\n", 4,
     "server.mode: is a key of a built-in role, and the server runs a program of its own"),
    ("clients:\n  - name: c\n    workload: {kind: echo}\n    program: {path: tutorial/block_client.py}\n", 5,
     "clients[0].workload: is a key of a built-in role, and client group c runs a program"),
    ("server:\n  program: {path: tutorial/block_server.py}\n  command: [nc]\n", 5,
     "server.command: is given with program: give one"),
    ("server:\n  trace: strace\n", 4, "server.trace: applies to a program or command only"),
    ("server:\n  command: [nc, -l, \"{port}\"]\n  trace: python\n", 5,
     "server.trace: 'python' is not a way to trace a command: use one of none, strace"),
    ("server:\n  command: []\n", 4, "server.command: the list is empty"),
    ("server:\n  program: {path: ../outside.py}\n", 4, "server.program.path: '../outside.py' leaves the program root"),
    ("server:\n  program: {path: /etc/passwd}\n", 4, "leaves the program root"),
    ("server:\n  program: {args: []}\n", 4, "server.program: path is missing: it is required"),
    ("server:\n  program: {path: tutorial/block_server.py, argz: []}\n", 4,
     "server.program.argz: unknown key for a program: use path, entry, args"),
]


@pytest.mark.parametrize("text, line, fragment", PROGRAM_BAD, ids=[f"{i:02d}" for i in range(len(PROGRAM_BAD))])
def test_bad_programs_name_file_line_key_and_what_is_allowed(tree, text, line, fragment):
    path = write(tree, "name: t\nprogram_root: ../programs\n" + text
                 + ("clients:\n  - name: s\n" if "clients" not in text else ""))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert fragment in message, message
    assert message.startswith(f"{path}:{line}: "), message
    assert info.value.line == line


def test_a_matrix_value_naming_a_missing_program_is_refused_at_the_matrix(tree):
    text = TUTORIAL.replace("tutorial/non_blocking_client.py]", "tutorial/gone.py]")
    with pytest.raises(ConfigError, match=r"x.yaml:10: matrix.clients.mine.program.path\[1\]: there is no file"):
        load_experiment(write(tree, text))


def test_a_missing_program_root_is_refused(tree):
    with pytest.raises(ConfigError, match="program_root: there is no directory"):
        load_experiment(write(tree, "name: t\nprogram_root: ../nowhere\nclients:\n  - name: s\n"))


def test_program_roles_run_through_the_program_role_with_placeholders_filled(tree):
    case = expand_cases(load_experiment(write(tree, TUTORIAL)))[0]
    experiment = case.experiment
    assert scenario.server_argv(experiment) == [
        "program", "--role", "server", "--name", "block_server.py", "--trace-with", "python",
        "--trace", scenario.TRACE_PATH, "--output-dir", scenario.PROGRAM_OUTPUT_DIR, "--port", "5000",
        "--", "python3", "/programs/tutorial/block_server.py", "5000"]
    assert scenario.client_argv(experiment.group("mine"), trace=False)[-4:] == [
        "python3", "/programs/tutorial/block_client.py", "server", "5000"]
    assert "none" in scenario.client_argv(experiment.group("mine"), trace=False)
    override = scenario.compose_override(experiment, case.id, programs_dir=tree / "run" / "programs")
    mount = {"type": "bind", "source": str(tree / "run" / "programs"), "target": "/programs", "read_only": True}
    assert override["services"]["server"]["volumes"] == [mount]
    assert override["services"]["client-mine"]["volumes"] == [mount]


def test_built_in_clients_of_a_program_server_expect_no_trailer(tree):
    experiment = load_experiment(write(tree, "name: t\nprogram_root: ../programs\n"
                                             "server: {program: {path: tutorial/block_server.py}}\n"
                                             "clients:\n  - name: s\n"))
    override = scenario.compose_override(experiment, "c")
    assert "--no-trailer" in override["services"]["client-s"]["command"]
    assert "volumes" not in override["services"]["client-s"]
    built_in = load_experiment_text("name: t\nclients:\n  - name: s\n", "configs/t.yaml")
    assert "--no-trailer" not in scenario.compose_override(built_in, "c")["services"]["client-s"]["command"]


def test_a_client_program_learns_what_was_delivered_from_the_server_by_address():
    server = {"per_connection": [{"peer": "172.18.0.3:40000", "bytes_received": 78192},
                                 {"peer": "172.18.0.4:40100", "bytes_received": 1000}]}
    mine = {"name": "mine", "replica": 0, "bytes_delivered": None,
            "program": {"sockets": [{"conn": 0, "kind": "connect", "local": "172.18.0.3:40000",
                                     "peer": "172.18.0.2:5000"}]}}
    unmatched = {**mine, "program": {"sockets": [{"kind": "connect", "local": "172.18.0.9:1"}]}}
    built_in = {"name": "b", "replica": 0, "bytes_delivered": 5}
    filled = records.with_deliveries([mine, unmatched, built_in], server)
    assert [c["bytes_delivered"] for c in filled] == [78192, None, 5]
    assert mine["bytes_delivered"] is None  # the input is left as it was


def test_try_builds_one_case_around_the_program(tree):
    client = tree / "programs" / "tutorial" / "block_client.py"
    server = tree / "programs" / "tutorial" / "block_server.py"
    experiment = try_experiment(client, None, server=server, link="rate=10mbit,delay=20ms,up.rate=1mbit")
    assert experiment.program_dir == client.parent.resolve()
    assert experiment.group("program").program.args == ("{host}", "{port}")
    assert experiment.server.program.script == "block_server.py"
    assert experiment.group("program").link.effective_up.rate_bps == 1_000_000
    assert experiment.group("program").link.effective_down.delay_ms == 20
    built_in = try_experiment(client, ["{host}", "{port}", "extra"], server_mode="epoll")
    assert built_in.server.mode == "epoll" and built_in.group("program").program.args[-1] == "extra"
    package = try_experiment(tree / "programs" / "package" / "main.py", None, server=server)
    assert package.program_dir == (tree / "programs").resolve()
    assert package.group("program").program.script == "package/main.py"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"link": "rate=10mbps"}, "lab.py try: --link rate=10mbps: '10mbps' is not a rate"),
    ({"link": "rate"}, "--link rate: 'rate' is not KEY=VALUE"),
    ({"timeout": "soon"}, "lab.py try: --timeout: 'soon' is not a duration"),
    ({"server": Path("/nonexistent/server.py")}, "--server /nonexistent/server.py: there is no such file"),
])
def test_try_refuses_bad_options_naming_the_option(tree, kwargs, fragment):
    with pytest.raises(UsageError) as info:
        try_experiment(tree / "programs" / "tutorial" / "block_client.py", None, **kwargs)
    assert fragment in str(info.value)


def test_link_words_become_a_link_mapping():
    assert link_mapping("rate=10mbit, down.delay=5ms") == {"rate": "10mbit", "down": {"delay": "5ms"}}
