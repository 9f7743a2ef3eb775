"""Profile: why the lab's blocking bulk client sends slower than iperf3 on an unshaped link.

    BASE_IMAGE=... python3 bench/profile_bulk.py [--bytes 2GiB] [--tries 3]

What BENCHMARKS.md says about `loadgen.bulk.blocking.*` rests on this. Between
two lab containers, against the lab's bulk server (the one the load-generation
benchmark uses):

1. cProfile of the lab's blocking client sending the payload: where its time goes;
2. the same number of bytes sent by a few lines of Python with sendall(), once
   from one payload buffer as large as the transfer (what the lab's bulk
   workload does: the tutorial's payload is one object) and once from a 128 KiB
   buffer sent again and again (what iperf3 does), alternating, ``--tries``
   times each.

Writes bench/results/profile_bulk.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, bench_lab, build_image, environment, link_env, run_in_client  # noqa: E402
from fidelity import BULK_PORT, SERVER_COMMAND  # noqa: E402
from socklab.units import parse_size_bytes  # noqa: E402

# Speaks the lab's bulk protocol: send, shut down the write side, read the trailer.
SENDER = r"""
import socket, sys, time
nbytes, kind = int(sys.argv[1]), sys.argv[2]
pattern = b"Hello Python\n"
block = pattern * (131072 // len(pattern)) if kind == "reused" else None
payload = memoryview(pattern * (nbytes // len(pattern))) if kind == "whole" else None
sock = socket.create_connection(("server", %d))
started = time.perf_counter()
if payload is not None:
    sock.sendall(payload)
    sent = len(payload)
else:
    sent = 0
    while sent + len(block) <= nbytes:
        sock.sendall(block)
        sent += len(block)
sock.shutdown(socket.SHUT_WR)
while sock.recv(65536):
    pass
print("SENT %%s %%d %%.6f" %% (kind, sent, time.perf_counter() - started))
""" % BULK_PORT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", default="2GiB")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_bulk.json")
    args = parser.parse_args()
    nbytes = parse_size_bytes(args.bytes)
    build_image()
    with bench_lab({"server": {"command": SERVER_COMMAND, "environment": link_env()}}) as lab:
        lab.up("server")
        profiled, stdout = run_in_client(lab, (
            "python3 -m cProfile -s tottime -m socklab client --mode blocking --host server "
            f"--port {BULK_PORT} --workload bulk --bytes {nbytes} | head -30"), link_env())
        rates: dict[str, list[float]] = {"whole": [], "reused": []}
        for attempt in range(args.tries):
            for kind in (("whole", "reused") if attempt % 2 == 0 else ("reused", "whole")):
                _, out = run_in_client(lab, shlex.join(["python3", "-c", SENDER, str(nbytes), kind]), link_env())
                line = next(line for line in out.splitlines() if line.startswith("SENT "))
                _, _, sent, seconds = line.split()
                rates[kind].append(int(sent) * 8 / float(seconds) / 1e9)
    lines = [line for line in stdout.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    summary = {
        "benchmark": "profile_bulk", **environment(), "bytes": nbytes,
        "lab_client": profiled.get("client"),
        "lab_client_profile_top": lines[start - 2:start + 8],
        "gbit_per_s": {kind: {"samples": [round(r, 2) for r in values], "median": round(statistics.median(values), 2)}
                       for kind, values in rates.items()},
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(summary["lab_client_profile_top"]))
    for kind, values in summary["gbit_per_s"].items():
        print(f"sendall from a {'payload-sized' if kind == 'whole' else '128 KiB reused'} buffer: "
              f"median {values['median']} Gbit/s {values['samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
