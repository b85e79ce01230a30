"""The monitor's picture of a packed ring, decoded from guest RAM: a ring built on a bytearray
with the real driver (guest/virtqueue_packed.py) and device (host/vhost_vq_packed.py) in known
states, each slot's AVAIL/USED bits judged against both sides' wrap counters, the event
structures, and the snapshot fields the monitor takes the positions from."""
import io

from rich.console import Console

from guest.ram import GuestRAM
from guest.virtqueue_packed import VirtQueuePacked
from host.vhost_vq_packed import VhostVirtqueuePacked
from tools.monitor.model import ring_sources
from tools.monitor.panels import decode_all, ring_panel
from tools.monitor.ring_packed import decode_packed


def text_of(renderable, width=100) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def pair(num=8, event_idx=True):
    ram = GuestRAM("t", 1 << 20, buf=bytearray(1 << 20))
    d, a, u = VirtQueuePacked.alloc_rings(ram, num)
    vq = VirtQueuePacked(ram.mem, 0, num, d, a, u, event_idx=event_idx)
    h = VhostVirtqueuePacked(0, "test")
    h.num, h.desc, h.avail, h.used = num, d, a, u
    h.event_idx = event_idx
    h.last_avail_idx = h.last_used_idx = 0x8000
    assert h.access_ok(ram.mem)
    h.init_access(ram.mem)
    return ram, vq, h


def picture(ram, vq, h):
    g, d = vq.snapshot(), h.snapshot()
    return decode_packed(ram.mem.read, vq.num, vq.desc, vq.avail, vq.used, event_idx=vq.event_idx,
                         driver_avail=(g["avail_idx"], g["avail_wrap"]),
                         driver_used=(g["last_used"], g["used_wrap"]),
                         device_avail=(d["last_avail"], d["avail_wrap"]),
                         device_used=(d["last_used"], d["used_wrap"]))


def test_states_follow_the_bits_against_both_wrap_counters_across_a_lap():
    ram, vq, h = pair(8)
    buf = ram.alloc.alloc(4096, 16)
    # lap 1: 6 buffers; the device takes 4 and uses 2; the driver reclaims 1
    for n in range(6):
        assert vq.add_sgs([(buf, 4)], [], token=n)
    chains = [h.get_vq_desc(ram.mem) for _ in range(4)]
    h.add_used(ram.mem, chains[0].head, 0)
    h.add_used(ram.mem, chains[1].head, 0)
    assert vq.get_buf()[0] == 0
    p = picture(ram, vq, h)
    assert "".join(p.desc) == ".UDDAA.."
    assert "".join(p.bits) == "bbaaaa--"
    # on into lap 0: reclaim, post 4 more (slots 6, 7 of lap 1, then 0, 1 of lap 0)
    h.add_used(ram.mem, chains[2].head, 0)
    h.add_used(ram.mem, chains[3].head, 0)
    while vq.get_buf():
        pass
    for n in range(4):
        assert vq.add_sgs([(buf, 4)], [], token=n)
    p = picture(ram, vq, h)
    assert (p.driver_avail, p.device_avail, p.device_used) == ((2, 0), (4, 1), (4, 1))
    # slots 0, 1 posted in lap 0 (AVAIL=0 USED=1), 4..7 posted in lap 1, 2, 3 stale used
    assert "".join(p.desc) == "AA..AAAA", p.desc
    assert "".join(p.bits) == "uubbaaaa"
    for _ in range(6):
        c = h.get_vq_desc(ram.mem)
        h.add_used(ram.mem, c.head, 0)
    p = picture(ram, vq, h)
    assert "".join(p.desc) == "UU..UUUU" and p.device_avail == (2, 0) == p.device_used   # 2, 3 reclaimed
    assert not p.problems


def test_the_text_shows_positions_events_and_marks():
    ram, vq, h = pair(8)
    buf = ram.alloc.alloc(4096, 16)
    for n in range(3):
        assert vq.add_sgs([(buf, 4)], [], token=n)
    h.disable_notify(ram.mem)
    vq.disable_cb()
    assert vq.enable_cb_after(3)            # DESC: interrupt when the used descriptor at 2 appears
    rings = [{"title": "q1 tx", "q": 1, "picture": picture(ram, vq, h)}]
    out = text_of(ring_panel(rings, "g1", 100))
    assert "q1 tx  packed  N=8" in out and "driver: avail 3/w1 used 0/w1" in out
    assert "driver event DESC off 2 lap 1" in out and "device event DISABLE" in out
    assert "AAA....." in out and "aaa-----" in out
    assert "bits: - none" in out                          # the packed legend


def test_hostile_event_flags_and_positions_are_reported_not_followed():
    ram, vq, h = pair(8, event_idx=False)
    drv = ram.mem.u16_view(vq.avail, 2)
    drv[0], drv[1] = 0x7FFF, 3                            # reserved flags
    p = decode_packed(ram.mem.read, 8, vq.desc, vq.avail, vq.used, driver_used=(9, 1),
                      device_avail=None)
    drv.release()
    assert any("reserved" in x for x in p.problems)
    assert any("driver last_used 9 outside" in x for x in p.problems)
    assert any("device last_avail unknown" in x for x in p.notes)


def test_ring_sources_take_the_packed_positions_from_both_snapshots():
    ram, vq, h = pair(8)
    buf = ram.alloc.alloc(4096, 16)
    assert vq.add_sgs([(buf, 4)], [], token=1)
    assert vq.add_sgs([(buf, 4)], [], token=2)
    h.get_vq_desc(ram.mem)
    raw = [{"role": "guest", "cid": 3, "name": "g", "ram": {"shm": "x", "table": [{}]},
            "vqs": [vq.snapshot()]},
           {"role": "device", "cid": 3, "device": "vsock", "stats": {"vqs": [h.snapshot()]}}]
    src = ring_sources(raw, 3)
    q = src["queues"][0]
    assert q["packed"] and q["positions"] == {"driver_avail": (2, 1), "driver_used": (0, 1),
                                              "device_avail": (1, 1), "device_used": (0, 1)}
    pics = decode_all(ram.mem.read, src)
    assert "".join(pics[0]["picture"].desc) == "DA......"


def test_the_other_slots_of_a_used_chain_are_free_not_in_the_device():
    """A used chain leaves one used descriptor; its other slots keep the bits the driver wrote
    (available in a lap the device has passed): free, not "in the device"."""
    ram, vq, h = pair(8)
    buf = ram.alloc.alloc(4096, 16)
    assert vq.add_sgs([(buf, 4), (buf + 8, 4)], [(buf + 16, 4)], token=1)    # slots 0-2
    assert vq.add_sgs([(buf, 4)], [], token=2)                                # slot 3
    assert vq.add_sgs([(buf, 4)], [], token=3)                                # slot 4
    c1, c2 = h.get_vq_desc(ram.mem), h.get_vq_desc(ram.mem)
    h.add_used(ram.mem, c1.head, 4)
    p = picture(ram, vq, h)
    assert "".join(p.desc) == "U..DA...", p.desc
    assert "".join(p.bits) == "baaaa---"
