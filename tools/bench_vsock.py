"""python -m tools.bench_vsock: one vsock stream's throughput, guest->host and host->guest, next to
socket.socketpair between two processes measured in the same run; kicks and interrupts per packet.

host->guest: a host program writes W-byte chunks into the bridge (`vsock-<cid>.sock`) to the
guest's discard service, half-closes, and the clock stops when the guest has consumed everything
(the connection closes). guest->host: a program inside the guest (tools.bench_apps:sender) writes
W-byte chunks to a host listener (`vsock-<cid>.sock_<P>`), which times what it receives.
A measurement, not a test: figures move 20-30 % between runs on a shared machine, so read the
ratio to the socketpair column.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from host.vsock.api import VsockHost
from shared.stats import read_all
from tools.launch import start, stop_all, wait_for_log
SIZES = [64, 4096, 65536, 1 << 20]
TOTAL = {64: 2 << 20, 4096: 32 << 20, 65536: 64 << 20, 1 << 20: 64 << 20}


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


def device_counters(run_dir: Path) -> dict:
    for d in read_all(run_dir):
        if d.get("role") == "device":
            return d.get("stats", {})
    return {}


def per_packet(c0: dict, c1: dict) -> tuple[float, float]:
    """Kicks and interrupts per packet (both directions) between two device stats snapshots."""
    d = {k: c1.get(k, 0) - c0.get(k, 0) for k in ("kicks", "interrupts", "rx_packets", "tx_packets")}
    pk = max(1, d["rx_packets"] + d["tx_packets"])
    return d["kicks"] / pk, d["interrupts"] / pk


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
    p = argparse.ArgumentParser(prog="python -m tools.bench_vsock", description=__doc__.splitlines()[0])
    p.add_argument("--credit-policy", choices=("every-read", "low-space"), default="every-read")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the bytes moved per size (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.scale <= 0:
        print("bench_vsock: --scale must be positive", file=sys.stderr)
        return 2
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="ve-bench-"))
    run_dir = tmp / "run"
    procs = []
    rows = []
    try:
        procs.append(start(["-m", "host", "--run-dir", str(run_dir), "--credit-policy", args.credit_policy],
                           tmp / "host.log"))
        if not wait_for_log(tmp / "host.log", "host listening", 20):
            console.print("host did not start")
            return 1
        listen_path = run_dir / "vsock-3.sock_7000"
        g2h: list = []
        srv = guest_to_host_listener(listen_path, g2h, len(SIZES))
        totals = {s: max(s, int(TOTAL[s] * args.scale) // s * s) for s in SIZES}
        procs.append(start(["-m", "guest", "--run-dir", str(run_dir), "--cid", "3", "--mem", "64M",
                            "--service", "discard=9", "--credit-policy", args.credit_policy,
                            "--run", "tools.bench_apps:sender"], tmp / "guest.log",
                           VE_BENCH_PORT="7000", VE_BENCH_GO=str(tmp / "go"),
                           VE_BENCH_PLAN=json.dumps([[s, totals[s]] for s in SIZES])))
        if not wait_for_log(tmp / "guest.log", "vsock device ready", 30):
            console.print("guest did not boot")
            return 1
        time.sleep(0.5)
        for size in SIZES:
            base = socketpair_mbps(size, totals[size])
            c0 = device_counters(run_dir)
            h2g = host_to_guest(run_dir, 3, size, totals[size])
            time.sleep(0.6)
            kicks, irqs = per_packet(c0, device_counters(run_dir))
            rows.append({"direction": "host->guest", "write": size, "MB/s": h2g, "socketpair MB/s": base,
                         "kicks/pkt": kicks, "irqs/pkt": irqs})
        # guest -> host: the guest app starts when the go file appears, one connection per size
        c0 = device_counters(run_dir)
        (tmp / "go").write_text("go")
        end = time.monotonic() + 300
        while len(g2h) < len(SIZES) and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(0.6)
        kicks, irqs = per_packet(c0, device_counters(run_dir))
        for size, (got, dt) in zip(SIZES, g2h):
            rows.append({"direction": "guest->host", "write": size, "MB/s": got / dt / 1e6,
                         "socketpair MB/s": socketpair_mbps(size, totals[size]),
                         "kicks/pkt": kicks, "irqs/pkt": irqs})
        srv.close()
    finally:
        stop_all(procs, 20)
        shutil.rmtree(tmp, ignore_errors=True)
    t = Table(title=f"one vsock stream vs socketpair (credit policy {args.credit_policy})")
    for col in ("direction", "write", "vsock MB/s", "socketpair MB/s", "ratio", "kicks/pkt", "irqs/pkt"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["direction"], str(r["write"]), f"{r['MB/s']:.1f}", f"{r['socketpair MB/s']:.1f}",
                  f"{r['MB/s'] / r['socketpair MB/s']:.3f}", f"{r['kicks/pkt']:.2f}", f"{r['irqs/pkt']:.2f}")
    console.print(t)
    console.print("kicks/irqs per packet count packets both ways (data and credit updates) on the device; "
                  "guest->host figures cover the whole guest->host phase")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
