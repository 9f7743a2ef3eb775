"""The tutorial's non-blocking client, in Python 3: one send(), whatever it takes.

    python3 non_blocking_client.py HOST PORT

On a non-blocking socket send() copies what fits into the send buffer and returns
at once with that count; the rest is never sent, since the program does not try
again. It exits at once, leaving the kernel to deliver what send() accepted.
"""

import socket
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.connect((host, port))
sock.setblocking(0)

data = ("Hello Python\n" * 10 * 1024 * 1024).encode()
started = time.time()
try:
    sent = sock.send(data)
except BlockingIOError:
    sent = 0
print(f"send() returned {sent} of {len(data)} bytes after {time.time() - started:.4f} s")
# No close() and no wait: the program ends here with its send buffer still full.
