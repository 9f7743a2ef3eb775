"""The yardstick for the echo benchmark: a minimal asyncio echo server, stdlib only.

    python3 reference_echo.py [PORT]

What anyone would write first with asyncio: a Protocol whose data_received
writes the bytes straight back, on the default event loop. The one addition is
the lab protocol's ending (services/socklab/protocol.py), without which the
lab's client would not accept the run: after the peer's EOF, one trailer line
with the count of bytes received, then close. It runs until killed.
"""

import asyncio
import sys


def trailer(bytes_received):
    """The lab protocol's trailer: ``SOCKLAB-RCVD <count>\\n``."""
    return b"SOCKLAB-RCVD %d\n" % bytes_received


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.received = 0

    def data_received(self, data):
        self.received += len(data)
        self.transport.write(data)

    def eof_received(self):
        self.transport.write(trailer(self.received))
        return False  # the transport closes once the trailer is flushed


async def main(port):
    # Room for the benchmark's 1,000 simultaneous connects, as the lab server is given.
    server = await asyncio.get_running_loop().create_server(Echo, "0.0.0.0", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
