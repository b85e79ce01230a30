"""Issue 8 item 8: a hostile guest advertises a 4 GiB buf_alloc and never consumes rx while a host
program pumps into the bridge; how much does the device process grow?

    python -m tests.abuse_rss [--seconds 6]      # prints idle and peak VmHWM of the device process

Used by tests/test_abuse.py (marked slow). Peak RSS is /proc/<pid>/status VmHWM (the kernel's
high-water mark, so nothing between two samples is missed).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.procs import Cluster  # noqa: E402

PORT = 7070


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def device_pid(host_pid: int) -> int:
    with open(f"/proc/{host_pid}/task/{host_pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    assert len(kids) == 1, kids
    return kids[0]


def measure(run_dir: Path, seconds: float = 6.0) -> dict:
    out = run_dir.parent / "app.out"
    c = Cluster(run_dir)
    saved = {k: os.environ.get(k) for k in ("VE_APP_OUT", "VE_APP_PORT")}
    os.environ.update(VE_APP_OUT=str(out), VE_APP_PORT=str(PORT))   # read by the guest program
    try:
        host = c.host()
        c.guest(3, "--buf-size", "4294967295", "--run", "tests.guest_apps:hoarder")
        dev = device_pid(host.pid)
        idle = vm_kib(dev, "VmHWM")
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        u.connect(str(run_dir / "vsock-3.sock"))
        u.sendall(f"CONNECT {PORT}\n".encode())
        u.settimeout(10)
        reply = b""
        while not reply.endswith(b"\n"):
            reply += u.recv(64)
        end = time.monotonic() + 10
        while not (out.exists() and "accepted" in out.read_text()) and time.monotonic() < end:
            time.sleep(0.05)
        u.setblocking(False)
        chunk = b"x" * (1 << 20)
        sent = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sent += u.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        peak = vm_kib(dev, "VmHWM")
        alive = host.p.poll() is None and os.path.exists(f"/proc/{dev}")
        u.close()
        return {"idle_kib": idle, "peak_kib": peak, "growth_mib": (peak - idle) / 1024,
                "pumped_mib": sent / (1 << 20), "seconds": seconds, "reply": reply.decode().strip(),
                "device_alive": alive, "app": out.read_text() if out.exists() else ""}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.abuse_rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ve-abuse-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir(mode=0o700)
        print(json.dumps(measure(run_dir, args.seconds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
