"""A small threaded TCP server for socklab's program-role tests.

    python3 count_server.py CONNECTIONS [PORT [DELAY_S]]

Listens on 127.0.0.1 (PORT, default 0: an ephemeral one), prints "port N", and
serves CONNECTIONS connections, each in its own thread: waits DELAY_S (default
0; a peer's send buffer fills meanwhile), reads to EOF, answers with the number
of bytes it read, closes. Then exits 0.
"""

import socket
import sys
import threading
import time


def serve(conn: socket.socket, delay_s: float) -> None:
    time.sleep(delay_s)
    total = 0
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            total += len(data)
        conn.sendall(str(total).encode())


def main() -> None:
    count = int(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    delay_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    print("port", listener.getsockname()[1], flush=True)
    workers = []
    for _ in range(count):
        conn, _ = listener.accept()
        worker = threading.Thread(target=serve, args=(conn, delay_s))
        worker.start()
        workers.append(worker)
    for worker in workers:
        worker.join()
    listener.close()


if __name__ == "__main__":
    main()
