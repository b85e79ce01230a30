"""A guest program (`python -m guest --run examples.guestapp:main`): talks to the services the
host runs in the guest's device process (`python -m host --service echo=6000 --service sink=6001
--service source=6002`) at CID 2, and prints one line each on the guest's standard output.
"""
from __future__ import annotations

import time

HOST = 2                                  # VMADDR_CID_HOST
ECHO, SINK, SOURCE = 6000, 6001, 6002


def _connect(vsock, port: int):
    end = time.monotonic() + 30
    while True:
        try:
            return vsock.create_connection((HOST, port), timeout=10)
        except ConnectionRefusedError:        # the host's services start with the device
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def _read_all(s) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def main(vsock) -> None:
    try:
        with _connect(vsock, ECHO) as s:                 # echo: the bytes come back
            s.sendall(b"hello")
            print(f"guestapp: echo answered {s.recv(100)!r}", flush=True)
        with _connect(vsock, SINK) as s:                 # sink: counts until EOF, answers the count
            s.sendall(b"x" * 100_000)
            s.shutdown(1)                                # SHUT_WR: EOF to the sink
            print(f"guestapp: sink counted {_read_all(s).decode().strip()} bytes", flush=True)
        with _connect(vsock, SOURCE) as s:               # source: '<n> <write_size>' -> n bytes
            s.sendall(b"50000 4096\n")
            print(f"guestapp: source sent {len(_read_all(s))} bytes", flush=True)
    except OSError as e:
        print(f"guestapp: failed: {type(e).__name__}: {e}", flush=True)
