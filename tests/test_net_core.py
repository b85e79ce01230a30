"""virtio-net driver (guest/net/driver.py) and vhost-net (host/net/device.py) on bytearray RAM.

One process, no threads: the guest driver's kick calls the device's kick_received directly (or is
recorded, when a test wants to run the device by hand); work the device queues for itself
(weights, backend wakeups) runs with run_local_work.
"""
from __future__ import annotations

import errno

import pytest

from host.dirty_log import VHOST_PAGE_SIZE, DirtyLog
from host.net.backends.loopback import Loopback, Sink
from host.net.device import VHOST_NET_POLL_STARTED, VhostNet
from shared.constants import (VHOST_F_LOG_ALL, VHOST_NET_PKT_WEIGHT, VIRTIO_CONFIG_S_NEEDS_RESET,
                              VIRTIO_F_VERSION_1, bit)
from shared.net.hdr import (NET_CONFIG, NET_HDR, NET_HDR_MRG, NET_VQ_RX, NET_VQ_TX,
                            VIRTIO_NET_F_MRG_RXBUF,
                            hdr_len, parse_ip, parse_mac)
from tests.net_rig import MAC, V1, Rig


def frame(i: int, size: int = 64) -> bytes:
    """A broadcast Ethernet frame numbered i, `size` bytes."""
    body = i.to_bytes(4, "big") * ((size - 14) // 4 + 1)
    return b"\xff" * 6 + MAC + b"\x88\xb5" + body[:size - 14]


# --- headers and config ----------------------------------------------------------------------------
def test_header_sizes_and_config():
    assert hdr_len(bit(VIRTIO_F_VERSION_1)) == 12
    assert hdr_len(bit(VIRTIO_NET_F_MRG_RXBUF)) == 12
    assert hdr_len(0) == 10
    dev = VhostNet(MAC)
    mac, status, pairs = NET_CONFIG.unpack(dev.config_bytes())
    assert (mac, status, pairs) == (MAC, 1, 1)
    assert parse_mac("52:54:00:00:00:02") == MAC
    for bad in ("52:54:00:00:00", "01:00:00:00:00:01", "00:00:00:00:00:00", "zz:54:00:00:00:02"):
        with pytest.raises(ValueError):
            parse_mac(bad)
    assert str(parse_ip("169.254.10.2/24").ip) == "169.254.10.2"
    for bad in ("10.0.0.1/24", "169.254.10.2", "169.254.300.1/24"):
        with pytest.raises(ValueError):
            parse_ip(bad)


@pytest.mark.parametrize("features", [V1, (V1 & ~bit(VIRTIO_F_VERSION_1))])
def test_tx_strips_the_header_and_returns_buffers(features):
    sink = Sink()
    rig = Rig(features, sink)
    sent = [frame(i, 64 + i) for i in range(40)]
    for f in sent:
        assert rig.drv.start_xmit(f)
    assert list(sink.queue) == sent
    assert rig.dev.vhost_hlen == (12 if features & bit(VIRTIO_F_VERSION_1) else 10)
    rig.drv.free_old_xmit()                      # start_xmit reclaimed the rest as it went
    assert rig.vqs[NET_VQ_TX].in_flight() == 0
    st = rig.dev.get_stats()
    assert (st["tx_frames"], st["tx_bytes"]) == (40, sum(map(len, sent)))


@pytest.mark.parametrize("features", [V1, (V1 & ~bit(VIRTIO_F_VERSION_1))])
def test_rx_writes_the_header(features):
    sink = Sink()
    rig = Rig(features, sink)
    want = [frame(i, 60 + 7 * i) for i in range(30)]
    sink.inbox.extend(want)
    # look at the raw header of the first used buffer before the driver takes it
    rig.dev.backend_readable()
    rig.run()
    token, ln = rig.vqs[NET_VQ_RX].get_buf()
    hl = hdr_len(features)
    raw = rig.mem.read(token, ln)
    assert ln == hl + len(want[0])
    if hl == 12:
        assert NET_HDR_MRG.unpack_from(raw) == (0, 0, 0, 0, 0, 0, 1)
    else:
        assert NET_HDR.unpack_from(raw) == (0, 0, 0, 0, 0, 0)
    assert raw[hl:] == want[0]
    assert rig.drv.receive() == want[1:]


def test_mergeable_rx_spans_buffers():
    sink = Sink()
    rig = Rig(V1 | bit(VIRTIO_NET_F_MRG_RXBUF), sink, rx_buf_size=256)
    want = [frame(i, size) for i, size in enumerate((60, 244, 245, 1000, 1514, 1514, 300))]
    sink.inbox.extend(want)
    assert rig.rx() == want
    assert rig.dev.stats["rx_dropped"] == 0
    # 1514 + 12 bytes over 256-byte buffers: 6 buffers, num_buffers said so
    assert rig.dev.stats["rx_frames"] == len(want)


def test_rx_truncated_frame_dropped_and_counted():
    sink = Sink()
    rig = Rig(V1, sink, fill=False)
    g = rig.ram.alloc.alloc(100)
    assert rig.vqs[NET_VQ_RX].add_sgs([], [(g, 100)], g)        # too small for a 200-byte frame
    sink.inbox.extend([frame(0, 200), frame(1, 80)])
    rig.dev.backend_readable()
    rig.run()
    assert rig.dev.stats["rx_dropped"] == 1
    token, ln = rig.vqs[NET_VQ_RX].get_buf()                    # the same buffer got frame 1
    assert (token, ln) == (g, 12 + 80)
    assert rig.mem.read(g + 12, 80) == frame(1, 80)


def test_rx_waits_for_buffers_and_loses_nothing():
    sink = Sink()
    rig = Rig(V1, sink, sizes=(8, 8))
    want = [frame(i) for i in range(50)]
    sink.inbox.extend(want)
    assert rig.rx() == want            # receive() refills and kicks; the kick resumes handle_rx


def test_loopback_reflects():
    rig = Rig(V1, Loopback())
    for i in range(10):
        assert rig.drv.start_xmit(frame(i))
    assert rig.rx() == [frame(i) for i in range(10)]


# --- tx polling ------------------------------------------------------------------------------------
def test_full_backend_starts_tx_polling_and_loses_nothing():
    lo = Loopback(capacity=8)
    lo.paused = True
    rig = Rig(V1, lo, sizes=(64, 64))
    for i in range(30):                                  # one burst: the send fills the backend
        assert rig.drv.start_xmit(frame(i), kick=False)
    rig.drv.kick(rig.vqs[NET_VQ_TX])
    assert len(lo.queue) == 8
    assert rig.dev.tx_poll_state == VHOST_NET_POLL_STARTED and rig.dev.tx_polling
    rig.drv.free_old_xmit()
    assert rig.vqs[NET_VQ_TX].in_flight() == 22          # still the guest's, not lost
    kicks_before = rig.dev.stats["kicks"]
    rig.drv.start_xmit(frame(30))                         # no kick: notifications stay off
    assert rig.dev.stats["kicks"] == kicks_before
    got = []
    lo.paused = False
    while len(got) < 31:
        f = lo.recv()
        assert f is not None
        got.append(f)
        if lo.writable():
            rig.dev.backend_writable()
            rig.run()
    assert got == [frame(i) for i in range(31)]
    assert not rig.dev.tx_polling
    rig.drv.free_old_xmit()
    assert rig.vqs[NET_VQ_TX].in_flight() == 0


# --- weights ---------------------------------------------------------------------------------------
def test_tx_flood_does_not_starve_rx():
    sink = Sink()
    rig = Rig(V1, sink, sizes=(256, 1024), direct_kick=False)
    for i in range(1000):
        assert rig.drv.start_xmit(frame(i), kick=False)
    rig.drv.kick(rig.vqs[NET_VQ_TX])
    sink.inbox.extend(frame(10_000 + i) for i in range(5))
    rig.dev.handle_tx()
    assert len(sink.queue) == VHOST_NET_PKT_WEIGHT        # the weight stopped it; work requeued
    assert rig.dev.stats["tx_requeued"] == 1
    rig.dev.backend_readable()                             # rx work queued behind tx
    rig.dev.run_local_work(limit=2)                        # tx's next slice, then rx
    assert rig.drv.receive() == [frame(10_000 + i) for i in range(5)]
    assert len(sink.queue) < 1000
    rig.run()
    assert len(sink.queue) == 1000


# --- backends --------------------------------------------------------------------------------------
def test_set_backend_swap_and_detach_under_traffic():
    a, b = Sink(name="a"), Sink(name="b")
    rig = Rig(V1, a)
    for i in range(5):
        rig.drv.start_xmit(frame(i))
    assert rig.dev.set_backend(NET_VQ_TX, b) is None       # a still serves rx
    for i in range(5, 10):
        rig.drv.start_xmit(frame(i))
    assert rig.dev.set_backend(NET_VQ_RX, b) is a          # now a is free to close
    assert rig.dev.get_stats()["backend"] == "b"
    assert rig.dev.set_backend(NET_VQ_TX, None) is None    # detach tx (fd -1)
    for i in range(10, 15):
        rig.drv.start_xmit(frame(i))                       # stays on the ring
    assert rig.vqs[NET_VQ_TX].in_flight() == 5
    rig.dev.set_backend(NET_VQ_TX, b)                      # re-attach: the queued frames go
    rig.run()
    assert list(a.queue) == [frame(i) for i in range(5)]
    assert list(b.queue) == [frame(i) for i in range(5, 15)]
    with pytest.raises(OSError) as ei:
        rig.dev.set_backend(2, b)
    assert ei.value.errno == errno.ENOBUFS


def test_reset_owner_detaches_backends():
    sink = Sink()
    rig = Rig(V1, sink)
    assert rig.dev.reset_owner() == [sink]
    assert rig.dev.backends == [None, None] and rig.dev.mem is None and not rig.dev.running


def test_log_all_refused_without_a_log():
    dev = VhostNet(MAC)
    assert not dev.features_ok(bit(VIRTIO_F_VERSION_1) | bit(VHOST_F_LOG_ALL))
    with pytest.raises(OSError) as ei:                    # vhost_net_set_features: -EFAULT
        dev.set_features(bit(VIRTIO_F_VERSION_1) | bit(VHOST_F_LOG_ALL))
    assert ei.value.errno == errno.EFAULT
    dev.set_log_base(bytearray(16))
    assert dev.features_ok(bit(VIRTIO_F_VERSION_1) | bit(VHOST_F_LOG_ALL))


# --- dirty logging ---------------------------------------------------------------------------------
def test_dirty_log_covers_every_device_write():
    sink = Sink()
    rig = Rig(V1 | bit(VHOST_F_LOG_ALL) | bit(VIRTIO_NET_F_MRG_RXBUF), sink, rx_buf_size=700,
              log=True, direct_kick=False)
    for i in range(20):
        rig.drv.start_xmit(frame(i, 100 + 70 * i), kick=False)
    sink.inbox.extend(frame(i, 60 + 77 * i) for i in range(19))
    before = bytes(rig.buf)
    bytearray_bits = rig.bitmap
    bytearray_bits[:] = bytes(len(bytearray_bits))
    rig.dev.handle_tx()
    rig.dev.handle_rx()
    rig.run()
    after = bytes(rig.buf)
    assert len(sink.queue) == 20 and rig.dev.stats["rx_frames"] == 19
    changed = set()
    for r in rig.ram.table:          # RAM offset -> gpa, region by region
        o = r["mmap_offset"]
        g0 = r["guest_phys_addr"]
        for page in range(g0 // VHOST_PAGE_SIZE, (g0 + r["memory_size"] - 1) // VHOST_PAGE_SIZE + 1):
            lo = max(page * VHOST_PAGE_SIZE, g0) - g0 + o
            hi = min((page + 1) * VHOST_PAGE_SIZE, g0 + r["memory_size"]) - g0 + o
            if before[lo:hi] != after[lo:hi]:
                changed.add(page)
    logged = DirtyLog(bytearray_bits).dirty_pages()
    assert changed and changed <= logged                # every page written is logged
    assert rig.dev.dirty_log.overflow == 0
    # and nothing but pages the device may write: rx buffers and the two used rings
    allowed = set()
    for vq in rig.vqs:
        for p in range(vq.used // VHOST_PAGE_SIZE, (vq.used + 6 + 8 * vq.num) // VHOST_PAGE_SIZE + 1):
            allowed.add(p)
    for st in rig.vqs[NET_VQ_RX]._state:
        if st is not None:
            g = st[0]
            allowed |= {g // VHOST_PAGE_SIZE, (g + 699) // VHOST_PAGE_SIZE}
    used_rx = []
    while (x := rig.vqs[NET_VQ_RX].get_buf()) is not None:
        used_rx.append(x)
    for g, ln in used_rx:
        allowed |= set(range(g // VHOST_PAGE_SIZE, (g + ln - 1) // VHOST_PAGE_SIZE + 1))
    assert logged <= allowed


# --- malformed input -------------------------------------------------------------------------------
def _broken(rig) -> bool:
    return rig.dev.broken and rig.dev.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_tx_chain_with_writable_buffer_needs_reset():
    rig = Rig(V1, Sink())
    g = rig.ram.alloc.alloc(200)
    rig.mem.write(g, bytes(12) + frame(0))
    rig.vqs[NET_VQ_TX].add_sgs([(g, 76)], [(g + 100, 50)], g)
    rig.drv.kick(rig.vqs[NET_VQ_TX])
    assert _broken(rig)
    assert "Unexpected descriptor format for TX" in rig.dev.stats["last_error"]


@pytest.mark.parametrize("hdr,body", [
    (bytes(12), b""),                                     # header only (the seed: len == 0)
    (bytes(11), b""),                                     # not even a header
    (bytes(8), b""),
])
def test_malformed_tx_header_needs_reset(hdr, body):
    rig = Rig(V1, Sink())
    other = Rig(V1, Sink())
    data = hdr + body
    g = rig.ram.alloc.alloc(len(data))
    rig.mem.write(g, data)
    rig.vqs[NET_VQ_TX].add_sgs([(g, len(data))], [], g)
    rig.drv.kick(rig.vqs[NET_VQ_TX])
    assert _broken(rig)
    rig.drv.start_xmit(frame(1))                          # the broken device does no more work
    assert not rig.dev.backends[NET_VQ_TX].queue
    assert other.drv.start_xmit(frame(2)) and list(other.dev.backends[NET_VQ_TX].queue) == [frame(2)]


def test_rx_chain_with_readable_buffer_needs_reset():
    sink = Sink()
    rig = Rig(V1, sink, fill=False)
    g = rig.ram.alloc.alloc(2000)
    rig.vqs[NET_VQ_RX].add_sgs([(g, 10)], [(g + 16, 1600)], g)
    sink.inbox.append(frame(0))
    rig.dev.backend_readable()
    rig.run()
    assert _broken(rig)
    assert "Unexpected descriptor format for RX" in rig.dev.stats["last_error"]


def test_driver_drops_bad_used_lengths():
    sink = Sink()
    rig = Rig(V1 | bit(VIRTIO_NET_F_MRG_RXBUF), sink, sizes=(8, 8), rx_buf_size=256)
    hvq = rig.dev.vqs[NET_VQ_RX]
    mem = rig.dev.mem
    # a hostile device: a used length shorter than the header, then num_buffers 0
    c = hvq.get_vq_desc(mem)
    hvq.add_used(mem, c.head, 5)
    c = hvq.get_vq_desc(mem)
    c.in_[0][:12] = NET_HDR_MRG.pack(0, 0, 0, 0, 0, 0, 0)
    hvq.add_used(mem, c.head, 100)
    assert rig.drv.receive() == []
    assert rig.drv.stats["rx_errors"] == 2


# --- SET_BACKEND over the control plane ------------------------------------------------------------
def test_set_backend_message_needs_the_owner_and_swaps():
    from host.native import native_session
    from shared.control import PROTOCOL_VERSION
    opened = []

    def make(hello):
        dev = VhostNet(MAC)
        dev.backend_opener = lambda spec: opened.append(Sink(name=spec)) or opened[-1]
        return dev
    s = native_session(make, attach_memory=lambda regions: None)
    seq = iter(range(1, 100))

    def call(op, **f):
        return s.handle({"op": op, "seq": next(seq), **f})

    rep, close = call("HELLO", version=PROTOCOL_VERSION, device="net", guest="g", reconnect=False,
                      params={})
    assert not close
    rep, close = call("SET_BACKEND", index=1, backend="loopback")
    assert close and rep["error"] == "EPERM"               # the owner check (vhost_dev_check_owner)
    s = native_session(make, attach_memory=lambda regions: None)
    call("HELLO", version=PROTOCOL_VERSION, device="net", guest="g", reconnect=False, params={})
    call("SET_OWNER")
    rep, close = call("SET_BACKEND", index=1, backend="a")
    assert not close and s.device.backends[NET_VQ_TX] is opened[-1]
    rep, close = call("SET_BACKEND", index=1, backend="")   # detach: fd -1
    assert not close and s.device.backends[NET_VQ_TX] is None
    rep, close = call("SET_BACKEND", index=2, backend="b")
    assert not close and rep["error"] == "ENOBUFS" and rep["fatal"] is False   # the ioctl's -ENOBUFS


def test_reset_owner_message_detaches_and_closes_the_backends():
    """RESET_OWNER over the control plane is vhost_net_reset_owner: the backends are stopped
    (vhost_net_stop) and closed, the device forgets its rings, and ownership is dropped."""
    from host.native import native_session
    from shared.control import PROTOCOL_VERSION
    closed = []

    def make(hello):
        dev = VhostNet(MAC)
        dev.backend_opener = lambda spec: Sink(name=spec)
        dev.backend_closer = closed.append
        return dev
    s = native_session(make, attach_memory=lambda regions: None)
    seq = iter(range(1, 100))

    def call(op, **f):
        return s.handle({"op": op, "seq": next(seq), **f})
    call("HELLO", version=PROTOCOL_VERSION, device="net", guest="g", reconnect=False, params={})
    call("SET_OWNER")
    call("SET_BACKEND", index=0, backend="a")
    call("SET_BACKEND", index=1, backend="b")
    b0, b1 = s.device.backends
    rep, close = call("RESET_OWNER")
    assert rep["ok"] and not close
    assert s.device.backends == [None, None] and closed == [b0, b1]
    rep, close = call("SET_BACKEND", index=1, backend="c")
    assert close and rep["error"] == "EPERM"               # no longer the owner


def test_backend_errors_are_not_the_guests():
    """Issue 17 item 4: a send error keeps the frame (vhost_discard_vq_desc + tx_poll_start, the
    seed's handle_tx) and it goes out once the backend works again; rx errors are counted."""
    class Broken(Sink):
        down = True

        def recv(self):
            if self.down:
                raise OSError(errno.ENETDOWN, "Network is down")
            return super().recv()

        def send(self, frame):
            if self.down:
                raise OSError(errno.ENETDOWN, "Network is down")
            return super().send(frame)
    be = Broken()
    rig = Rig(V1, be)
    assert rig.drv.start_xmit(frame(0))
    rig.dev.backend_readable()
    rig.run()
    st = rig.dev.stats
    assert not rig.dev.broken and st["rx_dropped"] >= 1
    assert st["tx_dropped"] == 0 and st["tx_errors"] == 1
    assert rig.dev.tx_polling and rig.dev.tx_poll_error       # retried on the runner's timer
    rig.drv.free_old_xmit()
    assert rig.vqs[NET_VQ_TX].in_flight() == 1            # the chain is still the device's to send
    rig.dev.backend_writable()                            # a retry while still down: kept again
    rig.run()
    assert st["tx_errors"] == 2 and rig.vqs[NET_VQ_TX].in_flight() == 1 and not be.queue
    be.down = False
    rig.dev.backend_writable()
    rig.run()
    assert list(be.queue) == [frame(0)] and st["tx_frames"] == 1 and not rig.dev.tx_polling
    rig.drv.free_old_xmit()
    assert rig.vqs[NET_VQ_TX].in_flight() == 0
