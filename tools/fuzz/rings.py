"""Fuzz target: the device side of a split virtqueue (host/vhost_vq.py) against a spec oracle."""
from __future__ import annotations

import random
import struct

from shared.constants import (INDIRECT_MAX_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                              VRING_DESC_F_WRITE)
from shared.errors import VringError
from shared.memory import GuestMemory
from shared.ring_layout import DESC, USED_ELEM

from . import OracleMismatch

BASE = 0x10000                  # guest-physical base of the RAM
SIZE = 0x20000                  # 128 KiB
DESC_AT, AVAIL_AT, USED_AT, DATA_AT = BASE, BASE + 0x5000, BASE + 0x6000, BASE + 0x9000
U32 = 0xFFFFFFFF


class RingCase:
    """One generated ring: memory, queue state, and what the driver published."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.num = rng.choice([1, 2, 4, 8, 16, 64, 256])
        self.event_idx = rng.random() < 0.5
        self.indirect = rng.random() < 0.6
        self.buf = bytearray(SIZE)
        self.last_avail = rng.choice([0, 0xFFFF, 0xFFF0, rng.randrange(0x10000)])
        self.tables: list[int] = []
        for i in range(self.num):
            self._desc(DESC_AT, i, *self._random_desc(i, self.num, top=True))
        if rng.random() < 0.1:
            n_avail = rng.randint(self.num + 1, 0xFFFF)      # ring rule 1 (docs/ring-rules.md)
        else:
            n_avail = rng.randint(0, self.num)
        self.n_avail = n_avail
        for k in range(min(n_avail, self.num)):
            head = rng.randrange(self.num) if rng.random() < 0.93 else rng.randint(self.num, 0xFFFF)
            self._u16(AVAIL_AT + 4 + 2 * ((self.last_avail + k) % self.num), head)
        self._u16(AVAIL_AT + 2, (self.last_avail + n_avail) & 0xFFFF)
        self._u16(AVAIL_AT, rng.choice([0, 0, 1]))           # VRING_AVAIL_F_NO_INTERRUPT

    # --- generation ---------------------------------------------------------------------------
    def _u16(self, gpa: int, v: int) -> None:
        struct.pack_into("<H", self.buf, gpa - BASE, v)

    def _desc(self, table: int, i: int, addr: int, ln: int, flags: int, nxt: int) -> None:
        DESC.pack_into(self.buf, table - BASE + 16 * i, addr, ln, flags, nxt)

    def _addr(self, ln: int) -> int:
        r = self.rng.random()
        if r < 0.9:
            return DATA_AT + self.rng.randrange(0, max(1, SIZE - (DATA_AT - BASE) - ln))
        if r < 0.95:
            return self.rng.choice([0, BASE - 8, BASE + SIZE - 4, 1 << 63])    # outside / straddling
        return self.rng.randrange(1 << 64)

    def _len(self) -> int:
        r = self.rng.random()
        if r < 0.85:
            return self.rng.randint(0, 512)
        if r < 0.95:
            return self.rng.randint(0, 8192)
        return self.rng.choice([U32, 1 << 31, SIZE])

    def _random_desc(self, i: int, bound: int, top: bool) -> tuple:
        rng = self.rng
        flags = 0
        if rng.random() < 0.45:
            flags |= VRING_DESC_F_NEXT
        if rng.random() < 0.35:
            flags |= VRING_DESC_F_WRITE
        nxt = (i + 1 + rng.randrange(3)) % bound if rng.random() < 0.9 else rng.randint(0, 0xFFFF)
        if rng.random() < (0.12 if top else 0.03):
            flags |= VRING_DESC_F_INDIRECT
            if rng.random() < 0.85:
                flags &= ~VRING_DESC_F_NEXT
            return (*self._indirect_table(), flags, nxt)
        ln = self._len()
        return self._addr(ln), ln, flags, nxt

    def _indirect_table(self) -> tuple[int, int]:
        rng = self.rng
        count = rng.randint(1, 8)
        at = DATA_AT + 0x4000 + 0x100 * len(self.tables)
        if at + 16 * count > BASE + SIZE:
            at = DATA_AT
        self.tables.append(at)
        for j in range(count):
            self._desc(at, j, *self._random_desc(j, count, top=False))
        ln = 16 * count
        r = rng.random()
        if r < 0.05:
            ln = rng.randint(1, 15) + 16 * rng.randint(0, 3)       # not a multiple of 16
        elif r < 0.08:
            ln = 0
        elif r < 0.1:
            ln = 16 * (INDIRECT_MAX_DESC + 1)
        return (at if rng.random() < 0.95 else self._addr(ln)), ln

    # --- the oracle (virtio 2.7.5 / 2.7.4.2, docs/ring-rules.md) ----------------------------------
    def in_ram(self, gpa: int, ln: int) -> bool:
        return ln == 0 or (BASE <= gpa and gpa + ln <= BASE + SIZE)

    def expect_chain(self, head: int):
        """The segments [(addr, len, writable)] of the chain at head, or None if it is invalid."""
        if head >= self.num:
            return None
        segs: list = []
        state = {"write": False, "total": 0}
        if not self._walk(bytes(self.buf[DESC_AT - BASE:DESC_AT - BASE + 16 * self.num]), head,
                          self.num, segs, state, nested=False):
            return None
        return segs

    def _walk(self, table: bytes, i: int, bound: int, segs: list, st: dict, nested: bool) -> bool:
        seen = 0
        while True:
            if i >= bound:
                return False
            seen += 1
            if seen > bound:
                return False                                  # a loop
            addr, ln, flags, nxt = DESC.unpack_from(table, 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                if nested or not self.indirect or flags & VRING_DESC_F_NEXT:
                    return False
                if ln == 0 or ln % 16 or ln // 16 > INDIRECT_MAX_DESC or not self.in_ram(addr, ln):
                    return False
                sub = bytes(self.buf[addr - BASE:addr - BASE + ln])
                if not self._walk(sub, 0, ln // 16, segs, st, nested=True):
                    return False
            else:
                w = bool(flags & VRING_DESC_F_WRITE)
                if st["write"] and not w:
                    return False                              # readable after writable
                st["write"] |= w
                st["total"] += ln
                if st["total"] > U32 or not self.in_ram(addr, ln):
                    return False
                segs.append((addr, ln, w))
            if not flags & VRING_DESC_F_NEXT:
                return True
            i = nxt


def make_vq(case: RingCase):
    from host.vhost_vq import VhostVirtqueue
    vq = VhostVirtqueue(0, "fuzz")
    vq.num, vq.desc, vq.avail, vq.used = case.num, DESC_AT, AVAIL_AT, USED_AT
    vq.event_idx, vq.indirect = case.event_idx, case.indirect
    vq.last_avail_idx = case.last_avail
    vq.last_used_idx = case.last_avail
    return vq


def run_case(rng: random.Random) -> dict:
    """Generate one ring, pop every chain, check each against the oracle. Returns counters."""
    case = RingCase(rng)
    mem = GuestMemory.from_buffer(case.buf, BASE)
    vq = make_vq(case)
    stats = {"chains": 0, "invalid": 0, "rule1": 0}
    used = []
    try:
        if case.n_avail > case.num:
            try:
                vq.get_vq_desc(mem)
            except VringError as e:
                if e.rule != 1:
                    raise OracleMismatch(f"avail.idx jump of {case.n_avail}: rule {e.rule}, expected 1")
                stats["rule1"] += 1
                if vq.last_avail_idx != case.last_avail:
                    raise OracleMismatch("a rule-1 error consumed an entry")
                return stats
            raise OracleMismatch(f"avail.idx moved {case.n_avail} > num {case.num}: no error")
        for k in range(case.n_avail):
            head = struct.unpack_from("<H", case.buf, AVAIL_AT - BASE + 4 + 2 * ((case.last_avail + k) % case.num))[0]
            want = case.expect_chain(head)
            before = vq.last_avail_idx
            try:
                chain = vq.get_vq_desc(mem)
            except VringError as e:
                if want is not None:
                    raise OracleMismatch(f"valid chain at head {head} refused: {e}") from None
                if vq.last_avail_idx != before:
                    raise OracleMismatch(f"invalid chain at head {head} was consumed")
                stats["invalid"] += 1
                break                  # the device stops here (NEEDS_RESET)
            if want is None:
                raise OracleMismatch(f"invalid chain at head {head} accepted: {chain}")
            if chain is None or chain.head != head:
                raise OracleMismatch(f"expected head {head}, got {chain}")
            _check_buffers(case, chain, want)
            if vq.last_avail_idx != (before + 1) & 0xFFFF:
                raise OracleMismatch("last_avail_idx did not advance by one")
            used.append((head, chain.in_len))
            stats["chains"] += 1
        else:
            if vq.get_vq_desc(mem) is not None:
                raise OracleMismatch("a chain beyond avail.idx was returned")
        _check_used(case, vq, mem, used)
        vq.signal(mem)
        vq.disable_notify(mem)
        vq.enable_notify(mem)
    finally:
        vq.unmap()
        mem.release()
    return stats


def _check_buffers(case: RingCase, chain, want) -> None:
    out = b"".join(bytes(v) for v in chain.out)
    in_ = b"".join(bytes(v) for v in chain.in_)
    w_out = b"".join(bytes(case.buf[a - BASE:a - BASE + n]) for a, n, w in want if not w and n)
    w_in = b"".join(bytes(case.buf[a - BASE:a - BASE + n]) for a, n, w in want if w and n)
    if out != w_out or in_ != w_in:
        raise OracleMismatch("chain buffers differ from the descriptors")
    if chain.out_len != sum(n for _, n, w in want if not w) or chain.in_len != sum(n for _, n, w in want if w):
        raise OracleMismatch("chain lengths differ from the descriptors")


def _check_used(case: RingCase, vq, mem, used) -> None:
    if not used:
        return
    half = len(used) // 2
    for head, ln in used[:half]:
        vq.add_used(mem, head, ln)
    vq.add_used_n(mem, used[half:])
    idx = struct.unpack_from("<H", case.buf, USED_AT - BASE + 2)[0]
    if idx != (case.last_avail + len(used)) & 0xFFFF:
        raise OracleMismatch(f"used.idx {idx} after {len(used)} used from {case.last_avail}")
    for k, (head, ln) in enumerate(used):
        slot = (case.last_avail + k) % case.num
        if USED_ELEM.unpack_from(case.buf, USED_AT - BASE + 4 + 8 * slot) != (head, ln):
            raise OracleMismatch(f"used ring slot {slot} wrong")
