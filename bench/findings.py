"""What people concluded from the benchmarks: why a target is missed, which figures lead.

Written after reading the results and profiling, by hand; :mod:`render` puts
each explanation beside its missed target in BENCHMARKS.md, and a test checks
that every missed target of the committed results has one.
"""

# (figure id, what the README says the ratio is) in the README's order.
HEADLINE: list[tuple[str, str]] = [
    ("link.goodput.100mbit.iperf3", "iperf3 through a 100 Mbit/s lab link, against the TCP ceiling"),
    ("link.goodput.1000mbit.lab", "the lab's bulk client through a 1 Gbit/s link, against iperf3"),
    ("link.rtt.userspace.50ms", "round trip over 50 ms each way (userspace backend), against the configured one"),
    ("loadgen.bulk.blocking.trace_off", "the lab's bulk client on an unshaped link, against iperf3"),
    ("overhead.case.10", "seconds per case outside the workload (10 clients), against bare compose up + down"),
    ("overhead.sweep.reuse", "a 12-case sweep with `--reuse`, wall time against its workloads"),
    ("echo.best_nonblocking.100", "echo req/s of the best non-blocking server at 100 connections, "
                                  "against a minimal asyncio server"),
    ("scale.epoll.held", "idle connections the epoll server holds, against the C10K line"),
]

# figure id -> why its target is missed (measured, profiled), one paragraph.
WHY: dict[str, str] = {}
