"""QEMU (TCG) + a real Linux guest through our vhost-user-vsock backend: boot-to-first-byte and
one stream's throughput each way at 64 KiB writes, next to the same run's socketpair.

    python -m tools.bench_vhost_user [--mib 8] [--json FILE]

Starts `python -m host --vhost-user` (DEBUG log kept: the session's message log) in a temp run
dir, boots QEMU with a scenario, and measures on the host side:
  first byte   QEMU start -> the guest's first vsock bytes reach a host listener (boot included)
  guest->host  `socat -b 65536 -u OPEN:/tmp/z VSOCK-CONNECT:2:5000` (an N-byte file) into a Unix
               listener on <run-dir>/vsock-3.sock_5000 (first byte to EOF)
  host->guest  64 KiB sendall()s through the bridge (CONNECT 9) into `socat -b 65536 -u
               VSOCK-LISTEN:9 OPEN:/dev/null` (first write to the guest's close)
TCG emulates the guest's CPU: these figures are the guest's, not the backend's ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import multiprocessing as mp
import threading

from host.vsock.api import VsockHost
from tools.linux_guest import QemuGuest, ensure_guest, qemu_vsock_cmd, scenario_initrd
from shared.cli import add_version

SCENARIO = r"""
echo first | socat -t 10 - VSOCK-CONNECT:2:4999
socat -b 65536 -u VSOCK-LISTEN:9 OPEN:/dev/null &
L=$!
sleep 1
echo H2G-READY
wait $L
head -c {total} /dev/zero > /tmp/z
socat -b 65536 -u OPEN:/tmp/z VSOCK-CONNECT:2:5000
echo G2H-DONE
"""



# --- measuring helpers (a socketpair baseline, a bridged stream each way) -----------------
def _sp_writer(sock: socket.socket, size: int, total: int) -> None:
    buf = b"x" * size
    for _ in range(total // size):
        sock.sendall(buf)
    sock.close()


def socketpair_mbps(size: int, total: int) -> float:
    a, b = socket.socketpair()
    p = mp.get_context("fork").Process(target=_sp_writer, args=(a, size, total))
    t0 = time.perf_counter()
    p.start()
    a.close()
    got, buf = 0, bytearray(1 << 20)
    while got < total:
        n = b.recv_into(buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    p.join()
    b.close()
    return got / dt / 1e6

def host_to_guest(run_dir: Path, cid: int, size: int, total: int) -> float:
    s = VsockHost(run_dir).connect(cid, 9, timeout=10)
    buf = b"y" * size
    t0 = time.perf_counter()
    for _ in range(total // size):
        s.sendall(buf)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(120)
    while s.recv(65536):
        pass
    dt = time.perf_counter() - t0
    s.close()
    return total / dt / 1e6


def guest_to_host_listener(path: Path, results: list, count: int) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def loop() -> None:
        buf = bytearray(1 << 20)
        for _ in range(count):
            try:
                c, _ = srv.accept()
            except OSError:
                return
            got, t0 = 0, None
            while True:
                n = c.recv_into(buf)
                if t0 is None:
                    t0 = time.perf_counter()
                if not n:
                    break
                got += n
            results.append((got, time.perf_counter() - t0))
            c.close()
    threading.Thread(target=loop, daemon=True).start()
    return srv




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_vhost_user")
    add_version(p)
    p.add_argument("--mib", type=int, default=8, help="MiB per direction (default 8)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="copy the host log and serial log here")
    a = p.parse_args(argv)
    total = a.mib << 20
    g = ensure_guest()
    base = Path(tempfile.mkdtemp(prefix="ve-bench-vu-"))
    run = base / "run"
    run.mkdir(mode=0o700)
    sock = base / "vu.sock"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    log = open(base / "host.log", "wb")
    host = subprocess.Popen([sys.executable, "-m", "host", "--vhost-user", str(sock), "--cid", "3",
                             "--run-dir", str(run), "--log-level", "DEBUG"], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    guest = None
    try:
        end = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < end:
            time.sleep(0.05)
        first: list = []
        l1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        l1.bind(str(run / "vsock-3.sock_4999"))
        l1.listen(1)
        g2h: list = []
        l2 = guest_to_host_listener(run / "vsock-3.sock_5000", g2h, 1)
        initrd = scenario_initrd(g, SCENARIO.format(total=total), base / "initrd.gz")
        load = os.getloadavg()
        guest = QemuGuest(qemu_vsock_cmd(g, initrd, sock), base / "serial.log")
        l1.settimeout(300)
        c, _ = l1.accept()
        c.recv(16)
        first_byte = time.monotonic() - guest.t0
        c.close()
        booted = guest.wait_for("VE-BOOTED", 10)[0]
        guest.wait_for("H2G-READY", 120)
        h2g = host_to_guest(run, 3, 65536, total)
        guest.wait_for("G2H-DONE", 600)
        got, dt = g2h[0]
        assert got == total, f"guest->host got {got} of {total} bytes"
        sp = socketpair_mbps(65536, 64 << 20)
        rows = {"first_byte_s": round(first_byte, 2), "boot_marker_s": round(booted, 2),
                "h2g_MBps": round(h2g, 2), "g2h_MBps": round(total / dt / 1e6, 2),
                "socketpair_MBps": round(sp, 1), "mib": a.mib, "loadavg_before": load,
                "loadavg_after": os.getloadavg()}
        print(json.dumps(rows, indent=1))
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))
        guest.wait(60)
        l1.close()
        l2.close()
    finally:
        if guest is not None:
            guest.kill()
        host.terminate()
        host.wait(15)
        log.close()
        if a.keep:
            a.keep.mkdir(parents=True, exist_ok=True)
            for f in ("host.log", "serial.log"):
                if (base / f).exists():
                    shutil.copy(base / f, a.keep / f)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
