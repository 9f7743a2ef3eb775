"""Profile: where the userspace delay line's time goes on a short round trip.

    BASE_IMAGE=... python3 bench/profile_delayline.py [--delay 1ms] [--seconds 8]

What BENCHMARKS.md says about round trips at 1 ms each way rests on this. In a
client container whose link has the delay (userspace backend), the delay line
the entrypoint started is stopped (its iptables rules stay; they bypass the
queue while nobody listens) and the same line, with the same configuration,
runs again in the foreground under cProfile (bench/probes/delay_line_profile.py)
while the lab's echo client makes 64-byte round trips through it. Prints the
ping-pong's latency, the line's counters and the heaviest functions per
packet, and writes them as JSON (default bench/results/profile_delayline.json).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import build_image, engine, exec_in, remove_container, server_lab, start_container  # noqa: E402
from common import standalone_parser, write_standalone  # noqa: E402
from experiments import SOCKLAB, client_argv, link_env, probe_command, server_argv  # noqa: E402
from socklab.entry import WORKLOAD_USER  # noqa: E402
from socklab.results import find_results  # noqa: E402
from socklab.shaping.commands import DEFAULT_STATE_PATH  # noqa: E402

ROUND_TRIPS_PER_S = 250


def _echo(requests: int = 1) -> dict:
    return {"mode": "blocking", "workload": {"kind": "echo", "size": 64, "requests": requests}}


def main() -> int:
    parser = standalone_parser(__doc__, "profile_delayline")
    parser.add_argument("--delay", default="1ms")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    build_image()
    requests = int((args.seconds - 3) * ROUND_TRIPS_PER_S)
    server = server_argv({"mode": "epoll"}, {"name": "load", **_echo()}, options={"--idle-timeout": "600"})
    with server_lab(server) as lab:
        container = start_container(lab, "client", f"{lab.name}-profiled", ["exec", "sleep", "600"],
                                    link_env(delay=args.delay, backend="userspace"), aliases=True)
        try:
            code, out = exec_in(container, ["sh", "-c", f"until test -e {DEFAULT_STATE_PATH}; do sleep 0.1; done"],
                                timeout_s=60)
            if code != 0:
                raise RuntimeError(f"the client's link was not set up: {out[-400:]}")
            line = engine().start_exec(container, probe_command("delay_line_profile", args.seconds))
            client = shlex.join([*SOCKLAB, *client_argv(_echo(requests))])
            code, client_out = exec_in(container, ["sh", "-c", f"sleep 1; exec {client}"], user=WORKLOAD_USER,
                                       timeout_s=args.seconds + 60)
            if code != 0:
                raise RuntimeError(f"the client failed ({code}): {client_out[-400:]}; the line: {line.output[-600:]}")
            if line.wait(args.seconds + 60) != 0:
                raise RuntimeError(f"the profiled delay line failed: {line.output[-400:]}")
        finally:
            remove_container(container)
    (result,) = [r for r in find_results(client_out) if r["role"] == "client"]
    profile = json.loads(next(text for text in line.stdout.splitlines()
                              if text.startswith("PROFILE "))[len("PROFILE "):])
    write_standalone(args.out, "profile_delayline", {"delay_each_way": args.delay,
                                                     "round_trip_ms": result["latency_ms"],
                                                     "round_trips": requests, **profile})
    print(f"round trip p50 {result['latency_ms']['p50']} ms over {args.delay} each way; "
          f"{profile['packets']} packets through the line")
    for row in profile["top"]:
        print(f"  {row['own_us_per_packet']:7.2f} µs own, {row['total_us_per_packet']:7.2f} µs total per packet  "
              f"{row['function']} ({row['calls']} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
