"""The VM fabric's pure parts and its small processes, without booting a VM.

The QEMU command line (no route out, bounded translation cache), the learning
switch (by its table and by a real switch process on a unix socket), the guest
agent's protocol (served over a real socket pair) and the fabric's process
clean-up by PID.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.vm import agent as protocol
from tests.vm.fabric import AgentClient, Fabric, FabricError, GuestResult, spawn, stop
from tests.vm.qemu import SUBNET, Image, VmSpec, kernel_cmdline, overlay_argv, qemu_argv
from tests.vm.switch import LearningTable, frame_bytes, frames_in

SWITCH = Path(__file__).resolve().parents[1] / "vm" / "switch.py"


def spec(index=0, **kw) -> VmSpec:
    return VmSpec(f"vm{index}", index, Image(Path("/img")), Path("/w"), Path("/w/switch.sock"), **kw)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


# ---- the QEMU command line -------------------------------------------------------


def test_qemu_argv_boots_the_shared_kernel_on_its_own_overlay_under_bounded_tcg():
    argv = qemu_argv(spec(memory_mib=768))
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-accel") == ["tcg,thread=multi,tb-size=256"]
    assert option_values(argv, "-M") == ["pc"]
    assert option_values(argv, "-smp") == ["1"] and option_values(argv, "-m") == ["768"]
    assert option_values(argv, "-kernel") == ["/img/vmlinuz"]
    assert option_values(argv, "-initrd") == ["/img/initrd.img"]
    assert option_values(argv, "-drive") == ["file=/w/vm0.qcow2,if=virtio,format=qcow2,cache=unsafe,discard=unmap"]
    assert "socklab.ip=10.213.7.11/24" in option_values(argv, "-append")[0].split()


def test_qemu_argv_has_one_nic_on_the_switch_and_no_route_out():
    argv = qemu_argv(spec(3))
    assert "-nodefaults" in argv and option_values(argv, "-nic") == ["none"]
    netdevs = option_values(argv, "-netdev")
    assert netdevs == ["stream,id=net0,server=off,addr.type=unix,addr.path=/w/switch.sock"]
    assert not any(n.startswith("user") for n in netdevs) and "-net" not in argv
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:53:00:03" in option_values(argv, "-device")
    chardevs = option_values(argv, "-chardev")
    assert chardevs == ["socket,id=agent,path=/w/vm3.agent.sock,server=on,wait=off"]
    assert "virtserialport,bus=vser0.0,chardev=agent,name=socklab.agent" in option_values(argv, "-device")


def test_kvm_is_a_path_and_nothing_else_is():
    argv = qemu_argv(spec(accel="kvm"))
    assert option_values(argv, "-accel") == ["kvm"] and option_values(argv, "-cpu") == ["host"]
    with pytest.raises(ValueError, match="accel 'hvf': use one of tcg, kvm"):
        spec(accel="hvf")
    with pytest.raises(ValueError, match="memory_mib 128"):
        spec(memory_mib=128)
    with pytest.raises(ValueError, match="cpus 0: use 1 to 8"):
        spec(cpus=0)
    with pytest.raises(ValueError, match="does not fit"):
        spec(index=250)


def test_a_vm_gets_the_vcpus_asked_for_and_a_fabric_names_them_per_vm():
    assert option_values(qemu_argv(spec(cpus=2)), "-smp") == ["2"]
    fabric = Fabric(Image(Path("/img")), Path("/w"), count=3, memory_mib=(1024, 1536, 1536), cpus=(2, 1, 1))
    assert [(s.cpus, s.memory_mib) for s in fabric.specs] == [(2, 1024), (1, 1536), (1, 1536)]
    assert [s.cpus for s in Fabric(Image(Path("/img")), Path("/w"), count=2).specs] == [1, 1]
    with pytest.raises(ValueError, match="cpus names 2 VMs, the fabric has 3"):
        Fabric(Image(Path("/img")), Path("/w"), count=3, cpus=(2, 1))


def test_every_vm_gets_its_own_address_mac_and_files():
    specs = [spec(i) for i in range(20)]
    assert len({s.address for s in specs}) == len({s.mac for s in specs}) == 20
    assert all(__import__("ipaddress").ip_address(s.address) in SUBNET for s in specs)
    assert len({s.overlay for s in specs} | {s.agent_socket for s in specs}) == 40
    assert kernel_cmdline(specs[2]).split()[-2:] == ["socklab.name=vm2", "socklab.ip=10.213.7.13/24"]
    assert overlay_argv(specs[0]) == ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                                      "-b", "/img/disk.raw", "/w/vm0.qcow2"]


# ---- the switch ----------------------------------------------------------------------

A, B, C = (bytes([0x52, 0x54, 0, 0x53, 0, i]) for i in (1, 2, 3))
BCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes, payload: bytes = b"\x08\x00" + b"x" * 46) -> bytes:
    return dst + src + payload


def test_switch_floods_unknown_then_forwards_to_the_learnt_port():
    table, ports = LearningTable(), ["p1", "p2", "p3"]
    assert table.route(eth(B, A), "p1", ports) == ["p2", "p3"]      # B unknown: flood
    assert table.route(eth(A, B), "p2", ports) == ["p1"]            # A learnt on p1
    assert table.route(eth(B, A), "p1", ports) == ["p2"]            # B learnt on p2
    assert table.route(eth(BCAST, A), "p1", ports) == ["p2", "p3"]  # broadcast: everyone else
    assert table.route(eth(A, C), "p1", ports) == []                # A is behind the ingress port
    assert table.route(b"short", "p1", ports) == []


def test_switch_forgets_a_port_that_went_away_and_never_learns_multicast_sources():
    table, ports = LearningTable(), ["p1", "p2", "p3"]
    table.route(eth(BCAST, A), "p1", ports)
    table.forget("p1")
    assert table.route(eth(A, B), "p2", ports) == ["p1", "p3"]
    table.route(eth(BCAST, b"\x01" + A[1:]), "p3", ports)
    assert table.route(eth(b"\x01" + A[1:], B), "p2", ports) == ["p1", "p3"]


def test_frames_are_split_by_their_length_prefix_across_reads():
    stream = frame_bytes(b"one") + frame_bytes(b"") + frame_bytes(b"three")
    frames, rest = frames_in(stream[:13])  # two frames and half of the third's length
    assert frames == [b"one", b""] and rest == stream[11:13]
    frames, rest = frames_in(rest + stream[13:])
    assert frames == [b"three"] and rest == b""


def _recv_frame(sock: socket.socket) -> bytes:
    buffer = b""
    while True:
        frames, _ = frames_in(buffer)
        if frames:
            return frames[0]
        chunk = sock.recv(65536)
        assert chunk, "the switch closed the connection"
        buffer += chunk


def test_a_real_switch_process_learns_and_forwards(tmp_path):
    path = tmp_path / "switch.sock"
    proc = spawn([sys.executable, str(SWITCH), str(path)], tmp_path / "switch.log")
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        ports = []
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            sock.settimeout(5)
            ports.append(sock)
        time.sleep(0.1)  # let the switch accept all three before the first frame
        ports[0].sendall(frame_bytes(eth(BCAST, A)))
        assert _recv_frame(ports[1]) == _recv_frame(ports[2]) == eth(BCAST, A)
        ports[1].sendall(frame_bytes(eth(A, B, b"\x08\x00reply")))
        assert _recv_frame(ports[0]) == eth(A, B, b"\x08\x00reply")
        ports[2].settimeout(0.3)
        with pytest.raises(socket.timeout):  # a learnt unicast is not flooded
            ports[2].recv(65536)
        for sock in ports:
            sock.close()
    finally:
        stop(proc)
    assert proc.returncode is not None


# ---- the agent's protocol --------------------------------------------------------------


def test_protocol_lines_round_trip_and_reject_what_is_not_a_message():
    line = protocol.encode({"id": 7, "op": "ping"})
    assert line.endswith(b"\n") and protocol.decode(line) == {"id": 7, "op": "ping"}
    for bad in (b"[1]", b'{"op": "ping"}', b'{"id": "7"}'):
        with pytest.raises(ValueError):
            protocol.decode(bad)
    assert protocol.split_lines(b"a\n\nb\nrest") == ([b"a", b"b"], b"rest")


def test_agent_exec_put_get_and_errors(tmp_path):
    done = protocol.serve_one({"op": "exec", "argv": ["sh", "-c", "cat; echo err >&2; exit 3"],
                               "stdin": protocol.b64(b"in"), "timeout_s": 10})
    assert (done["rc"], protocol.unb64(done["stdout"]), protocol.unb64(done["stderr"])) == (3, b"in", b"err\n")
    assert done["timed_out"] is False
    slow = protocol.serve_one({"op": "exec", "argv": ["sh", "-c", "sleep 30 & sleep 30"], "timeout_s": 0.3})
    assert slow["timed_out"] is True and slow["duration_s"] < 5
    target = tmp_path / "d" / "f.bin"
    assert protocol.serve_one({"op": "put", "path": str(target), "data": protocol.b64(b"\0\1"), "mode": 0o600}) \
        == {"ok": True}
    assert target.read_bytes() == b"\0\1" and (target.stat().st_mode & 0o777) == 0o600
    assert protocol.unb64(protocol.serve_one({"op": "get", "path": str(target)})["data"]) == b"\0\1"
    assert "get failed" in protocol.serve_one({"op": "get", "path": str(tmp_path / "none")})["error"]
    assert protocol.serve_one({"op": "reboot"}) == {"error": "unknown op 'reboot': use ping, exec, put or get"}


@pytest.fixture
def agent_socket(tmp_path):
    """A unix socket served by the real agent loop, as QEMU's chardev would be."""
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def accept_forever():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small pieces, like a port
            protocol.serve_fd(conn.fileno(), stop_on_eof=True)
            conn.close()

    threading.Thread(target=accept_forever, daemon=True).start()
    yield path
    listener.close()


def test_agent_client_runs_commands_and_skips_stale_replies(agent_socket):
    client = AgentClient(agent_socket)
    assert client.wait_ready(5) < 5
    client._send({"op": "exec", "argv": ["echo", "stale"]})  # its reply must not be taken for the next
    reply = client.request({"op": "exec", "argv": ["echo", "fresh"], "timeout_s": 5}, timeout_s=10)
    assert protocol.unb64(reply["stdout"]) == b"fresh\n"
    with pytest.raises(FabricError, match="the agent: unknown op"):
        client.request({"op": "nope"}, timeout_s=5)
    client.close()


def test_megabytes_cross_the_agent_in_small_pieces_quickly(tmp_path, agent_socket):
    # A virtio-serial port delivers a few KiB per read; gathering must not be quadratic.
    client = AgentClient(agent_socket)
    data = os.urandom(8 * 1024 * 1024)
    started = time.monotonic()
    client.request({"op": "put", "path": str(tmp_path / "big"), "data": protocol.b64(data)}, timeout_s=30)
    back = protocol.unb64(client.request({"op": "get", "path": str(tmp_path / "big")}, timeout_s=30)["data"])
    assert back == data and time.monotonic() - started < 10
    client.close()


def test_agent_client_times_out_with_one_sentence(agent_socket):
    client = AgentClient(agent_socket)
    with pytest.raises(FabricError, match="did not answer exec within 1 s"):
        client.request({"op": "exec", "argv": ["sleep", "3"], "timeout_s": 5}, timeout_s=1)
    client.close()


def test_guest_result_check_names_the_command_and_its_output():
    ok = GuestResult(("true",), 0, "", "", 0.1, False)
    assert ok.check() is ok
    with pytest.raises(FabricError, match=r"`docker info` exited with 1:\nno engine"):
        GuestResult(("docker", "info"), 1, "", "no engine", 0.1, False).check()
    with pytest.raises(FabricError, match="timed out"):
        GuestResult(("sleep", "9"), -9, "", "", 9, True).check()


# ---- processes are ended by the PIDs the fabric started ----------------------------------


def test_stop_ends_a_child_by_its_pid_and_kills_one_that_ignores_sigterm(tmp_path):
    polite = spawn(["sleep", "60"], tmp_path / "a.log")
    stubborn = spawn(["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"], tmp_path / "b.log")
    time.sleep(0.2)
    stop(polite)
    stop(stubborn, grace_s=0.5)
    assert polite.returncode == -15 and stubborn.returncode == -9
    for pid in (polite.pid, stubborn.pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_children_die_with_the_process_that_spawned_them(tmp_path):
    # A parent that spawns a child and is then SIGKILLed: no finaliser runs, the kernel ends the child.
    script = ("import sys, time; sys.path.insert(0, %r); from tests.vm.fabric import spawn; "
              "p = spawn(['sleep', '60'], __import__('pathlib').Path(%r)); print(p.pid, flush=True); time.sleep(60)"
              % (str(Path(__file__).resolve().parents[2]), str(tmp_path / "c.log")))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        # The child is not ours to reap; it is gone once the kernel has killed it and init reaped it.
        if Path(f"/proc/{child_pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {child_pid} outlived its parent")
