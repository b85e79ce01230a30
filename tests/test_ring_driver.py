"""Driver side of the split ring (guest/virtqueue.py): every verb, exact bytes at spec offsets."""
import struct

import pytest

from guest.ram import LOW_BASE, GuestRAM
from guest.virtqueue import VirtQueue
from host.vhost_vq import VhostVirtqueue
from shared.constants import (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                              VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY)
from shared.ring_layout import vring_init, vring_size

DESC = struct.Struct("<QIHH")


def make_ram():
    return GuestRAM("t", 1 << 20, buf=bytearray(1 << 20))


def make_vq(ram, num=8, **kw):
    d, a, u = VirtQueue.alloc_rings(ram, num)
    return VirtQueue(ram.mem, 0, num, d, a, u, **kw)


def u16(mem, gpa):
    return struct.unpack("<H", mem.read(gpa, 2))[0]


def device_use(mem, vq, elems):
    """Play the device by hand: write used elements, then used.idx (the publish order)."""
    idx = u16(mem, vq.used + 2)
    for head, ln in elems:
        mem.write(vq.used + 4 + 8 * (idx % vq.num), struct.pack("<II", head, ln))
        idx = (idx + 1) & 0xFFFF
    mem.write(vq.used + 2, struct.pack("<H", idx))


# --- layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num,used_off,total", [(64, 4096, 4614), (128, 4096, 5126),
                                                (256, 8192, 10246), (1024, 20480, 28678)])
def test_legacy_vring_size_and_init_match_linux(num, used_off, total):
    """uapi virtio_ring.h vring_size/vring_init at align 4096 (docs/ring-rules.md)."""
    assert vring_size(num, 4096) == total
    a = vring_init(num, 0x10000, 4096)
    assert a.desc == 0x10000
    assert a.avail == 0x10000 + 16 * num
    assert a.used == 0x10000 + used_off


def test_layout_sizes():
    assert VirtQueue.layout(256) == (4096, 6 + 512, 6 + 2048)
    with pytest.raises(ValueError):
        VirtQueue.layout(3)


def test_alloc_rings_aligned_and_zeroed():
    buf = bytearray(b"\xaa" * (1 << 20))
    ram = GuestRAM("t", 1 << 20, buf=buf)
    d, a, u = VirtQueue.alloc_rings(ram, 256)
    assert d % 16 == 0 and a % 2 == 0 and u % 4 == 0
    assert ram.mem.read(d, 4096) == bytes(4096)
    assert ram.mem.read(a, 6 + 512) == bytes(6 + 512)
    assert ram.mem.read(u, 6 + 2048) == bytes(6 + 2048)
    # also works with an allocator + memory, and frees back to the same state
    before = ram.alloc.in_use
    d2, a2, u2 = VirtQueue.alloc_rings(ram.alloc, 16, ram.mem)
    assert ram.alloc.in_use > before
    VirtQueue.free_rings(ram.alloc, d2, a2, u2)
    assert ram.alloc.in_use == before


def test_alloc_rings_exhausted_leaves_nothing_allocated():
    ram = GuestRAM("t", 1 << 16, buf=bytearray(1 << 16))     # 2 x 32 KiB regions
    before = ram.alloc.in_use
    with pytest.raises(MemoryError):
        VirtQueue.alloc_rings(ram, 4096)                     # 64 KiB desc table cannot fit
    assert ram.alloc.in_use == before


def test_init_writes_free_chain_through_desc_next():
    ram = make_ram()
    vq = make_vq(ram, 8)
    for i in range(8):
        assert DESC.unpack(ram.mem.read(vq.desc + 16 * i, 16)) == (0, 0, 0, (i + 1) % 8)
    assert vq.num_free == 8 and not vq.broken


# --- add_sgs ----------------------------------------------------------------------------------
def test_add_sgs_exact_bytes():
    ram = make_ram()
    mem = ram.mem
    vq = make_vq(ram, 8)
    assert vq.add_sgs([(0x4000_1000, 100), (0x4000_2000, 50)], [(0x4000_3000, 200)], "tok")
    assert DESC.unpack(mem.read(vq.desc + 0, 16)) == (0x4000_1000, 100, VRING_DESC_F_NEXT, 1)
    assert DESC.unpack(mem.read(vq.desc + 16, 16)) == (0x4000_2000, 50, VRING_DESC_F_NEXT, 2)
    # last descriptor: WRITE without NEXT (next field left as the free chain had it)
    assert DESC.unpack(mem.read(vq.desc + 32, 16)) == (0x4000_3000, 200, VRING_DESC_F_WRITE, 3)
    # raw bytes of desc[0]: le64 addr, le32 len, le16 flags, le16 next
    assert mem.read(vq.desc, 16) == bytes.fromhex("0010004000000000" "64000000" "0100" "0100")
    assert u16(mem, vq.avail + 0) == 0                   # avail.flags
    assert u16(mem, vq.avail + 2) == 1                   # avail.idx published
    assert u16(mem, vq.avail + 4) == 0                   # avail.ring[0] = head 0
    assert vq.num_free == 5 and vq.free_head == 3
    assert vq.add_sgs([], [(0x4000_4000, 8)], "t2")
    assert u16(mem, vq.avail + 4 + 2) == 3               # avail.ring[1] = head 3
    assert u16(mem, vq.avail + 2) == 2
    assert DESC.unpack(mem.read(vq.desc + 48, 16)) == (0x4000_4000, 8, VRING_DESC_F_WRITE, 4)


def test_add_sgs_no_space_changes_nothing():
    ram = make_ram()
    vq = make_vq(ram, 4)
    assert vq.add_sgs([(0x4000_1000, 1)] * 3, [], 1)
    snap = bytes(ram.mem.read(vq.desc, 16 * 4)) + ram.mem.read(vq.avail, 6 + 8)
    assert not vq.add_sgs([(0x4000_1000, 1)], [(0x4000_1000, 1)], 2)
    assert bytes(ram.mem.read(vq.desc, 16 * 4)) + ram.mem.read(vq.avail, 6 + 8) == snap
    assert vq.num_free == 1 and vq.avail_idx_shadow == 1 and vq.num_added == 1
    assert vq.add_sgs([(0x4000_1000, 1)], [], 3)         # one still fits
    assert not vq.add_sgs([(0x4000_1000, 1)], [], 4)


def test_add_sgs_rejects_none_token_and_empty():
    vq = make_vq(make_ram())
    with pytest.raises(ValueError):
        vq.add_sgs([(0x4000_1000, 1)], [], None)
    with pytest.raises(ValueError):
        vq.add_sgs([], [], 1)


# --- kick_prepare -----------------------------------------------------------------------------
def test_kick_prepare_without_event_idx_honours_no_notify():
    ram = make_ram()
    vq = make_vq(ram)
    vq.add_sgs([(0x4000_1000, 1)], [], 1)
    assert vq.kick_prepare() is True
    ram.mem.write(vq.used, struct.pack("<H", VRING_USED_F_NO_NOTIFY))
    vq.add_sgs([(0x4000_1000, 1)], [], 2)
    assert vq.kick_prepare() is False
    assert vq.num_added == 0


def test_kick_prepare_event_idx():
    ram = make_ram()
    vq = make_vq(ram, 8, event_idx=True)
    ae = vq.used + 4 + 8 * 8                              # avail_event offset
    vq.add_sgs([(0x4000_1000, 1)], [], 1)                # 0 -> 1 crosses avail_event 0
    assert vq.kick_prepare() is True
    ram.mem.write(ae, struct.pack("<H", 3))              # device: kick me when entry 3 is added
    vq.add_sgs([(0x4000_1000, 1)], [], 2)                # 1 -> 2
    assert vq.kick_prepare() is False
    vq.add_sgs([(0x4000_1000, 1)], [], 3)
    vq.add_sgs([(0x4000_1000, 1)], [], 4)                # 2 -> 4 passes 3
    assert vq.kick_prepare() is True
    # NO_NOTIFY is ignored with EVENT_IDX
    ram.mem.write(vq.used, struct.pack("<H", VRING_USED_F_NO_NOTIFY))
    ram.mem.write(ae, struct.pack("<H", 4))
    vq.add_sgs([(0x4000_1000, 1)], [], 5)
    assert vq.kick_prepare() is True
    assert u16(ram.mem, vq.avail) == 0                   # the driver keeps avail.flags = 0


# --- get_buf ----------------------------------------------------------------------------------
def test_get_buf_returns_token_and_len_and_recycles_lifo():
    ram = make_ram()
    vq = make_vq(ram, 4)
    assert vq.get_buf() is None and not vq.more_used()
    vq.add_sgs([(0x4000_1000, 1)], [(0x4000_2000, 64)], "a")   # heads 0,1
    vq.add_sgs([(0x4000_1000, 1)], [], "b")                      # head 2
    device_use(ram.mem, vq, [(2, 0), (0, 64)])
    assert vq.more_used()
    assert vq.get_buf() == ("b", 0)
    assert vq.free_head == 2 and vq.num_free == 2
    assert vq.get_buf() == ("a", 64)
    assert vq.free_head == 0 and vq.num_free == 4
    assert vq.get_buf() is None
    assert vq.last_used_idx == 2
    # the free chain now is 0 -> 1 -> 2 -> 3: a 4-descriptor buffer fits
    assert vq.add_sgs([(0x4000_1000, 1)] * 4, [], "c")
    assert vq.num_free == 0


def test_get_buf_id_out_of_range_breaks_queue():
    ram = make_ram()
    vq = make_vq(ram, 4)
    vq.add_sgs([(0x4000_1000, 1)], [], "a")
    device_use(ram.mem, vq, [(4, 0)])
    assert vq.get_buf() is None
    assert vq.broken and "out of range" in vq.broken_reason
    assert not vq.add_sgs([(0x4000_1000, 1)], [], "b")


def test_get_buf_id_not_a_head_breaks_queue():
    ram = make_ram()
    vq = make_vq(ram, 4)
    vq.add_sgs([(0x4000_1000, 1), (0x4000_1000, 1)], [], "a")   # heads 0 (+1)
    device_use(ram.mem, vq, [(1, 0)])                             # 1 is inside the chain
    assert vq.get_buf() is None
    assert vq.broken and "not a head" in vq.broken_reason


def test_get_buf_twice_same_id_is_not_a_head():
    ram = make_ram()
    vq = make_vq(ram, 4)
    vq.add_sgs([(0x4000_1000, 1)], [], "a")
    device_use(ram.mem, vq, [(0, 0), (0, 0)])
    assert vq.get_buf() == ("a", 0)
    assert vq.get_buf() is None and vq.broken


# --- interrupt suppression --------------------------------------------------------------------
def test_disable_enable_cb_without_event_idx():
    ram = make_ram()
    vq = make_vq(ram, 8)
    ue = vq.avail + 4 + 2 * 8
    vq.disable_cb()
    assert u16(ram.mem, vq.avail) == VRING_AVAIL_F_NO_INTERRUPT
    assert vq.enable_cb() is True
    assert u16(ram.mem, vq.avail) == 0
    assert u16(ram.mem, ue) == 0                          # used_event untouched without EVENT_IDX
    vq.add_sgs([(0x4000_1000, 1)], [], "a")
    vq.disable_cb()
    device_use(ram.mem, vq, [(0, 0)])
    assert vq.enable_cb() is False                        # raced in: poll again
    assert vq.get_buf() == ("a", 0)
    assert vq.enable_cb() is True


def test_disable_enable_cb_event_idx():
    ram = make_ram()
    vq = make_vq(ram, 8, event_idx=True)
    ue = vq.avail + 4 + 2 * 8                             # used_event = avail->ring[N]
    for i in range(3):
        vq.add_sgs([(0x4000_1000, 1)], [], i)
    device_use(ram.mem, vq, [(0, 0)])
    assert vq.get_buf() == (0, 0)
    assert u16(ram.mem, ue) == 1                          # callbacks on: interrupt at next entry
    vq.disable_cb()
    assert u16(ram.mem, vq.avail) == 0                    # flags stay 0 with EVENT_IDX
    device_use(ram.mem, vq, [(1, 0)])
    assert vq.get_buf() == (1, 0)
    assert u16(ram.mem, ue) == 1                          # disabled: used_event not advanced
    assert vq.enable_cb() is True
    assert u16(ram.mem, ue) == 2
    device_use(ram.mem, vq, [(2, 0)])
    vq.disable_cb()
    assert vq.enable_cb() is False


def test_enable_cb_delayed():
    ram = make_ram()
    vq = make_vq(ram, 16, event_idx=True)
    ue = vq.avail + 4 + 2 * 16
    for i in range(8):
        vq.add_sgs([(0x4000_1000, 1)], [], i)
    vq.disable_cb()
    assert vq.enable_cb_delayed() is True
    assert u16(ram.mem, ue) == 6                          # 0 + 8 * 3 // 4
    device_use(ram.mem, vq, [(i, 0) for i in range(7)])   # 7 used > 6
    vq.disable_cb()
    assert vq.enable_cb_delayed() is False


# --- detach_unused_buf ------------------------------------------------------------------------
def test_detach_unused_buf_reclaims_everything():
    ram = make_ram()
    vq = make_vq(ram, 8, indirect=True, alloc=ram.alloc)
    before = ram.alloc.in_use
    vq.add_sgs([(0x4000_1000, 1)], [], "a")
    vq.add_sgs([(0x4000_1000, 1)], [(0x4000_2000, 1)], "b")   # indirect
    assert ram.alloc.in_use > before
    got = {vq.detach_unused_buf(), vq.detach_unused_buf()}
    assert got == {"a", "b"}
    assert vq.detach_unused_buf() is None
    assert vq.num_free == 8 and vq.avail_idx_shadow == 0 and u16(ram.mem, vq.avail + 2) == 0
    assert ram.alloc.in_use == before


# --- indirect ---------------------------------------------------------------------------------
def test_indirect_table_layout_and_free():
    ram = make_ram()
    mem = ram.mem
    vq = make_vq(ram, 4, indirect=True, alloc=ram.alloc)
    before = ram.alloc.in_use
    assert vq.add_sgs([(0x4000_1000, 10), (0x4000_2000, 20)], [(0x4000_3000, 30)], "x")
    assert vq.num_free == 3                               # one descriptor for three buffers
    addr, ln, flags, _ = DESC.unpack(mem.read(vq.desc, 16))
    assert flags == VRING_DESC_F_INDIRECT and ln == 48
    assert ram.alloc.in_use > before and addr % 16 == 0
    assert [DESC.unpack(mem.read(addr + 16 * k, 16)) for k in range(3)] == [
        (0x4000_1000, 10, VRING_DESC_F_NEXT, 1),
        (0x4000_2000, 20, VRING_DESC_F_NEXT, 2),
        (0x4000_3000, 30, VRING_DESC_F_WRITE, 3)]
    # a single-entry buffer goes direct
    assert vq.add_sgs([(0x4000_4000, 5)], [], "y")
    assert DESC.unpack(mem.read(vq.desc + 16, 16))[2] == 0
    device_use(mem, vq, [(0, 30), (1, 0)])
    assert vq.get_buf() == ("x", 30)
    assert ram.alloc.in_use == before
    assert vq.get_buf() == ("y", 0)
    assert vq.num_free == 4


class _NoMemory:
    def alloc(self, size, align=16):
        return None

    def free(self, gpa):                                  # pragma: no cover - never allocated
        raise AssertionError("nothing to free")


def test_indirect_falls_back_to_direct_when_allocation_fails():
    ram = make_ram()
    vq = make_vq(ram, 4, indirect=True, alloc=_NoMemory())
    assert vq.add_sgs([(0x4000_1000, 1)], [(0x4000_2000, 2)], "x")
    assert vq.num_free == 2
    assert DESC.unpack(ram.mem.read(vq.desc, 16))[2] == VRING_DESC_F_NEXT


def test_indirect_not_used_when_ring_full():
    ram = make_ram()
    vq = make_vq(ram, 2, indirect=True, alloc=ram.alloc)
    before = ram.alloc.in_use
    assert vq.add_sgs([(0x4000_1000, 1)], [(0x4000_2000, 1)], 1)
    assert vq.add_sgs([(0x4000_1000, 1)], [(0x4000_2000, 1)], 2)
    in_use = ram.alloc.in_use
    assert not vq.add_sgs([(0x4000_1000, 1)], [(0x4000_2000, 1)], 3)   # num_free == 0
    assert ram.alloc.in_use == in_use > before


# --- wrap-around ------------------------------------------------------------------------------
def _start_at(vq, hvq, mem, idx):
    """Put both sides at ring index idx, consistently (a ring that has run idx buffers)."""
    vq.avail_idx_shadow = vq.last_used_idx = idx
    mem.write(vq.avail + 2, struct.pack("<H", idx))
    mem.write(vq.used + 2, struct.pack("<H", idx))
    hvq.last_avail_idx = idx
    hvq.last_used_idx = idx


def _pair(ram, num, **kw):
    vq = make_vq(ram, num, **kw)
    h = VhostVirtqueue(0)
    h.num, h.desc, h.avail, h.used = num, vq.desc, vq.avail, vq.used
    h.event_idx = kw.get("event_idx", False)
    h.indirect = kw.get("indirect", False)
    assert h.access_ok(ram.mem)
    return vq, h


@pytest.mark.parametrize("event_idx", [False, True])
def test_wraparound_past_65535(event_idx):
    ram = make_ram()
    mem = ram.mem
    vq, h = _pair(ram, 4, event_idx=event_idx)
    _start_at(vq, h, mem, 65530)
    for k in range(20):
        assert vq.add_sgs([(LOW_BASE + 0x1000, 4)], [], k)
        vq.kick_prepare()
        c = h.get_vq_desc(mem)
        h.add_used(mem, c.head, k)
        assert vq.get_buf() == (k, k)
    assert vq.avail_idx_shadow == (65530 + 20) & 0xFFFF == u16(mem, vq.avail + 2)
    assert u16(mem, vq.used + 2) == 14 and vq.last_used_idx == 14


def test_a_broken_queue_has_no_more_work_so_no_loop_spins_on_it():
    """virtqueue_poll is false on a broken queue: enable_cb says "nothing raced in" and more_used
    is false even with used entries the driver will never take (a device that reused a head)."""
    from guest.ram import GuestRAM
    from guest.virtqueue import VirtQueue
    ram = GuestRAM("t", 1 << 20, buf=bytearray(1 << 20))
    d, a, u = VirtQueue.alloc_rings(ram, 8)
    vq = VirtQueue(ram.mem, 0, 8, d, a, u, event_idx=True)
    g = ram.alloc.alloc(64)
    assert vq.add_sgs([(g, 64)], [], "tok")
    uv = ram.mem.u16_view(u, 2)
    ram.mem.write(u + 4, (5).to_bytes(4, "little") + (64).to_bytes(4, "little"))   # id 5: not a head
    uv[1] = 1
    assert vq.get_buf() is None and vq.broken
    assert not vq.more_used()
    assert vq.enable_cb() and vq.enable_cb_delayed() and vq.enable_cb_after(4)
