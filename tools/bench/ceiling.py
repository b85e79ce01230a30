"""The bare-ring ceiling (issue 15, item 6): a virtio-shaped vsock stream between two processes
with nothing but the ring, measured in the same run as the socketpair baseline.

What every vsock figure is held against: how fast plain CPython moves vsock packets through a
real split ring when no sockets layer, no credit, no engine and no extra thread stand in the way.
Two forked processes, "guest" (the driver) and "device" (the vhost side), share one segment of
guest RAM holding the queues and the buffers, and two named semaphores per queue (kick, call).
Each process does its own ring work in its only thread (run to completion).

  layout     split rings of NUM = 256 descriptors as virtio 1.x 2.7 (shared/ring_layout.py,
             legacy vring_init with 4 KiB alignment), queue q at q * RING_STRIDE, then the
             buffers: NUM slots per queue of one 44-byte header + up to 64 KiB payload
             (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE), one descriptor per packet
  packets    struct virtio_vsock_hdr (shared/vsock/packet.py HDR) packed by the sender and
             unpacked (copied out) by the receiver, which checks op RW, type STREAM and that
             hdr.len matches the buffer
  checks     the device checks every avail head (< NUM), how far avail.idx moved (<= NUM), every
             descriptor's flags (no NEXT, no INDIRECT; WRITE only on rx) and that [addr, addr+len)
             lies in the buffer area (vhost translate_desc); the driver checks every used id (< NUM
             and in flight) and used len (vring_get_buf / detach_buf)
  indices    written with one aligned 16-bit store (memoryview.cast('H')), once per batch, after
             the entries they publish
  notify     EVENT_IDX: a side about to sleep stores its event field (avail_event / used_event),
             issues a full barrier (shared/barrier.mb) and re-checks the index before sleeping; the
             other side posts the semaphore only when vring_need_event says the publish crossed
             that event (virtqueue_kick_prepare, vhost_notify). The sender of a g2h stream asks to
             be woken when 3/4 of its in-flight buffers are used (virtqueue_enable_cb_delayed).
  receive    the receiver copies each payload into an application buffer (what recv_into does);
             the sender copies each write from its application buffer into guest RAM

Streams: `stream(direction, size, total)`, direction "g2h" (guest tx queue, the device
consumes) or "h2g" (guest posts 64 KiB rx buffers, the device fills them). `size` is bytes per
application write: 1 MiB is sixteen 64 KiB packets under one index publish, 64 B one 108-byte
packet per publish. The receiver times from the go to the last byte, as baselines.stream does.
Round trips: `rr(size, seconds)`, 64 B on the tx queue echoed back on the rx queue.

Resources are named by shared.resources.resource_base under a temporary run dir, recorded in an
owner record before creation and unlinked at the end (also when a child failed).
"""
from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

from shared.barrier import mb
from shared.constants import (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_TYPE_STREAM,
                              VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE)
from shared.ring_layout import (DESC, USED_ELEM, align_up, avail_event_addr, avail_idx_addr, avail_ring_addr,
                                used_elem_addr, used_event_addr, used_idx_addr, vring_init,
                                vring_need_event, vring_size)
from shared.vsock.packet import HDR, HDR_SIZE

NUM = 256
MASK = NUM - 1
ALIGN = 4096
PKT = VIRTIO_VSOCK_MAX_PKT_BUF_SIZE
RING_STRIDE = align_up(vring_size(NUM, ALIGN), ALIGN)
GUEST_CID, HOST_CID, GUEST_PORT, HOST_PORT = 3, 2, 1024, 5002
BUF_ALLOC = 256 * 1024
WAIT = 0.1            # semaphore wait timeout: how often a sleeper looks at the stop word
STALL = 30.0          # seconds without progress before a side gives up
CTX = mp.get_context("fork")
BAD_FLAGS_TX = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE
BAD_FLAGS_RX = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT


class RingError(RuntimeError):
    """A check failed: the peer broke the ring protocol (never expected from our own peer)."""


def layout(nq: int, payload: int) -> tuple[int, int, int]:
    """(buffer area offset, slot size, segment size) for `nq` queues of `payload`-byte slots."""
    slot = align_up(HDR_SIZE + payload, 64)
    buf_base = align_up(nq * RING_STRIDE + 64, ALIGN)     # + a control word area after the rings
    return buf_base, slot, buf_base + nq * NUM * slot


class Vq:
    """One queue's fields in guest RAM, as aligned 16-bit views (the index and event stores)."""

    def __init__(self, ram: memoryview, q: int):
        a = vring_init(NUM, q * RING_STRIDE, ALIGN)
        self.desc = a.desc
        self.used_ring = used_elem_addr(a.used, 0)
        self.avail_idx = ram[avail_idx_addr(a.avail):avail_idx_addr(a.avail) + 2].cast("H")
        self.avail_ring = ram[avail_ring_addr(a.avail, 0):avail_ring_addr(a.avail, NUM)].cast("H")
        ue = used_event_addr(a.avail, NUM)
        self.used_event = ram[ue:ue + 2].cast("H")
        self.used_idx = ram[used_idx_addr(a.used):used_idx_addr(a.used) + 2].cast("H")
        ae = avail_event_addr(a.used, NUM)
        self.avail_event = ram[ae:ae + 2].cast("H")

    def release(self) -> None:
        for v in (self.avail_idx, self.avail_ring, self.used_event, self.used_idx, self.avail_event):
            v.release()


class _Side:
    """What a child attaches to: guest RAM, its queues, their doorbells, the stop word."""

    def __init__(self, shm_name: str, sems: list[tuple[str, str]], nq: int, payload: int):
        from shared.doorbell import SemDoorbell
        from shared.resources import attach_shm
        self.shm = attach_shm(shm_name)
        self.ram = memoryview(self.shm.buf)
        self.buf_base, self.slot, self.size = layout(nq, payload)
        self.vqs = [Vq(self.ram, q) for q in range(nq)]
        self.kicks = [SemDoorbell(k) for k, _ in sems]
        self.calls = [SemDoorbell(c) for _, c in sems]
        ctl = nq * RING_STRIDE
        self.ctl = self.ram[ctl:ctl + 4].cast("I")          # [0]: stop (the rr guest sets it)
        self.n = {"kicks": 0, "interrupts": 0, "wakeups": 0, "packets": 0}

    def close(self) -> None:
        from shared.resources import close_shm
        for v in self.vqs:
            v.release()
        self.ctl.release()
        self.ram.release()
        close_shm(self.shm)
        for d in self.kicks + self.calls:
            d.close()


def _sleep(idx: memoryview, last: int, event: memoryview, event_val: int, bell, side: _Side, what: str) -> None:
    """Wait until idx[0] != last: store the event field, barrier, re-check, then sleep on the
    doorbell (vhost_enable_notify / virtqueue_enable_cb). Gives up after STALL seconds or on stop."""
    end = time.monotonic() + STALL
    while True:
        event[0] = event_val
        mb()
        if idx[0] != last or side.ctl[0]:
            return
        if bell.wait(WAIT):
            side.n["wakeups"] += 1
        if idx[0] != last or side.ctl[0]:
            return
        if time.monotonic() > end:
            raise RingError(f"no progress on {what} for {STALL:.0f} s")


# --- g2h: the guest's tx queue ------------------------------------------------------------------
def _g2h_guest(s: _Side, size: int, total: int) -> None:
    vq, kick, call, ram = s.vqs[0], s.kicks[0], s.calls[0], s.ram
    avail_idx, avail_ring, used_idx, used_event, avail_event = (vq.avail_idx, vq.avail_ring, vq.used_idx,
                                                                 vq.used_event, vq.avail_event)
    desc, used_ring, buf_base, slot = vq.desc, vq.used_ring, s.buf_base, s.slot
    hdr_pack, desc_pack, used_unpack = HDR.pack_into, DESC.pack_into, USED_ELEM.unpack_from
    free = list(range(NUM))
    inflight = [False] * NUM
    src = memoryview(b"z" * size)
    aidx = published = last_used = 0
    kicks = packets = 0
    for _ in range(total // size):
        off = 0
        while off < size:
            if not free:
                if aidx != published:                       # publish what is queued before waiting
                    avail_idx[0] = aidx
                    mb()
                    if vring_need_event(avail_event[0], aidx, published):
                        kick.ring()
                        kicks += 1
                    published = aidx
                while used_idx[0] == last_used:
                    # virtqueue_enable_cb_delayed: an interrupt once 3/4 of what is out is used
                    _sleep(used_idx, last_used, used_event, (last_used + (NUM - len(free)) * 3 // 4) & 0xFFFF,
                           call, s, "the tx used ring")
                u = used_idx[0]
                if (u - last_used) & 0xFFFF > NUM:
                    raise RingError(f"used.idx moved from {last_used} to {u}")
                while last_used != u:
                    d, _ = used_unpack(ram, used_ring + 8 * (last_used & MASK))
                    if d >= NUM or not inflight[d]:
                        raise RingError(f"used id {d} was not in flight")
                    inflight[d] = False
                    free.append(d)
                    last_used = (last_used + 1) & 0xFFFF
            n = min(PKT, size - off)
            d = free.pop()
            base = buf_base + d * slot
            hdr_pack(ram, base, GUEST_CID, HOST_CID, GUEST_PORT, HOST_PORT, n, VIRTIO_VSOCK_TYPE_STREAM,
                     VIRTIO_VSOCK_OP_RW, 0, BUF_ALLOC, 0)
            ram[base + HDR_SIZE:base + HDR_SIZE + n] = src[off:off + n]
            desc_pack(ram, desc + 16 * d, base, HDR_SIZE + n, 0, 0)
            inflight[d] = True
            avail_ring[aidx & MASK] = d
            aidx = (aidx + 1) & 0xFFFF
            off += n
            packets += 1
        avail_idx[0] = aidx                                  # one publish per write
        mb()
        if vring_need_event(avail_event[0], aidx, published):
            kick.ring()
            kicks += 1
        published = aidx
    s.n.update(kicks=kicks, packets=packets)


def _g2h_device(s: _Side, size: int, total: int) -> int:
    vq, kick, call, ram = s.vqs[0], s.kicks[0], s.calls[0], s.ram
    avail_idx, avail_ring, used_idx, used_event, avail_event = (vq.avail_idx, vq.avail_ring, vq.used_idx,
                                                                 vq.used_event, vq.avail_event)
    desc, used_ring, lo, hi = vq.desc, vq.used_ring, s.buf_base, s.size
    desc_unpack, hdr_unpack, used_pack = DESC.unpack_from, HDR.unpack_from, USED_ELEM.pack_into
    appbuf = bytearray(max(size, 1 << 20))
    app, cap = memoryview(appbuf), len(appbuf)
    last_avail = uidx = got = pos = 0
    irqs = 0
    while got < total:
        a = avail_idx[0]
        if a == last_avail:
            _sleep(avail_idx, last_avail, avail_event, last_avail, kick, s, "the tx avail ring")
            continue
        if (a - last_avail) & 0xFFFF > NUM:
            raise RingError(f"avail.idx moved from {last_avail} to {a}")
        old = uidx
        while last_avail != a:
            head = avail_ring[last_avail & MASK]
            if head >= NUM:
                raise RingError(f"avail head {head} out of range")
            addr, ln, fl, _ = desc_unpack(ram, desc + 16 * head)
            if fl & BAD_FLAGS_TX or ln < HDR_SIZE or addr < lo or addr + ln > hi:
                raise RingError(f"descriptor {head}: addr {addr:#x} len {ln} flags {fl:#x}")
            _, _, _, _, plen, typ, op, _, _, _ = hdr_unpack(ram, addr)
            if op != VIRTIO_VSOCK_OP_RW or typ != VIRTIO_VSOCK_TYPE_STREAM or plen != ln - HDR_SIZE:
                raise RingError(f"packet op {op} type {typ} len {plen} in a {ln}-byte buffer")
            if pos + plen > cap:
                pos = 0
            app[pos:pos + plen] = ram[addr + HDR_SIZE:addr + ln]     # recv_into
            pos += plen
            got += plen
            used_pack(ram, used_ring + 8 * (uidx & MASK), head, 0)
            uidx = (uidx + 1) & 0xFFFF
            last_avail = (last_avail + 1) & 0xFFFF
        used_idx[0] = uidx                                    # one publish per batch
        mb()
        if vring_need_event(used_event[0], uidx, old):
            call.ring()
            irqs += 1
    s.n.update(interrupts=irqs)
    return got


# --- h2g: the guest's rx queue ------------------------------------------------------------------
def _h2g_post_all(s: _Side) -> None:
    """rx_fill: every slot as one device-writable buffer, published before the go."""
    vq = s.vqs[0]
    for d in range(NUM):
        DESC.pack_into(s.ram, vq.desc + 16 * d, s.buf_base + d * s.slot, HDR_SIZE + PKT, VRING_DESC_F_WRITE, 0)
        vq.avail_ring[d] = d
    vq.avail_idx[0] = NUM & 0xFFFF


def _h2g_guest(s: _Side, size: int, total: int) -> int:
    vq, kick, call, ram = s.vqs[0], s.kicks[0], s.calls[0], s.ram
    avail_idx, avail_ring, used_idx, used_event, avail_event = (vq.avail_idx, vq.avail_ring, vq.used_idx,
                                                                 vq.used_event, vq.avail_event)
    used_ring, buf_base, slot = vq.used_ring, s.buf_base, s.slot
    hdr_unpack, used_unpack = HDR.unpack_from, USED_ELEM.unpack_from
    appbuf = bytearray(max(size, 1 << 20))
    app, cap = memoryview(appbuf), len(appbuf)
    aidx = NUM & 0xFFFF
    last_used = got = pos = kicks = packets = 0
    while got < total:
        u = used_idx[0]
        if u == last_used:
            _sleep(used_idx, last_used, used_event, last_used, call, s, "the rx used ring")
            continue
        if (u - last_used) & 0xFFFF > NUM:
            raise RingError(f"used.idx moved from {last_used} to {u}")
        old = aidx
        while last_used != u:
            d, ln = used_unpack(ram, used_ring + 8 * (last_used & MASK))
            if d >= NUM or ln < HDR_SIZE or ln > HDR_SIZE + PKT:
                raise RingError(f"used id {d} len {ln}")
            base = buf_base + d * slot
            _, _, _, _, plen, typ, op, _, _, _ = hdr_unpack(ram, base)
            if op != VIRTIO_VSOCK_OP_RW or typ != VIRTIO_VSOCK_TYPE_STREAM or plen != ln - HDR_SIZE:
                raise RingError(f"packet op {op} type {typ} len {plen} in {ln} used bytes")
            if pos + plen > cap:
                pos = 0
            app[pos:pos + plen] = ram[base + HDR_SIZE:base + ln]     # recv_into
            pos += plen
            got += plen
            packets += 1
            avail_ring[aidx & MASK] = d                      # the buffer goes straight back (rx_fill)
            aidx = (aidx + 1) & 0xFFFF
            last_used = (last_used + 1) & 0xFFFF
        avail_idx[0] = aidx                                  # one publish per batch
        mb()
        if vring_need_event(avail_event[0], aidx, old):
            kick.ring()
            kicks += 1
    s.n.update(kicks=kicks, packets=packets)
    return got


def _h2g_device(s: _Side, size: int, total: int) -> None:
    vq, kick, call, ram = s.vqs[0], s.kicks[0], s.calls[0], s.ram
    avail_idx, avail_ring, used_idx, used_event, avail_event = (vq.avail_idx, vq.avail_ring, vq.used_idx,
                                                                 vq.used_event, vq.avail_event)
    desc, used_ring, lo, hi = vq.desc, vq.used_ring, s.buf_base, s.size
    desc_unpack, hdr_pack, used_pack = DESC.unpack_from, HDR.pack_into, USED_ELEM.pack_into
    src = memoryview(b"s" * size)
    last_avail = uidx = published = irqs = 0
    avail = avail_idx[0]
    for _ in range(total // size):
        off = 0
        while off < size:
            if last_avail == avail:
                avail = avail_idx[0]
                if last_avail == avail:
                    if uidx != published:                    # hand over what is filled, then wait
                        used_idx[0] = uidx
                        mb()
                        if vring_need_event(used_event[0], uidx, published):
                            call.ring()
                            irqs += 1
                        published = uidx
                    _sleep(avail_idx, last_avail, avail_event, last_avail, kick, s, "the rx avail ring")
                    avail = avail_idx[0]
                    continue
                if (avail - last_avail) & 0xFFFF > NUM:
                    raise RingError(f"avail.idx moved from {last_avail} to {avail}")
            head = avail_ring[last_avail & MASK]
            if head >= NUM:
                raise RingError(f"avail head {head} out of range")
            addr, ln, fl, _ = desc_unpack(ram, desc + 16 * head)
            if fl & BAD_FLAGS_RX or not fl & VRING_DESC_F_WRITE or ln <= HDR_SIZE or addr < lo or addr + ln > hi:
                raise RingError(f"descriptor {head}: addr {addr:#x} len {ln} flags {fl:#x}")
            n = min(PKT, size - off, ln - HDR_SIZE)
            hdr_pack(ram, addr, HOST_CID, GUEST_CID, HOST_PORT, GUEST_PORT, n, VIRTIO_VSOCK_TYPE_STREAM,
                     VIRTIO_VSOCK_OP_RW, 0, BUF_ALLOC, 0)
            ram[addr + HDR_SIZE:addr + HDR_SIZE + n] = src[off:off + n]
            used_pack(ram, used_ring + 8 * (uidx & MASK), head, HDR_SIZE + n)
            uidx = (uidx + 1) & 0xFFFF
            last_avail = (last_avail + 1) & 0xFFFF
            off += n
        used_idx[0] = uidx                                    # one publish per write
        mb()
        if vring_need_event(used_event[0], uidx, published):
            call.ring()
            irqs += 1
        published = uidx
    s.n.update(interrupts=irqs)


# --- round trips: tx queue 0 out, rx queue 1 back --------------------------------------------------
def _rr_guest(s: _Side, size: int, seconds: float) -> list[float]:
    tx, rx, ram = s.vqs[0], s.vqs[1], s.ram
    hdr_pack, hdr_unpack = HDR.pack_into, HDR.unpack_from
    desc_pack, used_unpack = DESC.pack_into, USED_ELEM.unpack_from
    tx_base, rx_base = s.buf_base, s.buf_base + NUM * s.slot
    for d in range(NUM):                                      # rx_fill
        desc_pack(ram, rx.desc + 16 * d, rx_base + d * s.slot, s.slot, VRING_DESC_F_WRITE, 0)
        rx.avail_ring[d] = d
    rx.avail_idx[0] = rx_aidx = NUM & 0xFFFF
    free = list(range(NUM))
    inflight = [False] * NUM
    msg = memoryview(b"r" * size)
    app = memoryview(bytearray(max(size, 4096)))
    tx_aidx = tx_used = rx_used = 0
    lat: list[float] = []
    pc = time.perf_counter
    end = pc() + seconds
    i = 0
    while True:
        t = pc()
        if t >= end and i >= 20:
            break
        if not free:                                          # reclaim tx buffers, never waiting long
            while tx.used_idx[0] == tx_used:
                _sleep(tx.used_idx, tx_used, tx.used_event, tx_used, s.calls[0], s, "the tx used ring")
            u = tx.used_idx[0]
            while tx_used != u:
                d, _ = used_unpack(ram, tx.used_ring + 8 * (tx_used & MASK))
                if d >= NUM or not inflight[d]:
                    raise RingError(f"used id {d} was not in flight")
                inflight[d] = False
                free.append(d)
                tx_used = (tx_used + 1) & 0xFFFF
        d = free.pop()
        base = tx_base + d * s.slot
        hdr_pack(ram, base, GUEST_CID, HOST_CID, GUEST_PORT, HOST_PORT, size, VIRTIO_VSOCK_TYPE_STREAM,
                 VIRTIO_VSOCK_OP_RW, 0, BUF_ALLOC, 0)
        ram[base + HDR_SIZE:base + HDR_SIZE + size] = msg
        desc_pack(ram, tx.desc + 16 * d, base, HDR_SIZE + size, 0, 0)
        inflight[d] = True
        tx.avail_ring[tx_aidx & MASK] = d
        old, tx_aidx = tx_aidx, (tx_aidx + 1) & 0xFFFF
        tx.avail_idx[0] = tx_aidx
        mb()
        if vring_need_event(tx.avail_event[0], tx_aidx, old):
            s.kicks[0].ring()
            s.n["kicks"] += 1
        got = 0
        while got < size:
            while rx.used_idx[0] == rx_used:
                _sleep(rx.used_idx, rx_used, rx.used_event, rx_used, s.calls[1], s, "the rx used ring")
            u = rx.used_idx[0]
            old = rx_aidx
            while rx_used != u:
                d, ln = used_unpack(ram, rx.used_ring + 8 * (rx_used & MASK))
                if d >= NUM or ln < HDR_SIZE or ln > s.slot:
                    raise RingError(f"used id {d} len {ln}")
                b = rx_base + d * s.slot
                _, _, _, _, plen, typ, op, _, _, _ = hdr_unpack(ram, b)
                if op != VIRTIO_VSOCK_OP_RW or plen != ln - HDR_SIZE or got + plen > len(app):
                    raise RingError(f"packet op {op} type {typ} len {plen} in {ln} used bytes")
                app[got:got + plen] = ram[b + HDR_SIZE:b + ln]
                got += plen
                rx.avail_ring[rx_aidx & MASK] = d
                rx_aidx = (rx_aidx + 1) & 0xFFFF
                rx_used = (rx_used + 1) & 0xFFFF
            rx.avail_idx[0] = rx_aidx
            mb()
            if vring_need_event(rx.avail_event[0], rx_aidx, old):
                s.kicks[1].ring()
                s.n["kicks"] += 1
        i += 1
        if i > 20:                                            # after a short warm-up
            lat.append((pc() - t) * 1e6)
    s.n["packets"] = 2 * i
    s.ctl[0] = 1                                              # stop the echo
    s.kicks[0].ring()
    return lat


def _rr_device(s: _Side, size: int, seconds: float) -> None:
    tx, rx, ram = s.vqs[0], s.vqs[1], s.ram
    lo, hi = s.buf_base, s.size
    desc_unpack, hdr_unpack, hdr_pack, used_pack = DESC.unpack_from, HDR.unpack_from, HDR.pack_into, \
        USED_ELEM.pack_into
    app = memoryview(bytearray(PKT))
    last_tx = tx_uidx = last_rx = rx_uidx = 0
    while not s.ctl[0]:
        a = tx.avail_idx[0]
        if a == last_tx:
            _sleep(tx.avail_idx, last_tx, tx.avail_event, last_tx, s.kicks[0], s, "the tx avail ring")
            continue
        if (a - last_tx) & 0xFFFF > NUM:
            raise RingError(f"avail.idx moved from {last_tx} to {a}")
        old_tx, old_rx = tx_uidx, rx_uidx
        while last_tx != a:
            head = tx.avail_ring[last_tx & MASK]
            if head >= NUM:
                raise RingError(f"avail head {head} out of range")
            addr, ln, fl, _ = desc_unpack(ram, tx.desc + 16 * head)
            if fl & BAD_FLAGS_TX or ln < HDR_SIZE or addr < lo or addr + ln > hi:
                raise RingError(f"descriptor {head}: addr {addr:#x} len {ln} flags {fl:#x}")
            _, _, sp, dp, plen, typ, op, _, _, _ = hdr_unpack(ram, addr)
            if op != VIRTIO_VSOCK_OP_RW or typ != VIRTIO_VSOCK_TYPE_STREAM or plen != ln - HDR_SIZE:
                raise RingError(f"packet op {op} type {typ} len {plen} in a {ln}-byte buffer")
            app[:plen] = ram[addr + HDR_SIZE:addr + ln]        # recv_into
            used_pack(ram, tx.used_ring + 8 * (tx_uidx & MASK), head, 0)
            tx_uidx = (tx_uidx + 1) & 0xFFFF
            last_tx = (last_tx + 1) & 0xFFFF
            # echo it on the rx queue (sendall)
            while rx.avail_idx[0] == last_rx:
                _sleep(rx.avail_idx, last_rx, rx.avail_event, last_rx, s.kicks[1], s, "the rx avail ring")
                if s.ctl[0]:
                    return
            head = rx.avail_ring[last_rx & MASK]
            if head >= NUM:
                raise RingError(f"avail head {head} out of range")
            addr, ln, fl, _ = desc_unpack(ram, rx.desc + 16 * head)
            if fl & BAD_FLAGS_RX or not fl & VRING_DESC_F_WRITE or ln < HDR_SIZE + plen or addr < lo \
                    or addr + ln > hi:
                raise RingError(f"descriptor {head}: addr {addr:#x} len {ln} flags {fl:#x}")
            hdr_pack(ram, addr, HOST_CID, GUEST_CID, dp, sp, plen, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW,
                     0, BUF_ALLOC, 0)
            ram[addr + HDR_SIZE:addr + HDR_SIZE + plen] = app[:plen]
            used_pack(ram, rx.used_ring + 8 * (rx_uidx & MASK), head, HDR_SIZE + plen)
            rx_uidx = (rx_uidx + 1) & 0xFFFF
            last_rx = (last_rx + 1) & 0xFFFF
        rx.used_idx[0] = rx_uidx                              # the answer first
        mb()
        if vring_need_event(rx.used_event[0], rx_uidx, old_rx):
            s.calls[1].ring()
            s.n["interrupts"] += 1
        tx.used_idx[0] = tx_uidx
        mb()
        if vring_need_event(tx.used_event[0], tx_uidx, old_tx):
            s.calls[0].ring()
            s.n["interrupts"] += 1


# --- the two processes ---------------------------------------------------------------------------
ROLES = {("g2h", "guest"): _g2h_guest, ("g2h", "device"): _g2h_device,
         ("h2g", "guest"): _h2g_guest, ("h2g", "device"): _h2g_device,
         ("rr", "guest"): _rr_guest, ("rr", "device"): _rr_device}


def _child(role: str, kind: str, shm_name: str, sems, nq: int, payload: int, a: int, b, conn) -> None:
    import resource
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)             # the bench ends its children itself
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    s = None
    try:
        s = _Side(shm_name, sems, nq, payload)
        if kind == "h2g" and role == "guest":
            _h2g_post_all(s)
        conn.send("ready")
        if conn.recv() != "go":
            return
        t0 = time.perf_counter()
        out = ROLES[(kind, role)](s, a, b)
        dt = time.perf_counter() - t0
        r = resource.getrusage(resource.RUSAGE_SELF)
        conn.send({"out": out, "seconds": dt, "cpu": r.ru_utime + r.ru_stime, "n": s.n})
    except Exception as e:   # reported as the figure's error, never a traceback
        try:
            conn.send({"error": f"{role}: {type(e).__name__}: {e}"})
        except OSError:
            pass
    finally:
        if s is not None:
            s.close()
        conn.close()


def _run(kind: str, a: int, b, payload: int, nq: int, timeout: float, run_dir: Path | None) -> tuple[dict, dict]:
    """Start guest and device for one run; their reports (guest, device). Names are made under
    `run_dir` (a temporary one, removed afterwards, when None)."""
    from shared.doorbell import SemDoorbell
    from shared.resources import OwnerRecord, create_shm, ensure_run_dir, resource_base
    own_dir = run_dir is None
    run_dir = ensure_run_dir(Path(tempfile.mkdtemp(prefix="bench-ceiling-")) if own_dir else Path(run_dir))
    rec = OwnerRecord(run_dir, "bench")
    base = resource_base(run_dir)
    shm_name = f"{base}-ram"
    sems = [(f"/{base}-k{q}", f"/{base}-c{q}") for q in range(nq)]
    rec.add(shm=[shm_name], sems=[n for pair in sems for n in pair])
    shm, bells, procs, conns = None, [], [], []
    try:
        shm = create_shm(shm_name, layout(nq, payload)[2])
        bells = [SemDoorbell(n, create=True) for pair in sems for n in pair]
        # One after the other: each attach registers the segment with multiprocessing's resource
        # tracker (shared by forked children) and unregisters it at once; two children doing
        # that at the same time make the tracker unregister a name twice (a KeyError it prints).
        for role in ("device", "guest"):
            mine, theirs = CTX.Pipe()
            p = CTX.Process(target=_child, name=f"bench-ceiling-{role}",
                            args=(role, kind, shm_name, sems, nq, payload, a, b, theirs))
            p.start()
            theirs.close()
            procs.append(p)
            conns.append(mine)
            if not mine.poll(30) or mine.recv() != "ready":
                raise RuntimeError(f"the ceiling's {role} process did not start")
        for c in conns:
            c.send("go")
        reports = []
        for c in conns:
            if not c.poll(timeout):
                raise RuntimeError(f"a ceiling process gave no result in {timeout:.0f} s")
            reports.append(c.recv())
        for r in reports:
            if "error" in r:
                raise RuntimeError(f"ceiling {r['error']}")
        device, guest = reports
        return guest, device
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for d in bells:
            d.close()
        if shm is not None:
            from shared.resources import close_shm
            close_shm(shm)
        rec.release_all()
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def stream(direction: str, size: int, total: int, run_dir: Path | None = None) -> dict:
    """One transfer of `total` bytes in `size`-byte writes: {"mbps", "bytes", "seconds", "cpu":
    {"guest", "device"}, "kicks", "interrupts", "wakeups", "packets"}."""
    if direction not in ("g2h", "h2g"):
        raise ValueError(f"direction {direction!r}")
    total = max(size, total // size * size)
    payload = min(size, PKT) if direction == "g2h" else PKT
    guest, device = _run(direction, size, total, payload, 1, 120, run_dir)
    recv = device if direction == "g2h" else guest
    got, dt = recv["out"], recv["seconds"]
    if got != total:
        raise RuntimeError(f"the ceiling receiver counted {got} bytes, {total} were sent")
    n = {k: guest["n"][k] + device["n"][k] for k in ("kicks", "interrupts", "wakeups")}
    return {"mbps": got / dt / 1e6, "bytes": got, "seconds": dt,
            "cpu": {"guest": guest["cpu"], "device": device["cpu"]},
            "packets": recv["n"]["packets"] if direction == "h2g" else guest["n"]["packets"], **n}


def rr(size: int, seconds: float, run_dir: Path | None = None) -> dict:
    """`size`-byte round trips for `seconds`: {"lat_us": [...], "kicks", "interrupts", "packets"}."""
    if not 1 <= size <= 4096:
        raise ValueError(f"round-trip size {size} is not in 1..4096")
    guest, device = _run("rr", size, seconds, 4096, 2, seconds + 60, run_dir)
    return {"lat_us": guest["out"], "kicks": guest["n"]["kicks"], "interrupts": device["n"]["interrupts"],
            "wakeups": guest["n"]["wakeups"] + device["n"]["wakeups"], "packets": guest["n"]["packets"]}
