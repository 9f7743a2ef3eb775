"""The connection driven by asyncio streams, and the loop that runs them all."""

from __future__ import annotations

import asyncio
from typing import Any

from ..sockcall import CallFailed, Expired, Limit, Sleep, Step, earliest
from .base import ConnBase, errno_name

class AsyncConn(ConnBase):
    """A connection driven by asyncio streams; time in drain() counts as blocked."""

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def _await(self, call: str, asked: int, awaitable: Any, limit: Limit | None) -> Any:
        """Await one stream operation, timed and traced; Expired once ``limit`` passes."""
        start = self.clock()
        returned, err = -1, "EOF"
        try:
            # asyncio.timeout, unlike wait_for, needs no extra task per call.
            async with asyncio.timeout(None if limit is None else max(0.0, limit.at_s - start)):
                result = await awaitable
            returned, err = (len(result) if isinstance(result, bytes) else 0), ""
            return result
        except OSError as exc:
            if isinstance(exc, TimeoutError) and exc.errno is None:
                err = "TIMEOUT"
                raise Expired(limit) from None
            err = errno_name(exc)
            raise CallFailed(call, exc) from exc
        finally:
            spent_s = self.clock() - start
            self._count(call, spent_s)
            self._record(start, call, asked, returned, err, spent_s)

    async def _connect_async(self, limit: Limit | None) -> None:
        sock = self._new_socket()
        sock.setblocking(False)
        await self._await("connect", 0, asyncio.get_running_loop().sock_connect(sock, self.settings.address),
                          limit)
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self._watch()

    def _connect_step(self, limit: Limit | None) -> Step:
        yield self._connect_async(limit)

    def send_payload(self, view: memoryview, chunk_bytes: int | None) -> Step:
        """write() each chunk and drain(); returns bytes the transport accepted."""
        self.bytes_requested += len(view)
        if self.expired is not None:
            return 0
        return (yield self._send_async(view, chunk_bytes))

    async def _send_async(self, view: memoryview, chunk_bytes: int | None) -> int:
        writer = self.writer
        sent = 0
        while sent < len(view):
            piece = view[sent:sent + chunk_bytes] if chunk_bytes else view[sent:]
            if self.first_send_at is None:
                self.first_send_at = self.clock()
            start = self.clock()
            writer.write(piece)
            spent_s = self.clock() - start
            self._count("write", spent_s)
            self._record(start, "write", len(piece), len(piece), "", spent_s)
            sent += len(piece)
            self.bytes_accepted += len(piece)
            try:
                await self._await("drain", writer.transport.get_write_buffer_size(), writer.drain(),
                                  self.settings.deadline)
            except Expired as exc:
                self._expire(exc.limit)
                break
        return sent

    def recv_exactly(self, nbytes: int) -> Step:
        """readexactly() an echo reply; returns what arrived before a limit passed."""
        if nbytes == 0 or self.expired is not None:
            return 0
        limit = earliest(self.settings.deadline, Limit(self.clock() + self.settings.eof_wait_s, "reply"))
        try:
            yield self._await("recv", nbytes, self.reader.readexactly(nbytes), limit)
        except Expired as exc:
            self._expire(exc.limit)
            return 0
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"the server closed the connection with {nbytes - len(exc.partial)} "
                                  "echo bytes still due") from None
        self.last_reply_at = self.clock()
        return nbytes

    def _shutdown_write(self) -> Step:
        # write_eof() shuts the socket down once the transport's buffer is flushed.
        start = self.clock()
        self.writer.write_eof()
        spent_s = self.clock() - start
        self._count("shutdown", spent_s)
        self._record(start, "shutdown", 0, 0, "", spent_s)
        yield from ()

    def _recv_step(self, nbytes: int, limit: Limit | None) -> Step:
        return (yield self._await("recv", nbytes, self.reader.read(nbytes), limit))

    def _close_socket(self) -> None:
        # Once the streams exist, the transport owns the socket.
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None
        else:
            super()._close_socket()


def run_asyncio(conns: list[AsyncConn], steps: list[Step]) -> None:
    """Drive every connection's generator on one asyncio event loop."""

    async def drive(conn: AsyncConn, work: Step) -> None:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                request = work.send(value) if error is None else work.throw(error)
            except StopIteration:
                return
            except Exception as exc:  # one connection's failure must not stop the others
                conn.fail(exc)
                return
            value, error = None, None
            try:
                if isinstance(request, Sleep):
                    await asyncio.sleep(max(0.0, request.until_s - conn.clock()))
                else:
                    value = await request
            except Exception as exc:
                error = exc

    async def drive_all() -> None:
        await asyncio.gather(*(drive(conn, work) for conn, work in zip(conns, steps)))

    asyncio.run(drive_all())
