"""Device side of the split ring (host/vhost_vq.py) against the real driver side, byte-exact."""
import struct

import pytest

from guest.ram import HIGH_BASE, LOW_BASE, GuestRAM
from guest.virtqueue import VirtQueue
from host.vhost_vq import DescChain, VhostVirtqueue
from shared.constants import VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY
from shared.errors import VringError
from shared.memory import GuestMemory, MemoryRegion


def make_ram():
    return GuestRAM("t", 1 << 20, buf=bytearray(1 << 20))


def u16(mem, gpa):
    return struct.unpack("<H", mem.read(gpa, 2))[0]


def pair(ram, num=8, *, event_idx=False, indirect=False, notify_on_empty=False):
    d, a, u = VirtQueue.alloc_rings(ram, num)
    vq = VirtQueue(ram.mem, 0, num, d, a, u, event_idx=event_idx, indirect=indirect,
                   alloc=ram.alloc if indirect else None)
    h = VhostVirtqueue(0, "test")
    h.num, h.desc, h.avail, h.used = num, d, a, u
    h.event_idx, h.indirect, h.notify_on_empty = event_idx, indirect, notify_on_empty
    assert h.access_ok(ram.mem)
    return vq, h


# --- access_ok (ring rule 13, docs/ring-rules.md) ------------------------------------------------------------------
def test_access_ok_accepts_allocated_rings_and_rejects_bad_config():
    ram = make_ram()
    vq, h = pair(ram, 8)
    for bad in (0, 3, 65536, 1 << 16):
        h.num = bad
        assert not h.access_ok(ram.mem)
    h.num = 8
    assert h.access_ok(ram.mem)
    h.desc = vq.desc + 8                      # not 16-aligned
    assert not h.access_ok(ram.mem)
    h.desc = vq.desc
    h.avail = vq.avail + 1                    # not 2-aligned
    assert not h.access_ok(ram.mem)
    h.avail = vq.avail
    h.used = vq.used + 2                      # not 4-aligned
    assert not h.access_ok(ram.mem)
    h.used = 0x1000                           # outside the memory table
    assert not h.access_ok(ram.mem)
    h.used = LOW_BASE + (1 << 19) - 16        # runs off the end of region 0
    assert not h.access_ok(ram.mem)
    h.used = vq.used
    assert h.access_ok(ram.mem)


def test_unmapped_ring_raises_rule_13_on_use():
    ram = make_ram()
    h = VhostVirtqueue(0)
    h.num, h.desc, h.avail, h.used = 8, 0x10, 0x200, 0x400   # nowhere in guest RAM
    with pytest.raises(VringError) as ei:
        h.get_vq_desc(ram.mem)
    assert ei.value.rule == 13


def test_event_fields_need_room_only_with_event_idx():
    """vq_access_ok sizes avail/used with the event words only when EVENT_IDX is acked."""
    buf = bytearray(8192)
    mem = GuestMemory.from_buffer(buf, 0x10000)
    h = VhostVirtqueue(0)
    # used ring of N=4 is 4+32 bytes (+2 with EVENT_IDX): put it flush at the end of memory
    h.num, h.desc, h.avail, h.used = 4, 0x10000, 0x10100, 0x10000 + 8192 - 36
    assert h.access_ok(mem)
    h.event_idx = True
    assert not h.access_ok(mem)


# --- get_vq_desc ------------------------------------------------------------------------------
def test_get_vq_desc_empty_then_chain_views():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram)
    assert h.get_vq_desc(mem) is None
    assert h.avail_empty(mem)
    mem.write(LOW_BASE + 0x1000, b"hello")
    mem.write(HIGH_BASE + 0x2000, b"world!")
    vq.add_sgs([(LOW_BASE + 0x1000, 5), (HIGH_BASE + 0x2000, 6)], [(LOW_BASE + 0x3000, 16)], "t")
    assert not h.avail_empty(mem)
    c = h.get_vq_desc(mem)
    assert isinstance(c, DescChain)
    assert c.head == 0 and c.out_len == 11 and c.in_len == 16
    assert b"".join(bytes(v) for v in c.out) == b"helloworld!"
    assert len(c.in_) == 1 and c.in_[0].nbytes == 16
    c.in_[0][:4] = b"ABCD"                                     # views write guest memory
    assert mem.read(LOW_BASE + 0x3000, 4) == b"ABCD"
    assert h.get_vq_desc(mem) is None and h.last_avail_idx == 1


def test_buffer_spanning_two_adjacent_regions_gives_two_views():
    buf = bytearray(0x4000)
    mv = memoryview(buf)
    mem = GuestMemory([MemoryRegion(0x10000, 0x2000, mv[:0x2000], 0x10000),
                       MemoryRegion(0x12000, 0x2000, mv[0x2000:], 0x12000)])
    vq = VirtQueue(mem, 0, 4, 0x10000, 0x10100, 0x10200)
    h = VhostVirtqueue(0)
    h.num, h.desc, h.avail, h.used = 4, 0x10000, 0x10100, 0x10200
    buf[0x1ff0:0x2010] = bytes(range(32))
    vq.add_sgs([(0x11ff0, 32)], [], "x")
    c = h.get_vq_desc(mem)
    assert [v.nbytes for v in c.out] == [16, 16]
    assert b"".join(bytes(v) for v in c.out) == bytes(range(32))


def test_zero_length_descriptor_contributes_no_view():
    ram = make_ram()
    vq, h = pair(ram)
    vq.add_sgs([(LOW_BASE + 0x1000, 0)], [(LOW_BASE + 0x2000, 8)], "z")
    c = h.get_vq_desc(ram.mem)
    assert c.out == [] and c.out_len == 0 and c.in_len == 8


def test_indirect_chain_read_by_device():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, 4, indirect=True)
    mem.write(LOW_BASE + 0x1000, b"abc")
    vq.add_sgs([(LOW_BASE + 0x1000, 3)], [(LOW_BASE + 0x2000, 7), (HIGH_BASE + 0x10, 9)], "i")
    c = h.get_vq_desc(mem)
    assert (c.head, c.out_len, c.in_len) == (0, 3, 16)
    assert bytes(c.out[0]) == b"abc" and [v.nbytes for v in c.in_] == [7, 9]
    h.add_used(mem, c.head, 16)
    assert vq.get_buf() == ("i", 16)


def test_discard_vq_desc_returns_the_same_chain_again():
    ram = make_ram()
    vq, h = pair(ram)
    vq.add_sgs([(LOW_BASE, 1)], [], "a")
    vq.add_sgs([(LOW_BASE, 2)], [], "b")
    c1 = h.get_vq_desc(ram.mem)
    c2 = h.get_vq_desc(ram.mem)
    h.discard_vq_desc(2)
    assert h.last_avail_idx == 0
    assert h.get_vq_desc(ram.mem).head == c1.head
    assert h.get_vq_desc(ram.mem).head == c2.head


# --- used side --------------------------------------------------------------------------------
def test_add_used_exact_bytes():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, 4)
    vq.add_sgs([(LOW_BASE, 1)], [], "a")
    vq.add_sgs([(LOW_BASE, 1)], [], "b")
    for _ in range(2):
        h.get_vq_desc(mem)
    h.add_used(mem, 1, 0x1234)
    assert mem.read(vq.used + 4, 8) == bytes.fromhex("01000000" "34120000")
    assert u16(mem, vq.used + 2) == 1 and h.used_idx(mem) == 1
    h.add_used_n(mem, [(0, 7)])
    assert mem.read(vq.used + 12, 8) == struct.pack("<II", 0, 7)
    assert vq.get_buf() == ("b", 0x1234)
    assert vq.get_buf() == ("a", 7)


def test_add_used_n_wraps_inside_the_ring_and_publishes_once():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, 4)
    for k in range(3):
        vq.add_sgs([(LOW_BASE, 1)], [], k)
    heads = [h.get_vq_desc(mem).head for _ in range(3)]
    h.add_used_n(mem, [(x, 0) for x in heads])
    assert [vq.get_buf()[0] for _ in range(3)] == [0, 1, 2]
    for k in range(3, 7):
        vq.add_sgs([(LOW_BASE, 1)], [], k)
    heads = [h.get_vq_desc(mem).head for _ in range(4)]
    h.add_used_n(mem, [(x, 1) for x in heads])            # slots 3, 0, 1, 2
    assert u16(mem, vq.used + 2) == 7
    assert struct.unpack("<II", mem.read(vq.used + 4 + 8 * 3, 8)) == (heads[0], 1)
    assert struct.unpack("<II", mem.read(vq.used + 4, 8)) == (heads[1], 1)
    assert [vq.get_buf() for _ in range(4)] == [(k, 1) for k in range(3, 7)]
    h.add_used_n(mem, [])
    assert u16(mem, vq.used + 2) == 7


# --- signal -----------------------------------------------------------------------------------
def test_signal_without_event_idx_honours_no_interrupt():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram)
    vq.add_sgs([(LOW_BASE, 1)], [], "a")
    vq.add_sgs([(LOW_BASE, 1)], [], "b")
    h.add_used(mem, h.get_vq_desc(mem).head, 0)
    assert h.signal(mem) is True
    vq.disable_cb()
    assert u16(mem, vq.avail) == VRING_AVAIL_F_NO_INTERRUPT
    assert h.signal(mem) is False
    vq.enable_cb()
    assert h.signal(mem) is True


def test_signal_notify_on_empty_overrides_no_interrupt():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, notify_on_empty=True)
    vq.add_sgs([(LOW_BASE, 1)], [], "a")
    vq.add_sgs([(LOW_BASE, 1)], [], "b")
    vq.disable_cb()
    h.add_used(mem, h.get_vq_desc(mem).head, 0)
    assert h.signal(mem) is False                         # one still pending
    h.add_used(mem, h.get_vq_desc(mem).head, 0)
    assert h.get_vq_desc(mem) is None
    assert h.signal(mem) is True                          # ran out of buffers


def test_signal_event_idx_math():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, 8, event_idx=True)
    ue = vq.avail + 4 + 2 * 8
    for k in range(6):
        vq.add_sgs([(LOW_BASE, 1)], [], k)
    h.add_used(mem, h.get_vq_desc(mem).head, 0)
    assert h.signal(mem) is True                          # first signal: signalled_used invalid
    assert h.signalled_used == 1 and h.signalled_used_valid
    mem.write(ue, struct.pack("<H", 3))                   # driver: interrupt when entry 3 is used
    h.add_used(mem, h.get_vq_desc(mem).head, 0)           # used 1 -> 2
    assert h.signal(mem) is False
    h.add_used(mem, h.get_vq_desc(mem).head, 0)           # 2 -> 3
    assert h.signal(mem) is False
    h.add_used(mem, h.get_vq_desc(mem).head, 0)           # 3 -> 4 passes used_event 3
    assert h.signal(mem) is True
    assert h.signal(mem) is False                         # nothing new since
    # avail.flags NO_INTERRUPT is ignored with EVENT_IDX
    mem.write(vq.avail, struct.pack("<H", VRING_AVAIL_F_NO_INTERRUPT))
    mem.write(ue, struct.pack("<H", 4))
    h.add_used(mem, h.get_vq_desc(mem).head, 0)
    assert h.signal(mem) is True


def test_signalled_used_invalidated_when_lapped():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, 4, event_idx=True)
    h.last_used_idx = 65535                                # 65535 entries used since signal 0
    h.signalled_used, h.signalled_used_valid = 0, True
    h.add_used(mem, 0, 0)                                  # new used == signalled_used (0)
    assert not h.signalled_used_valid
    assert h.signal(mem) is True


# --- kick suppression -------------------------------------------------------------------------
def test_disable_enable_notify_without_event_idx():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram)
    vq.add_sgs([(LOW_BASE, 1)], [], "a")
    assert vq.kick_prepare() is True
    h.disable_notify(mem)
    assert u16(mem, vq.used) == VRING_USED_F_NO_NOTIFY
    vq.add_sgs([(LOW_BASE, 1)], [], "b")
    assert vq.kick_prepare() is False
    assert h.enable_notify(mem) is True                   # two buffers are waiting
    assert u16(mem, vq.used) == 0
    h.disable_notify(mem)
    h.get_vq_desc(mem)
    h.get_vq_desc(mem)
    assert h.enable_notify(mem) is False
    assert h.enable_notify(mem) is False                  # already enabled: no-op


def test_disable_enable_notify_event_idx_writes_avail_event():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, 8, event_idx=True)
    ae = vq.used + 4 + 8 * 8                               # avail_event = used->ring[N]
    h.disable_notify(mem)
    assert u16(mem, vq.used) == 0                          # no flag write with EVENT_IDX
    vq.add_sgs([(LOW_BASE, 1)], [], "a")
    vq.kick_prepare()
    h.get_vq_desc(mem)
    assert h.enable_notify(mem) is False
    assert u16(mem, ae) == 1                               # = last_avail_idx
    vq.add_sgs([(LOW_BASE, 1)], [], "b")                   # 1 -> 2 crosses avail_event 1
    assert vq.kick_prepare() is True
    vq.add_sgs([(LOW_BASE, 1)], [], "c")
    assert vq.kick_prepare() is False                      # device hasn't re-armed
    h.disable_notify(mem)
    assert h.enable_notify(mem) is True                    # raced in


def test_reconfiguring_drops_the_mapping():
    ram = make_ram()
    vq, h = pair(ram, 8)
    d, a, u = VirtQueue.alloc_rings(ram, 16)
    vq2 = VirtQueue(ram.mem, 0, 16, d, a, u)
    h.num, h.desc, h.avail, h.used = 16, d, a, u
    h.last_avail_idx = 0
    h.last_used_idx = 0
    vq2.add_sgs([(LOW_BASE, 1)], [], "new")
    c = h.get_vq_desc(ram.mem)
    h.add_used(ram.mem, c.head, 0)
    assert vq2.get_buf() == ("new", 0)
    h.unmap()
    assert h.used_idx(ram.mem) == 1                        # remaps on demand


def test_set_vring_base_mid_stream():
    ram = make_ram()
    mem = ram.mem
    vq, h = pair(ram, 4)
    vq.add_sgs([(LOW_BASE, 1)], [], "a")
    vq.add_sgs([(LOW_BASE, 1)], [], "b")
    c = h.get_vq_desc(mem)
    h.add_used(mem, c.head, 0)
    # reconnect: a fresh backend resumes at the ring's used.idx
    h2 = VhostVirtqueue(0)
    h2.num, h2.desc, h2.avail, h2.used = 4, vq.desc, vq.avail, vq.used
    h2.last_avail_idx = h2.last_used_idx = h.used_idx(mem)
    c2 = h2.get_vq_desc(mem)
    h2.add_used(mem, c2.head, 5)
    assert vq.get_buf() == ("a", 0)
    assert vq.get_buf() == ("b", 5)
