"""Fuzz target: the vhost-vsock device (host/vsock/device.py) fed generated tx packets and rx/event
buffers through real rings on a bytearray, checked against the vsock rules (ring rule 14, docs/ring-rules.md).

Oracle for tx: packets are taken in ring order; a chain is malformed when it has a device-writable
buffer, holds fewer than 44 bytes, or (STREAM) its header's len exceeds 64 KiB or what the chain
holds. Every packet before the first malformed one is consumed (used.idx moves past it, with
length 44 + payload); the malformed one is not, and the device is NEEDS_RESET; without a
malformed one the device stays healthy. Nothing raises out of kick_received / queued work.
"""
from __future__ import annotations

import random

from shared.constants import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
                              VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
                              VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                              VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VIRTIO_VSOCK_TYPE_STREAM, VSOCK_VQ_EVENT,
                              VSOCK_VQ_RX, VSOCK_VQ_TX, bit)
from shared.doorbell import LocalDoorbell
from shared.ring_layout import used_idx_addr
from shared.vsock.packet import HDR, HDR_SIZE

from . import OracleMismatch

GUEST_CID = 3
RAM = 1 << 21
OPS = list(range(0, 9))
DRIVER_OK = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
             | VIRTIO_CONFIG_S_DRIVER_OK)


class _Worker:
    def __init__(self):
        self.work = []

    def queue_work(self, fn):
        if fn not in self.work:
            self.work.append(fn)

    def call_later(self, delay, fn):
        class H:
            def cancel(self):
                pass
        return H()

    def run(self, limit=2000):
        n = 0
        while self.work and n < limit:
            self.work.pop(0)()
            n += 1


def _header(rng: random.Random, room: int) -> tuple[bytes, bool, int]:
    """A vsock header (44 bytes) and whether it is well-formed for a chain with `room` payload bytes."""
    typ = VIRTIO_VSOCK_TYPE_STREAM if rng.random() < 0.9 else rng.randint(0, 5)
    r = rng.random()
    if r < 0.75:
        ln = rng.randint(0, room)
    elif r < 0.9:
        ln = rng.randint(room + 1, room + 100)
    else:
        ln = rng.choice([VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE + 1, 0xFFFFFFFF])
    src = GUEST_CID if rng.random() < 0.9 else rng.randrange(1 << 64)
    dst = 2 if rng.random() < 0.85 else rng.randrange(1 << 64)
    hdr = HDR.pack(src, dst, rng.randrange(1 << 32), rng.choice([1234, 5000, rng.randrange(1 << 32)]), ln,
                   typ, rng.choice(OPS) if rng.random() < 0.9 else rng.randrange(1 << 16),
                   rng.randrange(1 << 32), rng.randrange(1 << 32), rng.randrange(1 << 32))
    if typ != VIRTIO_VSOCK_TYPE_STREAM:
        ln = 0
    good = ln <= VIRTIO_VSOCK_MAX_PKT_BUF_SIZE and ln <= room
    return hdr, good, ln


def run_case(rng: random.Random) -> dict:
    from guest.ram import GuestRAM
    from guest.virtqueue import VirtQueue
    from host.vsock.device import VhostVsock
    buf = bytearray(RAM)
    ram = GuestRAM("fuzz", RAM, buf=buf)
    mem = ram.mem
    event_idx = rng.random() < 0.5
    indirect = rng.random() < 0.5
    dev = VhostVsock(GUEST_CID)
    worker = dev.worker = _Worker()
    sizes = (rng.choice([4, 8, 16]), rng.choice([4, 8, 16]), 4)
    vqs = []
    for i, num in enumerate(sizes):
        d, a, u = VirtQueue.alloc_rings(ram, num)
        vqs.append(VirtQueue(mem, i, num, d, a, u, event_idx=event_idx, indirect=indirect, alloc=ram.alloc))
        h = dev.vqs[i]
        h.num, h.desc, h.avail, h.used = num, d, a, u
        h.enabled = True
        dev.calls[i], dev.errs[i], dev.kicks[i] = LocalDoorbell(), LocalDoorbell(), LocalDoorbell()
    dev.set_features(bit(VIRTIO_F_VERSION_1) | (bit(VIRTIO_RING_F_EVENT_IDX) if event_idx else 0)
                     | (bit(VIRTIO_RING_F_INDIRECT_DESC) if indirect else 0))
    dev.set_mem(GuestMemoryView(buf, ram))
    dev.status = DRIVER_OK
    dev.start()
    stats = {"packets": 0, "malformed": 0, "rx_bufs": 0}
    try:
        # rx and event buffers: mostly valid (device-writable, big enough), sometimes not
        rx_bad = False
        for _ in range(rng.randint(0, sizes[0])):
            size = rng.choice([HDR_SIZE + 4096, HDR_SIZE + rng.randint(0, 64), rng.randint(1, HDR_SIZE - 1)])
            g = ram.alloc.alloc(size)
            readable = rng.random() < 0.05
            rx_bad |= readable or size < HDR_SIZE
            ok = vqs[VSOCK_VQ_RX].add_sgs([(g, size)] if readable else [], [] if readable else [(g, size)], g)
            stats["rx_bufs"] += ok
        for _ in range(rng.randint(0, 2)):
            g = ram.alloc.alloc(8)
            vqs[VSOCK_VQ_EVENT].add_sgs([], [(g, rng.choice([4, 8, 2]))], g)
        # tx packets in ring order, with the expectation for each
        expect = []
        for _ in range(rng.randint(1, sizes[1])):
            payload_room = rng.choice([0, rng.randint(0, 256), rng.randint(0, 5000)])
            hdr, good, ln = _header(rng, payload_room)
            if rng.random() < 0.05:
                hdr = hdr[:rng.randint(0, HDR_SIZE - 1)]
                good = False
            data = hdr + bytes(rng.getrandbits(8) for _ in range(min(payload_room, 64))) + bytes(max(0, payload_room - 64))
            g = ram.alloc.alloc(max(1, len(data)) + 64)
            mem.write(g, data)
            cut = rng.randint(0, len(data))
            outs = [(g, cut), (g + cut, len(data) - cut)] if 0 < cut < len(data) and rng.random() < 0.5 else [(g, len(data))]
            good = _well_formed(data)
            ins = []
            if rng.random() < 0.04:
                ins = [(g + len(data), 16)]
                good = False
            if not vqs[VSOCK_VQ_TX].add_sgs(outs, ins, g):
                break
            expect.append((good, ln))
        used0 = mem.load16(used_idx_addr(dev.vqs[VSOCK_VQ_TX].used))
        for q in rng.sample([VSOCK_VQ_RX, VSOCK_VQ_TX, VSOCK_VQ_EVENT], 3):
            dev.kick_received(q)
            worker.run()
        for _ in range(5):
            dev.kick_received(VSOCK_VQ_TX)
            worker.run()
        n_good = next((i for i, (good, _) in enumerate(expect) if not good), len(expect))
        used1 = mem.load16(used_idx_addr(dev.vqs[VSOCK_VQ_TX].used))
        taken = (used1 - used0) & 0xFFFF
        broken = bool(dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)
        stats["packets"] += taken
        if n_good < len(expect):
            stats["malformed"] += 1
            if not broken:
                raise OracleMismatch(f"malformed tx packet #{n_good} did not make the device NEEDS_RESET")
            if not dev.broken and taken != n_good:
                raise OracleMismatch(f"took {taken} tx packets, expected {n_good}")
            if taken > n_good:
                raise OracleMismatch(f"the malformed tx packet #{n_good} was consumed ({taken} taken)")
        elif broken and not rx_bad:
            raise OracleMismatch(f"NEEDS_RESET with well-formed packets and buffers: {dev.stats['last_error']}")
        elif not broken and taken != len(expect) and dev.more_replies():
            raise OracleMismatch(f"took {taken} of {len(expect)} well-formed tx packets")
    finally:
        dev.close()
    return stats


def _well_formed(data: bytes) -> bool:
    """The rule, from the bytes as the device will see them (ring rule 14)."""
    if len(data) < HDR_SIZE:
        return False
    f = HDR.unpack(data[:HDR_SIZE])
    ln, typ = f[4], f[5]
    return typ != VIRTIO_VSOCK_TYPE_STREAM or (ln <= VIRTIO_VSOCK_MAX_PKT_BUF_SIZE and ln <= len(data) - HDR_SIZE)


class GuestMemoryView:
    """The host's own GuestMemory over the guest's bytearray RAM (as the host attaches it)."""

    def __new__(cls, buf, ram):
        from shared.memory import GuestMemory, MemoryRegion
        base = memoryview(buf)
        return GuestMemory([MemoryRegion(r["guest_phys_addr"], r["memory_size"],
                                         base[r["mmap_offset"]:r["mmap_offset"] + r["memory_size"]],
                                         r["userspace_addr"]) for r in ram.table])
