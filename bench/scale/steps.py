"""One step of the scale benchmark: a fresh server, idle clients, what it held and what that cost."""

from __future__ import annotations

import re
import shlex
import time
from collections import Counter

from benchlab import run_in_client
from common import Log
from experiments import link_env
from socklab.results import find_results

from .lab import Background, Lab, accepted, start_server, stop_server
from .plan import CONNECT_STALL_S, FD_SLACK, HOLD_S, PROBE_INTERVAL_S, SERVER_STALL_S, SETTLE_S, client_commands


def watch_fill(lab: Lab, connections: int, clients: list[Background],
               baseline: dict) -> tuple[dict, list, float | None]:
    """Probe while the client connects, until all are held or the count stops moving.

    Returns the reading with the most connections held, the timeline of
    [seconds, established, accepted, server descriptors], and the seconds it
    took to hold them all (None if it never did).
    """
    started = changed_at = time.monotonic()
    best = last = baseline
    timeline = []
    while True:
        time.sleep(PROBE_INTERVAL_S)
        probe = lab.probe()
        now = time.monotonic()
        timeline.append([round(now - started, 1), probe["established"], accepted(probe), probe.get("fds")])
        if (probe["established"], accepted(probe)) != (last["established"], accepted(last)):
            changed_at = now
        last = probe
        if accepted(probe) >= accepted(best):
            best = probe
        if accepted(probe) >= connections:
            return best, timeline, now - started
        # A server out of descriptors takes no more: what waits for a SYN retransmission cannot change that.
        stall_s = SERVER_STALL_S if probe["established"] >= connections or out_of_descriptors(probe, baseline) \
            else CONNECT_STALL_S
        if (now - changed_at >= stall_s or now - started >= HOLD_S - 10 or not any(c.alive() for c in clients)
                or not probe.get("pid")):
            return best, timeline, None


def out_of_descriptors(probe: dict, baseline: dict) -> bool:
    """Whether the server holds (nearly) as many descriptors as its limit allows (baseline's ``nofile``)."""
    try:
        return probe.get("fds") is not None and probe["fds"] >= int(baseline["nofile"][0]) - FD_SLACK
    except (KeyError, TypeError, ValueError, IndexError):
        return False


# The kernel's side of the connections, read in the server container: the entries of its
# network namespace's connection tracking table, and the kernel's slab memory (the host's:
# /proc/meminfo is not namespaced), which holds every socket of both ends.
KERNEL_READING = ("cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo -; "
                  "grep -E '^(Slab|SUnreclaim):' /proc/meminfo")


def parse_kernel_reading(text: str) -> dict:
    """``conntrack_entries`` and ``slab_kib`` from KERNEL_READING's output (None where absent)."""
    lines = text.split("\n")
    conntrack = lines[0].strip() if lines else ""
    slab = re.search(r"^Slab:\s+(\d+) kB", text, re.M)
    return {"conntrack_entries": int(conntrack) if conntrack.isdigit() else None,
            "slab_kib": int(slab.group(1)) if slab else None}


def kernel_per_connection(idle: dict, held: dict, connections: int) -> float | None:
    """KiB of the kernel's slab memory per held connection (both ends) over the idle reading."""
    if not connections or idle.get("slab_kib") is None or held.get("slab_kib") is None:
        return None
    return round((held["slab_kib"] - idle["slab_kib"]) / connections, 2)


def measure(lab: Lab, mode: str, connections: int, log: Log) -> dict:
    """One step: a fresh ``mode`` server, ``connections`` idle clients; what it held and what that cost."""
    started = time.monotonic()
    server, baseline = start_server(lab, mode)
    kernel_idle = parse_kernel_reading(lab.sh(KERNEL_READING)[1])
    # One client container per share of the connections (each has its own source address), started together.
    commands = client_commands(connections, HOLD_S)
    clients = [Background(run_in_client, lab.project, shlex.join(command), link_env(), timeout_s=HOLD_S + 120)
               for command in commands]
    best, timeline, fill_s = watch_fill(lab, connections, clients, baseline)
    # Memory is read once more after the count is reached (see SETTLE_S),
    # unless the count has moved since.
    held_probe = best
    if best.get("pid"):
        time.sleep(SETTLE_S)
        settled = lab.probe()
        if accepted(settled) == accepted(best):
            held_probe = settled
    kernel_held = parse_kernel_reading(lab.sh(KERNEL_READING)[1])
    # Closing 20,000 connections under a thread-per-connection server wakes
    # 20,000 threads at once to fight for the GIL: measured, a minute of CPU
    # and a load average in the hundreds on a host others share. Killed
    # first, its threads are reaped by the kernel instead (and it prints no
    # result: the probes above are this mode's evidence).
    killed_first = mode == "threaded"
    if killed_first:
        done = stop_server(lab, server, "KILL")
    lab.kill_clients()
    client_outs = []
    for client in clients:
        try:
            client_outs.append(client.join(120)[1])
        except Exception as exc:  # the client's fate is evidence, not a reason to lose the step
            client_outs.append(f"client run failed: {exc}")
    if not killed_first:
        done = stop_server(lab, server)
    result = next((r for r in find_results(done.stdout) if r.get("role") == "server"), None)

    held = accepted(best)
    step = {
        "mode": mode, "connections": connections, "held": held, "all_held": held >= connections,
        "established": best["established"], "accept_queue": best["accept_queue"],
        "seconds_to_hold_all": round(fill_s, 2) if fill_s is not None else None,
        "rss_idle_kib": baseline.get("rss_kib"), "rss_held_kib": held_probe.get("rss_kib"),
        "rss_peak_kib": held_probe.get("hwm_kib"),
        "kib_per_connection": per_connection(baseline, held_probe),
        "threads": held_probe.get("threads"), "fds": held_probe.get("fds"), "maps": held_probe.get("maps"),
        "maps_idle": baseline.get("maps"), "vm_kib": held_probe.get("vm_kib"), "vm_idle_kib": baseline.get("vm_kib"),
        "nofile": baseline.get("nofile"), "nproc": baseline.get("nproc"), "stack": baseline.get("stack"),
        "timeline": timeline,
        "conntrack_entries": kernel_held["conntrack_entries"], "slab_kib_idle": kernel_idle["slab_kib"],
        "slab_kib_held": kernel_held["slab_kib"],
        # Other work on the host moves the slab too: a rough figure, kept for the limits' sentence.
        "kernel_kib_per_connection": kernel_per_connection(kernel_idle, kernel_held, accepted(held_probe)),
        # The server's network namespace: SYNs dropped because the accept queue was full.
        "listen_drops": {k: held_probe["netstat"][k] - baseline["netstat"][k] for k in baseline["netstat"]},
        "server_exit": done.returncode, "server_stopped_by": "SIGKILL" if killed_first else "SIGTERM",
        "server_stderr": _distinct_lines(done.stderr),
        "client_containers": len(clients),
        "client_port_range": next(filter(None, map(_port_range, client_outs)), None),
        "seconds": round(time.monotonic() - started, 1),
    }
    if result is not None:
        step["server_result"] = {k: result.get(k) for k in (
            "max_concurrent", "threads_max", "peak_rss_kib", "cpu_s", "connections", "stopped_by", "wall_s")}
    log(f"scale {mode:>11} {connections:6d}: held {held:6d} (established {best['established']}, "
        f"accept queue {best['accept_queue']}), RSS {step['rss_idle_kib']} -> {step['rss_held_kib']} KiB "
        f"= {step['kib_per_connection']} KiB/conn, threads {step['threads']}, fds {step['fds']}; "
        f"{step['seconds']} s")
    return step


def per_connection(baseline: dict, held: dict) -> float | None:
    """KiB of resident memory per accepted connection over the idle baseline."""
    count = accepted(held)
    if not count or baseline.get("rss_kib") is None or held.get("rss_kib") is None:
        return None
    return round((held["rss_kib"] - baseline["rss_kib"]) / count, 3)


def _distinct_lines(text: str, most: int = 12) -> list[str]:
    """The stderr's distinct lines with their counts (a limit hit 10,000 times prints 10,000 lines)."""
    counts = Counter(line.strip() for line in text.splitlines() if line.strip())
    return [line if n == 1 else f"{line} (x{n})" for line, n in counts.most_common(most)]


def _port_range(client_out: str) -> list[int] | None:
    match = re.search(r"^ports (\d+)\s+(\d+)", client_out or "", re.M)
    return [int(match.group(1)), int(match.group(2))] if match else None


def ramp(lab: Lab, mode: str, steps: tuple[int, ...], log: Log) -> list[dict]:
    """Steps of ``mode`` in increasing size, until one is not held in full."""
    done = []
    for connections in steps:
        try:
            done.append(measure(lab, mode, connections, log))
        except Exception as exc:  # one broken step must not lose the other modes' figures
            log(f"scale {mode} {connections}: FAILED: {exc}")
            done.append({"mode": mode, "connections": connections, "held": 0, "all_held": False,
                         "error": f"{type(exc).__name__}: {exc}"})
        if not done[-1]["all_held"]:
            break
    return done


def at(steps: list[dict], connections: int) -> dict | None:
    """The step of ``connections`` in a ramp, if it got that far."""
    return next((s for s in steps if s["connections"] == connections), None)
