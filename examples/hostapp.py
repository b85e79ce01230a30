"""A host program: runs once in each guest's device process (`python -m host --run
examples.hostapp:main`), the counterpart of an AF_VSOCK program on a Linux host.

It waits for the guest's device, connects to the guest's echo service (`--service echo=5000`
in the guest; retried while the guest is still starting it), sends a line and prints what came
back, one line on the host's standard output.
"""
from __future__ import annotations

import time

GUEST_ECHO_PORT = 5000


def main(vsock) -> None:
    if not vsock.wait_up(30):
        print(f"hostapp: the device of guest {vsock.guest_cid} never came up", flush=True)
        return
    end = time.monotonic() + 30
    while True:
        try:
            s = vsock.create_connection((vsock.guest_cid, GUEST_ECHO_PORT), timeout=10)
            break
        except ConnectionRefusedError:        # the guest starts its services after booting
            if time.monotonic() > end:
                print(f"hostapp: guest {vsock.guest_cid} has no echo service on port "
                      f"{GUEST_ECHO_PORT}", flush=True)
                return
            time.sleep(0.1)
    with s:
        msg = f"hello guest {vsock.guest_cid}, from the host".encode()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                break
            got += chunk
    print(f"hostapp: guest {vsock.guest_cid} echoed {got.decode(errors='replace')!r}", flush=True)
