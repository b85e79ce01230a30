"""python -m tools.wait_socket PATH: wait until a Unix socket at PATH accepts connections.

For scripts that start a host and a guest in the background and then talk to the guest's bridge
(README "Running it by hand"): the bridge socket <run-dir>/vsock-<cid>.sock appears only once the
guest's device is running (DRIVER_OK). Exit 0 when it is ready, 1 after --timeout, 2 on bad flags.

The probe connects and closes at once without a CONNECT line; the bridge drops such a connection
quietly (a CONNECT-less host program), and the guest sees nothing.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time

from shared.cli import add_version, prog_name, seconds


def ready(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog_name("tools.wait_socket"), description=__doc__.splitlines()[0])
    p.add_argument("path", help="the Unix socket, e.g. /tmp/ve/vsock-3.sock or /tmp/ve/control.sock")
    p.add_argument("--timeout", type=seconds, default=30.0, metavar="SECONDS", help="give up after this long (default 30)")
    add_version(p)
    args = p.parse_args(argv)
    end = time.monotonic() + args.timeout
    try:
        while not ready(args.path):
            if time.monotonic() >= end:
                print(f"wait_socket: {args.path} is not accepting connections after {args.timeout:g} s",
                      file=sys.stderr)
                return 1
            time.sleep(0.05)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
