"""Start client processes together and wait for them all: the scale benchmark's load.

    python3 idle_clients.py ARGVS_JSON

ARGVS_JSON is a JSON list of argument vectors, one client process each. First
raises the soft descriptor limit to the hard one (inherited by every client:
each needs a descriptor per connection) and prints the ephemeral port range
(``ports LOW HIGH``: how many connections one source address can open). The
clients' output goes straight to this process's. Exits with the highest exit
status of the clients. Stdlib only.
"""

import json
import resource
import subprocess
import sys

PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def main(argvs):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(PORT_RANGE) as f:
        print("ports " + " ".join(f.read().split()), flush=True)
    clients = [subprocess.Popen(argv) for argv in argvs]
    return max((client.wait() for client in clients), default=0)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
