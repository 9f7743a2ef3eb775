"""Why a scale step stopped where it did, in one sentence, from what was measured and the container's limits."""

from __future__ import annotations

import re

from socklab.servers import SELECT_MAX_CONNECTIONS


def _fd_limit(step: dict) -> int | None:
    try:
        return int(step["nofile"][0])
    except (TypeError, ValueError, IndexError):
        return None


def why_stopped(step: dict, limits: dict) -> str:
    """One sentence on why a step held fewer connections than it tried, from what was measured."""
    if "error" in step:
        return f"the step of {step['connections']} could not be measured: {step['error']}"
    mode, held, tried, queue = step["mode"], step["held"], step["connections"], step["accept_queue"]
    waiting = f"; the other {step['established'] - held} waited, established, in the accept queue" \
        if step["established"] > held else ""
    if mode == "blocking":
        return (f"the iterative server serves one connection at a time: of {tried} connected it held {held} "
                f"(accepted, being served){waiting} (the kernel completes handshakes up to the listen "
                f"backlog, net.core.somaxconn = {limits.get('somaxconn')}, without the server), and each "
                "waits until every connection ahead of it has ended")
    if mode == "select":
        return (f"stops accepting at {SELECT_MAX_CONNECTIONS} by design: select() cannot watch a descriptor "
                f"number >= FD_SETSIZE (1024 with glibc) and the server keeps 32 below it for its own "
                f"descriptors; held {held} of {tried}{waiting}")
    fd_limit = _fd_limit(step)
    fds = step.get("fds")
    if fd_limit and fds and fds >= fd_limit - 16:
        return (f"held {held} of {tried}: the server process ran out of file descriptors ({fds} open of its "
                f"RLIMIT_NOFILE {fd_limit}, the container's hard limit, set by the Docker daemon; one "
                f"descriptor per connection){waiting}{_asyncio_at_limit(step)}")
    threads_failed = [line for line in step["server_stderr"] if "can't start new thread" in line]
    if threads_failed:
        return f"held {held} of {tried}: starting a thread failed: {threads_failed[0]}"
    if step.get("server_exit") not in (0, None) and step.get("server_stopped_by") != "SIGKILL":
        return f"held {held} of {tried}: the server process died (exit {step['server_exit']})"
    if step["established"] < tried:
        return (f"held {held} of {tried}: the rest never completed the handshake on the server's side "
                f"(SYNs dropped with the accept queue full: {step['listen_drops'].get('ListenDrops')}; "
                f"timeline in the step's details)")
    return (f"held {held} of {tried}, stopping without an error the probes could see (established "
            f"{step['established']}, accept queue {queue}, server CPU "
            f"{step.get('server_result', {}).get('cpu_s')} s): see the step's details")


def _asyncio_at_limit(step: dict) -> str:
    # CPython's selector loop (3.11 here) goes on calling accept() up to
    # `backlog` times per wakeup after EMFILE, logging each and scheduling a
    # retry for each: CPython issue gh-151615, fixed upstream.
    logged = sum(int(m.group(1)) if m else 1 for line in step.get("server_stderr", [])
                 if "out of system resource" in line for m in [re.search(r"\(x(\d+)\)$", line)])
    if not logged:
        return ""
    cpu_s = step.get("server_result", {}).get("cpu_s")
    return (f"; asyncio logged 'socket.accept() out of system resource' {logged} times meanwhile "
            f"(server CPU {cpu_s} s): after EMFILE its accept loop keeps trying up to the listen backlog's "
            "count per wakeup, each failure logged and each scheduling a retry (CPython gh-151615)")


def limit_sentence(mode: str, steps: list[dict], limits: dict) -> str:
    """Where ``mode`` stopped in this run, and why."""
    last = steps[-1]
    if last["all_held"]:
        top = last["connections"]
        sentence = (f"held all {top} connections of its largest step ({last['seconds_to_hold_all']} s to "
                    f"accept them); this run tries no more")
    else:
        sentence = why_stopped(last, limits)
    if mode == "threaded":
        sentence += "; " + threaded_costs(steps, limits)
    return sentence


def threaded_costs(steps: list[dict], limits: dict) -> str:
    """What a thread per connection cost at its largest step, and the limit it would meet next."""
    step = max(steps, key=lambda s: s["held"])
    if "error" in step:
        return "not measured"
    added = (step.get("threads") or 1) - 1
    if not added:
        return "no threads were measured"
    maps_per_thread = ((step.get("maps") or 0) - (step.get("maps_idle") or 0)) / added
    vm_per_thread_mib = ((step.get("vm_kib") or 0) - (step.get("vm_idle_kib") or 0)) / added / 1024
    text = (f"at {step['held']} connections it ran {step['threads']} threads, "
            f"{step['kib_per_connection']} KiB resident and {vm_per_thread_mib:.1f} MiB of address space "
            f"(the thread stack, RLIMIT_STACK {step.get('stack', ['?'])[0]} bytes) per connection")
    bounds = []
    try:
        max_map_count = int(limits["vm.max_map_count"])
        if maps_per_thread > 0:
            # Per thread: its stack, the stack's guard page and (Python 3.11)
            # the interpreter's 16 KiB frame-stack chunk, each a mapping.
            bounds.append(f"vm.max_map_count {max_map_count}: {step.get('maps')} mappings were in use, "
                          f"{maps_per_thread:.1f} per thread (stack, guard page, the interpreter's frame "
                          f"stack), so ~{int(max_map_count / maps_per_thread)} threads")
    except (KeyError, TypeError, ValueError):
        pass
    for key in ("cgroup pids.max", "kernel.threads-max"):
        if limits.get(key):
            bounds.append(f"{key} {limits[key]}")
    if step.get("nproc"):
        bounds.append(f"RLIMIT_NPROC {step['nproc'][0]} (counted per user over the whole host)")
    if bounds:
        text += "; the limits it would meet next: " + ", ".join(bounds)
    return text
