"""Socket-call traces: every call a client makes, kept in memory, written at the end.

File format (gzip-compressed JSON lines, version 1):

* line 1, a header object: ``{"socklab_trace": 1, "start_epoch": <wall-clock
  seconds at t_s = 0>, "mode", "workload", "connections", "host", "port",
  "fields": [...]}``;
* then one JSON array per record, in time order, with the header's ``fields``:
  ``t_s`` (start of the call, seconds since the client started, monotonic
  clock), ``conn`` (connection index; -1 for a wait shared by an event loop),
  ``call`` (send, recv, connect, shutdown, select, poll, epoll, write, drain,
  or outq for a send-queue sample), ``asked`` (bytes asked; fds waited on for a
  wait), ``returned`` (bytes returned, ready fds for a wait, queued bytes for
  outq; -1 when the call failed), ``errno`` (e.g. "EAGAIN", "" on success),
  ``dur_s`` (time inside the call), ``n`` (identical failed attempts merged
  into this record: a busy loop's retries; 1 otherwise).

Recording is one ``list.append`` of a tuple per call, so tracing costs little
while the client runs; formatting and compression happen after it finished.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from typing import Any, Callable

from .atomic import replacing
from .tcpinfo import send_queue_bytes

TRACE_FORMAT = 1
FIELDS = ("t_s", "conn", "call", "asked", "returned", "errno", "dur_s", "n")
# How often the send queue is sampled: often enough to draw a buffer draining
# on a 10 Mbit/s link, rarely enough not to compete with the workload.
OUTQ_INTERVAL_S = 0.01


class Tracer:
    """Collects records ``(t_s, conn, call, asked, returned, errno, dur_s, n)``.

    ``add`` is ``list.append`` itself: safe from several threads (the GIL makes
    it atomic) and as cheap as recording can be.
    """

    def __init__(self, path: str, clock: Callable[[], float], origin_s: float,
                 header: dict[str, Any]) -> None:
        self.path = path
        self.clock = clock
        self.origin_s = origin_s
        start_epoch = time.time() - (clock() - origin_s)
        self.header = {"socklab_trace": TRACE_FORMAT, "start_epoch": round(start_epoch, 6),
                       **header, "fields": list(FIELDS)}
        self.records: list[tuple] = []
        self.add = self.records.append
        self._sampler: _OutqSampler | None = None

    def start_outq_sampling(self) -> None:
        """Sample every watched socket's send queue until ``write``."""
        self._sampler = _OutqSampler(self)
        self._sampler.start()

    def watch(self, conn: int, fd: int) -> None:
        """Include this connection's socket in send-queue sampling."""
        if self._sampler is not None:
            self._sampler.watch(conn, fd)

    def unwatch(self, conn: int) -> None:
        """Stop sampling a connection; call before its socket is closed."""
        if self._sampler is not None:
            self._sampler.unwatch(conn)

    def write(self) -> None:
        """Write the trace file (atomically), records sorted by time."""
        if self._sampler is not None:
            self._sampler.stop()
        self.records.sort(key=lambda r: r[0])
        with replacing(self.path, "wb") as raw, \
                gzip.open(raw, "wt", encoding="utf-8", compresslevel=6) as fh:
            fh.write(json.dumps(self.header, separators=(",", ":")) + "\n")
            # Call and errno names are identifiers chosen by this package, so
            # they need no JSON escaping; formatting by hand is several times
            # faster than json.dumps on millions of records.
            fh.writelines(
                f'[{t:.7f},{conn},"{call}",{asked},{returned},"{err}",{dur:.7f},{n}]\n'
                for t, conn, call, asked, returned, err, dur, n in self.records)


class _OutqSampler(threading.Thread):
    """Periodically records SIOCOUTQ for each watched socket."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__(name="socklab-outq", daemon=True)
        self._tracer = tracer
        self._fds: dict[int, int] = {}
        # Held while sampling so that a socket cannot be closed (and its fd
        # reused by another socket) between choosing it and reading it.
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def watch(self, conn: int, fd: int) -> None:
        with self._lock:
            self._fds[conn] = fd

    def unwatch(self, conn: int) -> None:
        with self._lock:
            self._fds.pop(conn, None)

    def stop(self) -> None:
        self._stopped.set()
        self.join()

    def run(self) -> None:
        clock, origin, add = self._tracer.clock, self._tracer.origin_s, self._tracer.add
        while not self._stopped.wait(OUTQ_INTERVAL_S):
            with self._lock:
                for conn, fd in self._fds.items():
                    queued = send_queue_bytes(fd)
                    if queued is not None:
                        add((clock() - origin, conn, "outq", 0, queued, "", 0.0, 1))


def read_trace(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A trace file's header and its records as dicts keyed by the header's fields."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        header = json.loads(fh.readline())
        fields = header["fields"]
        records = [dict(zip(fields, json.loads(line))) for line in fh if line.strip()]
    return header, records
