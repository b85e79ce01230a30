"""Issue 17 items 6 and 9, issue 21 item 5: the net device's ioctl-like control ops over the msgpack
protocol (ControlSession, pure: bytearray RAM, LocalDoorbells, a Sink backend).

    SET_BACKEND   fails as VHOST_NET_SET_BACKEND does (ENOBUFS, EFAULT, the open's error) and the
                  device goes on: the reply says `"fatal": false` and the connection stays.
    SET_LOG_BASE  the dirty bitmap in a shared memory segment; SET_FEATURES toggles LOG_ALL on a
                  running device, SET_VRING_ADDR its used-ring logging; an unusable log is EFAULT.
"""
from __future__ import annotations

import pytest

from host.dirty_log import DirtyLog
from host.net.backends.loopback import Sink
from host.net.device import VhostNet
from shared.constants import (VHOST_F_LOG_ALL, VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK,
                              VIRTIO_CONFIG_S_DRIVER as DRIVER, VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK,
                              VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
                              VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET, VIRTIO_F_VERSION_1, bit)
from shared.control import PROTOCOL_VERSION, error_is_fatal
from shared.errors import VringError
from shared.net.hdr import NET_VQ_RX, NET_VQ_TX, VHOST_NET_F_VIRTIO_NET_HDR
from tests.test_control_session import World

MAC = bytes.fromhex("525400000042")
FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VHOST_NET_F_VIRTIO_NET_HDR)
LOG_ALL = bit(VHOST_F_LOG_ALL)


class Shm:
    """Stands for a shared memory segment (attach_log's owner)."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.closed = False

    def close(self):
        self.closed = True


class NetWorld(World):
    def __init__(self):
        self.segments: dict[str, Shm] = {}
        self.opened: list[Sink] = []
        super().__init__(sizes=(64, 64), attach_log=self.attach_log)

    def factory(self, hello):
        dev = VhostNet(MAC, name="g1/net")
        dev.backend_opener = self.open_backend
        self.devices.append(dev)
        return dev

    def open_backend(self, spec):
        if spec == "nope":
            raise ValueError("net backend 'nope': unknown")
        self.opened.append(Sink(name=spec))
        return self.opened[-1]

    def attach_log(self, name, offset, size):
        seg = self.segments.get(name)
        if seg is None:
            raise FileNotFoundError(2, f"no segment {name}")
        if offset + size > len(seg.buf):
            raise ValueError("beyond the segment")
        return memoryview(seg.buf)[offset:offset + size], seg

    def hello(self, reconnect=False, **over):
        return self.ok("HELLO", version=PROTOCOL_VERSION, device="net", guest="g1",
                       reconnect=reconnect, params={})

    def soft(self, op, code, **fields):
        """An ioctl-like refusal: the error, `fatal: false`, the connection stays."""
        rep, close = self.send(op, **fields)
        assert not rep["ok"] and rep["error"] == code and rep["seq"] == self.seq, rep
        assert not close and not error_is_fatal(rep)
        assert self.ok("GET_STATUS")
        return rep


def log_size(w) -> int:
    end = max(r["guest_phys_addr"] + r["memory_size"] for r in w.ram.table)
    return -(-end // 4096 // 8)


# --- item 6: SET_BACKEND fails like the ioctl ---------------------------------------------------------
def test_set_backend_refusals_keep_the_device_running():
    w = NetWorld()
    w.full(features=FEATURES)
    w.ok("SET_BACKEND", index=NET_VQ_TX, backend="a")
    dev = w.dev
    assert dev.running and dev.backends[NET_VQ_TX] is w.opened[0]
    w.soft("SET_BACKEND", "ENOBUFS", index=2, backend="b")       # vhost_net_set_backend: -ENOBUFS
    w.soft("SET_BACKEND", "EINVAL", index=NET_VQ_TX, backend="nope")
    assert dev.running and dev.backends[NET_VQ_TX] is w.opened[0] and len(w.opened) == 1
    assert not dev.status & NEEDS_RESET and dev.status & DRIVER_OK
    w.ok("SET_BACKEND", index=NET_VQ_TX, backend="c")            # and it still takes a good one
    assert dev.backends[NET_VQ_TX] is w.opened[-1]


def test_set_backend_on_a_ring_that_is_not_accessible_is_efault():
    """vhost_vq_access_ok: a ring set up (num, addresses) against a memory table that no longer
    holds it. SET_MEM_TABLE replaced the table after SET_VRING_ADDR: the ring is stale."""
    w = NetWorld()
    w.to_features_ok(FEATURES)
    w.ok("SET_MEM_TABLE", regions=w.ram.table)
    w.ok("SET_VRING_NUM", index=NET_VQ_TX, num=64)
    w.ok("SET_VRING_ADDR", **w.addr(NET_VQ_TX))
    ring_region = next(r for r in w.ram.table
                       if r["guest_phys_addr"] <= w.rings[NET_VQ_TX][0] < r["guest_phys_addr"] + r["memory_size"])
    other = [r for r in w.ram.table if r is not ring_region]
    w.ok("SET_MEM_TABLE", regions=other)
    w.soft("SET_BACKEND", "EFAULT", index=NET_VQ_TX, backend="a")
    assert w.dev.backends[NET_VQ_TX] is None and not w.opened
    w.ok("SET_BACKEND", index=NET_VQ_RX, backend="a")            # a ring not set up passes (num 0)


# --- item 9: dirty logging on the wire --------------------------------------------------------------
def test_log_all_without_a_log_is_efault_not_an_internal_error():
    w = NetWorld()
    w.hello()
    w.ok("SET_OWNER")
    w.ok("SET_STATUS", status=ACK)
    w.ok("SET_STATUS", status=ACK | DRIVER)
    assert w.ok("GET_FEATURES")["features"] & LOG_ALL
    w.soft("SET_FEATURES", "EFAULT", features=FEATURES | LOG_ALL)   # vhost_net_set_features
    w.soft("SET_LOG_BASE", "EFAULT", shm="ve-missing", offset=0, size=4096)
    w.ok("SET_FEATURES", features=FEATURES)


def test_log_base_and_log_all_on_a_running_device():
    """QEMU starts migration on a running device: SET_LOG_BASE, SET_FEATURES +LOG_ALL,
    SET_VRING_ADDR with VHOST_VRING_F_LOG; every page the device writes is then in the bitmap."""
    w = NetWorld()
    w.full(features=FEATURES)
    dev = w.dev
    sink = Sink()
    dev.set_backend(NET_VQ_RX, sink)
    size = log_size(w)
    w.segments["ve-log"] = Shm(size + 100)
    w.soft("SET_LOG_BASE", "EFAULT", shm="ve-log", offset=0, size=size - 1)   # too small: EFAULT
    w.soft("SET_LOG_BASE", "EFAULT", shm="ve-log", offset=200, size=size)     # beyond the segment
    w.soft("SET_LOG_BASE", "EFAULT", shm="ve-log", offset=0, size=0)
    w.ok("SET_LOG_BASE", shm="ve-log", offset=100, size=size)
    w.ok("SET_FEATURES", features=FEATURES | LOG_ALL)                        # while running
    assert dev.log_all and dev.running and dev.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    addr = dict(w.addr(NET_VQ_RX), flags=1, log_guest_addr=w.rings[NET_VQ_RX][2])
    w.ok("SET_VRING_ADDR", **addr)                                             # used-ring logging
    assert dev.log_addr[NET_VQ_RX] == w.rings[NET_VQ_RX][2]
    bad, close = w.send("SET_FEATURES", features=FEATURES | LOG_ALL | bit(15))   # MRG_RXBUF
    assert close and bad["error"] in ("EPROTO", "EOPNOTSUPP")
    # traffic: the guest posts an rx buffer, a frame arrives, its pages are logged
    w2 = NetWorld()
    w2.full(features=FEATURES)
    w2.segments["ve-log"] = Shm(size)
    w2.ok("SET_LOG_BASE", shm="ve-log", offset=0, size=size)
    w2.ok("SET_FEATURES", features=FEATURES | LOG_ALL)
    w2.ok("SET_VRING_ADDR", **dict(w2.addr(NET_VQ_RX), flags=1, log_guest_addr=w2.rings[NET_VQ_RX][2]))
    sink = Sink()
    w2.dev.set_backend(NET_VQ_RX, sink)
    gvq = w2.guest_vq(NET_VQ_RX, features=FEATURES)
    g = w2.ram.alloc.alloc(2048)
    assert gvq.add_sgs([], [(g, 2048)], g)
    sink.inbox.append(b"\xff" * 6 + MAC + b"\x88\xb5" + bytes(50))
    w2.dev.handle_rx()
    assert w2.dev.stats["rx_frames"] == 1
    logged = DirtyLog(w2.segments["ve-log"].buf).dirty_pages()
    assert g // 4096 in logged and w2.rings[NET_VQ_RX][2] // 4096 in logged
    # LOG_ALL off again, then the log may go; a reset closes it
    w2.ok("SET_FEATURES", features=FEATURES)
    assert not w2.dev.log_all
    w2.ok("SET_LOG_BASE", shm="", offset=0, size=0)
    assert w2.segments["ve-log"].closed


def test_a_vsock_device_still_refuses_ring_logging():
    w = World()
    w.to_features_ok()
    w.ok("SET_MEM_TABLE", regions=w.ram.table)
    w.ok("SET_VRING_NUM", index=0, num=64)
    w.bad("SET_VRING_ADDR", "EOPNOTSUPP", **dict(w.addr(0), flags=1))


# --- issue 21 item 5: DRIVER_OK is never added while NEEDS_RESET is set -------------------------------
def test_needs_reset_only_follows_driver_ok_and_only_reset_clears_it():
    """Why the session no longer checks "DRIVER_OK while NEEDS_RESET": NEEDS_RESET comes from
    vq_err, which runs only on a started device (after DRIVER_OK); the only way back to a status
    without DRIVER_OK is 0, which clears NEEDS_RESET. No message sequence reaches the check."""
    w = NetWorld()
    w.to_features_ok(FEATURES)
    dev = w.dev
    dev.kick_received(NET_VQ_TX)                       # before DRIVER_OK: nothing runs, no vq_err
    dev.handle_rx()
    assert not dev.status & NEEDS_RESET
    w.ok("SET_MEM_TABLE", regions=w.ram.table)
    for i in range(2):
        w.setup_vring(i)
    assert w.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK | DRIVER_OK)["status"] & DRIVER_OK
    dev.vq_err(dev.vqs[NET_VQ_TX], VringError(1, "test"))
    assert dev.status & NEEDS_RESET and dev.status & DRIVER_OK
    # every later status write keeps DRIVER_OK (bits are only added) or is refused, but 0
    rep = w.ok("SET_STATUS", status=ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert rep["status"] & NEEDS_RESET and rep["status"] & DRIVER_OK
    rep, close = w.send("SET_STATUS", status=ACK | DRIVER | FEATURES_OK)
    assert close and rep["error"] == "EPROTO"
    w.session = w.new_session()
    w.hello()
    w.ok("SET_OWNER")
    assert w.ok("SET_STATUS", status=0)["status"] == 0


@pytest.mark.parametrize("spec,wanted_bit", [("tap:t0", True), ("tap:t0,vnet_hdr=on", False),
                                             ("loopback", True)])
def test_the_guest_vmm_acks_the_header_bit_only_for_backends_without_vnet_hdr(spec, wanted_bit):
    from guest.net.device import wanted_features
    assert bool(wanted_features(spec) & bit(VHOST_NET_F_VIRTIO_NET_HDR)) is wanted_bit


# --- item 9 over vhost-user: VHOST_USER_PROTOCOL_F_LOG_SHMFD ----------------------------------------
def _vu_session():
    from host.vhost_user.codec import vhost_user_session
    dev = VhostNet(MAC, hdr_from_backend=True)
    return vhost_user_session(dev)


def _log_fd(size):
    import os
    fd = os.memfd_create("ve-test-log")
    os.ftruncate(fd, size)
    return fd


def test_vhost_user_log_shmfd_and_log_all_on_running_rings():
    import os
    import struct

    from host.session import PROTOCOL_F_LOG_SHMFD
    from host.vhost_user import codec
    from tests.test_vhost_user_session import GPA, MEM, negotiate, req, ring_addrs, setup_rings, state, u64
    need = -(-(GPA + MEM) // 4096 // 8)
    # offered: LOG_ALL and LOG_SHMFD; without a log, LOG_ALL is EFAULT (the connection closes)
    s = _vu_session()
    f = negotiate(s)
    assert f & LOG_ALL and s.session.protocol_features & (1 << PROTOCOL_F_LOG_SHMFD)
    out = s.handle(req("SET_FEATURES", u64((1 << 32) | LOG_ALL), need_reply=True))
    assert out.close and s.session.error.code == "EFAULT" and out.replies[-1][-8:] == u64(1)
    s.close()
    # too small a log for the memory table: EFAULT, no traceback
    s = _vu_session()
    setup_rings(s, negotiate(s))
    out = s.handle(req("SET_LOG_BASE", struct.pack("<QQ", need - 1, 0), [_log_fd(need)]))
    assert out.close and s.session.error.code == "EFAULT"
    s.close()
    # the sequence QEMU sends when migration starts, on running rings
    s = _vu_session()
    setup_rings(s, negotiate(s))
    for q in (0, 1):
        s.handle(req("SET_VRING_ENABLE", state(q, 1)))
    dev = s.device
    assert dev.running
    fd = _log_fd(need + 4096)
    out = s.handle(req("SET_LOG_BASE", struct.pack("<QQ", need, 4096), [os.dup(fd)]))
    assert not out.close and out.replies and codec.parse_reply(out.replies[0])[0] == "SET_LOG_BASE"
    out = s.handle(req("SET_FEATURES", u64((1 << 32) | (1 << 30) | LOG_ALL), need_reply=True))
    assert not out.close and dev.log_all and dev.running
    addrs = bytearray(ring_addrs(0))
    struct.pack_into("<I", addrs, 4, 1)                       # VHOST_VRING_F_LOG, same addresses
    struct.pack_into("<Q", addrs, 32, dev.vqs[0].used)
    out = s.handle(req("SET_VRING_ADDR", bytes(addrs), need_reply=True))
    assert not out.close and dev.log_addr[0] == dev.vqs[0].used
    # a frame into the guest is logged in the memfd's bitmap
    sink = Sink()
    dev.set_backend(NET_VQ_RX, sink)
    mem = dev.mem
    g = GPA + 0x80000
    desc = dev.vqs[0].desc
    mem.write(desc, struct.pack("<QIHH", g, 2048, 2, 0))        # one device-writable buffer
    avail = dev.vqs[0].avail
    mem.write(avail + 4, struct.pack("<H", 0))
    mem.write(avail + 2, struct.pack("<H", 1))
    sink.inbox.append(b"\xff" * 6 + MAC + b"\x88\xb5" + bytes(50))
    dev.handle_rx()
    assert dev.stats["rx_frames"] == 1 and not dev.broken
    bits = os.pread(fd, need, 4096)
    logged = DirtyLog(bytearray(bits)).dirty_pages()
    assert g // 4096 in logged and dev.vqs[0].used // 4096 in logged
    s.close()
    assert dev.dirty_log is None                               # the log went with the frontend
    os.close(fd)
