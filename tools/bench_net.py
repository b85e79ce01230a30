"""vhost-net throughput: frames per second through real host and guest processes, next to two
plain Python processes sending the same frames over a UDP socket pair in the same run.

    guest->backend   a guest on udp:L:R blasts frames; this process counts datagrams on R
    backend->guest   this process sends datagrams to L; the guest's driver counts frames
    guest->guest     two guests on the L2 segment; one blasts, the other counts
    baseline         a sender process and a receiver process over UDP on 127.0.0.1

Rates are frames received divided by first-to-last receive time (UDP may drop: loss is shown).
Kicks + interrupts per frame are the guest driver's kicks and interrupt callbacks on the sending
(tx) or receiving (rx) guest, over the frames it handled.

    python -m tools.bench_net [--frames N] [--sizes 64,1500]
`bench_net(frames, sizes)` returns the rows (dicts) for tools.bench.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from tools.launch import free_udp_port, start, stop_all, wait_for_log
from shared.cli import add_version


def _count(sock: socket.socket, count: int, idle: float = 1.0) -> tuple[int, float]:
    """Receive until `count` datagrams or `idle` seconds without one: (received, first-to-last s)."""
    sock.settimeout(idle)
    n, first, last = 0, None, None
    while n < count:
        try:
            sock.recv(65536)
        except socket.timeout:
            if first is not None:
                break
            sock.settimeout(20)
            continue
        last = time.perf_counter()
        first = first or last
        n += 1
        sock.settimeout(idle)
    return n, (last - first) if first and last else 0.0


def _udp_receiver(port: int, count: int, q) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind(("127.0.0.1", port))
    q.put("ready")
    q.put(_count(s, count))


def _udp_sender(port: int, size: int, count: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    frame = b"\xff" * 12 + b"\x88\xb5" + b"b" * (size - 14)
    for _ in range(count):
        s.send(frame)


def baseline_fps(size: int, count: int) -> tuple[float, float]:
    """Two plain Python processes over a UDP socket pair: (frames/s received, loss fraction)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = free_udp_port()
    r = ctx.Process(target=_udp_receiver, args=(port, count, q))
    r.start()
    q.get(timeout=10)
    s = ctx.Process(target=_udp_sender, args=(port, size, count))
    s.start()
    s.join(120)
    n, dt = q.get(timeout=120)
    r.join(10)
    return (n / dt if dt else 0.0), 1 - n / count


class _Guest:
    def __init__(self, proc, bench_dir: Path):
        self.proc, self.dir, self.phase = proc, bench_dir, 0

    def go(self) -> int:
        (self.dir / f"go-{self.phase}").touch()
        self.phase += 1
        return self.phase - 1

    def done(self, i: int, timeout: float = 60) -> dict:
        p = self.dir / f"done-{i}"
        end = time.monotonic() + timeout
        while not p.exists():
            if time.monotonic() > end:
                raise TimeoutError(f"guest phase {i} did not finish")
            time.sleep(0.01)
        return json.loads(p.read_text())


def bench_net(frames: int = 20000, sizes=(64, 1500)) -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix="ve-bench-net-"))
    run_dir = base / "run"
    procs = []
    rows: list[dict] = []
    try:
        procs.append(start(["-m", "host", "--run-dir", str(run_dir), "--log-level", "WARNING"], base / "host.log"))
        end = time.monotonic() + 20
        while not (run_dir / "control.sock").exists() and time.monotonic() < end:
            time.sleep(0.05)
        lport, rport = free_udp_port(), free_udp_port()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        peer.bind(("127.0.0.1", rport))

        def guest(name, spec, plan, *extra, **env):
            d = base / name
            d.mkdir()
            log = base / f"{name}.log"
            procs.append(start(["-m", "guest", "--run-dir", str(run_dir), "--name", name, "--mem", "32M",
                                "--queue-size", "256", "--net", spec, "--net-run", "tools.bench_apps:net_bench", *extra],
                               log, VE_BENCH_DIR=str(d), VE_BENCH_PLAN=json.dumps(plan), **env))
            if not wait_for_log(log, "virtio-net:", 30):
                raise RuntimeError(f"guest {name} did not boot: {log.read_text()[-500:]}")
            return _Guest(procs[-1], d)

        plan_a = [[k, s, frames] for s in sizes for k in ("tx", "rx")]
        a = guest("a", f"udp:{lport}:{rport}", plan_a)
        seg_plan_tx = [["tx", s, frames] for s in sizes]
        seg_plan_rx = [["rx", s, frames] for s in sizes]
        b = guest("b", "segment:bench", seg_plan_tx, "--mac", "52:54:00:be:00:0b", VE_BENCH_DST="525400be000c")
        c = guest("c", "segment:bench", seg_plan_rx, "--mac", "52:54:00:be:00:0c")
        for size in sizes:
            bfps, bloss = baseline_fps(size, frames)
            # guest -> backend
            i = a.go()
            n, dt = _count(peer, frames)
            r = a.done(i)
            rows.append(_row("guest->backend (udp)", size, n, dt, frames, r, bfps, bloss))
            # backend -> guest
            i = a.go()
            frame = b"\xff" * 12 + b"\x88\xb5" + b"b" * (size - 14)
            time.sleep(0.05)
            for _ in range(frames):
                peer.sendto(frame, ("127.0.0.1", lport))   # the guest's socket takes only its peer
            r = a.done(i)
            rows.append(_row("backend->guest (udp)", size, r["count"], r["elapsed"], frames, r, bfps, bloss))
            # guest -> guest over the segment
            ic = c.go()
            time.sleep(0.2)                           # c announces itself; b's switch port learns
            ib = b.go()
            rb, rc = b.done(ib), c.done(ic)
            rows.append(_row("guest->guest (segment)", size, rc["count"], rc["elapsed"], frames,
                             {"kicks": rb["kicks"] + rc["kicks"],
                              "interrupts": rb["interrupts"] + rc["interrupts"]}, bfps, bloss, per=2))
        peer.close()
    except BaseException:
        for log in sorted(base.glob("*.log")):
            print(f"--- {log.name}\n" + log.read_text(errors="replace")[-1500:], file=sys.stderr)
        raise
    finally:
        stop_all(procs)
        shutil.rmtree(base, ignore_errors=True)
    return rows


def _row(path, size, n, dt, sent, r, bfps, bloss, per=1) -> dict:
    fps = n / dt if dt else 0.0
    return {"path": path, "size": size, "frames": n, "sent": sent, "loss": 1 - n / sent,
            "fps": fps, "baseline_fps": bfps, "baseline_loss": bloss,
            "ratio": fps / bfps if bfps else 0.0,
            "kicks_irqs_per_frame": (r.get("kicks", 0) + r.get("interrupts", 0)) / max(1, n) / per}


def render(rows: list[dict]):
    from rich.table import Table
    t = Table(title="vhost-net frames/s vs two Python processes over UDP (same run)")
    for c in ("path", "size", "frames/s", "loss", "UDP pair frames/s", "ratio", "kicks+irqs/frame"):
        t.add_column(c, justify="right" if c != "path" else "left")
    for r in rows:
        t.add_row(r["path"], str(r["size"]), f"{r['fps']:,.0f}", f"{r['loss']:.1%}",
                  f"{r['baseline_fps']:,.0f}", f"{r['ratio']:.2f}", f"{r['kicks_irqs_per_frame']:.3f}")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_net", description=__doc__.split("\n\n")[0])
    add_version(p)
    p.add_argument("--frames", type=int, default=20000, help="frames per measurement (default 20000)")
    p.add_argument("--sizes", default="64,1500", help="frame sizes in bytes, comma-separated")
    a = p.parse_args(argv)
    try:
        sizes = [int(x) for x in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes {a.sizes!r}: want numbers like 64,1500")
    if any(not 60 <= s <= 1514 for s in sizes) or a.frames < 1:
        p.error("sizes must be 60..1514 bytes and --frames positive")
    from rich.console import Console
    rows = bench_net(a.frames, sizes)
    Console().print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
