"""The lab's Compose project inside a VM, driven through the agent (for the netem tests).

The same moves as tests/lab/test_userspace_link.py makes on the host — an
unshaped server, a client run with its link given as SOCKLAB_LINK_* — but every
command runs in the VM, next to its engine and its netem kernel.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import tarfile
from pathlib import Path

from socklab.results import find_results

from .fabric import FabricError, GuestResult, Vm

ROOT = Path(__file__).resolve().parents[2]
GUEST_TREE = "/root/socklab"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "socklab-base:bookworm")


# What the lab needs to build and run: the tests, docs and recorded results stay on the host.
LAB_PATHS = ("lab.py", "compose.yaml", "requirements.txt", "labkit/", "services/", "configs/")


def working_tree_tar() -> bytes:
    """The lab's files of the working tree as git sees them (tracked and untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name in sorted(set(listed.decode().split("\0")) - {""}):
            if name.startswith(LAB_PATHS) and (ROOT / name).is_file():
                tar.add(ROOT / name, arcname=name, recursive=False)
    return buffer.getvalue()


def in_tree(vm: Vm, argv: list[str], timeout_s: float = 600, env: dict | None = None) -> GuestResult:
    """Run ``argv`` in the VM's copy of the working tree (the lab's environment set)."""
    return vm.exec(argv, cwd=GUEST_TREE, timeout_s=timeout_s, env={"BASE_IMAGE": BASE_IMAGE, **(env or {})})


SERVER_ARGS = ["server", "--mode", "threaded", "--port", "5000", "--max-connections", "1000"]


def link_flags(link: dict[str, str], backend: str = "netem") -> list[str]:
    """`docker compose run -e` flags for a client link (rate unset unless given)."""
    env = {"SOCKLAB_LINK_RATE": "", "SOCKLAB_LINK_BACKEND": backend, "SOCKLAB_REPORT_LINK": "1",
           **{f"SOCKLAB_LINK_{k.upper()}": v for k, v in link.items()}}
    return [flag for key, value in env.items() for flag in ("-e", f"{key}={value}")]


class GuestProject:
    """One Compose project in the VM with an unshaped server; removed by :meth:`down`."""

    def __init__(self, vm: Vm, *server_args: str):
        self.vm = vm
        self.name = f"socklab-vm-{secrets.token_hex(3)}"
        self.override = f"/tmp/{self.name}.json"
        vm.put(self.override, json.dumps({"services": {"server": {"command": [*SERVER_ARGS, *server_args]}}})
               .encode())
        self.compose("up", "-d", "--wait", "server", env={"SERVER_LINK_RATE": ""})

    def compose(self, *args: str, timeout_s: float = 300, env: dict | None = None, check: bool = True):
        done = in_tree(self.vm, ["docker", "compose", "-p", self.name, "-f", f"{GUEST_TREE}/compose.yaml",
                                 "-f", self.override, *args], timeout_s=timeout_s, env=env)
        return done.check() if check else done

    def client(self, link: dict[str, str], *args: str, backend: str = "netem",
               timeout_s: float = 300) -> dict[str, dict]:
        """Run one client with ``link``; its results by role (client, link)."""
        done = self.compose("run", "--rm", "--use-aliases", *link_flags(link, backend), "client",
                            "client", "--host", "server", "--port", "5000", *args, timeout_s=timeout_s)
        results = {r["role"]: r for r in find_results(done.stdout)}
        if not {"client", "link"} <= set(results):
            raise FabricError(f"the client printed no client and link results:\n{done.stdout}\n{done.stderr}")
        assert results["client"]["errors"] == [], results["client"]
        return results

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "2", timeout_s=120, check=False)
        self.vm.exec(["rm", "-f", self.override])


def netem_qdiscs(link_result: dict) -> dict[str, dict]:
    """The link's netem qdiscs by direction: 'up' on eth0, 'down' on the ifb device."""
    found = {}
    for dev, qdiscs in link_result["qdisc"].items():
        for qdisc in qdiscs:
            if qdisc["kind"] == "netem":
                found["up" if dev == "eth0" else "down"] = qdisc
    return found
