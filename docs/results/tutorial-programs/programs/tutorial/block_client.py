"""The tutorial's blocking client, in Python 3: one send() of "Hello Python\n" x 10 Mi.

    python3 block_client.py HOST PORT

A blocking send() returns only once the kernel has taken all 136,314,880 bytes:
the program sleeps whenever the send buffer is full, as long as the link needs.
"""

import socket
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.connect((host, port))

data = ("Hello Python\n" * 10 * 1024 * 1024).encode()
started = time.time()
sent = sock.send(data)
print(f"send() returned {sent} of {len(data)} bytes after {time.time() - started:.2f} s")
sock.close()
