"""The lab's TCP server: one lifecycle, one workload object, six ways to wait.

``python -m socklab server --mode MODE --port P ...`` listens, serves every
connection with the workload (count and discard, or echo), answers each EOF
with the protocol's trailer, and prints one result line when it stops.

The layout follows the stdlib's socketserver/selectors split so that the modes
can be compared fairly:

* lifecycle.py — ``Server`` owns everything the modes share (bind and listen,
  signals, the stop condition, statistics, the result) and defines
  ``Strategy``, the one thing a mode provides: *how the server waits*;
* connection.py — ``Connections`` owns what is done with each connection's bytes;
* blocking.py (blocking, threaded), reactor.py (select, poll, epoll: one loop
  over pollers.py), asyncio_protocols.py (asyncio) — the strategies, with
  accepting.py for what the socket-level ones share; strategies.py names them;
* cli.py — the command line and ``main``.
"""

from .cli import build_parser, main, parse_args
from .connection import WORKLOADS, Connections
from .lifecycle import Server, ServerConfig, Strategy
from .reactor import SELECT_MAX_CONNECTIONS
from .strategies import MODES, STRATEGIES

__all__ = [
    "MODES", "SELECT_MAX_CONNECTIONS", "STRATEGIES", "WORKLOADS", "Connections", "Server",
    "ServerConfig", "Strategy", "build_parser", "main", "parse_args",
]
