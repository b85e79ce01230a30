"""The one Session behind the vhost-user codec (vhost_user_session) over a real VhostVsock, in one process: memfds for memory, eventfds for doorbells.

Drives the message sequence QEMU 7.2 sends for vhost-user-vsock (real-peers.md) and the rules
around it: REPLY_ACK, GET_CONFIG, rings starting only when configured, fds replaced at any time,
GET_VRING_BASE stopping rings, errors closing the connection, close() leaving a fresh device.
"""
from __future__ import annotations

import os
import struct

import pytest

from host.vhost_user import codec
from host.session import Region as MemRegion
from host.guest_memory import attach_memory
from host.session import PROTOCOL_FEATURES
from host.vhost_user.codec import vhost_user_session
from host.vsock.device import VhostVsock
from shared.constants import VIRTIO_CONFIG_S_DRIVER_OK
from shared.doorbell import EventFdDoorbell

MEM = 1 << 20
UVA = 0x7F00_0000_0000          # where "QEMU" mapped the guest RAM
GPA = 0x10000
NUM = 128


def req(op: str, payload: bytes = b"", fds=(), need_reply: bool = False):
    return codec.decode_message(codec.encode_request(op, payload, need_reply), list(fds))


def u64(v):
    return struct.pack("<Q", v)


def state(i, n):
    return struct.pack("<II", i, n)


@pytest.fixture
def sess():
    dev = VhostVsock(3, num_queues=2)
    s = vhost_user_session(dev)
    yield s
    s.close()


def memfd() -> int:
    fd = os.memfd_create("ve-test-ram")
    os.ftruncate(fd, MEM)
    return fd


def ring_addrs(q: int) -> bytes:
    base = UVA + 0x1000 + q * 0x10000                 # desc 16*N, avail, used (page aligned)
    return struct.pack("<IIQQQQ", q, 0, base, base + 0x2000, base + 0x1000, 0)


def negotiate(s):
    out = s.handle(req("GET_FEATURES"))
    features = struct.unpack("<Q", out.replies[0][12:])[0]
    assert features & (1 << 30) and features & (1 << 32)      # PROTOCOL_FEATURES, VERSION_1
    out = s.handle(req("GET_PROTOCOL_FEATURES"))
    pf = struct.unpack("<Q", out.replies[0][12:])[0]
    assert pf & (1 << 3) and pf & (1 << 9)                     # REPLY_ACK, CONFIG
    s.handle(req("SET_PROTOCOL_FEATURES", u64(pf)))
    s.handle(req("SET_OWNER"))
    return features


def setup_rings(s, features):
    assert s.handle(req("SET_FEATURES", u64(features & ((1 << 32) | (1 << 30))))).replies == []
    ram = memfd()
    table = codec.mem_table_payload([MemRegion(GPA, MEM, UVA, 0)])
    out = s.handle(req("SET_MEM_TABLE", table, [ram], need_reply=True))
    ack = bytes.fromhex("05000000 05000000 08000000") + u64(0)    # REPLY_ACK: success
    assert out.replies == ([ack] if s.session.protocol_features & 8 else []) and not out.close
    kicks = []
    for q in (0, 1):
        s.handle(req("SET_VRING_NUM", state(q, NUM)))
        s.handle(req("SET_VRING_BASE", state(q, 0)))
        s.handle(req("SET_VRING_ADDR", ring_addrs(q)))
        k = os.eventfd(0)
        kicks.append(k)
        os.eventfd_write(k, 1)                                   # a kick before the ring runs
        s.handle(req("SET_VRING_KICK", u64(q), [os.dup(k)]))
    return kicks


def test_qemu_sequence_starts_the_device(sess):
    f = negotiate(sess)
    for q in (0, 1):
        assert sess.handle(req("SET_VRING_CALL", u64(q), [os.eventfd(0)])).replies == []
    out = sess.handle(req("GET_CONFIG", struct.pack("<III", 0, 8, 0) + bytes(8)))
    assert out.replies[0][12 + 12:] == struct.pack("<Q", 3)      # le64 guest_cid
    kicks = setup_rings(sess, f)
    dev = sess.device
    assert not dev.running                                     # enabled only by SET_VRING_ENABLE
    out = sess.handle(req("SET_VRING_ENABLE", state(0, 1)))
    assert out.started == [0] and dev.running and dev.status & VIRTIO_CONFIG_S_DRIVER_OK
    out = sess.handle(req("SET_VRING_ENABLE", state(1, 1)))
    assert out.started == [1]
    # CALL fds replaced while running (QEMU does this after DRIVER_OK)
    old = dev.calls[0]
    sess.handle(req("SET_VRING_CALL", u64(0), [os.eventfd(0)]))
    assert dev.calls[0] is not old and old.fd == -1 and dev.running
    # poweroff: disable, GET_VRING_BASE stops each ring and reports its base
    sess.handle(req("SET_VRING_ENABLE", state(0, 0)))
    out = sess.handle(req("GET_VRING_BASE", state(0, 0)))
    assert out.replies == [codec.reply("GET_VRING_BASE", state(0, 0))]
    out = sess.handle(req("GET_VRING_BASE", state(1, 0)))
    assert not dev.running and dev.kicks == [None, None]
    for k in kicks:
        os.close(k)


def test_without_protocol_features_the_kick_starts_the_ring(sess):
    sess.handle(req("SET_OWNER"))
    kicks = setup_rings(sess, (1 << 32))
    assert sess.session.ring_started(0) and sess.session.ring_started(1) and sess.device.running
    for k in kicks:
        os.close(k)


def test_ring_addresses_translate_through_the_table(sess):
    setup_rings(sess, negotiate(sess))
    vq = sess.device.vqs[1]
    assert vq.desc == GPA + 0x1000 + 0x10000
    assert vq.avail == vq.desc + 0x1000 and vq.used == vq.desc + 0x2000


@pytest.mark.parametrize("bad", [
    ("SET_VRING_ADDR", struct.pack("<IIQQQQ", 0, 0, 0x1000, 0x3000, 0x2000, 0)),   # not in the table
    ("SET_VRING_NUM", state(0, 100)),                                             # not a power of 2
    ("SET_VRING_NUM", state(5, 128)),                                             # no such queue
    ("SET_PROTOCOL_FEATURES", u64(1 << 5)),                                       # not offered
    ("GET_CONFIG", struct.pack("<III", 4, 8, 0) + bytes(8)),                      # outside config
    ("SET_CONFIG", struct.pack("<III", 0, 8, 0) + bytes(8)),                      # read-only
    ("SET_LOG_BASE", struct.pack("<QQ", 4096, 0)),                                # not supported
])
def test_errors_nack_and_close(sess, bad):
    f = negotiate(sess)
    sess.handle(req("SET_FEATURES", u64(f & ((1 << 32) | (1 << 30)))))
    sess.handle(req("SET_MEM_TABLE", codec.mem_table_payload([MemRegion(GPA, MEM, UVA, 0)]), [memfd()]))
    op, payload = bad
    fds = [os.eventfd(0)] if op == "SET_LOG_BASE" else []
    out = sess.handle(req(op, payload, fds, need_reply=True))
    assert out.close and sess.session.error is not None
    if out.replies and op not in ("GET_CONFIG",):
        assert out.replies[-1][-8:] == u64(1)                    # REPLY_ACK: failure


def test_close_resets_for_the_next_frontend(sess):
    setup_rings(sess, negotiate(sess))
    sess.handle(req("SET_VRING_ENABLE", state(0, 1)))
    dev = sess.device
    assert dev.running and dev.mem is not None
    sess.close()
    assert not dev.running and dev.mem is None and dev.kicks == [None, None] and dev.status == 0


def test_memory_with_mmap_offset():
    fd = memfd()
    os.pwrite(fd, b"hello", 0x3000)
    mem = attach_memory([MemRegion(0x100000, 0x8000, 0x5000, 0x3000, fd)])
    try:
        assert mem.read(0x100000, 5) == b"hello"
        assert mem.uva_to_gpa(0x5000 + 16, 4) == 0x100010
    finally:
        mem.release()


def test_protocol_features_offer():
    assert PROTOCOL_FEATURES & (1 << 3) and PROTOCOL_FEATURES & (1 << 9)


def test_eventfd_doorbell():
    import select
    db = EventFdDoorbell()
    assert db.wait(0.01) == 0
    db.ring()
    db.ring()
    assert select.select([db], [], [], 0)[0] == [db]       # fileno(): a selector can watch it
    assert db.wait(1) == 2                                  # the whole counter, eventfd semantics
    assert db.read() == 0
    fd = db.fileno()
    db.close()
    db.ring()                                               # ringing a closed doorbell is a no-op
    with pytest.raises(OSError):
        os.fstat(fd)


def test_kick_fd_replaced_while_running(sess):
    kicks = setup_rings(sess, negotiate(sess))
    sess.handle(req("SET_VRING_ENABLE", state(1, 1)))
    old = sess.device.kicks[1]
    out = sess.handle(req("SET_VRING_KICK", u64(1), [os.eventfd(0)]))
    assert not out.close and sess.session.ring_started(1)
    assert sess.device.kicks[1] is not old and old.fd == -1     # the old fd is closed
    for k in kicks:
        os.close(k)


def test_packed_rings_over_vhost_user_carry_both_wrap_counters(sess):
    """Issue 19: with VIRTIO_F_RING_PACKED offered and acked the device serves packed rings;
    SET_VRING_ADDR checks the packed parts (driver and device areas 4-aligned), SET_VRING_BASE
    takes QEMU's 32-bit value (avail slot/wrap low, used slot/wrap high) and GET_VRING_BASE gives
    it back in the same layout, after the ring moved on a lap."""
    from guest.virtqueue_packed import VirtQueuePacked
    from shared.memory import GuestMemory
    from shared.constants import VIRTIO_F_RING_PACKED
    dev = sess.device
    dev.offer_packed()
    f = negotiate(sess)
    assert f >> VIRTIO_F_RING_PACKED & 1
    assert sess.handle(req("SET_FEATURES", u64((1 << 32) | (1 << 30) | (1 << VIRTIO_F_RING_PACKED)))).replies == []
    assert all(getattr(q, "packed", False) for q in dev.vqs)
    ram = memfd()
    sess.handle(req("SET_MEM_TABLE", codec.mem_table_payload([MemRegion(GPA, MEM, UVA, 0)]), [os.dup(ram)]))
    num = 8
    desc, drv, devarea = 0x1000, 0x2000, 0x2004               # offsets in the RAM
    sess.handle(req("SET_VRING_NUM", state(1, num)))
    # vhost_vring_addr: desc, used, avail (the device area travels as used, the driver's as avail)
    bad = struct.pack("<IIQQQQ", 1, 0, UVA + desc, UVA + devarea, UVA + drv + 2, 0)
    assert sess.handle(req("SET_VRING_ADDR", bad)).close       # driver area not 4-aligned
    sess = vhost_user_session(dev)                              # a new connection
    negotiate(sess)
    sess.handle(req("SET_FEATURES", u64((1 << 32) | (1 << 30) | (1 << VIRTIO_F_RING_PACKED))))
    sess.handle(req("SET_MEM_TABLE", codec.mem_table_payload([MemRegion(GPA, MEM, UVA, 0)]), [ram]))
    sess.handle(req("SET_VRING_NUM", state(1, num)))
    sess.handle(req("SET_VRING_BASE", state(1, 0x80008000)))   # QEMU: a new ring
    sess.handle(req("SET_VRING_ADDR", struct.pack("<IIQQQQ", 1, 0, UVA + desc, UVA + devarea, UVA + drv, 0)))
    vq = dev.vqs[1]
    assert (vq.desc, vq.avail, vq.used) == (GPA + desc, GPA + drv, GPA + devarea)
    assert vq.last_avail_idx == 0x8000 and vq.last_used_idx == 0x8000
    # the driver (our packed driver on the same memory) moves the ring 11 slots: past the end once
    gmem = GuestMemory.from_buffer(dev.mem.view(GPA, MEM), GPA)
    g = VirtQueuePacked(gmem, 1, num, GPA + desc, GPA + drv, GPA + devarea)
    for n in range(11):
        assert g.add_sgs([(GPA + 0x8000, 44)], [], n)
        c = vq.get_vq_desc(dev.mem)
        vq.add_used(dev.mem, c.head, 0)
        assert g.get_buf() == (n, 0)
    g.close()
    gmem.release()
    out = sess.handle(req("GET_VRING_BASE", state(1, 0)))
    want = 3 | 0 << 15 | (3 | 0 << 15) << 16                  # slot 3 of lap 0, both sides
    assert out.replies == [codec.reply("GET_VRING_BASE", state(1, want))]
    sess.close()
