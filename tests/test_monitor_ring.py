"""The ring picture decoded from guest RAM: rings built on a bytearray with the real driver
(guest/virtqueue.py) and device (host/vhost_vq.py) in known states, drawn with no colour."""
import io
import struct

from rich.console import Console

from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from host.vhost_vq import VhostVirtqueue
from shared.constants import VRING_DESC_F_NEXT
from shared.ring_layout import avail_ring_addr, avail_idx_addr
from tools.monitor.ring import decode_ring, ring_text

BUF = 0x4000_8000


def text_of(renderable, width=100) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def pair(num=16, event_idx=False, start=0):
    ram = GuestRAM("t", 1 << 20, buf=bytearray(1 << 20))
    d, a, u = VirtQueue.alloc_rings(ram, num)
    vq = VirtQueue(ram.mem, 0, num, d, a, u, event_idx=event_idx)
    h = VhostVirtqueue(0, "test")
    h.num, h.desc, h.avail, h.used = num, d, a, u
    h.event_idx = event_idx
    if start:
        # Both sides resume at `start`, as after SET_VRING_BASE on a ring that ran a long time.
        vq.avail_idx_shadow = vq.last_used_idx = start
        ram.mem.store16(avail_idx_addr(a), start)
        ram.mem.store16(u + 2, start)
        h.last_avail_idx = h.last_used_idx = start
    assert h.access_ok(ram.mem)
    return ram, vq, h


def picture(ram, vq, h):
    return decode_ring(ram.mem.read, vq.num, vq.desc, vq.avail, vq.used, last_avail=h.last_avail_idx,
                       last_used=vq.last_used_idx, event_idx=vq.event_idx)


def post(vq, n, descs=1):
    for i in range(n):
        ok = vq.add_sgs([(BUF, 16)], [(BUF, 64)] * (descs - 1), i + 1)
        assert ok


def take(ram, h, n):
    return [h.get_vq_desc(ram.mem) for _ in range(n)]


# --- states ----------------------------------------------------------------------------------------
def state_empty():
    ram, vq, h = pair()
    return picture(ram, vq, h)


def state_full():
    ram, vq, h = pair()
    post(vq, 16)
    assert vq.num_free == 0
    return picture(ram, vq, h)


def state_mixed():
    """Posted, taken, used and reclaimed buffers at once; two-descriptor chains among them."""
    ram, vq, h = pair()
    post(vq, 6)
    post(vq, 2, descs=2)
    chains = take(ram, h, 5)
    for c in chains[:3]:
        h.add_used(ram.mem, c.head, 0)
    assert vq.get_buf() is not None
    return picture(ram, vq, h)


def state_wrapped():
    """Indices cross 65535 -> 0: the windows are taken mod 2^16."""
    ram, vq, h = pair(start=65533)
    post(vq, 8)
    chains = take(ram, h, 6)
    for c in chains[:5]:
        h.add_used(ram.mem, c.head, 0)
    for _ in range(2):
        assert vq.get_buf() is not None
    assert vq.avail_idx_shadow == 5 and h.last_avail_idx == 3 and vq.last_used_idx == 65535
    return picture(ram, vq, h)


def state_event_idx():
    """EVENT_IDX: the driver asks for an interrupt after 3/4 of its buffers (enable_cb_delayed),
    the device re-arms kicks at last_avail (enable_notify writes avail_event)."""
    ram, vq, h = pair(event_idx=True)
    post(vq, 8)
    h.disable_notify(ram.mem)
    take(ram, h, 4)
    h.enable_notify(ram.mem)
    vq.enable_cb_delayed()
    return picture(ram, vq, h)


def state_broken():
    """A hostile driver posts a chain that loops (desc 2 -> 3 -> 2) next to a good buffer."""
    ram, vq, h = pair()
    post(vq, 1)
    mem = ram.mem
    for i, nxt in ((2, 3), (3, 2)):
        mem.write(vq.desc + 16 * i, struct.pack("<QIHH", BUF, 16, VRING_DESC_F_NEXT, nxt))
    mem.store16(avail_ring_addr(vq.avail, 1), 2)
    mem.store16(avail_idx_addr(vq.avail), 2)
    return picture(ram, vq, h)


# --- frozen pictures (compare the whole text) ---------------------------------------------------
EXPECTED = {
    "broken": """\
broken  N=16  avail.idx 2  last_avail 0  used.idx 0  last_used 0
  free 13  avail 1  in device 0  used 0  broken 2
  desc A.!!............
  ring AA..............
       * a             
  flags: avail 0, used 0
  ! chain at head 2 loops back to 2
""",
    "empty": """\
empty  N=16  avail.idx 0  last_avail 0  used.idx 0  last_used 0
  free 16  avail 0  in device 0  used 0
  desc ................
  ring ................
       *               
  flags: avail 0, used 0
""",
    "event_idx": """\
event_idx  N=16  avail.idx 8  last_avail 4  used.idx 0  last_used 0
  free 8  avail 4  in device 4  used 0
  desc DDDDAAAA........
  ring DDDDAAAA........
       *   * e a       
  EVENT_IDX  used_event 6 (irq once used.idx passes it)  avail_event 4 (kick once avail.idx does)
""",
    "full": """\
full  N=16  avail.idx 16  last_avail 0  used.idx 0  last_used 0
  free 0  avail 16  in device 0  used 0
  desc AAAAAAAAAAAAAAAA
  ring AAAAAAAAAAAAAAAA
       *               
  flags: avail 0, used 0
""",
    "mixed": """\
mixed  N=16  avail.idx 8  last_avail 5  used.idx 3  last_used 1
  free 7  avail 5  in device 2  used 2
  desc .UUDDAAAAA......
  ring .UUDDAAA........
        r u l  a       
  flags: avail 0, used 0
""",
    "wrapped": """\
wrapped  N=16  avail.idx 5  last_avail 3  used.idx 2  last_used 65535
  free 10  avail 2  in device 1  used 3
  desc ..UUUDAA........
  ring UUDAA..........U
         ul a         r
  flags: avail 0, used 0
""",
}


def test_each_state_renders_exactly():
    for name, want in EXPECTED.items():
        got = text_of(ring_text(globals()["state_" + name](), name))
        assert got == want, f"{name}:\n{got}"


def test_free_cells_match_the_drivers_free_list():
    for make in (state_empty, state_full, state_mixed, state_wrapped, state_event_idx):
        ram_vq = {}

        def capture(ram, vq, h, _store=ram_vq):
            _store["vq"] = vq
            return decode_ring(ram.mem.read, vq.num, vq.desc, vq.avail, vq.used,
                               last_avail=h.last_avail_idx, last_used=vq.last_used_idx,
                               event_idx=vq.event_idx)
        globals()["picture"], saved = capture, picture
        try:
            p = make()
        finally:
            globals()["picture"] = saved
        assert p.counts()["."] == ram_vq["vq"].num_free, make.__name__
        assert not p.problems and not p.notes


def test_avail_idx_jump_is_a_problem_not_followed():
    ram, vq, h = pair()
    post(vq, 2)
    ram.mem.store16(avail_idx_addr(vq.avail), 40)        # 40 ahead of used.idx with N=16
    p = picture(ram, vq, h)
    assert p.problems == ["avail.idx is 40 entries ahead of used.idx, more than N=16"]
    assert p.counts()["A"] == 0


def test_stale_snapshot_indices_are_replaced_and_said_so():
    ram, vq, h = pair()
    post(vq, 4)
    for c in take(ram, h, 4):
        h.add_used(ram.mem, c.head, 0)
    p = decode_ring(ram.mem.read, 16, vq.desc, vq.avail, vq.used, last_avail=60000, last_used=60000)
    assert p.last_avail == 4 and p.last_used == 4 and len(p.notes) == 2 and not p.problems


def test_big_queue_groups_slots_per_cell():
    ram, vq, h = pair(num=512)
    post(vq, 100)
    out = text_of(ring_text(picture(ram, vq, h), "big"))
    assert "(1 cell = 4 slots)" in out
    cells = [line[7:] for line in out.splitlines()
             if line[7:].strip() and set(line[7:]) <= set("A.")]       # strip rows, labels cut off
    assert sum(len(r) for r in cells) == 2 * 128                         # desc and ring strips
    assert "A" * 25 in out


def test_read_only_attachment(run_dir):
    """The monitor maps guest RAM read-only, outside the resource tracker."""
    import mmap

    import pytest

    from shared.resources import close_shm, create_shm, resource_base, unlink_shm
    from tools.monitor.ram import RamError, ReadOnlyRAM
    name = f"{resource_base(run_dir)}-ram"
    shm = create_shm(name, 8192)
    try:
        shm.buf[4096:4100] = b"ring"
        table = [{"guest_phys_addr": 0x4000_0000, "memory_size": 4096, "mmap_offset": 0, "shm": name},
                 {"guest_phys_addr": 0x1_0000_0000, "memory_size": 4096, "mmap_offset": 4096, "shm": name}]
        ram = ReadOnlyRAM(name, table)
        try:
            assert ram.read(0x1_0000_0000, 4) == b"ring"
            with pytest.raises(TypeError):
                ram.mm[0] = 1                      # PROT_READ: not writable
            assert ram.mm.closed is False and isinstance(ram.mm, mmap.mmap)
            with pytest.raises(RamError):
                ram.read(0x5000_0000, 4)
        finally:
            ram.close()
    finally:
        close_shm(shm)
        unlink_shm(name)
    with pytest.raises(RamError):
        ReadOnlyRAM(name, table)


def test_event_idx_words_stand_in_for_stale_snapshots():
    """The driver's used_event and the device's avail_event are live: newer than a snapshot."""
    ram, vq, h = pair(event_idx=True)
    post(vq, 6)
    chains = take(ram, h, 6)
    for c in chains[:4]:
        h.add_used(ram.mem, c.head, 0)
    vq.get_buf()
    vq.get_buf()                       # last_used 2, and used_event follows it (callbacks on)
    h.disable_notify(ram.mem)
    h.enable_notify(ram.mem)           # avail_event = last_avail = 6
    p = decode_ring(ram.mem.read, 16, vq.desc, vq.avail, vq.used, last_avail=1, last_used=0,
                    event_idx=True)    # snapshots from before all that
    assert (p.last_avail, p.last_used) == (6, 2)
    assert p.counts() == {".": 12, "A": 0, "D": 2, "U": 2, "!": 0} and not p.problems


def test_a_stale_used_chain_is_not_blamed_on_the_guest():
    ram, vq, h = pair()
    post(vq, 4)
    for c in take(ram, h, 4):
        h.add_used(ram.mem, c.head, 0)
    for _ in range(4):
        vq.get_buf()
    post(vq, 4, descs=2)               # the reclaimed descriptors are reused for new chains
    p = decode_ring(ram.mem.read, 16, vq.desc, vq.avail, vq.used, last_avail=4, last_used=0)
    assert not p.problems and p.counts()["!"] == 0
