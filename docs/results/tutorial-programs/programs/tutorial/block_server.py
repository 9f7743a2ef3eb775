"""The tutorial's server, in Python 3: accept one client, recv(1024) until it closes.

    python3 block_server.py PORT
"""

import socket
import sys

port = int(sys.argv[1]) if len(sys.argv) > 1 else 1234

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", port))
sock.listen(5)

conn, addr = sock.accept()
print("Connected by", addr)
received = 0
while True:
    data = conn.recv(1024)
    if not data:
        break
    received += len(data)
print("All Data Received:", received, "bytes")
conn.close()
sock.close()
