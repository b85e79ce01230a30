"""Fuzz target: the device side of a packed virtqueue (host/vhost_vq_packed.py) against an oracle
written from the packed-ring rules (virtio 1.1+ 2.8, docs/ring-rules.md).

A case is a ring of N descriptors (N any size up to 256, not only powers of 2) with the device's
positions somewhere in some lap. The generator writes chains the way a driver does (NEXT links to
the following slot, wrapping, each descriptor with the AVAIL/USED bits of its lap, one buffer id)
and then mutates them: the bits of another lap or of no lap, ids out of range or repeated,
INDIRECT with NEXT or in the middle of a chain, broken tables, readable after writable, addresses
outside guest RAM, huge lengths; the rest of the ring holds leftovers of earlier laps or garbage.

The oracle reads the same bytes and says, for every position, "empty", "invalid" or the chain's
(id, buffers, slots). The device must agree chain by chain: a valid chain is returned with exactly
its buffers and moves the position by its slots (flipping the wrap counter past N); an invalid one
raises VringError and moves nothing. Then the chains are completed in a random order, some one by
one, some in batches: each used descriptor must appear at the next used slot with its id, its
length and AVAIL = USED = the used wrap counter, the position moving by that chain's slots.
"""
from __future__ import annotations

import random

from shared.constants import (INDIRECT_MAX_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                              VRING_DESC_F_WRITE)
from shared.errors import VringError
from shared.memory import GuestMemory
from shared.ring_layout import DESC_F_AVAIL, DESC_F_USED, PACKED_DESC

from . import OracleMismatch
from .rings import BASE, _check_buffers          # the same RAM base and buffer oracle

SIZE = 0x20000
DESC_AT, DRIVER_AT, DEVICE_AT, DATA_AT = BASE, BASE + 0x1000, BASE + 0x1010, BASE + 0x2000
TABLES_AT = BASE + 0x18000
U32 = 0xFFFFFFFF
AU = DESC_F_AVAIL | DESC_F_USED


def lap_bits(wrap: int) -> int:
    """What a driver writes to make a descriptor available in lap `wrap`."""
    return DESC_F_AVAIL if wrap else DESC_F_USED


class PackedCase:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.num = rng.choice([1, 2, 3, 4, 5, 8, 16, 64, 256])
        self.event_idx = rng.random() < 0.5
        self.indirect = rng.random() < 0.6
        self.buf = bytearray(SIZE)
        self.start = rng.randrange(self.num)
        self.wrap = rng.randrange(2)
        self.tables = 0
        self._fill()

    # --- generation -------------------------------------------------------------------------
    def _desc(self, table: int, i: int, addr: int, ln: int, bid: int, flags: int) -> None:
        PACKED_DESC.pack_into(self.buf, table - BASE + 16 * i, addr, ln, bid, flags)

    def _addr(self, ln: int) -> int:
        r = self.rng.random()
        if r < 0.975:
            return DATA_AT + self.rng.randrange(0, max(1, TABLES_AT - DATA_AT - ln))
        if r < 0.99:
            return self.rng.choice([0, BASE - 8, BASE + SIZE - 4, 1 << 63])
        return self.rng.randrange(1 << 64)

    def _len(self) -> int:
        r = self.rng.random()
        if r < 0.85:
            return self.rng.randint(0, 512)
        if r < 0.985:
            return self.rng.randint(0, 4096)
        return self.rng.choice([U32, 1 << 31, SIZE])

    def _fill(self) -> None:
        rng, num = self.rng, self.num
        # leftovers: descriptors as an earlier lap left them (used, or available in the other lap)
        for i in range(num):
            r = rng.random()
            flags = (AU if not self.wrap else 0) if r < 0.5 else (
                lap_bits(self.wrap ^ 1) if r < 0.8 else rng.randrange(0x10000))
            self._desc(DESC_AT, i, self._addr(16), rng.randint(0, 64), rng.randrange(num), flags)
        # chains as a driver writes them, from the device's position on
        pos, wrap, room = self.start, self.wrap, num
        ids = list(range(num))
        rng.shuffle(ids)
        while room and rng.random() < 0.9:
            n = min(room, rng.choice([1, 1, 1, 2, 2, 3, 4, rng.randint(1, num)]))
            bid = ids.pop() if ids and rng.random() < 0.95 else rng.choice(
                [num, rng.randint(num, 0xFFFF), rng.randrange(num)])
            use_indirect = n == 1 and rng.random() < 0.25
            n_write = rng.randint(0, n)
            for k in range(n):
                flags = lap_bits(wrap)
                if k < n - 1:
                    flags |= VRING_DESC_F_NEXT
                if k >= n - n_write:
                    flags |= VRING_DESC_F_WRITE
                ln = self._len()
                addr = self._addr(ln)
                if use_indirect:
                    flags |= VRING_DESC_F_INDIRECT
                    addr, ln = self._table()
                # mutations
                r = rng.random()
                if r < 0.01:
                    flags ^= DESC_F_AVAIL                      # no lap / the other lap
                elif r < 0.015:
                    flags ^= AU
                elif r < 0.02:
                    flags ^= VRING_DESC_F_WRITE
                elif r < 0.025:
                    flags ^= VRING_DESC_F_NEXT
                elif r < 0.03:
                    flags |= VRING_DESC_F_INDIRECT
                    addr, ln = self._table()
                self._desc(DESC_AT, pos, addr, ln, bid if rng.random() < 0.97 else rng.randrange(0x10000), flags)
                pos += 1
                if pos >= num:
                    pos, wrap = 0, wrap ^ 1
            room -= n

    def _table(self) -> tuple[int, int]:
        rng = self.rng
        count = rng.randint(1, 8)
        at = TABLES_AT + 0x100 * self.tables
        self.tables += 1
        if at + 16 * count > BASE + SIZE:
            at = TABLES_AT
        n_write = rng.randint(0, count)
        for j in range(count):
            flags = VRING_DESC_F_WRITE if j >= count - n_write else 0
            if rng.random() < 0.05:
                flags ^= VRING_DESC_F_WRITE
            if rng.random() < 0.1:
                flags |= rng.choice([VRING_DESC_F_NEXT, VRING_DESC_F_INDIRECT, DESC_F_AVAIL])  # ignored
            ln = self._len()
            self._desc(at, j, self._addr(ln), ln, rng.randrange(0x10000), flags)
        ln = 16 * count
        r = rng.random()
        if r < 0.05:
            ln = rng.randint(1, 15) + 16 * rng.randint(0, 3)
        elif r < 0.07:
            ln = 0
        elif r < 0.09:
            ln = 16 * (INDIRECT_MAX_DESC + 1)
        return (at if rng.random() < 0.95 else self._addr(ln)), ln

    # --- the oracle (spec 2.8.1, 2.8.7, 2.8.19; docs/ring-rules.md) ----------------------------
    def in_ram(self, gpa: int, ln: int) -> bool:
        return ln == 0 or (BASE <= gpa and gpa + ln <= BASE + SIZE)

    def read(self, i: int) -> tuple:
        return PACKED_DESC.unpack_from(self.buf, DESC_AT - BASE + 16 * i)

    @staticmethod
    def avail(flags: int, wrap: int) -> bool:
        return ((flags >> 7) & 1) == wrap and ((flags >> 15) & 1) != wrap

    def expect(self, pos: int, wrap: int, inflight: set):
        """'empty', 'invalid', or (id, [(addr, len, writable)], slots, next pos, next wrap)."""
        num = self.num
        if not self.avail(self.read(pos)[3], wrap):
            return "empty"
        segs: list = []
        writing, total, n, i, w = False, 0, 0, pos, wrap
        while True:
            if n >= num:
                return "invalid"
            addr, ln, bid, flags = self.read(i)
            if n and not self.avail(flags, w):
                return "invalid"
            n += 1
            if flags & VRING_DESC_F_INDIRECT:
                if n != 1 or flags & VRING_DESC_F_NEXT or not self.indirect:
                    return "invalid"
                if ln == 0 or ln % 16 or ln // 16 > INDIRECT_MAX_DESC or not self.in_ram(addr, ln):
                    return "invalid"
                for j in range(ln // 16):
                    a, l2, _, f2 = PACKED_DESC.unpack_from(self.buf, addr - BASE + 16 * j)
                    wr = bool(f2 & VRING_DESC_F_WRITE)
                    if writing and not wr:
                        return "invalid"
                    writing |= wr
                    total += l2
                    if total > U32 or not self.in_ram(a, l2):
                        return "invalid"
                    segs.append((a, l2, wr))
            else:
                wr = bool(flags & VRING_DESC_F_WRITE)
                if writing and not wr:
                    return "invalid"
                writing |= wr
                total += ln
                if total > U32 or not self.in_ram(addr, ln):
                    return "invalid"
                segs.append((addr, ln, wr))
            i += 1
            if i >= num:
                i, w = 0, w ^ 1
            if not flags & VRING_DESC_F_NEXT:
                break
        if bid >= num or bid in inflight:
            return "invalid"
        return bid, segs, n, i, w


def run_case(rng: random.Random) -> dict:
    from host.vhost_vq_packed import VhostVirtqueuePacked
    case = PackedCase(rng)
    mem = GuestMemory.from_buffer(case.buf, BASE)
    vq = VhostVirtqueuePacked(0, "fuzz")
    vq.num, vq.desc, vq.avail, vq.used = case.num, DESC_AT, DRIVER_AT, DEVICE_AT
    vq.event_idx, vq.indirect = case.event_idx, case.indirect
    base = case.start | case.wrap << 15
    vq.last_avail_idx = base
    vq.last_used_idx = base
    stats = {"chains": 0, "invalid": 0, "empty": 0}
    popped = []
    try:
        pos, wrap, inflight = case.start, case.wrap, set()
        for _ in range(case.num + 1):
            want = case.expect(pos, wrap, inflight)
            before = vq.last_avail_idx
            try:
                chain = vq.get_vq_desc(mem)
            except VringError as e:
                if want != "invalid":
                    raise OracleMismatch(f"slot {pos} lap {wrap}: {e}, oracle says {str(want)[:80]}") from None
                if vq.last_avail_idx != before:
                    raise OracleMismatch(f"an invalid chain at slot {pos} was consumed")
                stats["invalid"] += 1
                break
            if want == "invalid":
                raise OracleMismatch(f"invalid chain at slot {pos} lap {wrap} accepted: {chain}")
            if want == "empty":
                if chain is not None:
                    raise OracleMismatch(f"slot {pos} lap {wrap} is not available, got {chain}")
                stats["empty"] += 1
                break
            bid, segs, n, pos, wrap = want
            if chain is None or chain.head != bid:
                raise OracleMismatch(f"expected buffer id {bid}, got {chain}")
            _check_buffers(case, chain, segs)
            if vq.last_avail_idx != pos | wrap << 15:
                raise OracleMismatch(f"position {vq.last_avail_idx:#x} after a {n}-slot chain, "
                                     f"expected {pos | wrap << 15:#x}")
            inflight.add(bid)
            popped.append((bid, chain.in_len, n))
            stats["chains"] += 1
        _check_used(case, vq, mem, popped)
        vq.signal(mem)
        vq.disable_notify(mem)
        vq.enable_notify(mem)
        vq.enable_notify_after(mem, rng.randint(0, 300))
        vq.avail_empty(mem)
        vq.snapshot()
    finally:
        vq.unmap()
        mem.release()
    return stats


def _check_used(case: PackedCase, vq, mem, popped) -> None:
    rng = case.rng
    order = popped[:]
    rng.shuffle(order)
    pos, wrap = case.start, case.wrap
    k = 0
    while k < len(order):
        batch = order[k:k + rng.randint(1, 4)]
        if len(batch) == 1 and rng.random() < 0.5:
            vq.add_used(mem, batch[0][0], batch[0][1])
        else:
            vq.add_used_n(mem, [(b, ln) for b, ln, _ in batch])
        for bid, ln, n in batch:
            _, got_len, got_id, flags = case.read(pos)
            if (got_id, got_len) != (bid, ln & U32) or flags & AU != (AU if wrap else 0):
                raise OracleMismatch(f"used slot {pos} lap {wrap}: id {got_id} len {got_len} "
                                     f"flags {flags:#x}, expected id {bid} len {ln}")
            pos += n
            if pos >= case.num:
                pos, wrap = pos - case.num, wrap ^ 1
        k += len(batch)
    if vq.last_used_idx != pos | wrap << 15:
        raise OracleMismatch(f"used position {vq.last_used_idx:#x}, expected {pos | wrap << 15:#x}")
