"""What a test VM is, and the QEMU command line that boots it (pure).

Every VM boots the shared image's kernel and initramfs directly (no firmware
boot loader, no disk boot sector), on a qcow2 overlay of the shared disk, with
exactly two ways out: one virtio-net NIC on a ``-netdev stream`` to the host's
switch (a unix socket; never QEMU's user-mode network, which would route to the
outside world) and one virtio-serial port for the agent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

# The VMs' private L2 network. Only the VMs are on it: the switch is a process
# on a unix socket, not an interface of the host, so nothing here can leave.
SUBNET = ipaddress.ip_network("10.213.7.0/24")
FIRST_HOST = 11
# Under TCG the default translation cache pushed QEMU's RSS to 2 GiB for a 1 GiB
# guest; 256 MiB bounds it (0.8-1 GiB RSS measured).
TCG_ACCEL = "tcg,thread=multi,tb-size=256"
ACCELS = ("tcg", "kvm")
AGENT_PORT_NAME = "socklab.agent"


@dataclass(frozen=True)
class Image:
    """A built VM image: its directory holds vmlinuz, initrd.img and disk.raw."""

    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.raw"


@dataclass(frozen=True)
class VmSpec:
    """One VM of a fabric: its place on the network and the files QEMU uses."""

    name: str
    index: int
    image: Image
    workdir: Path  # the VM's own files: overlay, sockets, serial log
    switch_socket: Path
    memory_mib: int = 1024
    accel: str = "tcg"
    cpus: int = 1

    def __post_init__(self) -> None:
        if self.accel not in ACCELS:
            raise ValueError(f"accel {self.accel!r}: use one of {', '.join(ACCELS)}")
        if not 0 <= self.index < SUBNET.num_addresses - FIRST_HOST - 1:
            raise ValueError(f"VM index {self.index} does not fit in {SUBNET}")
        if not 256 <= self.memory_mib <= 8192:
            raise ValueError(f"memory_mib {self.memory_mib}: use 256 to 8192")
        if not 1 <= self.cpus <= 8:
            raise ValueError(f"cpus {self.cpus}: use 1 to 8")

    @property
    def overlay(self) -> Path:
        return self.workdir / f"{self.name}.qcow2"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / f"{self.name}.agent.sock"

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"{self.name}.serial.log"

    @property
    def mac(self) -> str:
        """A locally administered unicast MAC, unique per index."""
        return f"52:54:00:53:{self.index >> 8 & 0xff:02x}:{self.index & 0xff:02x}"

    @property
    def address(self) -> str:
        """The VM's IPv4 address on the fabric's network."""
        return str(SUBNET.network_address + FIRST_HOST + self.index)

    @property
    def cidr(self) -> str:
        return f"{self.address}/{SUBNET.prefixlen}"


def kernel_cmdline(spec: VmSpec) -> str:
    """The guest kernel's command line: serial console, and what the guest init reads."""
    # tsc=reliable: with two vCPUs under TCG the kernel's boot-time check found the TSCs
    # "unsynchronized" and read every clock from the emulated HPET. Every vCPU's TSC is
    # QEMU's one clock (20,000 reads alternating between two vCPUs never went back), and
    # on it a 20 ms round trip through netem spread 1.8-2.6 ms from p50 to p90, not 3.4-4.7.
    return " ".join(["console=ttyS0", "quiet", "panic=-1", "tsc=reliable",
                     f"socklab.name={spec.name}", f"socklab.ip={spec.cidr}"])


def qemu_argv(spec: VmSpec, qemu: str = "qemu-system-x86_64") -> list[str]:
    """The QEMU command line that boots ``spec`` (its overlay must exist)."""
    accel = TCG_ACCEL if spec.accel == "tcg" else "kvm"
    cpu = "max" if spec.accel == "tcg" else "host"
    return [
        qemu, "-M", "pc", "-accel", accel, "-cpu", cpu, "-smp", str(spec.cpus), "-m", str(spec.memory_mib),
        "-name", spec.name, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{spec.serial_log}",
        "-kernel", str(spec.image.kernel), "-initrd", str(spec.image.initrd),
        "-append", kernel_cmdline(spec),
        "-drive", f"file={spec.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-nic", "none",
        "-netdev", f"stream,id=net0,server=off,addr.type=unix,addr.path={spec.switch_socket}",
        "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={spec.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
    ]


def overlay_argv(spec: VmSpec) -> list[str]:
    """The qemu-img command that makes ``spec``'s copy-on-write overlay of the shared disk."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
            "-b", str(spec.image.disk), str(spec.overlay)]
