"""The asyncio mode: asyncio's event loop with a BufferedProtocol per connection.

Protocols, not streams, and the BufferedProtocol flavour: its transport
recv_into()s straight into the buffer get_buffer() returns, so every receive
asks for exactly --recv-size bytes, as in the other modes, with no copy and
no coroutine switch per chunk. Streams (and plain Protocol) cannot honour
--recv-size: the transport always reads up to 256 KiB and StreamReader
re-slices that. Measured on loopback, 136 MB bulk, one connection (server CPU
includes ~0.1 s of interpreter start-up):
  recv 64 KiB: BufferedProtocol 0.04 s wall, 0.19 s CPU; streams 0.25 s, 0.37 s.
  recv 1 KiB:  BufferedProtocol 1.07 s, 1.22 s; streams 0.38 s, 0.50 s, but
  only because streams made 256 KiB receives instead of the 1 KiB asked for.
asyncio runs one loop iteration per receive; that cost is what this mode shows.
"""

from __future__ import annotations

import asyncio

from .connection import ECHO_HIGH_WATER_BYTES, Connection
from .lifecycle import Server, Strategy


class AsyncioStrategy(Strategy):
    """asyncio's event loop with a BufferedProtocol per connection."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def run(self, server: Server) -> None:
        asyncio.run(self._serve(server))

    async def _serve(self, server: Server) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            if server.stopping:
                return
            live: set[_AsyncioConnection] = set()
            view = memoryview(bytearray(server.config.recv_size_bytes))
            aserver = await self._loop.create_server(
                lambda: _AsyncioConnection(server, live, view),
                sock=server.listener, backlog=server.config.backlog)
            try:
                await self._stop.wait()
            finally:
                aserver.close()
                for protocol in list(live):
                    protocol.finish("shutdown")
        finally:
            self._loop = None

    def wake(self, server: Server) -> None:
        # A signal handler may not touch the loop's internals, but
        # call_soon_threadsafe() is only a queue append plus a self-pipe write.
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)


class _AsyncioConnection(asyncio.BufferedProtocol):
    """One connection's asyncio protocol around the shared ``Connection`` logic."""

    def __init__(self, server: Server, live: set[_AsyncioConnection], view: memoryview) -> None:
        self._server = server
        self._live = live
        # Shared by all connections: the transport hands each chunk to
        # buffer_updated() before it reads the next, so nothing is overwritten.
        self._view = view
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._conn: Connection | None = None
        self._done = False
        self._eof = False
        self._written = 0
        self._last_active_s = 0.0
        self._last_buffered = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._conn = self._server.open_connection(transport.get_extra_info("peername"))
        self._live.add(self)
        # Backpressure for echo: pause_writing() above this stops reading.
        transport.set_write_buffer_limits(high=ECHO_HIGH_WATER_BYTES)
        self._last_active_s = self._loop.time()
        # One timer per idle period that re-arms itself from the last activity,
        # rather than cancelling and re-creating a timer for every chunk.
        self._timer = self._loop.call_at(
            self._last_active_s + self._server.config.idle_timeout_s, self._check_idle)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._conn is not None
        self._last_active_s = self._loop.time()
        reply = self._conn.on_data(self._view[:nbytes])
        if reply:
            # Copied: a transport may keep what it could not send yet, and the
            # view is overwritten by the next receive.
            self._write(bytes(reply))

    def eof_received(self) -> bool:
        assert self._conn is not None
        self._eof = True
        self._write(self._conn.on_eof())
        return False  # the transport closes once the trailer is flushed

    def pause_writing(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("eof" if exc is None and self._eof else "reset")

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._written += len(data)
        self._transport.write(data)

    def _check_idle(self) -> None:
        assert self._transport is not None
        now_s = self._loop.time()
        # The transport drains its buffer without telling the protocol; a
        # change since the last check means bytes moved.
        buffered = self._transport.get_write_buffer_size()
        if buffered != self._last_buffered:
            self._last_buffered = buffered
            self._last_active_s = now_s
        deadline_s = self._last_active_s + self._server.config.idle_timeout_s
        if now_s >= deadline_s:
            self.finish("idle")
        else:
            self._timer = self._loop.call_at(deadline_s, self._check_idle)

    def finish(self, closed_by: str) -> None:
        """Record the connection's end once; cut it unless the transport already closed.

        bytes_sent is what was written minus what the transport still holds.
        After a reset the transport has already dropped its buffer, so up to
        one write buffer (the echo high-water mark) may be counted as sent.
        """
        if self._done or self._conn is None or self._transport is None:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._live.discard(self)
        self._conn.on_sent(self._written - self._transport.get_write_buffer_size())
        if closed_by in ("idle", "shutdown"):
            self._transport.abort()
        self._server.close_connection(self._conn, closed_by)
