"""The packed virtqueue: driver side (guest/virtqueue_packed.py) against the device side
(host/vhost_vq_packed.py) in one process on a bytearray, byte-exact; hostile rings on the device
side; a hostile device on the driver side; the vhost-user ring base."""
import struct

import pytest

from guest.ram import GuestRAM
from guest.virtqueue_packed import VirtQueuePacked
from host.device import VhostDevice
from host.vhost_vq import VhostVirtqueue
from host.vhost_vq_packed import VhostVirtqueuePacked
from shared.constants import (VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                              VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, bit)
from shared.errors import VringError
from shared.ring_layout import (DESC_F_AVAIL, DESC_F_USED, PACKED_DESC,
                                VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
                                VRING_PACKED_EVENT_FLAG_ENABLE)

AU = DESC_F_AVAIL | DESC_F_USED


def make_ram():
    return GuestRAM("t", 1 << 20, buf=bytearray(1 << 20))


def pair(ram, num=8, *, event_idx=False, indirect=False, notify_on_empty=False):
    d, a, u = VirtQueuePacked.alloc_rings(ram, num)
    vq = VirtQueuePacked(ram.mem, 0, num, d, a, u, event_idx=event_idx, indirect=indirect,
                         alloc=ram.alloc if indirect else None)
    h = VhostVirtqueuePacked(0, "test")
    h.num, h.desc, h.avail, h.used = num, d, a, u
    h.event_idx, h.indirect, h.notify_on_empty = event_idx, indirect, notify_on_empty
    h.last_avail_idx = h.last_used_idx = vq.resume_base()      # 0x8000: slot 0, wrap 1
    assert h.access_ok(ram.mem)
    h.init_access(ram.mem)
    return vq, h


def desc(ram, vq, i):
    return PACKED_DESC.unpack(ram.mem.read(vq.desc + 16 * i, 16))     # addr, len, id, flags


def u16(ram, gpa):
    return struct.unpack("<H", ram.mem.read(gpa, 2))[0]


def serve(ram, h, used_len=0):
    """The device pops everything available and returns it (length used_len, or in_len)."""
    got = []
    while (c := h.get_vq_desc(ram.mem)) is not None:
        for mv in c.in_:
            mv[:] = b"\xab" * len(mv)
        got.append((c.head, used_len or c.in_len))
    h.add_used_n(ram.mem, got)
    return got


# --- layout and the handover, byte for byte -------------------------------------------------------
def test_descriptors_carry_id_and_the_lap_bits_and_the_device_marks_them_used():
    ram = make_ram()
    vq, h = pair(ram, 4)
    buf = ram.alloc.alloc(4096, 16)
    assert vq.add_sgs([(buf, 10)], [(buf + 100, 20), (buf + 200, 30)], token="a")
    # three slots, one id; NEXT on all but the last; WRITE on the in part; AVAIL=1 USED=0 (lap 1)
    assert [desc(ram, vq, i) for i in range(3)] == [
        (buf, 10, 0, VRING_DESC_F_NEXT | DESC_F_AVAIL),
        (buf + 100, 20, 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | DESC_F_AVAIL),
        (buf + 200, 30, 0, VRING_DESC_F_WRITE | DESC_F_AVAIL)]
    assert vq.num_free == 1 and vq.next_avail_idx == 3
    c = h.get_vq_desc(ram.mem)
    assert (c.head, c.out_len, c.in_len, len(c.out), len(c.in_)) == (0, 10, 50, 1, 2)
    assert h.get_vq_desc(ram.mem) is None
    h.add_used(ram.mem, c.head, 50)
    # the used descriptor overwrites slot 0: id 0, len 50, AVAIL = USED = 1
    _, ln, bid, flags = desc(ram, vq, 0)
    assert (ln, bid, flags & AU) == (50, 0, AU)
    assert h.last_used_idx == 3 | 0x8000
    assert vq.get_buf() == ("a", 50)
    assert vq.num_free == 4 and vq.last_used_idx == 3 and vq.used_wrap_counter == 1


def test_wrap_counters_flip_at_the_end_and_the_bits_follow_them():
    ram = make_ram()
    vq, h = pair(ram, 4)
    buf = ram.alloc.alloc(4096, 16)
    laps = []
    for n in range(12):
        assert vq.add_sgs([(buf, 8)], [(buf + 64, 8)], token=n)   # two slots each
        laps.append(vq.avail_wrap_counter)
        assert serve(ram, h) == [(0, 8)]
        assert vq.get_buf() == (n, 8)
    assert laps == [1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1]
    # after 24 slots in a 4-slot ring: 6 laps, back at slot 0 with both counters 1
    assert (vq.next_avail_idx, vq.avail_wrap_counter, vq.last_used_idx, vq.used_wrap_counter) == (0, 1, 0, 1)
    assert h.vring_base() == 0x8000 | 0x8000 << 16
    # a chain that straddles the end: slot 3 (lap 1 bits) then slot 0 (lap 0 bits)
    assert vq.add_sgs([(buf, 8)], [], token="x")
    assert vq.add_sgs([(buf, 8)], [], token="y")
    assert vq.add_sgs([(buf, 8)], [], token="z")
    assert [c[0] for c in serve(ram, h)] == [0, 1, 2]
    assert [vq.get_buf()[0] for _ in range(3)] == ["x", "y", "z"]
    assert vq.add_sgs([(buf, 8)], [(buf + 8, 8)], token="w")
    # slot 3 in lap 1: AVAIL=1 USED=0; slot 0 in lap 0: AVAIL=0 USED=1
    assert desc(ram, vq, 3)[3] & AU == DESC_F_AVAIL and desc(ram, vq, 0)[3] & AU == DESC_F_USED
    c = h.get_vq_desc(ram.mem)
    assert (c.out_len, c.in_len) == (8, 8) and h.last_avail_idx == 1     # slot 1, lap 0
    h.add_used(ram.mem, c.head, 8)
    assert vq.get_buf() == ("w", 8) and (vq.last_used_idx, vq.used_wrap_counter) == (1, 0)
    assert vq.num_free == 4


def test_the_head_flags_are_the_last_store_of_add_sgs():
    """virtio_wmb then the head's flags: a device that sees the head sees the whole chain."""
    ram = make_ram()
    vq, h = pair(ram, 8)
    buf = ram.alloc.alloc(4096, 16)
    writes = []

    class Rec:
        def __init__(self, v):
            self.v = v

        def __getitem__(self, i):
            return self.v[i]

        def __setitem__(self, i, x):
            writes.append(i)
            self.v[i] = x
    vq._dw = Rec(vq._dw)
    assert vq.add_sgs([(buf, 1), (buf + 1, 1)], [(buf + 2, 1)], token=1)
    assert writes == [8 * 1 + 7, 8 * 2 + 7, 8 * 0 + 7]
    # and a device looking before that store finds nothing
    ram2 = make_ram()
    vq2, h2 = pair(ram2, 8)
    assert vq2.add_sgs([(buf, 1), (buf + 1, 1)], [], token=1)
    flags0 = vq2._dw[7]
    vq2._dw[7] = 0                                        # "not yet published"
    assert h2.get_vq_desc(ram2.mem) is None and h2.avail_empty(ram2.mem)
    vq2._dw[7] = flags0
    assert h2.get_vq_desc(ram2.mem).out_len == 2


def test_indirect_tables_take_one_slot():
    ram = make_ram()
    vq, h = pair(ram, 4, indirect=True)
    buf = ram.alloc.alloc(4096, 16)
    for n in range(9):
        assert vq.add_sgs([(buf, 44), (buf + 44, 100)], [(buf + 200, 300)], token=n)
        assert vq.num_free == 3
        addr, ln, bid, flags = desc(ram, vq, vq.next_avail_idx - 1 if vq.next_avail_idx else 3)
        assert flags & VRING_DESC_F_INDIRECT and ln == 48
        c = h.get_vq_desc(ram.mem)
        assert (c.out_len, c.in_len) == (144, 300)
        h.add_used(ram.mem, c.head, 300)
        assert vq.get_buf() == (n, 300)
    assert vq.num_free == 4


def test_out_of_order_completion_ids_and_positions():
    """Used descriptors are written in completion order from the driver's next used slot."""
    ram = make_ram()
    vq, h = pair(ram, 8)
    buf = ram.alloc.alloc(4096, 16)
    for t in "abc":
        assert vq.add_sgs([(buf, 4)], [(buf + 8, 4)], token=t)
    chains = [h.get_vq_desc(ram.mem) for _ in range(3)]
    h.add_used(ram.mem, chains[2].head, 1)        # c first, then a, then b
    h.add_used(ram.mem, chains[0].head, 2)
    assert vq.get_buf() == ("c", 1)
    assert vq.get_buf() == ("a", 2)
    assert vq.get_buf() is None
    assert vq.device_pending()
    h.add_used(ram.mem, chains[1].head, 3)
    assert not vq.device_pending() or vq.in_flight() == 1
    assert vq.get_buf() == ("b", 3)
    assert not vq.device_pending() and vq.num_free == 8


# --- notifications -------------------------------------------------------------------------------
def test_kick_suppression_without_event_idx():
    ram = make_ram()
    vq, h = pair(ram, 8)
    buf = ram.alloc.alloc(4096, 16)
    assert vq.add_sgs([(buf, 1)], [], token=1) and vq.kick_prepare()
    h.disable_notify(ram.mem)
    assert u16(ram, vq.used + 2) == VRING_PACKED_EVENT_FLAG_DISABLE
    assert vq.add_sgs([(buf, 1)], [], token=2) and not vq.kick_prepare()
    assert h.enable_notify(ram.mem)                 # buffers are there: raced
    serve(ram, h)
    h.disable_notify(ram.mem)
    assert not h.enable_notify(ram.mem)              # nothing new
    assert u16(ram, vq.used + 2) == VRING_PACKED_EVENT_FLAG_ENABLE
    assert vq.add_sgs([(buf, 1)], [], token=3) and vq.kick_prepare()


def test_kick_suppression_with_event_idx_across_the_wrap():
    ram = make_ram()
    vq, h = pair(ram, 4, event_idx=True)
    buf = ram.alloc.alloc(4096, 16)
    kicks = []
    for n in range(20):
        assert vq.add_sgs([(buf, 1)], [], token=n)
        kicks.append(vq.kick_prepare())
        if n % 3 == 2:                                  # the device serves every third buffer
            h.disable_notify(ram.mem)
            serve(ram, h, 1)
            while vq.get_buf():
                pass
            assert not h.enable_notify(ram.mem)
            assert u16(ram, vq.used + 2) == VRING_PACKED_EVENT_FLAG_DESC
            assert u16(ram, vq.used) == h.last_avail_idx   # off_wrap: where it wants the kick
    # a kick exactly for the first buffer after each re-arm (and the very first)
    assert kicks == [n % 3 == 0 for n in range(20)], kicks


def test_interrupt_suppression_with_and_without_event_idx():
    for event_idx in (False, True):
        ram = make_ram()
        vq, h = pair(ram, 4, event_idx=event_idx)
        buf = ram.alloc.alloc(4096, 16)
        sig = []
        for n in range(14):
            assert vq.add_sgs([(buf, 1)], [(buf + 4, 1)], token=n)
            serve(ram, h, 1)
            sig.append(h.signal(ram.mem))
            if n % 2:                                   # the driver polls every second one
                vq.disable_cb()
                while vq.get_buf():
                    pass
                assert vq.enable_cb()
            else:
                vq.disable_cb()
        # signalled only for the first completion after each enable_cb
        assert sig == [n % 2 == 0 for n in range(14)], (event_idx, sig)
        assert u16(ram, vq.avail + 2) == (VRING_PACKED_EVENT_FLAG_DESC if event_idx
                                          else VRING_PACKED_EVENT_FLAG_ENABLE)
        vq.disable_cb()
        assert u16(ram, vq.avail + 2) == VRING_PACKED_EVENT_FLAG_DISABLE


def test_enable_cb_reports_a_race_and_enable_cb_after_waits_for_k():
    ram = make_ram()
    vq, h = pair(ram, 8, event_idx=True)
    buf = ram.alloc.alloc(4096, 16)
    for n in range(6):
        assert vq.add_sgs([(buf, 1)], [], token=n)
    vq.disable_cb()
    serve(ram, h, 1)
    assert not h.signal(ram.mem)                         # disabled
    assert not vq.enable_cb()                            # used buffers are waiting: poll again
    while vq.get_buf():
        pass
    for n in range(6):
        assert vq.add_sgs([(buf, 1)], [], token=n)
    chains = [h.get_vq_desc(ram.mem) for _ in range(6)]
    assert vq.enable_cb_after(4)
    sig = []
    for c in chains:
        h.add_used(ram.mem, c.head, 1)
        sig.append(h.signal(ram.mem))
    assert sig.index(True) == 3, sig                     # the 4th completion interrupts


def test_notify_on_empty_signals_even_when_disabled():
    ram = make_ram()
    vq, h = pair(ram, 8, notify_on_empty=True)
    buf = ram.alloc.alloc(4096, 16)
    vq.disable_cb()
    assert vq.add_sgs([(buf, 1)], [], token=1)
    serve(ram, h, 1)
    assert h.signal(ram.mem)


def test_discard_and_enable_notify_seen():
    ram = make_ram()
    vq, h = pair(ram, 8, event_idx=True)
    buf = ram.alloc.alloc(4096, 16)
    for n in range(3):
        assert vq.add_sgs([], [(buf, 4)], token=n)
    a, b = h.get_vq_desc(ram.mem), h.get_vq_desc(ram.mem)
    h.disable_notify(ram.mem)
    h.discard_vq_desc(2)
    assert h.last_avail_idx == 0x8000
    # seen=True: the two un-popped buffers were seen; the third was not: it raced in
    assert h.enable_notify(ram.mem, seen=True) is True
    assert u16(ram, vq.used) == 2 | 0x8000               # a kick is asked for past the seen ones
    assert [h.get_vq_desc(ram.mem).head for _ in range(3)] == [a.head, b.head, 2]
    h.disable_notify(ram.mem)
    h.discard_vq_desc(3)
    assert h.enable_notify(ram.mem, seen=True) is False  # all three were seen: nothing new
    assert u16(ram, vq.used) == 3 | 0x8000
    assert vq.add_sgs([], [(buf, 4)], token=3) and vq.kick_prepare()


# --- the device against hostile rings --------------------------------------------------------------
def write_desc(ram, vq, i, addr, ln, bid, flags):
    PACKED_DESC.pack_into(ram.mem.view(vq.desc, 16 * vq.num), 16 * i, addr, ln, bid, flags)


@pytest.mark.parametrize("case, rule", [
    ("second descriptor not available", 15),
    ("second descriptor of the other lap", 15),
    ("id out of range", 16),
    ("id in flight", 16),
    ("loop: every slot chained", 5),
    ("indirect with next", 8),
    ("indirect not negotiated", 8),
    ("indirect in the middle", 8),
    ("indirect length", 6),
    ("indirect too big", 7),
    ("out after in", 10),
    ("out after in, indirect", 10),
    ("address outside memory", 11),
    ("indirect table outside memory", 11),
    ("length over 2^32", 12),
])
def test_hostile_rings_raise_the_rule_and_move_nothing(case, rule):
    ram = make_ram()
    vq, h = pair(ram, 4, indirect=case != "indirect not negotiated")
    buf = ram.alloc.alloc(8192, 16)
    A = DESC_F_AVAIL
    N, W, I = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
    table = ram.mem.view(buf + 4096, 64)
    if case == "second descriptor not available":
        write_desc(ram, vq, 1, buf, 4, 0, 0)
        write_desc(ram, vq, 0, buf, 4, 0, N | A)
    elif case == "second descriptor of the other lap":
        write_desc(ram, vq, 1, buf, 4, 0, DESC_F_USED)
        write_desc(ram, vq, 0, buf, 4, 0, N | A)
    elif case == "id out of range":
        write_desc(ram, vq, 0, buf, 4, 4, A)
    elif case == "id in flight":
        write_desc(ram, vq, 0, buf, 4, 2, A)
        write_desc(ram, vq, 1, buf, 4, 2, A)
        h.get_vq_desc(ram.mem)
    elif case == "loop: every slot chained":
        for i in range(4):
            write_desc(ram, vq, i, buf, 4, 0, N | A)
    elif case == "indirect with next":
        write_desc(ram, vq, 1, buf, 4, 0, A)
        write_desc(ram, vq, 0, buf + 4096, 32, 0, I | N | A)
    elif case in ("indirect not negotiated",):
        write_desc(ram, vq, 0, buf + 4096, 32, 0, I | A)
    elif case == "indirect in the middle":
        write_desc(ram, vq, 1, buf + 4096, 32, 0, I | A)
        write_desc(ram, vq, 0, buf, 4, 0, N | A)
    elif case == "indirect length":
        write_desc(ram, vq, 0, buf + 4096, 24, 0, I | A)
    elif case == "indirect too big":
        write_desc(ram, vq, 0, buf + 4096, 16 * 65537, 0, I | A)
    elif case == "out after in":
        write_desc(ram, vq, 1, buf, 4, 0, A)
        write_desc(ram, vq, 0, buf, 4, 0, N | W | A)
    elif case == "out after in, indirect":
        PACKED_DESC.pack_into(table, 0, buf, 4, 0, W)
        PACKED_DESC.pack_into(table, 16, buf, 4, 0, 0)
        write_desc(ram, vq, 0, buf + 4096, 32, 0, I | A)
    elif case == "address outside memory":
        write_desc(ram, vq, 0, 0x10, 4, 0, A)
    elif case == "indirect table outside memory":
        write_desc(ram, vq, 0, 1 << 40, 32, 0, I | A)
    elif case == "length over 2^32":
        write_desc(ram, vq, 1, buf, 0xFFFFFFFF, 0, A)
        write_desc(ram, vq, 0, buf, 2, 0, N | A)
    before = h.last_avail_idx
    with pytest.raises(VringError) as e:
        h.get_vq_desc(ram.mem)
    assert e.value.rule == rule, e.value
    assert h.last_avail_idx == before


def test_an_indirect_table_ignores_next_and_ids_inside_it():
    ram = make_ram()
    vq, h = pair(ram, 4, indirect=True)
    buf = ram.alloc.alloc(8192, 16)
    table = ram.mem.view(buf + 4096, 48)
    PACKED_DESC.pack_into(table, 0, buf, 4, 77, VRING_DESC_F_NEXT)        # reserved: ignored
    PACKED_DESC.pack_into(table, 16, buf, 5, 99, 0)
    PACKED_DESC.pack_into(table, 32, buf, 6, 0, VRING_DESC_F_WRITE)
    write_desc(ram, vq, 0, buf + 4096, 48, 1, VRING_DESC_F_INDIRECT | DESC_F_AVAIL)
    c = h.get_vq_desc(ram.mem)
    assert (c.head, c.out_len, c.in_len) == (1, 9, 6)


def test_a_device_that_writes_a_bad_id_breaks_the_driver_queue():
    ram = make_ram()
    vq, h = pair(ram, 4)
    buf = ram.alloc.alloc(4096, 16)
    assert vq.add_sgs([(buf, 4)], [], token=1)
    write_desc(ram, vq, 0, 0, 4, 3, AU)              # id 3 was never made available
    assert vq.get_buf() is None and vq.broken and "id 3" in vq.broken_reason
    assert not vq.add_sgs([(buf, 4)], [], token=2) and not vq.more_used() and vq.enable_cb()


def test_access_ok_rule_13():
    ram = make_ram()
    vq, h = pair(ram, 8)
    for bad in (0, 32769):
        h.num = bad
        assert not h.access_ok(ram.mem)
    h.num = 6                                        # packed sizes need not be powers of 2
    assert h.access_ok(ram.mem)
    h.num = 8
    h.avail = vq.avail + 2                           # driver area: 4-aligned
    assert not h.access_ok(ram.mem)
    h.avail = vq.avail
    h.used = 0x1000                                  # outside the memory table
    assert not h.access_ok(ram.mem)
    h.used = vq.used
    h.last_avail_idx = 8 | 0x8000                    # base outside the ring
    assert not h.access_ok(ram.mem)


# --- vhost-user ring base ------------------------------------------------------------------------
def test_vring_base_carries_both_positions_and_wrap_counters():
    h = VhostVirtqueuePacked(0)
    h.last_avail_idx = h.last_used_idx = 0x8000                 # DPDK: avail half only
    assert h.vring_base() == 0x80008000
    v = 5 | (0 << 15) | (3 | 1 << 15) << 16                     # QEMU: avail 5 lap 0, used 3 lap 1
    h.last_avail_idx = v
    h.last_used_idx = v
    assert (h.last_avail_idx, h.last_used_idx) == (5, 3 | 0x8000)
    assert h.vring_base() == v


def test_the_device_picks_the_layout_the_features_chose_and_reset_goes_back_to_split():
    class Dev(VhostDevice):
        num_queues = 2
    d = Dev("t")
    assert not d.features & bit(VIRTIO_F_RING_PACKED)
    d.offer_packed()
    d.vqs[0].num = 16
    d.set_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_F_RING_PACKED))
    assert all(isinstance(q, VhostVirtqueuePacked) and q.event_idx for q in d.vqs)
    assert d.vqs[0].num == 16
    d.reset()
    assert all(type(q) is VhostVirtqueue for q in d.vqs)
    d.set_features(bit(VIRTIO_F_VERSION_1))
    assert all(type(q) is VhostVirtqueue for q in d.vqs)


def test_many_laps_with_random_chains_against_the_real_partner():
    """Random mixes of chain lengths, directions, indirect, completion order and suppression:
    every token comes back once with its length, free counts return to N."""
    import random
    rnd = random.Random(19)
    for num in (3, 8, 16):
        for event_idx in (False, True):
            ram = make_ram()
            vq, h = pair(ram, num, event_idx=event_idx, indirect=True)
            buf = ram.alloc.alloc(65536, 16)
            outstanding = {}
            popped = []
            serial = 0
            for step in range(600):
                op = rnd.random()
                if op < 0.45:
                    n_out, n_in = rnd.randint(0, 3), rnd.randint(0, 3)
                    if n_out + n_in == 0:
                        n_in = 1
                    if rnd.random() < 0.5:
                        vq.indirect = False
                    else:
                        vq.indirect = True
                    ok = vq.add_sgs([(buf + 16 * k, 4) for k in range(n_out)],
                                    [(buf + 1024 + 16 * k, 8) for k in range(n_in)], token=serial)
                    if ok:
                        outstanding[serial] = 8 * n_in
                        serial += 1
                    vq.kick_prepare()
                elif op < 0.7:
                    c = h.get_vq_desc(ram.mem)
                    if c is not None:
                        popped.append(c)
                elif op < 0.9 and popped:
                    c = popped.pop(rnd.randrange(len(popped)))
                    h.add_used(ram.mem, c.head, c.in_len)
                    h.signal(ram.mem)
                else:
                    while (b := vq.get_buf()) is not None:
                        assert outstanding.pop(b[0]) == b[1]
                    vq.enable_cb() if rnd.random() < 0.5 else vq.disable_cb()
            while (c := h.get_vq_desc(ram.mem)) is not None:
                popped.append(c)
            for c in popped:
                h.add_used(ram.mem, c.head, c.in_len)
            while (b := vq.get_buf()) is not None:
                assert outstanding.pop(b[0]) == b[1]
            assert not outstanding and vq.num_free == num and not vq.broken, (num, event_idx)


def test_get_buf_moves_the_event_on_so_each_completion_interrupts():
    """EVENT_IDX with callbacks on: get_buf publishes off_wrap = the next used slot."""
    ram = make_ram()
    vq, h = pair(ram, 4, event_idx=True)
    buf = ram.alloc.alloc(4096, 16)
    vq.disable_cb()
    assert vq.enable_cb()                               # ENABLE -> DESC (Linux starts at ENABLE)
    assert u16(ram, vq.avail + 2) == VRING_PACKED_EVENT_FLAG_DESC
    sig = []
    for n in range(10):
        assert vq.add_sgs([(buf, 1)], [], token=n)
        serve(ram, h, 1)
        sig.append(h.signal(ram.mem))
        assert vq.get_buf() == (n, 1)
        assert u16(ram, vq.avail) == vq.last_used_idx | vq.used_wrap_counter << 15
    assert sig == [True] * 10


def test_signal_compares_positions_across_the_wrap():
    """The last interrupt was in the lap before: its position counts N back, so an event two
    laps' worth of slots ahead in raw numbers is not taken as crossed."""
    ram = make_ram()
    vq, h = pair(ram, 4, event_idx=True)
    buf = ram.alloc.alloc(4096, 16)
    for n in range(3):
        assert vq.add_sgs([(buf, 1)], [], token=n)
    serve(ram, h, 1)
    assert h.signal(ram.mem)                            # signalled at slot 3, lap 1
    while vq.get_buf():
        pass
    for n in range(3):
        assert vq.add_sgs([(buf, 1)], [], token=n)      # slots 3, 0, 1
    chains = [h.get_vq_desc(ram.mem) for _ in range(3)]
    drv = ram.mem.u16_view(vq.avail, 2)
    drv[0], drv[1] = 3, VRING_PACKED_EVENT_FLAG_DESC   # interrupt at slot 3 of lap 0
    h.add_used(ram.mem, chains[0].head, 1)
    h.add_used(ram.mem, chains[1].head, 1)             # used position: slot 1, lap 0
    assert not h.signal(ram.mem)
    drv.release()


def test_moderation_counts_buffers_not_slots():
    """enable_cb_after(k) / enable_notify_after(k) ask for the k-th buffer, also when every
    buffer takes two slots (a vsock header and its payload)."""
    ram = make_ram()
    vq, h = pair(ram, 16, event_idx=True)
    buf = ram.alloc.alloc(4096, 16)
    assert vq.add_sgs([(buf, 4), (buf + 4, 4)], [], token="first")   # the device learns: 2 slots
    h.get_vq_desc(ram.mem)
    h.disable_notify(ram.mem)
    assert not h.enable_notify_after(ram.mem, 3)
    kicks = []
    for n in range(3):
        assert vq.add_sgs([(buf, 4), (buf + 4, 4)], [], token=n)
        kicks.append(vq.kick_prepare())
    assert kicks == [False, False, True], kicks
    chains = [h.get_vq_desc(ram.mem) for _ in range(3)]
    vq.disable_cb()
    h.add_used(ram.mem, 0, 0)                       # "first"
    assert not h.signal(ram.mem)                    # disabled (and signalled_used now valid)
    while vq.get_buf():
        pass
    assert vq.enable_cb_after(3)
    sig = []
    for c in chains:
        h.add_used(ram.mem, c.head, 0)
        sig.append(h.signal(ram.mem))
    assert sig == [False, False, True], sig


def test_dirty_log_ranges_name_the_used_descriptors_and_the_device_area():
    """Dirty logging (host/net/device.py) asks the ring what it wrote: a packed ring writes its
    used descriptors into the descriptor ring, and its kick intent into the device area."""
    ram = make_ram()
    vq, h = pair(ram, 4)
    buf = ram.alloc.alloc(4096, 16)
    for n in range(3):
        assert vq.add_sgs([(buf, 4)], [(buf + 8, 4)], token=n)      # slots 0-1, 2-3, 0-1 (lap 0)
        if n == 1:
            chains = [h.get_vq_desc(ram.mem) for _ in range(2)]
            h.add_used_n(ram.mem, [(c.head, 4) for c in chains])
            assert h.used_log_ranges(0, 2, 0x999) == [(vq.desc + 8, 8), (vq.desc + 32 + 8, 8)]
            while vq.get_buf():
                pass
    c = h.get_vq_desc(ram.mem)
    h.add_used(ram.mem, c.head, 4)
    assert h.used_log_ranges(2, 1, 0x999) == [(vq.desc + 8, 8)]          # slot 0 again
    assert h.notify_log_ranges(vq.used) == [(vq.used, 4)]
