"""Profile: why the lab's blocking bulk client sends slower than iperf3 on an unshaped link.

    BASE_IMAGE=... python3 bench/profile_bulk.py [--bytes 2GiB] [--tries 3]

What BENCHMARKS.md says about `loadgen.bulk.blocking.*` rests on this. Between
two lab containers, against the lab's bulk server (the one the load-generation
benchmark uses):

1. cProfile of the lab's blocking client sending the payload: where its time goes;
2. the same number of bytes sent by a few lines of Python with sendall()
   (bench/probes/bulk_sender.py): from one plain buffer as large as the
   transfer (the tutorial's payload as one bytes object, what the bulk workload
   sent before socklab.payload), from the lab's tiled payload (one buffer too,
   whose pages repeat a small tile: what it sends now) and from a 128 KiB
   buffer sent again and again (what iperf3 does), in turn, ``--tries`` times each.

Writes bench/results/profile_bulk.json and prints a summary.
"""

from __future__ import annotations

import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import build_image, run_in_client, server_lab  # noqa: E402
from common import standalone_parser, write_standalone  # noqa: E402
from experiments import client_argv, link_env, probe_command  # noqa: E402
from fidelity import BULK_PORT, SERVER_COMMAND  # noqa: E402
from socklab.units import parse_size_bytes  # noqa: E402


def main() -> int:
    parser = standalone_parser(__doc__, "profile_bulk")
    parser.add_argument("--bytes", default="2GiB")
    parser.add_argument("--tries", type=int, default=3)
    args = parser.parse_args()
    nbytes = parse_size_bytes(args.bytes)
    client = client_argv({"mode": "blocking", "workload": {"kind": "bulk", "bytes": nbytes}}, {"--port": BULK_PORT})
    build_image()
    with server_lab(SERVER_COMMAND) as lab:
        profiled, stdout = run_in_client(
            lab, shlex.join(["python3", "-m", "cProfile", "-s", "tottime", "-m", "socklab", *client]) + " | head -30",
            link_env())
        rates: dict[str, list[float]] = {"whole": [], "tiled": [], "reused": []}
        kinds = list(rates)
        for attempt in range(args.tries):
            # Rotated, so that no kind always runs first after the profile.
            for kind in kinds[attempt % 3:] + kinds[:attempt % 3]:
                sender = probe_command("bulk_sender", "server", BULK_PORT, nbytes, kind)
                _, out = run_in_client(lab, shlex.join(sender), link_env())
                line = next(line for line in out.splitlines() if line.startswith("SENT "))
                _, _, sent, seconds = line.split()
                rates[kind].append(int(sent) * 8 / float(seconds) / 1e9)
    lines = [line for line in stdout.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    summary = {
        "bytes": nbytes,
        "lab_client": profiled.get("client"),
        "lab_client_profile_top": lines[start - 2:start + 8],
        "gbit_per_s": {kind: {"samples": [round(r, 2) for r in values], "median": round(statistics.median(values), 2)}
                       for kind, values in rates.items()},
    }
    write_standalone(args.out, "profile_bulk", summary)
    print("\n".join(summary["lab_client_profile_top"]))
    buffers = {"whole": "a payload-sized plain", "tiled": "the lab's tiled payload", "reused": "a 128 KiB reused"}
    for kind, values in summary["gbit_per_s"].items():
        print(f"sendall from {buffers[kind]} buffer: median {values['median']} Gbit/s {values['samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
