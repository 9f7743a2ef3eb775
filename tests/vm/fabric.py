"""The VM fabric: boot N test VMs on a private switch, drive them through their agents.

    image = build_image()                       # cached on the host, see build-image.sh
    with Fabric(image, workdir, count=2) as fabric:
        vm = fabric.vms[0]
        vm.exec(["docker", "info"]).check()
        vm.put("/root/x.tar", data)

Every process the fabric starts (the switch, one QEMU per VM) is remembered by
its PID and ended by that PID in :meth:`Fabric.close` — which runs on leaving the
``with`` block, at interpreter exit, and on SIGTERM/SIGINT; each child also gets
SIGKILL from the kernel if the Python process dies without running any of
those (PR_SET_PDEATHSIG). Nothing is ever matched by name.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from . import agent as protocol
from .qemu import Image, VmSpec, overlay_argv, qemu_argv

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-image.sh"
_PR_SET_PDEATHSIG = 1


class FabricError(RuntimeError):
    """The fabric could not build, boot or reach a VM; the message says which and why."""


def missing_prerequisite(base_image: str) -> str | None:
    """What this host lacks to build and boot the VMs, as a sentence; None when it has it all."""
    if os.geteuid() != 0:
        return "the VMs need root (debootstrap, mkfs.ext4 -d of a root filesystem)"
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: run .ci/prepare-host.sh"
    if subprocess.run(["docker", "image", "inspect", base_image], capture_output=True).returncode != 0:
        return f"the base image {base_image} is missing: run .ci/prepare-host.sh"
    return None


def build_image(env: Mapping[str, str] | None = None, timeout_s: float = 1800) -> Image:
    """The VM image for the current inputs, built first if the cache has none."""
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    if done.returncode != 0:
        raise FabricError(f"{BUILD_SCRIPT.name} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return Image(Path(done.stdout.strip().splitlines()[-1]))


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: Sequence[str], log_path: Path) -> subprocess.Popen:
    """Start a child that the kernel kills if this process dies first."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)


def stop(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """End ``proc`` by its PID: SIGTERM, then SIGKILL after ``grace_s``; always reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class GuestResult:
    """What a command in a VM returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool

    def check(self) -> "GuestResult":
        """``self`` if the command exited 0; otherwise FabricError with its output's end."""
        if self.returncode != 0 or self.timed_out:
            how = "timed out" if self.timed_out else f"exited with {self.returncode}"
            tail = "\n".join((self.stderr + self.stdout).strip().splitlines()[-30:])
            raise FabricError(f"in the VM, `{' '.join(self.argv)}` {how}:\n{tail}")
        return self


class AgentClient:
    """Requests to one VM's agent over its virtio-serial unix socket, one at a time."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.socket_path))
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: dict) -> int:
        request_id = self._next_id
        self._next_id += 1
        self._connect().sendall(protocol.encode({"id": request_id, **message}))
        return request_id

    def _reply(self, request_id: int, deadline: float) -> dict | None:
        """The reply to ``request_id``, or None when ``deadline`` passes first."""
        sock = self._connect()
        while True:
            lines, self._buffer = protocol.split_lines(self._buffer)
            for index, line in enumerate(lines):
                try:
                    message = protocol.decode(line)
                except ValueError:
                    continue
                if message["id"] == request_id:
                    rest = b"\n".join(lines[index + 1:])
                    self._buffer = (rest + b"\n" if rest else b"") + self._buffer
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                return None
            if not chunk:
                raise FabricError(f"the agent's socket {self.socket_path} closed (did the VM stop?)")
            pieces = [chunk]
            # Gather a long reply without copying it once per piece.
            while b"\n" not in pieces[-1]:
                try:
                    more = sock.recv(1 << 20)
                except socket.timeout:
                    break
                if not more:
                    break
                pieces.append(more)
            self._buffer += b"".join(pieces)

    def request(self, message: dict, timeout_s: float) -> dict:
        """Send ``message``, wait for its reply; FabricError on timeout or an agent error."""
        try:
            request_id = self._send(message)
        except OSError as exc:
            self.close()
            raise FabricError(f"cannot reach the agent on {self.socket_path} ({exc}); did the VM stop?") from None
        reply = self._reply(request_id, time.monotonic() + timeout_s)
        if reply is None:
            # The reply may still come; a new connection starts clean.
            self.close()
            self._buffer = b""
            raise FabricError(f"the agent did not answer {message.get('op')} within {timeout_s:.0f} s")
        if "error" in reply:
            raise FabricError(f"the agent: {reply['error']}")
        return reply

    def wait_ready(self, timeout_s: float) -> float:
        """Ping until the agent answers; the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            try:
                request_id = self._send({"op": "ping"})
                if self._reply(request_id, min(deadline, time.monotonic() + 2)) is not None:
                    return time.monotonic() - started
            except OSError:  # QEMU has not made its socket yet
                self.close()
                time.sleep(0.5)
        raise FabricError(f"the agent on {self.socket_path} did not answer within {timeout_s:.0f} s")


class Vm:
    """One running VM: its spec, its QEMU process, its agent."""

    def __init__(self, spec: VmSpec, process: subprocess.Popen):
        self.spec = spec
        self.process = process
        self.agent = AgentClient(spec.agent_socket)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str:
        return self.spec.address

    def exec(self, argv: Sequence[str], timeout_s: float = 300, env: Mapping[str, str] | None = None,
             cwd: str | None = None, stdin: bytes = b"") -> GuestResult:
        """Run ``argv`` in the VM (killed past ``timeout_s``) and return what it did."""
        reply = self.agent.request({"op": "exec", "argv": list(argv), "timeout_s": timeout_s,
                                    "env": dict(env or {}), "cwd": cwd, "stdin": protocol.b64(stdin)},
                                   timeout_s=timeout_s + 30)
        return GuestResult(tuple(argv), reply["rc"], protocol.unb64(reply["stdout"]).decode(errors="replace"),
                           protocol.unb64(reply["stderr"]).decode(errors="replace"),
                           reply["duration_s"], reply["timed_out"])

    def sh(self, script: str, timeout_s: float = 300, env: Mapping[str, str] | None = None) -> GuestResult:
        """Run a shell script in the VM; FabricError unless it exits 0."""
        return self.exec(["sh", "-c", script], timeout_s=timeout_s, env=env).check()

    def put(self, path: str, data: bytes, mode: int = 0o644, timeout_s: float = 120) -> None:
        """Write ``data`` to ``path`` in the VM."""
        self.agent.request({"op": "put", "path": path, "data": protocol.b64(data), "mode": mode}, timeout_s)

    def get(self, path: str, timeout_s: float = 120) -> bytes:
        """The bytes of ``path`` in the VM."""
        return protocol.unb64(self.agent.request({"op": "get", "path": path}, timeout_s)["data"])

    def serial_log(self) -> str:
        """What the guest printed on its console (kernel, init)."""
        try:
            return self.spec.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _per_vm(name: str, value: Sequence[int] | int, count: int) -> list[int]:
    """``value`` for each of ``count`` VMs: one for all, or one each (ValueError if the count differs)."""
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise ValueError(f"{name} names {len(values)} VMs, the fabric has {count}")
    return values


class Fabric:
    """N VMs on one learning switch, all ended by their PIDs on close."""

    def __init__(self, image: Image, workdir: Path, count: int, memory_mib: Sequence[int] | int = 1024,
                 accel: str | None = None, cpus: Sequence[int] | int = 1):
        if count < 1:
            raise ValueError("a fabric has at least one VM")
        self.image = image
        self.workdir = Path(workdir)
        memories = _per_vm("memory_mib", memory_mib, count)
        vcpus = _per_vm("cpus", cpus, count)
        # KVM only on request: where /dev/kvm cannot boot a stock kernel (PVM hosts) it hangs silently.
        accel = accel or os.environ.get("SOCKLAB_VM_ACCEL", "tcg")
        self.switch_socket = self.workdir / "switch.sock"
        self.specs = [VmSpec(f"vm{i}", i, image, self.workdir, self.switch_socket, memories[i], accel, vcpus[i])
                      for i in range(count)]
        self.vms: list[Vm] = []
        self._switch: subprocess.Popen | None = None
        self._closed = False
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> "Fabric":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pids(self) -> list[int]:
        """The PIDs of every process this fabric started and has not reaped."""
        procs = ([self._switch] if self._switch else []) + [vm.process for vm in self.vms]
        return [p.pid for p in procs if p.poll() is None]

    def start(self, timeout_s: float = 300) -> float:
        """Start the switch and every VM, wait until each agent answers; the seconds it took."""
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            self._switch = spawn([sys.executable, str(HERE / "switch.py"), str(self.switch_socket)],
                                 self.workdir / "switch.log")
            _wait_for(lambda: self.switch_socket.exists() or self._switch.poll() is not None, 10)
            if self._switch.poll() is not None:
                raise FabricError(f"the switch exited: {(self.workdir / 'switch.log').read_text()[-2000:]}")
            for spec in self.specs:
                for stale in (spec.overlay, spec.agent_socket, spec.serial_log):
                    stale.unlink(missing_ok=True)
                subprocess.run(overlay_argv(spec), check=True, capture_output=True)
                self.vms.append(Vm(spec, spawn(qemu_argv(spec), self.workdir / f"{spec.name}.qemu.log")))
            for vm in self.vms:
                remaining = timeout_s - (time.monotonic() - started)
                try:
                    vm.agent.wait_ready(remaining)
                except FabricError as exc:
                    raise FabricError(f"{vm.name}: {exc}; its console:\n{vm.serial_log()[-3000:]}") from None
            return time.monotonic() - started
        except BaseException:
            self.close()
            raise

    def wait_docker(self, timeout_s: float = 180) -> None:
        """Wait until every VM's dockerd answers."""
        for vm in self.vms:
            vm.sh(f"i=0; until docker info >/dev/null 2>&1; do i=$((i+1)); [ $i -lt {int(timeout_s * 5)} ]"
                  " || { tail -n 20 /var/log/dockerd.log; exit 1; }; sleep 0.2; done", timeout_s=timeout_s + 10)

    def _on_signal(self, signum, frame) -> None:
        self.close()
        previous = self._previous_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def close(self) -> None:
        """Stop every VM and the switch by their PIDs, remove the overlays. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for vm in self.vms:
            vm.agent.close()
            stop(vm.process)
        if self._switch is not None:
            stop(self._switch)
        for spec in self.specs:
            spec.overlay.unlink(missing_ok=True)
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        atexit.unregister(self.close)


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
