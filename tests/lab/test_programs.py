"""A program of the user's as a role, on real containers: the tutorial's own three programs
give what the built-in modes give, traced without a change to them; `lab.py try`; a crash;
a command traced by strace; nothing of the user's runs with privileges."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from socklab.trace import read_trace

from .conftest import lab, records_of

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "examples" / "tutorial"
PAYLOAD = 136_314_880
pytestmark = pytest.mark.docker


def by_program(records: list[dict]) -> dict[str, dict]:
    return {r["clients"][0]["mode"]: r for r in records}


@pytest.fixture(scope="module")
def tutorial_run(lab_image, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """configs/tutorial-programs.yaml: the tutorial's server with its blocking, then its non-blocking client."""
    out = tmp_path_factory.mktemp("tutorial")
    done = lab("run", "configs/tutorial-programs.yaml", "--out", str(out), "--no-plots")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run, records = records_of(out)
    return run, by_program(records)


@pytest.fixture(scope="module")
def built_in_run(lab_image, tmp_path_factory) -> dict[str, dict]:
    """The built-in blocking and non-blocking modes on the same link (seed-demo, once each)."""
    out = tmp_path_factory.mktemp("builtin")
    done = lab("run", "configs/seed-demo.yaml", "--repeat", "1", "--out", str(out), "--no-plots")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return by_program(records_of(out)[1])


def test_the_tutorial_programs_hold_every_expectation(tutorial_run):
    _, records = tutorial_run
    assert set(records) == {"block_client.py", "non_blocking_client.py"}
    for record in records.values():
        assert record["status"] == "ok", record["error"]
        assert record["expectations"] and all(e["passed"] for e in record["expectations"]), record["expectations"]


def test_the_blocking_program_sends_everything_in_one_call_like_the_blocking_mode(tutorial_run, built_in_run):
    mine = tutorial_run[1]["block_client.py"]
    client, server = mine["clients"][0], mine["server"]
    assert client["send_calls"] == 1 and client["eagain"] == 0
    assert client["bytes_requested"] == client["bytes_accepted"] == PAYLOAD
    assert server["bytes_received"] == PAYLOAD and client["bytes_delivered"] == PAYLOAD
    assert server["mode"] == "block_server.py" and server["connections"] == 1
    built_in = built_in_run["blocking"]["clients"][0]
    assert built_in["send_calls"] == 1 and built_in["bytes_accepted"] == PAYLOAD
    # The same link carried both: a blocking send() lasts as long as the link needs, either way.
    assert 0.8 < client["send_s"] / built_in["send_s"] < 1.25, (client["send_s"], built_in["send_s"])


def test_the_non_blocking_program_sends_a_partial_count_that_the_server_receives_whole(tutorial_run, built_in_run):
    mine = tutorial_run[1]["non_blocking_client.py"]
    client, server = mine["clients"][0], mine["server"]
    assert client["send_calls"] == 1
    assert 0 < client["bytes_accepted"] < client["bytes_requested"] == PAYLOAD
    assert client["send_s"] < 0.05
    # It exited at once with its send buffer full: the container's network outlived it
    # until the kernel had sent all of it, and the server got every byte and the FIN.
    assert server["bytes_received"] == client["bytes_accepted"] == client["bytes_delivered"]
    assert client["drain"]["complete"] and client["drain"]["unsent_bytes"] == 0
    assert client["drain"]["s"] > 0
    built_in = built_in_run["nonblocking"]["clients"][0]
    assert built_in["send_calls"] == 1 and 0 < built_in["bytes_accepted"] < PAYLOAD
    # One send() into an empty buffer of the same kernel: counts of the same order.
    assert 0.25 < client["bytes_accepted"] / built_in["bytes_accepted"] < 4


def test_the_run_directory_keeps_each_program_its_output_and_its_trace(tutorial_run):
    run, records = tutorial_run
    for name, record in records.items():
        client = record["clients"][0]
        program = client["program"]
        copy = run / "programs" / "tutorial" / name
        assert program["path"] == f"tutorial/{name}"
        assert program["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
        assert copy.read_bytes() == (TUTORIAL / name).read_bytes()
        assert program["exit_code"] == 0
        stdout = (run / program["stdout"]).read_text()
        assert f"send() returned {client['bytes_accepted']} of {PAYLOAD} bytes" in stdout
        assert stdout.strip().splitlines()[-1] in program["stdout_tail"]
        header, calls = read_trace(str(run / client["trace"]))
        sends = [c for c in calls if c["call"] == "send"]
        assert len(sends) == 1 and sends[0]["asked"] == PAYLOAD and sends[0]["returned"] == client["bytes_accepted"]
        assert [c["call"] for c in calls if c["call"] == "connect"] == ["connect"]
        assert header["sockets"][0]["kind"] == "connect" and header["sockets"][0]["peer"].endswith(":5000")
        server = record["server"]
        assert "All Data Received" in (run / server["program"]["stdout"]).read_text()
        _, server_calls = read_trace(str(run / server["trace"]))
        assert sum(c["returned"] for c in server_calls if c["call"] == "recv" and c["returned"] > 0) == \
            server["bytes_received"]
        assert {c["asked"] for c in server_calls if c["call"] == "recv"} == {1024}
    experiment = (run / "experiment.yaml").read_text()
    assert "program_root: programs" in experiment


def test_lab_try_runs_a_program_against_a_built_in_server_and_says_what_its_calls_did(lab_image, tmp_path):
    done = lab("try", str(TUTORIAL / "non_blocking_client.py"), "--server-mode", "blocking",
               "--link", "rate=100mbit", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run, (record,) = records_of(tmp_path)
    client = record["clients"][0]
    assert record["status"] == "ok" and client["send_calls"] == 1
    # The built-in server's own count of that connection, matched by address.
    assert client["bytes_delivered"] == client["bytes_accepted"] == record["server"]["bytes_received"]
    out = done.stdout
    assert f"{client['bytes_accepted']:,}" in out and f"{PAYLOAD:,}" in out
    assert "bytes send() returned" in out and "send() calls" in out
    assert f"run directory: {run}" in out
    assert f"socket calls of program: {run / client['trace']}" in out
    assert (run / "plots" / "send-timeline.png").is_file() and "send-call timeline:" in out


def test_a_program_that_crashes_fails_its_case_with_its_last_error_line_and_ran_unprivileged(lab_image, tmp_path):
    program = tmp_path / "crash.py"
    program.write_text(
        "import os, socket, sys\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
        "print('uid', os.getuid(), 'caps', caps, flush=True)\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "s.sendall(b'x' * 1000)\n"
        "raise RuntimeError('the homework is not finished')\n")
    done = lab("try", str(program), "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    run, (record,) = records_of(tmp_path / "out")
    client = record["clients"][0]
    assert record["status"] == "failed"
    assert "RuntimeError: the homework is not finished" in record["error"]
    assert client["program"]["exit_code"] == 1
    assert client["bytes_accepted"] == 1000 and record["server"]["bytes_received"] == 1000
    assert "uid 10001 caps 0000000000000000" in (run / client["program"]["stdout"]).read_text()


def test_a_command_runs_as_a_role_and_strace_traces_its_socket_calls(lab_image, tmp_path):
    experiment = tmp_path / "iperf.yaml"
    experiment.write_text(
        "name: iperf\ntimeout: 60s\n"
        "server:\n  command: [iperf3, --server, --one-off, --port, \"{port}\"]\n"
        "clients:\n  - name: perf\n"
        "    command: [iperf3, --client, \"{host}\", --port, \"{port}\", --bytes, 4M]\n"
        "    trace: strace\n    link: {rate: 50mbit}\n"
        "expect:\n  - name: iperf3 sent its 4 MiB through traced socket calls\n"
        "    check: \"perf.bytes_accepted >= 4194304 and perf.send_calls > 0\"\n")
    done = lab("run", str(experiment), "--out", str(tmp_path / "out"), "--no-plots")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run, (record,) = records_of(tmp_path / "out")
    client = record["clients"][0]
    assert client["mode"] == "iperf3" and client["program"]["traced"] == "strace"
    assert record["server"]["program"]["traced"] == "none" and record["server"]["bytes_received"] is None
    with gzip.open(run / client["trace"], "rt") as fh:
        assert json.loads(fh.readline())["socklab_trace"] == 1
    assert "iperf Done." in (run / client["program"]["stdout"]).read_text()


def test_a_program_that_never_exits_times_out_like_any_case(lab_image, tmp_path):
    program = tmp_path / "forever.py"
    program.write_text("import socket, sys, time\n"
                       "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
                       "while True:\n    time.sleep(1)\n")
    done = lab("try", str(program), "--timeout", "6s", "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    _, (record,) = records_of(tmp_path / "out")
    assert record["status"] == "timeout"
    assert "ran past its timeout of 6 s" in record["error"] and "client-program" in record["error"]
    assert "timeout" in done.stdout
