"""The least an asyncio program does to hold a connection: the scale benchmark's reference.

    python3 hold_asyncio.py PORT BACKLOG [HOST]

A Protocol that does nothing (its transport closes on the peer's EOF). Runs
until killed. Stdlib only, passed on the command line like hold_epoll.py.
"""

import asyncio
import sys


async def main(port, backlog, host="0.0.0.0"):
    loop = asyncio.get_running_loop()
    await loop.create_server(asyncio.Protocol, host, port, backlog=backlog)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4]))
