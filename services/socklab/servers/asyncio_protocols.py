"""The asyncio mode: asyncio's event loop with a Protocol per connection.

A plain Protocol, as anyone would write an asyncio echo server: the
transport recv()s a chunk and hands it to data_received(), which writes the
same bytes object straight back to the transport (no copy, no coroutine
switch per chunk). --recv-size is honoured by setting the transport's
``max_size``, what it asks each recv() for (256 KiB otherwise).

Per connection the protocol is a small object with __slots__; there is no
timer per connection: one periodic sweep finds the idle ones (see
lifecycle.IDLE_SWEEPS), so that an idle connection costs little more than
asyncio's own transport. asyncio runs one loop iteration per receive; that
cost is what this mode shows.
"""

from __future__ import annotations

import asyncio
from functools import partial

from .accepting import ACCEPTS_PER_WAKEUP
from .connection import ECHO_HIGH_WATER_BYTES, Connections
from .lifecycle import IDLE_SWEEPS, Server, Strategy

# asyncio's own ratio of the low to the high write-buffer mark, as a constant
# so that no transport holds an int object of its own for it.
_ECHO_LOW_WATER_BYTES = ECHO_HIGH_WATER_BYTES // 4


class AsyncioStrategy(Strategy):
    """asyncio's event loop with a Protocol per connection."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def run(self, server: Server) -> None:
        asyncio.run(self._serve(server))

    async def _serve(self, server: Server) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            if server.stopping:
                return
            shared = _Shared(server)
            # asyncio takes ``backlog`` both for listen() and for how many
            # connections to accept per wakeup, each with a task of its own
            # until connection_made(): a burst of thousands would cost that
            # many tasks at once (memory the process keeps). So it gets the
            # accept batch, and the listener its own backlog back at once.
            assert server.listener is not None
            aserver = await self._loop.create_server(
                partial(_AsyncioConnection, shared), sock=server.listener, backlog=ACCEPTS_PER_WAKEUP)
            server.listener.listen(server.config.backlog)
            self._sweeper = self._loop.call_later(server.config.idle_sweep_s, self._sweep_idle, shared)
            try:
                await self._stop.wait()
            finally:
                self._sweeper.cancel()
                aserver.close()
                for protocol in list(shared.live):
                    protocol.finish("shutdown")
        finally:
            self._loop = None

    def _sweep_idle(self, shared: _Shared) -> None:
        # Every connection silent for IDLE_SWEEPS sweeps in a row is closed.
        # The transport drains its buffer without telling the protocol: a
        # change in what it holds since the last sweep counts as activity.
        for protocol in list(shared.live):
            transport = protocol.transport
            buffered = transport.get_write_buffer_size()
            if buffered != protocol.buffered:
                protocol.buffered = buffered
                protocol.idle = 0
            elif protocol.idle >= IDLE_SWEEPS:
                protocol.finish("idle")
            else:
                protocol.idle += 1
        assert self._loop is not None
        self._sweeper = self._loop.call_later(shared.server.config.idle_sweep_s, self._sweep_idle, shared)

    def wake(self, server: Server) -> None:
        # A signal handler may not touch the loop's internals, but
        # call_soon_threadsafe() is only a queue append plus a self-pipe write.
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)


class _Shared:
    """What every connection's protocol of one run refers to."""

    __slots__ = ("server", "conns", "live", "recv_size")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conns: Connections = server.connections
        self.live: set[_AsyncioConnection] = set()
        self.recv_size = server.config.recv_size_bytes


class _AsyncioConnection(asyncio.Protocol):
    """One connection's asyncio protocol around the shared ``Connections``.

    bytes_sent is counted as written and, when the connection ends, less what
    the transport still holds. After a reset the transport has already
    dropped its buffer, so up to one write buffer (the echo high-water mark)
    may be counted as sent.
    """

    __slots__ = ("shared", "transport", "cid", "eof", "idle", "buffered")

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.cid = -1  # until connection_made
        self.eof = False
        self.idle = 0  # idle sweeps since the last activity
        self.buffered = 0  # what the transport held at the last sweep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        shared = self.shared
        self.transport = transport
        self.cid = shared.server.open_connection(transport.get_extra_info("peername"))
        shared.live.add(self)
        transport.max_size = shared.recv_size  # type: ignore[attr-defined]
        # Backpressure for echo: pause_writing() above this stops reading.
        transport.set_write_buffer_limits(high=ECHO_HIGH_WATER_BYTES, low=_ECHO_LOW_WATER_BYTES)

    def data_received(self, data: bytes) -> None:
        self.idle = 0
        conns = self.shared.conns
        reply = conns.on_data(self.cid, data)
        if reply:
            conns.on_sent(self.cid, len(reply))
            self.transport.write(reply)

    def eof_received(self) -> bool:
        self.eof = True
        trailer = self.shared.conns.on_eof(self.cid)
        self.shared.conns.on_sent(self.cid, len(trailer))
        self.transport.write(trailer)
        return False  # the transport closes once the trailer is flushed

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("eof" if exc is None and self.eof else "reset")

    def finish(self, closed_by: str) -> None:
        """Record the connection's end once; cut it unless the transport already closed."""
        shared = self.shared
        if self.cid < 0 or self not in shared.live:
            return
        shared.live.discard(self)
        # Written but never taken by the kernel: not sent.
        shared.conns.on_sent(self.cid, -self.transport.get_write_buffer_size())
        if closed_by in ("idle", "shutdown"):
            self.transport.abort()
        shared.server.close_connection(self.cid, closed_by)
