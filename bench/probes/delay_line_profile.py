"""Replace a container's delay line by the same line under cProfile: profile_delayline's probe.

    python3 delay_line_profile.py SECONDS        (as root, in a client container of the userspace backend)

Reads the delay line's configuration from the command the link's plan started
it with (in /run/socklab/link.json), stops that line (its iptables rules stay;
they bypass the queue while nobody listens), runs the same line in the
foreground under cProfile for SECONDS, then prints one line: ``PROFILE
{"packets", "stats", "top"}``, the heaviest functions per packet. Stdlib
only, and socklab's delay line.
"""

import cProfile
import json
import pstats
import sys
import threading

STATE_PATH = "/run/socklab/link.json"
START = ["shape", "delayline", "start"]
TOP = 12


def line_words(state):
    """The delay line's configuration word per direction, from the link state's start command."""
    start = next(c for c in state["commands"] if c[3:6] == START)
    return {start[i].lstrip("-"): start[i + 1] for i in range(6, len(start) - 1) if start[i] in ("--up", "--down")}


def top_functions(stats, packets):
    """Every profiled function's calls and CPU time per packet, the heaviest by own time first."""
    rows = []
    for (path, lineno, name), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{path.rsplit('/', 1)[-1]}:{lineno}({name})", "calls": nc,
                     "own_us_per_packet": round(tt / packets * 1e6, 2),
                     "total_us_per_packet": round(ct / packets * 1e6, 2)})
    rows.sort(key=lambda r: -r["own_us_per_packet"])
    return rows[:TOP]


def main(seconds):
    from socklab.shaping import delayline

    with open(STATE_PATH) as f:
        words = line_words(json.load(f))
    print(json.dumps(delayline.stop()), file=sys.stderr)
    line = delayline.DelayLine({d: delayline.LineConfig.from_word(w) for d, w in words.items()})
    line.open()
    # Asked as its controller would: the request wakes its loop, which may be waiting on nothing held.
    threading.Timer(seconds, delayline.stop).start()
    profile = cProfile.Profile()
    profile.runcall(line.run)
    stats = line.stats()
    packets = sum(stats[d]["packets"] for d in ("up", "down") if d in stats)
    print("PROFILE " + json.dumps({"packets": packets, "stats": stats,
                                   "top": top_functions(pstats.Stats(profile), packets)}))


if __name__ == "__main__":
    main(float(sys.argv[1]))
