"""Round trips through one ring, split or packed, between two processes (the bench's "ring"
scenario).

The bench process plays the guest (it creates the guest RAM and the kick/call semaphores, as a
VMM does); a forked child plays the vhost backend. The guest posts a 64-byte buffer, the host
pops it, reads it and returns it on the used ring, the guest waits for the used entry and posts
again. `depth` buffers are kept in flight (1 = strict ping-pong).

  suppression on   EVENT_IDX; guest: kick_prepare, disable_cb / get_buf / enable_cb;
                   host: disable_notify / get_vq_desc / enable_notify, signal()
  suppression off  no EVENT_IDX, no flags: the guest kicks every buffer, the host interrupts
                   for every buffer

Every waiter sleeps in doorbell.wait(timeout) in a loop so it notices shutdown. Resources get
names from resource_base() under a temporary run dir, are recorded in an owner record before
creation, and are unlinked at the end.
"""
from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

PAYLOAD = 64
WAIT = 0.1            # doorbell wait timeout: how fast a waiter notices shutdown


# --- host side (child process) ------------------------------------------------------------------
def _host_main(shm_name, table, ring, kick_name, call_name, suppress, stop, conn, packed=False):
    from host.vhost_vq import VhostVirtqueue
    from host.vhost_vq_packed import VhostVirtqueuePacked
    from shared.doorbell import SemDoorbell
    from shared.memory import GuestMemory, MemoryRegion
    from shared.resources import attach_shm, close_shm

    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the bench ends its children itself
    shm = attach_shm(shm_name)
    kick, call = SemDoorbell(kick_name), SemDoorbell(call_name)
    base = memoryview(shm.buf)
    mem = GuestMemory([MemoryRegion(r["guest_phys_addr"], r["memory_size"],
                                    base[r["mmap_offset"]:r["mmap_offset"] + r["memory_size"]],
                                    r["userspace_addr"]) for r in table])
    base.release()
    h = (VhostVirtqueuePacked if packed else VhostVirtqueue)(0, "bench")
    h.num, h.desc, h.avail, h.used = ring
    h.event_idx = suppress
    if packed:
        h.last_avail_idx = h.last_used_idx = 0x8000     # slot 0, wrap counters 1
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
def bench_ring(seconds: float, ring_size: int, depth: int, suppress: bool, packed: bool = False) -> dict:
    from guest.ram import GuestRAM
    from guest.virtqueue import VirtQueue
    from guest.virtqueue_packed import VirtQueuePacked
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
        cls = VirtQueuePacked if packed else VirtQueue
        d, a, u = cls.alloc_rings(ram, ring_size)
        vq = cls(ram.mem, 0, ring_size, d, a, u, event_idx=suppress, name="bench")
        depth = max(1, min(depth, ring_size))
        bufs = [ram.alloc.alloc(PAYLOAD) for _ in range(depth)]
        for i, b in enumerate(bufs):
            ram.mem.write(b, bytes([i & 0xFF]) * PAYLOAD)
        stop = ctx.Event()
        parent_conn, child_conn = ctx.Pipe()
        child = ctx.Process(target=_host_main, name="bench-host",
                            args=(shm_name, ram.table, (ring_size, d, a, u), kick_name, call_name,
                                  suppress, stop, child_conn, packed))
        child.start()
        kicks = interrupts = rt = 0
        for i, b in enumerate(bufs):
            vq.add_sgs([(b, PAYLOAD)], [], i)
        if not suppress or vq.kick_prepare():
            kick.ring()                # priming, before the clock: not a round trip's kick
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
