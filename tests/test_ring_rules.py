"""One negative test per row 1..13 of docs/ring-rules.md: malformed rings built byte by byte.

MockSplitQueue plays a hostile driver (the rust-vmm MockSplitQueue idea): it writes descriptors,
avail entries and avail.idx straight into guest memory, with no checks of its own.
"""
import struct

import pytest

from host.vhost_vq import VhostVirtqueue
from shared.constants import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE)
from shared.errors import VringError
from shared.memory import GuestMemory

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
BASE = 0x10000
SIZE = 0x10000
DATA = BASE + 0x8000            # a scratch area for buffers and indirect tables


class MockSplitQueue:
    def __init__(self, num=8, *, indirect=True, event_idx=False):
        self.buf = bytearray(SIZE)
        self.mem = GuestMemory.from_buffer(self.buf, BASE)
        self.num = num
        self.desc_addr = BASE
        self.avail_addr = BASE + 16 * num
        self.used_addr = (self.avail_addr + 6 + 2 * num + 3) & ~3
        self.idx = 0
        self.vq = VhostVirtqueue(0, "mock")
        self.vq.num, self.vq.desc, self.vq.avail, self.vq.used = (num, self.desc_addr,
                                                                  self.avail_addr, self.used_addr)
        self.vq.indirect = indirect
        self.vq.event_idx = event_idx

    def desc(self, i, addr, length, flags=0, nxt=0):
        self.mem.write(self.desc_addr + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def table(self, gpa, entries):
        """Write an indirect table of (addr, len, flags, next) entries at gpa."""
        for k, e in enumerate(entries):
            self.mem.write(gpa + 16 * k, struct.pack("<QIHH", *e))

    def publish(self, *heads):
        for h in heads:
            self.mem.write(self.avail_addr + 4 + 2 * (self.idx % self.num), struct.pack("<H", h))
            self.idx = (self.idx + 1) & 0xFFFF
        self.set_avail_idx(self.idx)

    def set_avail_idx(self, idx):
        self.mem.write(self.avail_addr + 2, struct.pack("<H", idx & 0xFFFF))

    def pop(self):
        return self.vq.get_vq_desc(self.mem)


def rule_of(q):
    with pytest.raises(VringError) as ei:
        q.pop()
    assert q.vq.last_avail_idx == 0          # a bad chain is never consumed
    return ei.value.rule


def test_sanity_good_chain_passes():
    q = MockSplitQueue()
    q.desc(0, DATA, 8, NEXT, 1)
    q.desc(1, DATA + 8, 8, WRITE)
    q.publish(0)
    c = q.pop()
    assert (c.head, c.out_len, c.in_len) == (0, 8, 8)


def test_rule_1_avail_idx_more_than_num_ahead():
    """Rule 1: `(u16)(avail.idx - last_avail_idx) > N` is fatal ("Guest moved used index")."""
    q = MockSplitQueue(num=8)
    q.set_avail_idx(9)
    assert rule_of(q) == 1
    q.set_avail_idx(0xFFFF)                  # "moved backwards" is the same check mod 2^16
    assert rule_of(q) == 1
    q.set_avail_idx(8)                       # exactly N ahead is allowed
    assert q.pop().head == 0                 # (zeroed ring: head 0, an empty buffer)


def test_rule_1_checked_by_enable_notify_and_avail_empty():
    """Rule 1 also guards every other read of avail.idx."""
    q = MockSplitQueue(num=8)
    q.vq.disable_notify(q.mem)
    q.set_avail_idx(100)
    with pytest.raises(VringError) as ei:
        q.vq.enable_notify(q.mem)
    assert ei.value.rule == 1
    with pytest.raises(VringError) as ei:
        q.vq.avail_empty(q.mem)
    assert ei.value.rule == 1


def test_rule_2_equal_indices_mean_empty():
    """Rule 2: avail.idx == last_avail ⇒ empty (vhost returns vq->num; we return None)."""
    q = MockSplitQueue()
    q.desc(0, DATA, 8)
    assert q.pop() is None
    q.vq.last_avail_idx = 5
    q.set_avail_idx(5)
    assert q.pop() is None
    assert q.vq.avail_empty(q.mem)


def test_rule_3_head_out_of_range():
    """Rule 3: head ≥ N ("Guest says index %u > %u is available")."""
    q = MockSplitQueue(num=8)
    q.publish(8)
    assert rule_of(q) == 3


def test_rule_4_next_out_of_range():
    """Rule 4: next ≥ N while NEXT set ("Desc index is %u > %u, head = %u")."""
    q = MockSplitQueue(num=8)
    q.desc(0, DATA, 8, NEXT, 8)
    q.publish(0)
    assert rule_of(q) == 4


def test_rule_4_next_outside_indirect_table():
    """Rule 4 inside an indirect table: next ≥ table length ("Desc next is %u" in QEMU)."""
    q = MockSplitQueue()
    q.table(DATA, [(DATA + 0x100, 4, NEXT, 2), (DATA + 0x100, 4, 0, 0)])
    q.desc(0, DATA, 32, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 4


def test_rule_5_loop_in_direct_chain():
    """Rule 5: chain longer than N (loop): `++found > vq->num` "Loop detected"."""
    q = MockSplitQueue(num=8)
    q.desc(0, DATA, 8, NEXT, 1)
    q.desc(1, DATA, 8, NEXT, 0)
    q.publish(0)
    assert rule_of(q) == 5


def test_rule_5_boundary_chain_of_exactly_n_is_fine():
    """Rule 5 boundary: a chain using all N descriptors is legal."""
    q = MockSplitQueue(num=8)
    for i in range(8):
        q.desc(i, DATA + i, 1, NEXT if i < 7 else 0, i + 1)
    q.publish(0)
    assert q.pop().out_len == 8


def test_rule_6_indirect_length_not_multiple_of_16():
    """Rule 6: indirect len % 16 ≠ 0 ("Invalid length in indirect descriptor")."""
    q = MockSplitQueue()
    q.table(DATA, [(DATA + 0x100, 4, 0, 0)])
    q.desc(0, DATA, 24, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 6


def test_rule_6_indirect_length_zero():
    """Rule 6: an empty indirect table is not a table."""
    q = MockSplitQueue()
    q.desc(0, DATA, 0, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 6


def test_rule_7_indirect_table_too_big():
    """Rule 7: indirect count > 65536 ("Indirect buffer length too big", -E2BIG)."""
    q = MockSplitQueue()
    q.desc(0, DATA, 16 * 65537, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 7


def test_rule_8_nested_indirect():
    """Rule 8: nested INDIRECT ("Nested indirect descriptor")."""
    q = MockSplitQueue()
    q.table(DATA, [(DATA + 0x100, 4, NEXT, 1), (DATA + 0x200, 16, INDIRECT, 0)])
    q.desc(0, DATA, 32, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 8


def test_rule_8_indirect_not_negotiated():
    """Rule 8 family: INDIRECT only if VIRTIO_RING_F_INDIRECT_DESC was negotiated (spec 2.7.5.3.1)."""
    q = MockSplitQueue(indirect=False)
    q.table(DATA, [(DATA + 0x100, 4, 0, 0)])
    q.desc(0, DATA, 16, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 8


def test_rule_8_indirect_with_next():
    """Rule 8 family: "The driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT"."""
    q = MockSplitQueue()
    q.table(DATA, [(DATA + 0x100, 4, 0, 0)])
    q.desc(0, DATA, 16, INDIRECT | NEXT, 1)
    q.desc(1, DATA, 4)
    q.publish(0)
    assert rule_of(q) == 8


def test_rule_9_loop_inside_indirect_table():
    """Rule 9: loop inside an indirect table ("Loop detected … indirect size")."""
    q = MockSplitQueue()
    q.table(DATA, [(DATA + 0x100, 4, NEXT, 1), (DATA + 0x100, 4, NEXT, 0)])
    q.desc(0, DATA, 32, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 9


def test_rule_10_readable_after_writable():
    """Rule 10: readable descriptor after a writable one ("Descriptor has out after in")."""
    q = MockSplitQueue()
    q.desc(0, DATA, 8, WRITE | NEXT, 1)
    q.desc(1, DATA + 8, 8)
    q.publish(0)
    assert rule_of(q) == 10


def test_rule_10_readable_after_zero_length_writable():
    """Rule 10 holds by descriptor, not by byte: a 0-byte writable still orders the chain."""
    q = MockSplitQueue()
    q.desc(0, DATA, 0, WRITE | NEXT, 1)
    q.desc(1, DATA + 8, 8)
    q.publish(0)
    assert rule_of(q) == 10


def test_rule_10_inside_indirect_table():
    """Rule 10 inside an indirect table ("Indirect descriptor has out after in")."""
    q = MockSplitQueue()
    q.table(DATA, [(DATA + 0x100, 4, WRITE | NEXT, 1), (DATA + 0x100, 4, 0, 0)])
    q.desc(0, DATA, 32, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 10


def test_rule_11_buffer_outside_memory_table():
    """Rule 11: address not in the memory table (translate_desc failure, -EFAULT)."""
    q = MockSplitQueue()
    q.desc(0, BASE + SIZE - 4, 8)            # straddles the end of guest memory
    q.publish(0)
    assert rule_of(q) == 11


def test_rule_11_indirect_table_outside_memory_table():
    """Rule 11: the indirect table itself must be mappable ("Translation failure in indirect")."""
    q = MockSplitQueue()
    q.desc(0, 0x100, 32, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 11


def test_rule_12_chain_longer_than_4_gib():
    """Rule 12: total chain bytes must stay within 2^32 - 1 (no overflowing length)."""
    q = MockSplitQueue()
    q.desc(0, DATA, 0x8000_0000, NEXT, 1)
    q.desc(1, DATA, 0x8000_0000, WRITE)
    q.publish(0)
    assert rule_of(q) == 12


def test_rule_12_inside_indirect_table():
    """Rule 12 counts indirect entries too."""
    q = MockSplitQueue()
    q.table(DATA, [(DATA, 0xFFFF_FFFF, NEXT, 1), (DATA, 1, WRITE, 0)])
    q.desc(0, DATA, 32, INDIRECT)
    q.publish(0)
    assert rule_of(q) == 12


@pytest.mark.parametrize("field,value", [("num", 6), ("num", 0), ("desc", BASE + 8),
                                         ("avail", BASE + 0x101), ("used", BASE + 0x402),
                                         ("used", BASE + SIZE - 8), ("desc", 0x1000)])
def test_rule_13_ring_memory_must_be_accessible(field, value):
    """Rule 13: ring memory accessible & ready (vhost_vq_access_ok before use, else -EFAULT)."""
    q = MockSplitQueue()
    assert q.vq.access_ok(q.mem)
    setattr(q.vq, field, value)
    assert not q.vq.access_ok(q.mem)
    for call in (q.vq.get_vq_desc, q.vq.signal, q.vq.avail_empty):
        with pytest.raises(VringError) as ei:
            call(q.mem)
        assert ei.value.rule == 13


def test_errors_quote_linux_messages():
    q = MockSplitQueue(num=8)
    q.publish(9)
    with pytest.raises(VringError, match=r"Guest says index 9 > 8 is available"):
        q.pop()
