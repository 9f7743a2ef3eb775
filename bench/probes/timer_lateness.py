"""How late this kernel wakes a process from a short sleep: the VM benchmark's yardstick.

    python3 timer_lateness.py SLEEP_MS COUNT

Sleeps SLEEP_MS COUNT times, one after the other, and prints one JSON line:
``{"sleep_ms": .., "count": .., "late_ms": {"p50": .., "p90": .., "max": ..}}``,
the time past each sleep's end at which the process ran again. A delayed
packet waits in the same way (netem's qdisc timer, the delay line's sleep), so
this is the part of a round trip the kernel's timers add. Stdlib only.
"""

import json
import sys
import time


def lateness_ms(sleep_ms, count):
    """Each sleep's overshoot in ms, sorted."""
    late = []
    for _ in range(count):
        started = time.perf_counter()
        time.sleep(sleep_ms / 1000)
        late.append((time.perf_counter() - started) * 1000 - sleep_ms)
    return sorted(late)


if __name__ == "__main__":
    sleep_ms, count = float(sys.argv[1]), int(sys.argv[2])
    late = lateness_ms(sleep_ms, count)
    print(json.dumps({"sleep_ms": sleep_ms, "count": count,
                      "late_ms": {"p50": round(late[len(late) // 2], 4), "p90": round(late[int(len(late) * 0.9)], 4),
                                  "max": round(late[-1], 4)}}))
