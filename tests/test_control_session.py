"""The one Session (host/session.py) behind the native codec (host/native.py) and VhostDevice (host/device.py), pure: bytearray guest
RAM, LocalDoorbells, the real split rings on both sides."""
import struct

import pytest

from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from host.native import native_session
from host.device import VHOST_FEATURES, VhostDevice
from shared.constants import (VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
                              VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
                              VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET, VIRTIO_F_VERSION_1,
                              VIRTIO_ID_VSOCK, VIRTIO_RING_F_EVENT_IDX, VIRTIO_VSOCK_F_STREAM, bit)
from shared.control import PROTOCOL_VERSION, Decoder, encode
from shared.doorbell import LocalDoorbell
from shared.errors import ProtocolError, VringError
from shared.memory import GuestMemory, MemoryRegion
from shared.ring_layout import used_idx_addr

RAM = 1 << 20
V1 = bit(VIRTIO_F_VERSION_1)
EVENT_IDX = bit(VIRTIO_RING_F_EVENT_IDX)


class FakeVsock(VhostDevice):
    device_type = "vsock"
    device_id = VIRTIO_ID_VSOCK
    num_queues = 3
    device_features = bit(VIRTIO_VSOCK_F_STREAM)

    def __init__(self, cid=3):
        super().__init__("g1/vsock")
        self.cid = cid
        self.calls_log = []

    def config_bytes(self):
        return struct.pack("<Q", self.cid)

    def start(self):
        super().start()
        self.calls_log.append("start")

    def stop(self):
        super().stop()
        self.calls_log.append("stop")

    def reset(self):
        super().reset()
        self.calls_log.append("reset")

    def handle_kick(self, qidx):
        """Echo: consume every chain and return it with length 1."""
        vq = self.vqs[qidx]
        while (chain := vq.get_vq_desc(self.mem)) is not None:
            vq.add_used(self.mem, chain.head, 1)
        self.notify(vq)


class CountingMemory(GuestMemory):
    releases = 0

    def release(self):
        CountingMemory.releases += 1
        super().release()


class ClosingDoorbell(LocalDoorbell):
    def __init__(self):
        super().__init__()
        self.closed = 0

    def close(self):
        self.closed += 1


class World:
    """One guest (bytearray RAM, rings, doorbells) and one session talking to it."""

    def __init__(self, sizes=(64, 64, 16), **session_kw):
        self.buf = bytearray(RAM)
        self.ram = GuestRAM("ve-test-ram", RAM, buf=self.buf)
        self.rings = [VirtQueue.alloc_rings(self.ram, n) for n in sizes]
        self.sizes = sizes
        self.bells = {}
        for i in range(len(sizes)):
            for k in "kce":
                self.bells[f"/ve-t-q{i}{k}"] = ClosingDoorbell()
        self.devices = []
        self.seq = 0
        self.session = self.new_session(**session_kw)

    def attach(self, regions):
        return CountingMemory([MemoryRegion(r.guest_phys_addr, r.memory_size,
                                            memoryview(self.buf)[r.mmap_offset:r.mmap_offset + r.memory_size],
                                            r.userspace_addr) for r in regions])

    def open_bell(self, spec):
        try:
            return self.bells[spec["name"]]
        except KeyError:
            raise ValueError(f"doorbell {spec['name']!r} does not exist") from None

    def factory(self, hello):
        dev = FakeVsock(hello["params"].get("cid", 3))
        self.devices.append(dev)
        return dev

    def new_session(self, **kw):
        self.session = native_session(kw.pop("factory", self.factory), attach_memory=self.attach,
                                      open_doorbell=self.open_bell, **kw)
        return self.session

    @property
    def dev(self):
        return self.session.device

    def send(self, op, **fields):
        self.seq += 1
        return self.session.handle({"op": op, "seq": self.seq, **fields})

    def ok(self, op, **fields):
        rep, close = self.send(op, **fields)
        assert rep["ok"], rep
        assert rep["seq"] == self.seq and not close
        return rep

    def bad(self, op, code, **fields):
        rep, close = self.send(op, **fields)
        assert not rep["ok"] and rep["error"] == code, rep
        assert close and rep["seq"] == self.seq
        # the session is finished: anything else is refused too
        rep2, close2 = self.send("GET_STATUS")
        assert not rep2["ok"] and close2
        return rep

    # --- steps ---
    def hello(self, reconnect=False, **over):
        return self.ok("HELLO", **{"version": PROTOCOL_VERSION, "device": "vsock", "guest": "g1",
                                   "reconnect": reconnect, "params": {"cid": 3}, **over})

    def to_features_ok(self, features=V1 | EVENT_IDX, hello=True):
        if hello:
            self.hello()
        self.ok("SET_OWNER")
        self.ok("SET_STATUS", status=ACK)
        self.ok("SET_STATUS", status=ACK | DRIVER)
        assert self.ok("GET_FEATURES")["features"] & features == features
        self.ok("SET_FEATURES", features=features)
        assert self.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK)["status"] & FEATURES_OK

    def addr(self, i):
        d, a, u = self.rings[i]
        return dict(index=i, flags=0, desc_user_addr=self.ram.gpa_to_uva(d),
                    avail_user_addr=self.ram.gpa_to_uva(a), used_user_addr=self.ram.gpa_to_uva(u),
                    log_guest_addr=0)

    def bell(self, i, k):
        return {"kind": "posix_sem", "name": f"/ve-t-q{i}{k}"}

    def setup_vring(self, i, base=0):
        self.ok("SET_VRING_NUM", index=i, num=self.sizes[i])
        self.ok("SET_VRING_ADDR", **self.addr(i))
        self.ok("SET_VRING_BASE", index=i, num=base)
        for k, op in (("k", "SET_VRING_KICK"), ("c", "SET_VRING_CALL"), ("e", "SET_VRING_ERR")):
            self.ok(op, index=i, doorbell=self.bell(i, k))
        self.ok("SET_VRING_ENABLE", index=i, enable=True)

    def full(self, features=V1 | EVENT_IDX, bases=(0, 0, 0), hello=True):
        self.to_features_ok(features, hello)
        self.ok("SET_MEM_TABLE", regions=self.ram.table)
        for i in range(len(self.sizes)):
            self.setup_vring(i, bases[i])
        assert self.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK | DRIVER_OK)["status"] == 0x0F

    def guest_vq(self, i, features=V1 | EVENT_IDX):
        d, a, u = self.rings[i]
        return VirtQueue(self.ram.mem, i, self.sizes[i], d, a, u, event_idx=bool(features & EVENT_IDX))


# --- the whole handshake and the data path it enables ---------------------------------------------
def test_full_handshake_and_a_buffer_round_trip():
    w = World()
    rep = w.hello()
    assert rep["device_id"] == VIRTIO_ID_VSOCK and rep["num_queues"] == 3
    assert rep["max_queue_size"] == 1024 and rep["config_size"] == 8 and rep["version"] == 1
    w.full(hello=False)
    dev = w.dev
    assert dev.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK and dev.running
    assert dev.acked_features == V1 | EVENT_IDX and dev.calls_log == ["start"]
    for i, vq in enumerate(dev.vqs):     # the host sees the rings at the guest's addresses
        assert (vq.desc, vq.avail, vq.used) == w.rings[i] and vq.num == w.sizes[i]
        assert vq.enabled and vq.event_idx and dev.kicks[i] is w.bells[f"/ve-t-q{i}k"]
        assert dev.calls[i] is w.bells[f"/ve-t-q{i}c"] and dev.errs[i] is w.bells[f"/ve-t-q{i}e"]
    # a buffer posted by the guest ring is consumed by the host ring and comes back
    gvq = w.guest_vq(1)
    buf = w.ram.alloc.alloc(64)
    assert gvq.add_sgs([(buf, 64)], [], "tok")
    assert gvq.kick_prepare()
    dev.kick_received(1)
    assert dev.stats["kicks"] == 1 and dev.stats["interrupts"] == 1
    assert w.bells["/ve-t-q1c"].wait(0) == 1
    assert gvq.get_buf() == ("tok", 1)
    assert w.ok("GET_STATS")["stats"]["vq_kicks"] == [0, 1, 0]
    assert w.ok("GET_CONFIG", offset=0, size=8)["data"] == struct.pack("<Q", 3)
    assert w.ok("GET_QUEUE_NUM")["num"] == 3


def test_feed_bytes_in_pieces_gives_encoded_replies():
    w = World()
    s = w.session
    stream = encode({"op": "HELLO", "seq": 1, "version": 1, "device": "vsock", "guest": "g",
                     "reconnect": False, "params": {}}) + encode({"op": "GET_FEATURES", "seq": 2})
    out = []
    for i in range(0, len(stream), 5):
        res = s.feed(stream[i:i + 5])
        assert not res.close
        out += res.replies
    msgs = Decoder(kind="reply").feed(b"".join(out))
    assert [m["seq"] for m in msgs] == [1, 2] and all(m["ok"] for m in msgs)
    assert msgs[1]["features"] == VHOST_FEATURES | bit(VIRTIO_VSOCK_F_STREAM)
    # garbage: an error reply and close
    res = s.feed(b"\xc1")
    assert res.close and Decoder(kind="reply").feed(res.replies[0])[0]["error"] == "EPROTO"
    res = s.feed(encode({"op": "GET_STATUS", "seq": 3}))
    assert res.replies == [] and res.close


def test_feed_answers_a_schema_error_with_its_seq():
    w = World()
    res = w.session.feed(encode({"op": "HELLO", "seq": 9, "version": 1}))
    rep = Decoder(kind="reply").feed(res.replies[0])[0]
    assert res.close and rep["seq"] == 9 and rep["error"] == "EINVAL"


# --- the legal order ----------------------------------------------------------------------------
def _features_ok(w):
    w.to_features_ok()


def _mem(w):
    w.to_features_ok()
    w.ok("SET_MEM_TABLE", regions=w.ram.table)


def _num(w):
    _mem(w)
    w.ok("SET_VRING_NUM", index=0, num=64)


REFUSALS = [
    # (name, setup, op, fields, code)
    ("first message not HELLO", lambda w: None, "GET_FEATURES", {}, "EPROTO"),
    ("HELLO twice", lambda w: w.hello(), "HELLO",
     dict(version=1, device="vsock", guest="g", reconnect=False, params={}), "EPROTO"),
    ("state change before SET_OWNER", lambda w: w.hello(), "SET_STATUS", {"status": ACK}, "EPERM"),
    ("vring before SET_OWNER", lambda w: w.hello(), "SET_VRING_NUM", {"index": 0, "num": 64}, "EPERM"),
    ("SET_OWNER twice", lambda w: (w.hello(), w.ok("SET_OWNER")), "SET_OWNER", {}, "EBUSY"),
    ("DRIVER before ACK", lambda w: (w.hello(), w.ok("SET_OWNER")), "SET_STATUS", {"status": DRIVER}, "EPROTO"),
    ("FEATURES_OK before DRIVER", lambda w: (w.hello(), w.ok("SET_OWNER"), w.ok("SET_STATUS", status=ACK)),
     "SET_STATUS", {"status": ACK | FEATURES_OK}, "EPROTO"),
    ("DRIVER_OK before FEATURES_OK",
     lambda w: (w.hello(), w.ok("SET_OWNER"), w.ok("SET_STATUS", status=ACK | DRIVER)),
     "SET_STATUS", {"status": ACK | DRIVER | DRIVER_OK}, "EPROTO"),
    ("clearing a status bit", lambda w: (w.hello(), w.ok("SET_OWNER"), w.ok("SET_STATUS", status=ACK | DRIVER)),
     "SET_STATUS", {"status": ACK}, "EPROTO"),
    ("reserved status bit", lambda w: (w.hello(), w.ok("SET_OWNER")), "SET_STATUS", {"status": ACK | 0x10}, "EINVAL"),
    ("SET_FEATURES before DRIVER", lambda w: (w.hello(), w.ok("SET_OWNER"), w.ok("SET_STATUS", status=ACK)),
     "SET_FEATURES", {"features": V1}, "EPROTO"),
    ("SET_FEATURES after FEATURES_OK", _features_ok, "SET_FEATURES", {"features": V1}, "EPROTO"),
    ("features not offered", lambda w: (w.hello(), w.ok("SET_OWNER"), w.ok("SET_STATUS", status=ACK | DRIVER)),
     "SET_FEATURES", {"features": V1 | bit(34)}, "EOPNOTSUPP"),
    ("SET_MEM_TABLE before FEATURES_OK",
     lambda w: (w.hello(), w.ok("SET_OWNER"), w.ok("SET_STATUS", status=ACK | DRIVER)),
     "SET_MEM_TABLE", {"regions": "TABLE"}, "EPROTO"),
    ("SET_VRING_NUM before FEATURES_OK",
     lambda w: (w.hello(), w.ok("SET_OWNER"), w.ok("SET_STATUS", status=ACK | DRIVER)),
     "SET_VRING_NUM", {"index": 0, "num": 64}, "EPROTO"),
    ("num not a power of two", _mem, "SET_VRING_NUM", {"index": 0, "num": 100}, "EINVAL"),
    ("num zero", _mem, "SET_VRING_NUM", {"index": 0, "num": 0}, "EINVAL"),
    ("num above the maximum", _mem, "SET_VRING_NUM", {"index": 0, "num": 2048}, "EINVAL"),
    ("queue index out of range", _mem, "SET_VRING_NUM", {"index": 3, "num": 64}, "ENOBUFS"),
    ("GET_VRING_BASE index out of range", _mem, "GET_VRING_BASE", {"index": 7}, "ENOBUFS"),
    ("SET_VRING_ADDR before SET_VRING_NUM", _mem, "SET_VRING_ADDR", "ADDR0", "EPROTO"),
    ("SET_VRING_ADDR before SET_MEM_TABLE",
     lambda w: (w.to_features_ok(), w.ok("SET_VRING_NUM", index=0, num=64)), "SET_VRING_ADDR", "ADDR0", "EPROTO"),
    ("ring address misaligned", _num, "SET_VRING_ADDR", ("ADDR0", {"desc_user_addr": 8}), "EINVAL"),
    ("ring outside the memory table", _num, "SET_VRING_ADDR",
     ("ADDR0", {"used_user_addr": 0x7F00_0000_0000 + RAM - 64}), "EFAULT"),
    ("dirty logging", _num, "SET_VRING_ADDR", ("ADDR0", {"flags": 1}), "EOPNOTSUPP"),
    ("doorbell that does not exist", _num, "SET_VRING_KICK",
     {"index": 0, "doorbell": {"kind": "posix_sem", "name": "/ve-nope"}}, "EBADF"),
    ("GET_CONFIG past the end", lambda w: w.hello(), "GET_CONFIG", {"offset": 4, "size": 8}, "EINVAL"),
    ("HELLO with another version", lambda w: None, "HELLO",
     dict(version=2, device="vsock", guest="g", reconnect=False, params={}), "EPROTONOSUPPORT"),
    ("a malformed message", lambda w: w.hello(), "SET_FEATURES", {"features": "all"}, "EINVAL"),
    ("an unknown op", lambda w: w.hello(), "SET_LOG_FD", {}, "EOPNOTSUPP"),
]


@pytest.mark.parametrize("name, setup, op, fields, code", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_out_of_order_and_malformed_are_refused_and_close(name, setup, op, fields, code):
    w = World()
    setup(w)
    if fields == "ADDR0":
        fields = w.addr(0)
    elif isinstance(fields, tuple):
        fields = {**w.addr(0), **fields[1]}
    elif fields.get("regions") == "TABLE":
        fields = {"regions": w.ram.table}
    rep = w.bad(op, code, **fields)
    assert rep["message"]
    if w.dev is not None:
        assert not w.dev.running


def test_vring_changes_while_enabled_or_running_are_ebusy():
    w = World()
    _mem(w)
    w.setup_vring(0)
    w.bad("SET_VRING_NUM", "EBUSY", index=0, num=32)
    w = World()
    _mem(w)
    w.setup_vring(0)
    w.bad("SET_MEM_TABLE", "EBUSY", regions=w.ram.table)
    w = World()
    w.full()
    w.bad("SET_VRING_CALL", "EBUSY", index=2, doorbell=None)


def test_driver_ok_needs_doorbells_and_set_up_rings():
    w = World()
    _mem(w)
    w.ok("SET_VRING_NUM", index=0, num=64)
    w.ok("SET_VRING_ADDR", **w.addr(0))
    w.ok("SET_VRING_KICK", index=0, doorbell=w.bell(0, "k"))
    w.ok("SET_VRING_ENABLE", index=0, enable=True)
    rep = w.bad("SET_STATUS", "EINVAL", status=0x0F)
    assert "doorbell" in rep["message"]
    w = World()
    _mem(w)
    w.ok("SET_VRING_ENABLE", index=1, enable=True)    # enabled, never described
    assert "not set up" in w.bad("SET_STATUS", "EINVAL", status=0x0F)["message"]


def test_driver_ok_refused_when_access_ok_fails():
    w = World()
    _mem(w)
    w.setup_vring(0)
    w.dev.vqs[0].access_ok = lambda mem: False      # ring rule 13 is the ring's to decide
    w.bad("SET_STATUS", "EFAULT", status=0x0F)


def test_features_ok_refused_leaves_the_bit_clear():
    w = World()
    w.hello()
    w.ok("SET_OWNER")
    w.ok("SET_STATUS", status=ACK | DRIVER)
    w.ok("SET_FEATURES", features=EVENT_IDX)          # no VERSION_1: a legacy driver
    rep = w.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK)
    assert rep["status"] == ACK | DRIVER                # refused, not an error
    assert w.ok("GET_STATUS")["status"] == ACK | DRIVER
    w.bad("SET_MEM_TABLE", "EPROTO", regions=w.ram.table)


def test_features_ok_refused_then_driver_can_reset_and_retry():
    w = World()
    w.hello()
    w.ok("SET_OWNER")
    w.ok("SET_STATUS", status=ACK | DRIVER)
    w.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK)   # nothing acked: refused
    assert w.ok("GET_STATUS")["status"] == ACK | DRIVER
    w.ok("SET_STATUS", status=0)
    w.ok("SET_STATUS", status=ACK | DRIVER)
    w.ok("SET_FEATURES", features=V1)
    assert w.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK)["status"] & FEATURES_OK


def test_status_zero_resets_and_releases_everything():
    w = World()
    w.full()
    dev = w.dev
    before = CountingMemory.releases
    assert w.ok("SET_STATUS", status=0)["status"] == 0
    assert CountingMemory.releases == before + 1 and dev.mem is None
    assert dev.calls_log[-2:] == ["stop", "reset"] and not dev.running
    assert dev.acked_features == 0 and dev.status == 0
    assert all(db is None for db in dev.kicks + dev.calls + dev.errs)
    assert all(b.closed == 1 for b in w.bells.values())
    assert all(vq.num == 0 and not vq.enabled and vq.last_avail_idx == 0 for vq in dev.vqs)
    # still the owner: the same session sets the device up again from scratch
    w.ok("SET_STATUS", status=ACK)
    w.ok("SET_STATUS", status=ACK | DRIVER)
    w.ok("SET_FEATURES", features=V1)
    w.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK)
    w.bad("SET_VRING_ADDR", "EPROTO", **w.addr(0))   # the old memory table is gone


def test_reset_owner_drops_ownership():
    w = World()
    w.full()
    w.ok("RESET_OWNER")
    assert w.dev.mem is None and w.dev.status == 0
    w.ok("GET_FEATURES")                            # queries still allowed
    w.ok("SET_OWNER")                               # ownership can be taken again
    w.ok("SET_STATUS", status=ACK)
    w.ok("RESET_OWNER")
    w.bad("SET_STATUS", "EPERM", status=ACK)


def test_failed_status_stops_device_until_reset():
    w = World()
    w.full()
    assert w.ok("SET_STATUS", status=0x0F | FAILED)["status"] & FAILED
    assert not w.dev.running
    w.ok("SET_STATUS", status=0)
    w.ok("SET_STATUS", status=ACK | FAILED)
    w.bad("SET_STATUS", "EPROTO", status=ACK | DRIVER | FAILED)


def test_get_vring_base_stops_the_ring_and_reports_last_avail():
    w = World()
    w.full()
    gvq = w.guest_vq(0)
    for n in range(3):
        gvq.add_sgs([], [(w.ram.alloc.alloc(16), 16)], n)
    w.dev.kick_received(0)
    rep = w.ok("GET_VRING_BASE", index=0)
    assert rep["num"] == 3 and not w.dev.vqs[0].enabled
    gvq.add_sgs([], [(w.ram.alloc.alloc(16), 16)], 9)
    w.dev.kick_received(0)                          # a stopped ring is not processed
    assert w.dev.vqs[0].last_avail_idx == 3


def test_reconnect_style_setup_resumes_at_used_idx():
    w = World()
    w.full()
    gvq = w.guest_vq(1)
    for n in range(5):
        assert gvq.add_sgs([(w.ram.alloc.alloc(16), 16)], [], n)
    w.dev.kick_received(1)
    assert [gvq.get_buf()[0] for _ in range(5)] == list(range(5))
    used_idx = w.ram.mem.load16(used_idx_addr(w.rings[1][2]))
    assert used_idx == 5
    # the host goes away; a new one gets the replayed state
    old = w.dev
    w.session.close()
    assert old.mem is None and old.calls_log[-1] == "reset"
    w.new_session()
    w.hello(reconnect=True)
    assert w.dev.reconnect and w.dev is not old
    w.ok("SET_OWNER")
    w.ok("SET_STATUS", status=ACK)
    w.ok("SET_STATUS", status=ACK | DRIVER)
    w.ok("SET_FEATURES", features=V1 | EVENT_IDX)
    w.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK)
    w.ok("SET_MEM_TABLE", regions=w.ram.table)
    for i in range(3):
        w.setup_vring(i, base=w.ram.mem.load16(used_idx_addr(w.rings[i][2])))
    w.ok("SET_STATUS", status=0x0F)
    vq = w.dev.vqs[1]
    assert vq.last_avail_idx == 5 and vq.last_used_idx == 5
    assert gvq.add_sgs([(w.ram.alloc.alloc(16), 16)], [], "after")
    w.dev.kick_received(1)
    assert gvq.get_buf() == ("after", 1)


def test_device_factory_refusals():
    def dup(hello):
        raise ProtocolError("CID 3 is already in use", "EADDRINUSE")
    w = World(factory=dup)
    rep = w.bad("HELLO", "EADDRINUSE", version=1, device="vsock", guest="g", reconnect=False, params={})
    assert "in use" in rep["message"]


def test_a_device_bug_is_eio_not_an_exception():
    w = World()
    w.to_features_ok()
    w.ok("SET_MEM_TABLE", regions=w.ram.table)
    w.dev.config_bytes = lambda: 1 / 0
    w.bad("GET_CONFIG", "EIO", offset=0, size=1)


def test_attach_failure_is_efault():
    w = World()
    w.to_features_ok()

    def boom(regions):
        raise FileNotFoundError("no such segment")
    w.session.session.attach_memory = boom
    assert "no such segment" in w.bad("SET_MEM_TABLE", "EFAULT", regions=w.ram.table)["message"]


def test_overlapping_regions_are_einval():
    w = World()
    w.to_features_ok()
    t = [dict(r) for r in w.ram.table]
    t[1]["guest_phys_addr"] = t[0]["guest_phys_addr"] + 4096
    w.bad("SET_MEM_TABLE", "EINVAL", regions=t)


# --- VhostDevice: errors on the data path ---------------------------------------------------------
def test_vq_err_sets_needs_reset_rings_err_and_stops_processing():
    w = World()
    w.full()
    dev = w.dev
    d, a, u = w.rings[0]
    w.ram.mem.store16(a + 2, 200)                   # avail.idx 200 ahead of a 64-entry ring: rule 1
    dev.kick_received(0)
    assert dev.broken and dev.stats["errors"] == 1 and "rule 1" in dev.stats["last_error"]
    assert w.bells["/ve-t-q0e"].wait(0) == 1
    status = w.ok("GET_STATUS")["status"]
    assert status & NEEDS_RESET and status & DRIVER_OK
    calls = []
    dev.handle_kick = calls.append
    dev.kick_received(1)
    assert calls == []                              # a broken device does nothing until reset
    w.ok("SET_STATUS", status=0)
    assert not dev.broken and not dev.status & NEEDS_RESET


def test_vq_err_with_a_direct_exception():
    dev = FakeVsock()
    dev.vq_err(dev.vqs[2], VringError(5, "Loop detected"))
    assert dev.status == NEEDS_RESET and dev.broken and dev.stats["errors"] == 1


def test_notify_without_call_doorbell_or_memory_is_false():
    dev = FakeVsock()
    assert dev.notify(dev.vqs[0]) is False
