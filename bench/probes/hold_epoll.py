"""The least a stdlib epoll program does to hold a connection: the scale benchmark's reference.

    python3 hold_epoll.py PORT BACKLOG [HOST]

Accepts each connection, registers it, keeps the socket object; closes a
connection on its EOF. Runs until killed. Stdlib only: it runs in the lab's
image, passed on the command line (``python3 -c SOURCE PORT BACKLOG``).
"""

import select
import socket
import sys


def main(port, backlog, host="0.0.0.0"):
    listener = socket.create_server((host, port), backlog=backlog)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    held = {}
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _ = listener.accept()
                    except OSError:
                        break
                    sock.setblocking(False)
                    poller.register(sock.fileno(), select.EPOLLIN)
                    held[sock.fileno()] = sock
            else:
                poller.unregister(fd)
                held.pop(fd).close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4])
