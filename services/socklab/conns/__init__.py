"""One client connection in each I/O mode, with its counters and its trace records.

Workloads (workloads.py) are written once, against the interface every
connection class offers; each method is a generator used with ``yield from``:

* ``connect()`` — open the connection the workload runs on;
* ``connect_attempt(cancel_after_s)`` — one attempt of the connect workload;
* ``send_payload(view, chunk_bytes)`` — send the mode's way, return bytes accepted;
* ``recv_exactly(nbytes)`` — read an echo reply;
* ``finish()`` — TCP_INFO, ``shutdown(SHUT_WR)``, read to the server's EOF.

``SocketConn`` does real socket calls for the blocking, timeout and
non-blocking modes (its generators yield ``Wait``/``Sleep`` to an EventLoop);
``AsyncConn`` does the same with asyncio streams (its generators yield
coroutines to ``run_asyncio``).

base.py holds what both kinds share (counters, failures, the connect logic,
finish); sockets.py the socket-call kind and its runners; streams.py the
asyncio kind and its runner.
"""

from .base import RECV_BYTES, ConnBase, Mode, Settings
from .sockets import SocketConn, run_shared_loop, run_threads
from .streams import AsyncConn, run_asyncio

__all__ = ["RECV_BYTES", "AsyncConn", "ConnBase", "Mode", "Settings", "SocketConn", "run_asyncio",
           "run_shared_loop", "run_threads"]
