"""Profile: where the userspace delay line's time goes on a short round trip.

    BASE_IMAGE=... python3 bench/profile_delayline.py [--delay 1ms] [--seconds 8]

What BENCHMARKS.md says about round trips at 1 ms each way rests on this. In a
client container whose link has the delay (userspace backend), the delay line
the entrypoint started is stopped (its iptables rules stay; they bypass the
queue while nobody listens) and the same line, with the same configuration,
runs again in the foreground under cProfile while the lab's echo client makes
64-byte round trips through it. Prints the ping-pong's latency, the line's
counters and the heaviest functions per packet, and writes them as JSON
(default bench/results/profile_delayline.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, bench_lab, build_image, environment, link_env  # noqa: E402
from labkit import proc  # noqa: E402
from socklab.results import find_results  # noqa: E402

# Runs as root in the client container: the delay line the plan started is
# replaced by one in the foreground, profiled, that stops after SECONDS.
PROFILED_LINE = r"""
import cProfile, json, pstats, shlex, sys, threading
from socklab.shaping import delayline
seconds = float(sys.argv[1])
state = json.load(open("/run/socklab/link.json"))
start = next(c for c in state["commands"] if c[3:6] == ["shape", "delayline", "start"])
words = {start[i].lstrip("-"): start[i + 1] for i in range(6, len(start) - 1) if start[i] in ("--up", "--down")}
print(json.dumps(delayline.stop()), file=sys.stderr)
line = delayline.DelayLine({d: delayline.LineConfig.from_word(w) for d, w in words.items()})
line.open()
# Asked as its controller would: the request wakes its loop, which may be waiting on nothing held.
threading.Timer(seconds, delayline.stop).start()
profile = cProfile.Profile()
profile.runcall(line.run)
stats = line.stats()
packets = sum(stats[d]["packets"] for d in ("up", "down") if d in stats)
rows = []
for (path, lineno, name), (cc, nc, tt, ct, _) in pstats.Stats(profile).stats.items():
    rows.append({"function": f"{path.rsplit('/', 1)[-1]}:{lineno}({name})", "calls": nc,
                 "own_us_per_packet": round(tt / packets * 1e6, 2), "total_us_per_packet": round(ct / packets * 1e6, 2)})
rows.sort(key=lambda r: -r["own_us_per_packet"])
print("PROFILE " + json.dumps({"packets": packets, "stats": stats, "top": rows[:12]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", default="1ms")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_delayline.json")
    args = parser.parse_args()
    build_image()
    server = ["server", "--mode", "epoll", "--port", "5000", "--workload", "echo", "--idle-timeout", "600"]
    with bench_lab({"server": {"command": server, "environment": link_env()}}) as lab:
        lab.up("server")
        name = f"{lab.name}-profiled"
        try:
            env = link_env(delay=args.delay, backend="userspace")
            lab.compose("run", "-d", "--name", name, "--use-aliases",
                        *[flag for k, v in env.items() for flag in ("-e", f"{k}={v}")],
                        "client", "exec", "sleep", "600", timeout_s=120)
            proc.run(["docker", "exec", name, "sh", "-c", "until test -e /run/socklab/link.json; do sleep 0.1; done"],
                     timeout_s=60)
            outputs = {}

            def profiled() -> None:
                outputs["line"] = proc.run(["docker", "exec", name, "python3", "-c", PROFILED_LINE, str(args.seconds)],
                                           timeout_s=args.seconds + 60).stdout

            thread = threading.Thread(target=profiled)
            thread.start()
            requests = int((args.seconds - 3) * 250)
            client = proc.run(["docker", "exec", "-u", "socklab", name, "sh", "-c",
                               "sleep 1; exec python3 -m socklab client --mode blocking --host server --port 5000 "
                               f"--workload echo --size 64 --requests {requests}"], timeout_s=args.seconds + 60)
            thread.join()
        finally:
            proc.run(["docker", "rm", "-f", name], check=False)
    (result,) = [r for r in find_results(client.stdout) if r["role"] == "client"]
    profile = json.loads(next(line for line in outputs["line"].splitlines()
                              if line.startswith("PROFILE "))[len("PROFILE "):])
    summary = {"benchmark": "profile_delayline", **environment(), "delay_each_way": args.delay,
               "round_trip_ms": result["latency_ms"], "round_trips": requests, **profile}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"round trip p50 {result['latency_ms']['p50']} ms over {args.delay} each way; "
          f"{profile['packets']} packets through the line")
    for row in profile["top"]:
        print(f"  {row['own_us_per_packet']:7.2f} µs own, {row['total_us_per_packet']:7.2f} µs total per packet  "
              f"{row['function']} ({row['calls']} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
