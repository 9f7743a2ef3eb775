"""A small TCP client for socklab's program-role tests.

    python3 send_client.py PORT BYTES

Two connections to 127.0.0.1:PORT. The first: a blocking connect and one
sendall() of BYTES. The second: the tutorial's non-blocking socket, connect_ex
(EINPROGRESS), select() until it is writable, one send() of BYTES (whatever it
accepts), one more send() (EAGAIN when the buffer is full), then blocking
again for the rest. Each ends with shutdown(SHUT_WR) and reads the server's
answer (the bytes it received), printed as "answer N".
"""

import select
import socket
import sys


def finish(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        data = sock.recv(100)
        if not data:
            break
        answer += data
    print("answer", answer.decode(), flush=True)
    sock.close()


def main() -> None:
    port, size = int(sys.argv[1]), int(sys.argv[2])
    payload = b"Hello Python\n" * (size // 13) + b"x" * (size % 13)

    first = socket.create_connection(("127.0.0.1", port))
    first.sendall(payload)
    finish(first)

    second = socket.socket()
    second.setblocking(False)
    second.connect_ex(("127.0.0.1", port))
    select.select([], [second], [], 5)
    sent = second.send(payload)
    print("send returned", sent, flush=True)
    if sent < size:
        try:
            sent += second.send(payload[sent:])
        except BlockingIOError:
            print("EAGAIN", flush=True)
    second.setblocking(True)
    second.sendall(payload[sent:])
    finish(second)


if __name__ == "__main__":
    main()
