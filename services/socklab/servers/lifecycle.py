"""What every mode shares: listen, signals, the stop condition, statistics, the result.

``Server`` runs one ``Strategy`` (how a mode waits) between ``listen`` and the
result line; strategies report each connection's start and end to it.
"""

from __future__ import annotations

import abc
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import SocklabError
from ..results import cpu_seconds, emit_result, peak_rss_kib
from .connection import Connections

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The loop-based modes look for idle connections this many times per idle
# timeout, rather than keeping a deadline per connection (a timer, or a place
# in an ordered map, per connection is memory an idle connection need not
# cost): a silent connection is closed between 1 and 1 + 1/IDLE_SWEEPS idle
# timeouts after its last activity.
IDLE_SWEEPS = 10
# What the server prints on stderr once it listens: the orchestrator waits for it.
LISTENING_LINE = "socklab server listening on"


@dataclass(frozen=True)
class ServerConfig:
    """What the command line asked for."""

    mode: str
    host: str
    port: int
    recv_size_bytes: int
    max_connections: int | None
    workload: str
    idle_timeout_s: float
    backlog: int
    rcvbuf_bytes: int | None

    @property
    def idle_sweep_s(self) -> float:
        """How often the loop-based modes look for idle connections (see IDLE_SWEEPS)."""
        return self.idle_timeout_s / IDLE_SWEEPS


class Server:
    """The lifecycle every mode shares: listen, serve through a strategy, stop, report.

    Strategies call ``open_connection`` / ``close_connection`` around each
    connection and poll ``stopping``; ``request_stop`` may be called from a
    signal handler or any thread.
    """

    def __init__(self, config: ServerConfig, strategy: "Strategy") -> None:
        self.config = config
        self.strategy = strategy
        self.listener: socket.socket | None = None
        # A plain attribute, read after every blocking call: cheap and atomic.
        self.stopping = False
        self.stopped_by: str | None = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        # Every connection's state and record, numbered in order of opening.
        self.connections = Connections(config.workload == "echo")
        self._open = 0
        self._finished = 0
        self._max_concurrent = 0
        self._threads_max = threading.active_count()
        self._idle_timeouts = 0

    def listen(self) -> None:
        """Bind and listen; a failure is a one-sentence SocklabError."""
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if cfg.rcvbuf_bytes:
                # Set on the listener, before listen(): accepted sockets inherit
                # it, and the window scale is fixed during the handshake.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.rcvbuf_bytes)
            sock.bind((cfg.host, cfg.port))
            sock.listen(cfg.backlog)
        except OSError as exc:
            sock.close()
            raise SocklabError(
                f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
            ) from None
        self.listener = sock
        self._t0 = time.monotonic()

    def serve(self, result_file: str | None = None) -> dict[str, Any]:
        """Run until the stop condition, print the result line (also to ``result_file``), return it."""
        # Handlers first: whoever waits for the port may signal as soon as it
        # opens; a stop before the strategy runs is seen by its first check.
        # They stay until the result is out, so that a second SIGTERM cannot
        # kill the process between stopping and reporting.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            try:
                self.listen()
                assert self.listener is not None
                port = self.listener.getsockname()[1]
                print(f"{LISTENING_LINE} {self.config.host}:{port} mode={self.config.mode}",
                      file=sys.stderr, flush=True)
                self.strategy.run(self)
            finally:
                if self.listener is not None:
                    self.listener.close()
            wall_s = time.monotonic() - self._t0
            self._close_stragglers()
            result = self._result(wall_s)
            emit_result(result, result_file)
            return result
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.request_stop("signal")

    def request_stop(self, reason: str) -> None:
        """Stop serving: the first reason is the one reported."""
        if self.stopped_by is None:
            self.stopped_by = reason
        self.stopping = True
        self.strategy.wake(self)

    def now_s(self) -> float:
        """Seconds since the server started listening."""
        return time.monotonic() - self._t0

    def open_connection(self, address: Any) -> int:
        """Register a newly accepted connection from ``address`` (the peer's sockaddr): its number.

        The workload is then driven through ``self.connections`` with that number.
        """
        with self._lock:
            cid = self.connections.open(address, self.now_s())
            self._open += 1
            self._max_concurrent = max(self._max_concurrent, self._open)
            self._threads_max = max(self._threads_max, threading.active_count())
        return cid

    def close_connection(self, cid: int, closed_by: str) -> None:
        """Record the end of connection ``cid``; stop once enough connections have finished.

        ``closed_by``: "eof", "idle" and "reset" finish a connection; "shutdown"
        (cut because the server stops) does not count towards --max-connections.
        """
        self.connections.close(cid, self.now_s(), closed_by)
        with self._lock:
            self._open -= 1
            # A thread-per-connection worker calls this while still alive, so
            # every thread that ever ran is counted here at its busiest.
            self._threads_max = max(self._threads_max, threading.active_count())
            if closed_by == "idle":
                self._idle_timeouts += 1
            if closed_by != "shutdown":
                self._finished += 1
            limit = self.config.max_connections
            reached = limit is not None and self._finished >= limit
        if reached:
            self.request_stop("max-connections")

    def _close_stragglers(self) -> None:
        # A connection a strategy could not close in time (a worker thread that
        # missed its join deadline, an asyncio transport made during shutdown)
        # is reported as cut by the shutdown rather than left without an end.
        with self._lock:
            open_ones = self.connections.open_ones()
        for cid in open_ones:
            self.close_connection(cid, "shutdown")

    def _result(self, wall_s: float) -> dict[str, Any]:
        conns = self.connections
        return {
            "role": "server",
            "mode": self.config.mode,
            "workload": self.config.workload,
            "connections": self._finished,
            "bytes_received": conns.bytes_received(),
            "bytes_sent": conns.bytes_sent(),
            "cpu_s": round(cpu_seconds(), 6),
            "max_concurrent": self._max_concurrent,
            "threads_max": self._threads_max,
            "peak_rss_kib": peak_rss_kib(),
            "idle_timeouts": self._idle_timeouts,
            "wall_s": round(wall_s, 6),
            "stopped_by": self.stopped_by,
            "per_connection": [conns.record(cid) for cid in range(len(conns))],
        }


class Strategy(abc.ABC):
    """How a mode waits. ``run`` serves until ``server.stopping``; ``wake`` unblocks it."""

    @abc.abstractmethod
    def run(self, server: Server) -> None:
        """Serve connections until ``server.stopping``; close every open one before returning."""

    @abc.abstractmethod
    def wake(self, server: Server) -> None:
        """Make ``run`` notice ``server.stopping`` soon; safe in a signal handler.

        May be called before ``run`` starts or after it returns.
        """
