"""Round trips per second through one split ring between two processes, next to OS baselines.

The bench process plays the guest (it creates the guest RAM and the kick/call semaphores, as a
VMM does); a forked child plays the vhost backend. The guest posts a 64-byte buffer, the host
pops it, reads it and returns it on the used ring, the guest waits for the used entry and posts
again. `--depth` buffers are kept in flight (1 = strict ping-pong).

  suppression on   EVENT_IDX; guest: kick_prepare, disable_cb / get_buf / enable_cb;
                   host: disable_notify / get_vq_desc / enable_notify, signal()
  suppression off  no EVENT_IDX, no flags: the guest kicks every buffer, the host interrupts
                   for every buffer

Baselines in the same run: a socketpair ping-pong and a multiprocessing.Pipe ping-pong of
64-byte messages. Every waiter sleeps in doorbell.wait(timeout) in a loop so it notices
shutdown. Resources get names from resource_base() under a temporary run dir, are recorded in
an owner record before creation, and are unlinked at the end.

    python -m tools.bench_ring --seconds 2 --ring-size 256 --depth 16
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import socket
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PAYLOAD = 64
WAIT = 0.1            # doorbell wait timeout: how fast a waiter notices shutdown


# --- host side (child process) ------------------------------------------------------------------
def _host_main(shm_name, table, ring, kick_name, call_name, suppress, stop, conn):
    from host.vhost_vq import VhostVirtqueue
    from shared.doorbell import SemDoorbell
    from shared.memory import GuestMemory, MemoryRegion
    from shared.resources import attach_shm, close_shm

    shm = attach_shm(shm_name)
    kick, call = SemDoorbell(kick_name), SemDoorbell(call_name)
    base = memoryview(shm.buf)
    mem = GuestMemory([MemoryRegion(r["guest_phys_addr"], r["memory_size"],
                                    base[r["mmap_offset"]:r["mmap_offset"] + r["memory_size"]],
                                    r["userspace_addr"]) for r in table])
    base.release()
    h = VhostVirtqueue(0, "bench")
    h.num, h.desc, h.avail, h.used = ring
    h.event_idx = suppress
    handled = signals = wakeups = 0
    try:
        if not h.access_ok(mem):
            raise RuntimeError("ring not accessible")
        while not stop.is_set():
            if suppress:
                h.disable_notify(mem)
                while True:
                    c = h.get_vq_desc(mem)
                    if c is None:
                        if h.enable_notify(mem):      # raced in: keep going with kicks off
                            h.disable_notify(mem)
                            continue
                        break
                    bytes(c.out[0])                   # consume the payload
                    head = c.head
                    del c
                    h.add_used(mem, head, 0)
                    handled += 1
                    if h.signal(mem):
                        call.ring()
                        signals += 1
            else:
                while (c := h.get_vq_desc(mem)) is not None:
                    bytes(c.out[0])
                    head = c.head
                    del c
                    h.add_used(mem, head, 0)
                    handled += 1
                    call.ring()
                    signals += 1
            if kick.wait(WAIT):
                wakeups += 1
        conn.send({"handled": handled, "signals": signals, "wakeups": wakeups})
    except Exception as exc:   # report instead of dying with a traceback
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        h.unmap()
        mem.release()
        close_shm(shm)
        kick.close()
        call.close()


# --- guest side (this process) ------------------------------------------------------------------
def bench_ring(seconds: float, ring_size: int, depth: int, suppress: bool) -> dict:
    from guest.ram import GuestRAM
    from guest.virtqueue import VirtQueue
    from shared.doorbell import SemDoorbell
    from shared.resources import OwnerRecord, ensure_run_dir, resource_base

    run_dir = ensure_run_dir(Path(tempfile.mkdtemp(prefix="bench-ring-")))
    base = resource_base(run_dir)
    shm_name, kick_name, call_name = f"{base}-ram", f"/{base}-k0", f"/{base}-c0"
    rec = OwnerRecord(run_dir, "bench")
    rec.add(shm=[shm_name], sems=[kick_name, call_name])
    ctx = mp.get_context("fork")
    ram = vq = kick = call = child = None
    try:
        ram = GuestRAM(shm_name, 1 << 20)
        kick = SemDoorbell(kick_name, create=True)
        call = SemDoorbell(call_name, create=True)
        d, a, u = VirtQueue.alloc_rings(ram, ring_size)
        vq = VirtQueue(ram.mem, 0, ring_size, d, a, u, event_idx=suppress, name="bench")
        depth = max(1, min(depth, ring_size))
        bufs = [ram.alloc.alloc(PAYLOAD) for _ in range(depth)]
        for i, b in enumerate(bufs):
            ram.mem.write(b, bytes([i & 0xFF]) * PAYLOAD)
        stop = ctx.Event()
        parent_conn, child_conn = ctx.Pipe()
        child = ctx.Process(target=_host_main, name="bench-host",
                            args=(shm_name, ram.table, (ring_size, d, a, u), kick_name, call_name,
                                  suppress, stop, child_conn))
        child.start()
        kicks = interrupts = rt = 0
        for i, b in enumerate(bufs):
            vq.add_sgs([(b, PAYLOAD)], [], i)
        if not suppress or vq.kick_prepare():
            kick.ring()
            kicks += 1
        if suppress:
            vq.disable_cb()
        t0 = time.perf_counter()
        end = t0 + seconds
        now = t0
        while now < end:
            r = vq.get_buf()
            if r is None:
                if suppress and not vq.enable_cb():   # raced in: poll again, callbacks off
                    vq.disable_cb()
                    continue
                if call.wait(WAIT):
                    interrupts += 1
                if suppress:
                    vq.disable_cb()
                now = time.perf_counter()
                continue
            rt += 1
            i = r[0]
            vq.add_sgs([(bufs[i], PAYLOAD)], [], i)
            if not suppress or vq.kick_prepare():
                kick.ring()
                kicks += 1
            now = time.perf_counter()
        elapsed = now - t0
        stop.set()
        if not parent_conn.poll(10):
            raise RuntimeError("bench host did not report")
        host = parent_conn.recv()
        if "error" in host:
            raise RuntimeError(f"bench host failed: {host['error']}")
        if vq.broken:
            raise RuntimeError(f"ring broke: {vq.broken_reason}")
        return {"rt_s": rt / elapsed, "rt": rt, "kicks": kicks / max(rt, 1),
                "irqs": host["signals"] / max(host["handled"], 1),
                "guest_wakeups": interrupts / max(rt, 1)}
    finally:
        if child is not None:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join(5)
        if vq is not None:
            vq.close()
        if ram is not None:
            ram.close()
        for db in (kick, call):
            if db is not None:
                db.close()
        rec.release_all()
        shutil.rmtree(run_dir, ignore_errors=True)


# --- baselines ------------------------------------------------------------------------------------
def _sock_echo(sock):
    while True:
        m = sock.recv(PAYLOAD)
        if not m:
            return
        sock.sendall(m)


def _pipe_echo(conn):
    while True:
        m = conn.recv_bytes()
        if not m:
            return
        conn.send_bytes(m)


def _ping_pong(seconds: float, echo, a, b, one_round_trip, finish=None) -> dict:
    """Run `echo(b)` in a forked child and time `one_round_trip()` for `seconds`."""
    child = mp.get_context("fork").Process(target=echo, args=(b,), name=f"bench-{echo.__name__}")
    child.start()
    b.close()
    rt = 0
    try:
        t0 = now = time.perf_counter()
        end = t0 + seconds
        while now < end:
            one_round_trip()
            rt += 1
            now = time.perf_counter()
        if finish is not None:
            finish()
        return {"rt_s": rt / (now - t0), "rt": rt}
    finally:
        a.close()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()


def bench_socketpair(seconds: float) -> dict:
    a, b = socket.socketpair()
    msg = b"x" * PAYLOAD

    def one() -> None:
        a.sendall(msg)
        got = 0
        while got < PAYLOAD:
            got += len(a.recv(PAYLOAD - got))
    return _ping_pong(seconds, _sock_echo, a, b, one)


def bench_pipe(seconds: float) -> dict:
    a, b = mp.get_context("fork").Pipe()
    msg = b"x" * PAYLOAD

    def one() -> None:
        a.send_bytes(msg)
        a.recv_bytes()
    return _ping_pong(seconds, _pipe_echo, a, b, one, finish=lambda: a.send_bytes(b""))


# --- report ---------------------------------------------------------------------------------------
def render(rows: list[tuple[str, dict]], sock: float, pipe: float) -> Table:
    t = Table(title=f"split ring round trips ({PAYLOAD}-byte buffers) vs OS ping-pong")
    for col in ("scenario", "round trips/s", "µs/rt", "kicks/buf", "irqs/buf", "× socketpair",
                "× Pipe"):
        t.add_column(col, justify="left" if col == "scenario" else "right", no_wrap=True)
    for name, r in rows:
        t.add_row(name, f"{r['rt_s']:,.0f}", f"{1e6 / r['rt_s']:.1f}" if r["rt_s"] else "-",
                  f"{r['kicks']:.3f}" if "kicks" in r else "-",
                  f"{r['irqs']:.3f}" if "irqs" in r else "-",
                  f"{r['rt_s'] / sock:.2f}", f"{r['rt_s'] / pipe:.2f}")
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_ring", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Scenarios: ring with notification suppression on/off at "
                                       "depth 1 and at --depth, socketpair and Pipe ping-pong.")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per scenario (default 2)")
    p.add_argument("--ring-size", type=int, default=256, help="queue size N, a power of 2 (default 256)")
    p.add_argument("--depth", type=int, default=16,
                   help="buffers in flight for the pipelined ring rows (default 16; 1 = ping-pong only)")
    args = p.parse_args(argv)
    from shared.ring_layout import check_num
    try:
        check_num(args.ring_size)
    except ValueError as exc:
        p.error(str(exc))
    if args.seconds <= 0 or args.depth < 1:
        p.error("--seconds must be positive and --depth at least 1")
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 110))
    sock = bench_socketpair(args.seconds)
    pipe = bench_pipe(args.seconds)
    rows = [("socketpair ping-pong", sock), ("multiprocessing.Pipe ping-pong", pipe)]
    depths = [1] if args.depth == 1 else [1, args.depth]
    for depth in depths:
        for suppress in (True, False):
            r = bench_ring(args.seconds, args.ring_size, depth, suppress)
            rows.append((f"ring, depth {depth}, suppression {'on' if suppress else 'off'}", r))
    console.print(render(rows, sock["rt_s"], pipe["rt_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
