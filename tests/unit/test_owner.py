"""Who owns the lab's objects, and whether clean may remove them: the liveness decision."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from labkit import owner

ALIVE = owner.Owner("lab-host", 4242, "boot-a:1000")


def started_of(pid: int) -> str | None:
    """This host as the decision sees it: pid 4242 runs since tick 1000, pid 5151 since 2000."""
    return {4242: "boot-a:1000", 5151: "boot-a:2000"}.get(pid)


@pytest.mark.parametrize("labels, force, remove, reason", [
    (ALIVE.labels(), False, False, "its run is still going (lab.py pid 4242 on this host)"),
    (ALIVE.labels(), True, True, "--force"),
    ({**ALIVE.labels(), owner.OWNER_PID: "6161"}, False, True, "its run (lab.py pid 6161) has ended"),
    # The pid is alive but it is another process: it started at another time.
    ({**ALIVE.labels(), owner.OWNER_PID: "5151"}, False, True,
     "its run (lab.py pid 5151) has ended; that pid is another process now"),
    # Same pid and ticks, but recorded before a reboot.
    ({**ALIVE.labels(), owner.OWNER_STARTED: "boot-b:1000"}, False, True,
     "its run (lab.py pid 4242) has ended; that pid is another process now"),
    ({**ALIVE.labels(), owner.OWNER_HOST: "other-host"}, False, False,
     "its run's lab.py runs on host other-host, whose processes this host cannot check"),
    ({"io.socklab.lab": "true"}, False, True,
     "no run owns it (made by `docker compose up`, or by a lab.py before owners were recorded)"),
    ({**ALIVE.labels(), owner.OWNER_PID: "not-a-pid"}, False, True,
     "no run owns it (made by `docker compose up`, or by a lab.py before owners were recorded)"),
])
def test_judge(labels, force, remove, reason):
    verdict = owner.judge(labels, host="lab-host", started_of=started_of, force=force)
    assert verdict == owner.Verdict(remove, reason)


def test_labels_round_trip():
    assert owner.Owner.from_labels({"x": "y", **ALIVE.labels()}) == ALIVE


def test_a_process_start_is_read_from_proc_and_differs_between_processes():
    mine = owner.process_started(os.getpid())
    boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert mine is not None and mine.startswith(boot_id + ":") and int(mine.split(":")[1]) > 0
    assert owner.process_started(os.getpid()) == mine
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        theirs = owner.process_started(child.pid)
        assert theirs is not None and theirs != mine
    finally:
        child.kill()
        child.wait()
    assert owner.process_started(child.pid) is None


def test_a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields(tmp_path):
    (tmp_path / "77").mkdir()
    fields = ["S"] + [str(n) for n in range(4, 22)] + ["123456"] + ["0"] * 30
    (tmp_path / "77" / "stat").write_text(f"77 (a (b) c) {' '.join(fields)}\n")
    (tmp_path / "sys" / "kernel" / "random").mkdir(parents=True)
    (tmp_path / "sys" / "kernel" / "random" / "boot_id").write_text("boot-x\n")
    assert owner.process_started(77, proc=tmp_path) == "boot-x:123456"


def test_the_current_owner_is_alive_by_its_own_judgement():
    me = owner.current_owner()
    verdict = owner.judge(me.labels(), host=owner.this_host(), started_of=owner.process_started)
    assert not verdict.remove
