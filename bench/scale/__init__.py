"""Benchmark: the most concurrent idle connections each server mode holds, and what one costs.

    python3 bench/scale [--quick]      (or: python3 bench/run.py --only scale)

The C10K question on this machine, and the C100K one for the epoll and asyncio
servers: can a Python server hold 10,000 (100,000) connections at once? For
each server mode the number of idle connections is ramped (one
fresh server per step, so every step starts from the same baseline), and the
step counts as *held* when all of its connections are, at one moment, both
established and accepted by the server. That is read from the server's side
while the client holds them: `ss` in the server container counts the
established connections to the port, minus those still waiting in the
listener's accept queue (which the kernel completes without the server). The
server's own result (``max_concurrent``) is kept beside it as a cross-check.

The clients are the lab's epoll client (one thread per process, 5,000
connections per process) with ``--workload slow --rate 0``: connect, then send
nothing, from as many client containers as the step needs at 25,000 each (one
source address has 28,232 ephemeral ports towards the server's port: 100,000
take four). Once the server holds them all (or has stopped taking more) the
client containers are killed, which closes every connection at once. SYN cookies
are off in the server's network namespace, so that a connection arriving while
the accept queue is full is retried by the client instead of lost (see
SERVER_SERVICE): the ramp measures how many a server holds, not how fast it
accepts a burst.

Memory per connection is the server's resident memory (VmRSS, read from /proc
while the connections are held) minus its own idle baseline just before the
client connected, divided by the connections held. Its reference, measured in
the same run at the same count, is the least the same idiom needs: a dozen
lines of stdlib epoll (or asyncio) that accept and keep each socket, nothing
else. The ratio is what the lab's bookkeeping per connection costs over that.
Both asyncio figures vary by a few tenths of a KiB from run to run: each wakeup
accepts up to the backlog's count of connections and starts a task for each,
and what those leave behind in the allocator's arenas stays resident (with a
backlog of 128 the spread vanishes, but so many SYNs are then dropped that the
threaded server cannot fill a step before the client gives up).

Servers and probes run inside one long-lived server container (`docker exec`
as the unprivileged workload user), so a step costs a process start, not a
container. Every container is given as many descriptors as the engine grants
(Compose ``ulimits: nofile``, asked at 1,048,576, Linux's default fs.nr_open:
DockerAPI.nofile_allowed) and each process raises its soft limit to that hard
one. A Docker daemon that runs with a lower limit of its own and whose runtime
cannot raise a hard limit (no CAP_SYS_RESOURCE) refuses more than its own, and
there that limit, not the server, is where the last steps stop (limits.py
says so, and what would bound 100,000 next).

The package, by concept: plan (what is tried, every process's arguments),
lab (the server container and its processes), steps (one step and a ramp),
limits (why a step stopped), figures. The programs the container runs that
are not the lab's own are files of bench/probes/.
"""

from __future__ import annotations

import time

from benchlab import bench_lab, build_image, engine
from common import Log
from labkit.compose import NOFILE_WANTED, nofile_ulimits
from labkit.engine.compose import lab_image_ref

from .figures import held_figure, memory_figure, memory_summary
from .lab import Lab
from .limits import limit_sentence, why_stopped
from .plan import C10K, FULL, MODE_ORDER, QUICK, REFERENCE, SERVER_SERVICE
from .steps import at, ramp


def run(quick: bool, log: Log) -> dict:
    """Every scale figure; ``quick`` tries each mode once at a single size."""
    build_image()
    plan = QUICK if quick else FULL
    started = time.monotonic()
    # Every container as many descriptors as the engine grants, up to what Linux allows a process.
    nofile, refusal = engine().nofile_allowed(lab_image_ref(), NOFILE_WANTED)
    descriptors = nofile_ulimits(nofile)
    services = {"server": {**SERVER_SERVICE, **descriptors}, "client": descriptors}
    runs: dict[str, list[list[dict]]] = {}
    with bench_lab(services, prefix="socklab-bench-scale") as project:
        project.up("server", wait=False)  # nothing listens until a step starts a server
        lab = Lab(project, engine())
        limits = {**lab.container_limits(), "nofile_wanted": NOFILE_WANTED, "nofile_granted": nofile,
                  "nofile_refusal": refusal}
        for mode in MODE_ORDER:
            for repetition in range(plan.repetitions.get(mode, 1)):
                runs.setdefault(mode, []).append(ramp(lab, mode, plan.ramp(mode, repetition), log))
                if mode in REFERENCE:
                    runs.setdefault(REFERENCE[mode], []).append(ramp(lab, REFERENCE[mode], (C10K,), log))
    details = {"plan": {"ramps": plan.ramps, "repetitions": plan.repetitions, "repeat_ramps": plan.repeat_ramps},
               "container_limits": limits,
               "memory": {mode: memory_summary(reps) for mode, reps in runs.items()},
               "steps": runs, "seconds": round(time.monotonic() - started, 1)}
    figures, limit_text, why = [], {}, {}
    for mode in MODE_ORDER:
        limit_text[mode] = limit_sentence(mode, runs[mode][0], limits)
        figures.append(held_figure(mode, runs[mode][:plan.reaching_top(mode)], plan,
                                   limit_text[mode] if mode in REFERENCE else ""))
        if mode in REFERENCE:
            at_c10k = [at(steps, C10K) for steps in runs[mode]]
            missed = [s for s in at_c10k if s is None or not s["all_held"]]
            if missed:
                why[mode] = "; ".join(why_stopped(s, limits) if s else "the ramp stopped before 10000"
                                      for s in missed)
            references = [at(steps, C10K) for steps in runs[REFERENCE[mode]]]
            figures.append(memory_figure(mode, at_c10k, references))
    threaded = [at(steps, C10K) for steps in runs["threaded"]]
    epoll = [at(steps, C10K) for steps in runs["epoll"]][:len(threaded)]
    figures.append(memory_figure("threaded", threaded, epoll,
                                 reference_label="the lab's epoll server at the same count, same run"))
    details["limits"] = limit_text
    if why:
        details["why"] = why
    return {"figures": figures, "details": details}
