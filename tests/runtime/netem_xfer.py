"""Bounded TCP transfer: `xfer.py serve PORT NBYTES` prints recv seconds; `xfer.py send ADDR PORT NBYTES`."""

import socket
import sys
import time

mode = sys.argv[1]
if mode == "serve":
    port, n = int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    got = 0
    t0 = None
    buf = bytearray(1 << 20)
    while got < n:
        k = c.recv_into(buf)
        if k == 0:
            break
        if t0 is None:
            t0 = time.perf_counter()
        got += k
    print(got, time.perf_counter() - t0, flush=True)
else:
    addr, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for _ in range(100):
        try:
            c = socket.create_connection((addr, port))
            break
        except OSError:
            time.sleep(0.05)
    data = b"x" * (1 << 20)
    sent = 0
    while sent < n:
        sent += c.send(data[: min(len(data), n - sent)])
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
