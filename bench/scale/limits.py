"""Why a scale step stopped where it did, in one sentence, from what was measured and the container's limits."""

from __future__ import annotations

import re
import statistics

from socklab.servers import SELECT_MAX_CONNECTIONS

from .plan import C100K, CONNECT_TIMEOUT_S, FD_SLACK, PER_CLIENT_CONTAINER, REFERENCE


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
    if fd_limit and fds and fds >= fd_limit - FD_SLACK:
        return (f"held {held} of {tried}: the server process ran out of file descriptors ({fds} open of its "
                f"RLIMIT_NOFILE {fd_limit}, {descriptor_cap(limits)}; one descriptor per "
                f"connection){waiting}{_asyncio_at_limit(step)}")
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


def descriptor_cap(limits: dict) -> str:
    """Where the container's descriptor limit comes from: granted as the lab asked, or the engine's cap."""
    granted, wanted, refusal = limits.get("nofile_granted"), limits.get("nofile_wanted"), limits.get("nofile_refusal")
    if granted is None or wanted is None:
        return "the container's hard limit, set by the Docker daemon"
    if not refusal:
        return f"the container's hard limit, {granted} as the lab asks (Compose ulimits nofile)"
    # runc's message ends "...error setting rlimit type 7: operation not permitted: unknown".
    short = re.search(r"error setting rlimit type \d+: [^:]+", refusal)
    return (f"the container's hard limit: the lab asks for {wanted} (Compose ulimits nofile) and the engine refused "
            f"({short.group(0) if short else refusal[-160:]}), so a container keeps the Docker daemon's own "
            f"{granted}, which its runtime cannot raise without CAP_SYS_RESOURCE")


def next_limits(steps: list[dict], limits: dict, goal: int) -> str:
    """What bounds ``goal`` connections once descriptors do not, from the steps measured and the limits read."""
    held = [s for s in steps if "error" not in s and s.get("held")]
    if not held:
        return ""
    bounds = []
    nearest = None  # (connections, what) of the bound that would be met first
    most = max(held, key=lambda s: s["held"])
    try:
        conntrack = int(limits["nf_conntrack_max"])
        tracked = (f"; at {most['held']} held the server's namespace tracked {most['conntrack_entries']}, "
                   "connects still retrying included" if most.get("conntrack_entries") is not None else "")
        bounds.append(f"connection tracking, nf_conntrack_max {conntrack} entries per network namespace (one "
                      f"per connection: {goal} would fill {goal / conntrack:.0%}{tracked})")
        nearest = (conntrack, "connection tracking")
    except (KeyError, TypeError, ValueError):
        pass
    ports = (limits.get("ip_local_port_range") or "").split()
    if len(ports) == 2:
        per_address = int(ports[1]) - int(ports[0]) + 1
        bounds.append(f"{per_address} ephemeral ports per client address towards one server port "
                      f"(ip_local_port_range {ports[0]}-{ports[1]}), which the benchmark spreads over "
                      f"{-(-goal // PER_CLIENT_CONTAINER)} client containers")
    # The server's own memory per connection as measured at the most it held.
    weighed = [s for s in held if s.get("kib_per_connection") and s["held"] >= 1000]
    if weighed:
        kib = max(weighed, key=lambda s: s["held"])["kib_per_connection"]
        server_mib = kib * goal / 1024
        memory = limits.get("cgroup memory limit")
        capped = memory and memory.isdigit() and int(memory) < 2**60
        if capped and (nearest is None or int(memory) / 1024 / kib < nearest[0]):
            nearest = (int(int(memory) / 1024 / kib), "the container's memory limit")
        bounds.append(f"memory: at {kib:.2f} KiB resident per connection the server would hold "
                      f"{server_mib:.0f} MiB for {goal} ("
                      + (f"cgroup limit {int(memory) / 2**20:.0f} MiB" if capped else "no cgroup memory limit")
                      + ")")
    # Only where every client connection was held: the others' half-open sockets would count too.
    kernel = [s["kernel_kib_per_connection"] for s in held
              if s.get("kernel_kib_per_connection") is not None and s["held"] >= 1000 and s.get("all_held")]
    if kernel:
        bounds.append(f"kernel memory: the slab grew by ~{statistics.median(kernel):.1f} KiB per connection (both "
                      f"ends, read host-wide), ~{statistics.median(kernel) * goal / 2**20:.1f} GiB for {goal}")
    timed = [s for s in held if s.get("seconds_to_hold_all") and s["held"] >= 1000]
    if timed:
        fastest = max(timed, key=lambda s: s["held"])
        rate = fastest["held"] / fastest["seconds_to_hold_all"]
        bounds.append(f"time: at the {rate:.0f} connections/s it took {fastest['held']} at, {goal} take "
                      f"~{goal / rate:.0f} s (the clients' connect timeout is {CONNECT_TIMEOUT_S} s per connection)")
    if not bounds:
        return ""
    first = (f"; the first of them, at about {nearest[0]} connections, is {nearest[1]}"
             if nearest and nearest[0] > goal else "")
    return "past the descriptors, the limits it would meet next: " + "; ".join(bounds) + first


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
    if mode in REFERENCE:
        more = next_limits(steps, limits, C100K)
        sentence += f"; {more}" if more else ""
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
