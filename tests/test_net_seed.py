"""Issue 17 (items 1-8) and issue 21 item 3: vhost-net as the seed's vhost/net.c does it, on
bytearray RAM in one process, and every length boundary the device, the driver and the backends
enforce, tested at and around it.

Chains are written by hand (add_sgs) where the driver would refuse to build them: the device must
cope with whatever a guest posts.
"""
from __future__ import annotations

import errno

import pytest

from guest.net.driver import VirtioNet
from host.net.backends.loopback import Loopback, Sink
from host.net.device import VHOST_NET_POLL_STARTED
from shared.constants import VHOST_NET_PKT_WEIGHT, VHOST_NET_WEIGHT, VIRTIO_CONFIG_S_NEEDS_RESET, bit
from shared.net.hdr import (NET_HDR_MRG, NET_VQ_RX, NET_VQ_TX, VHOST_NET_F_VIRTIO_NET_HDR,
                            VIRTIO_NET_F_MRG_RXBUF)
from tests.net_rig import MAC, V1, Rig

HL = 12                                   # the VERSION_1 header
MRG = V1 | bit(VIRTIO_NET_F_MRG_RXBUF)
NOHDR = V1 & ~bit(VHOST_NET_F_VIRTIO_NET_HDR)     # the VMM left the header to the backend


def frame(i: int, size: int = 64, ethertype: bytes = b"\x88\xb5") -> bytes:
    body = i.to_bytes(4, "big") * (size // 4 + 1)
    return (b"\xff" * 6 + MAC + ethertype + body)[:size]


def vlan_frame(i: int, vid: int = 100, size: int = 1518) -> bytes:
    """An 802.1Q frame: 1518 bytes carry a full 1500-byte payload."""
    tag = b"\x81\x00" + vid.to_bytes(2, "big")
    return (b"\xff" * 6 + MAC + tag + b"\x08\x00" + i.to_bytes(4, "big") * size)[:size]


def post_tx(rig, data: bytes, kick: bool = True) -> int:
    """A raw tx chain of `data` (header included, as the guest wrote it)."""
    g = rig.ram.alloc.alloc(max(len(data), 1))
    rig.mem.write(g, data)
    assert rig.vqs[NET_VQ_TX].add_sgs([(g, len(data))], [], g)
    if kick:
        rig.drv.kick(rig.vqs[NET_VQ_TX])
    rig.run()
    return g


def post_rx(rig, *sizes: int) -> list[int]:
    out = []
    for n in sizes:
        g = rig.ram.alloc.alloc(max(n, 1))
        rig.mem.write(g, b"\xee" * n)
        assert rig.vqs[NET_VQ_RX].add_sgs([], [(g, n)], g)
        out.append(g)
    return out


def broken(rig) -> bool:
    return bool(rig.dev.broken and rig.dev.status & VIRTIO_CONFIG_S_NEEDS_RESET)


# --- item 1: frames the seed passes on ---------------------------------------------------------------
def test_tx_passes_vlan_jumbo_and_flagged_frames_on():
    """handle_tx refuses only a chain with nothing after the header: VLAN (1518), jumbo (9014),
    flags / gso_type set in the header (the seed ignores the stripped header) all go out."""
    sink = Sink()
    rig = Rig(V1, sink)
    frames = [(bytes(HL), vlan_frame(1)),
              (bytes(HL), frame(2, 9014)),
              (NET_HDR_MRG.pack(1, 0, 0, 0, 0, 0, 0), frame(3)),       # NEEDS_CSUM
              (NET_HDR_MRG.pack(0, 1, 54, 1448, 0, 0, 0), frame(4)),   # GSO_TCPV4
              (bytes(HL), frame(5, 65000))]
    for hdr, body in frames:
        post_tx(rig, hdr + body)
    assert not broken(rig)
    assert list(sink.queue) == [b for _, b in frames]
    assert rig.dev.stats["tx_frames"] == len(frames)
    rig.drv.free_old_xmit()
    assert rig.vqs[NET_VQ_TX].in_flight() == 0


def test_backend_refusal_is_counted_and_the_chain_completed():
    """A backend may refuse what it cannot carry (EMSGSIZE / EINVAL): counted, chain completed,
    the device and the frames after it go on."""
    class Mtu1500(Sink):
        def send(self, f):
            if len(f) > 1514:
                raise OSError(errno.EMSGSIZE, "Message too long")
            return super().send(f)
    be = Mtu1500()
    rig = Rig(V1, be)
    post_tx(rig, bytes(HL) + frame(0, 9014))
    post_tx(rig, bytes(HL) + frame(1))
    st = rig.dev.stats
    assert not broken(rig) and (st["tx_refused"], st["tx_dropped"], st["tx_frames"]) == (1, 1, 1)
    assert list(be.queue) == [frame(1)] and not rig.dev.tx_polling
    rig.drv.free_old_xmit()
    assert rig.vqs[NET_VQ_TX].in_flight() == 0


@pytest.mark.parametrize("features,size,ok", [
    (V1, 0, False),          # an empty chain
    (V1, HL - 1, False),     # not even the header
    (V1, HL, False),         # header only: "Unexpected header len for TX"
    (V1, HL + 1, True),      # one byte after it: the backend's to judge
    (V1, HL + 13, True),
    (V1, HL + 14, True),     # the smallest Ethernet frame
    (NOHDR, 1, True),        # nothing stripped: any non-empty chain goes to the backend as is
    (NOHDR, 0, False),
])
def test_tx_length_boundaries(features, size, ok):
    sink = Sink()
    rig = Rig(features, sink)
    data = bytes(range(256))[:size] if size <= 256 else bytes(size)
    g = rig.ram.alloc.alloc(max(size, 1))
    rig.mem.write(g, data)
    rig.vqs[NET_VQ_TX].add_sgs([(g, size)], [], g)
    rig.drv.kick(rig.vqs[NET_VQ_TX])
    rig.run()
    assert broken(rig) is not ok
    if ok:
        strip = HL if features & bit(VHOST_NET_F_VIRTIO_NET_HDR) else 0
        assert list(sink.queue) == [data[strip:]]
    else:
        assert not sink.queue and "Unexpected header len for TX" in rig.dev.stats["last_error"]


def test_driver_frame_boundaries():
    """The guest driver (ours) keeps Ethernet's limits: 14 bytes is the smallest frame it sends
    and accepts; max_frame (1518 by default: VLAN) the largest."""
    sink = Sink()
    rig = Rig(V1, sink)
    assert rig.drv.start_xmit(frame(0, 14))
    with pytest.raises(ValueError):
        rig.drv.start_xmit(frame(0, 13))
    assert rig.drv.start_xmit(vlan_frame(1))
    with pytest.raises(ValueError):
        rig.drv.start_xmit(vlan_frame(1, size=1519))
    assert list(sink.queue) == [frame(0, 14), vlan_frame(1)]
    sink.inbox.extend([frame(2, 13), frame(3, 14), vlan_frame(4), vlan_frame(5, size=1519)])
    assert rig.rx() == [frame(3, 14), vlan_frame(4)]
    assert rig.drv.stats["rx_errors"] == 1                # 13 bytes: not Ethernet
    assert rig.dev.stats["rx_dropped"] == 1               # 1519 + 12 > the buffer: the device's drop
    big = VirtioNet(rig.mem, rig.ram.alloc, rig.vqs[0], rig.vqs[1], V1, MAC, max_frame=9018)
    assert big.rx_buf_size == HL + 9018


# --- item 2: the header is the feature's -------------------------------------------------------------
def test_header_follows_the_feature_bit_not_the_backend():
    # bit acked, backend with vnet_hdr: vhost strips (vhost_net_set_features: hdr_size)
    vsink = Sink()
    vsink.vnet_hdr = True
    rig = Rig(V1, vsink)
    assert (rig.dev.vhost_hlen, rig.dev.sock_hlen) == (HL, 0)
    rig.drv.start_xmit(frame(0))
    assert list(vsink.queue) == [frame(0)]
    # bit clear, backend without vnet_hdr: the header goes to it as is, both ways
    sink = Sink()
    rig = Rig(NOHDR | bit(VIRTIO_NET_F_MRG_RXBUF), sink)
    assert (rig.dev.vhost_hlen, rig.dev.sock_hlen) == (0, HL)
    hdr = NET_HDR_MRG.pack(1, 0, 0, 0, 20, 4, 0)
    post_tx(rig, hdr + frame(1))
    assert list(sink.queue) == [hdr + frame(1)]
    sink.inbox.append(NET_HDR_MRG.pack(1, 0, 0, 0, 20, 4, 0) + frame(2))
    sink.inbox.append(b"\x00" * (HL - 1))                 # shorter than the backend's header
    rig.dev.backend_readable()
    rig.run()
    g, ln = rig.vqs[NET_VQ_RX].get_buf()
    assert ln == HL + 64
    assert rig.mem.read(g, ln) == NET_HDR_MRG.pack(1, 0, 0, 0, 20, 4, 1) + frame(2)   # num_buffers ours
    assert rig.dev.stats["rx_dropped"] == 1


def test_vhost_user_takes_the_header_choice_from_the_backend():
    """hdr_from_backend (vhost-user, no VMM to ack bit 27): QEMU's vhost-kernel choice."""
    from host.net.device import VhostNet
    for vnet, want in ((False, (HL, 0)), (True, (0, HL))):
        dev = VhostNet(MAC, hdr_from_backend=True)
        be = Sink()
        be.vnet_hdr = vnet
        dev.set_backend(NET_VQ_RX, be)
        dev.set_backend(NET_VQ_TX, be)
        dev.set_features(NOHDR)
        assert (dev.vhost_hlen, dev.sock_hlen) == want


# --- item 3: weights as the seed counts them --------------------------------------------------------
def test_tx_byte_weight_fires_before_the_packet_weight():
    sink = Sink()
    rig = Rig(V1, sink, sizes=(64, 256), direct_kick=False)
    n = 100
    for i in range(n):
        post_tx(rig, bytes(HL) + frame(i, 9000), kick=False)
    rig.dev.handle_tx()
    per = -(-VHOST_NET_WEIGHT // 9000)                # the seed: total_len += len (after the header)
    assert per < VHOST_NET_PKT_WEIGHT
    assert len(sink.queue) == per and rig.dev.stats["tx_requeued"] == 1
    rig.run()
    assert len(sink.queue) == n


def test_rx_byte_weight_counts_the_header():
    """handle_rx: len += hdr_size; total_len += len. 8180-byte frames + 12: the 64th frame reaches
    0x80000 exactly (without the header it would be the 65th)."""
    sink = Sink()
    rig = Rig(V1, sink, sizes=(128, 8), rx_buf_size=HL + 8192, direct_kick=False)
    sink.inbox.extend(frame(i, 8180) for i in range(100))
    rig.dev.handle_rx()
    assert VHOST_NET_WEIGHT // (8180 + HL) == 64 and VHOST_NET_WEIGHT % (8180 + HL) == 0
    assert rig.dev.stats["rx_frames"] == 64 and rig.dev.stats["rx_requeued"] == 1


def test_packet_weight_is_an_option_the_seed_has_not():
    for weight, want in ((VHOST_NET_PKT_WEIGHT, VHOST_NET_PKT_WEIGHT), (0, 600)):
        sink = Sink()
        rig = Rig(V1, sink, sizes=(64, 1024), direct_kick=False)
        rig.dev.pkt_weight = weight
        for i in range(600):
            rig.drv.start_xmit(frame(i), kick=False)
        rig.dev.handle_tx()
        assert len(sink.queue) == want


# --- item 5: nothing lost in a backend swap ---------------------------------------------------------
def test_frame_held_across_an_rx_backend_swap_is_delivered():
    a, b = Sink(name="a"), Sink(name="b")
    rig = Rig(V1, a, fill=False)
    a.inbox.append(frame(7))
    rig.dev.backend_readable()
    rig.run()
    assert rig.dev.rx_pending == frame(7)            # read, no buffer yet
    rig.dev.set_backend(NET_VQ_RX, b)
    b.inbox.append(frame(8))
    assert rig.rx() == []                              # (no buffers yet: nothing to take)
    rig.drv.refill_and_kick()
    rig.run()
    assert rig.drv.receive() == [frame(7), frame(8)]
    assert rig.dev.stats["rx_dropped"] == 0
    # detached (fd -1) with a frame held: still delivered once buffers come
    c = Sink(name="c")
    rig.dev.set_backend(NET_VQ_RX, c)
    rig.drv.receive()
    c.inbox.append(frame(9))
    rig.dev.rx_pending = c.recv()
    rig.dev.set_backend(NET_VQ_RX, None)
    rig.dev.handle_rx()
    assert rig.drv.receive() == [frame(9)]


def test_frame_held_at_reset_is_counted_dropped():
    a = Sink()
    rig = Rig(V1, a, fill=False)
    a.inbox.append(frame(1))
    rig.dev.backend_readable()
    rig.run()
    rig.dev.reset()
    assert rig.dev.rx_pending is None and rig.dev.stats["rx_dropped"] == 1


# --- item 7: a too-small rx buffer is a ring error --------------------------------------------------
@pytest.mark.parametrize("features,sizes,outcome", [
    (V1, (HL - 1,), "error"),
    (V1, (HL,), "error"),                  # the seed: nothing after the header (len == 0)
    (V1, (HL + 1,), "truncated"),          # room, but not for this frame: dropped, not an error
    (V1, (HL + 63,), "truncated"),
    (V1, (HL + 64,), "ok"),                # header + frame exactly
    (MRG, (HL - 1, 2000), "error"),        # spec 5.1.6.3.1: every mergeable buffer holds a header
    (MRG, (HL, 64), "ok2"),                # header alone in the first buffer, frame in the second
    (MRG, (HL + 63,), "truncated"),        # the ring runs out of buffers before the frame fits
    (MRG, (HL + 64,), "ok"),
])
def test_rx_buffer_boundaries(features, sizes, outcome):
    sink = Sink()
    rig = Rig(features, sink, fill=False)
    heads = post_rx(rig, *sizes)
    sink.inbox.append(frame(0, 64))
    rig.dev.backend_readable()
    rig.run()
    if outcome == "error":
        assert broken(rig) and "Unexpected header len for RX" in rig.dev.stats["last_error"]
        return
    assert not broken(rig)
    if outcome == "truncated":
        if features & bit(VIRTIO_NET_F_MRG_RXBUF):
            assert rig.dev.rx_pending == frame(0, 64)      # waits for more buffers
            assert rig.vqs[NET_VQ_RX].get_buf() is None
            # the next buffer the guest posts is kicked (avail_event past the un-popped one) and
            # the frame goes out over both
            post_rx(rig, 100)
            assert rig.drv.kick(rig.vqs[NET_VQ_RX])
            rig.run()
            g0, l0 = rig.vqs[NET_VQ_RX].get_buf()
            g1, l1 = rig.vqs[NET_VQ_RX].get_buf()
            assert (g0, l0) == (heads[0], HL + 63) and l1 == 1
            assert rig.mem.read(g0, l0) + rig.mem.read(g1, l1) == NET_HDR_MRG.pack(0, 0, 0, 0, 0, 0, 2) + frame(0, 64)
            return
        else:
            assert rig.dev.stats["rx_dropped"] == 1
        assert rig.vqs[NET_VQ_RX].get_buf() is None
        return
    got = [rig.vqs[NET_VQ_RX].get_buf() for _ in heads]
    data = b"".join(rig.mem.read(g, ln) for g, ln in got)
    nb = 2 if outcome == "ok2" else 1
    assert data == NET_HDR_MRG.pack(0, 0, 0, 0, 0, 0, nb) + frame(0, 64)


# --- item 8: the three-quarters-full branch ---------------------------------------------------------
def test_tx_stops_with_notifications_off_when_the_backend_is_three_quarters_full():
    lo = Loopback(capacity=8)
    lo.paused = True
    rig = Rig(V1, lo, sizes=(64, 64))
    for i in range(6):                                 # 6 of 8: wmem >= sndbuf * 3 / 4
        assert rig.drv.start_xmit(frame(i))
    assert len(lo.queue) == 6
    assert rig.dev.tx_poll_state == VHOST_NET_POLL_STARTED and rig.dev.stats["tx_wmem_stop"] == 1
    kicks = rig.dev.stats["kicks"]
    assert rig.drv.start_xmit(frame(6))                # notifications stayed off: no kick
    assert rig.dev.stats["kicks"] == kicks and len(lo.queue) == 6
    lo.paused = False
    lo.recv(), lo.recv(), lo.recv()                    # drained below half: POLLOUT
    assert lo.writable()
    rig.dev.backend_writable()
    rig.run()
    assert [lo.recv() for _ in range(4)] == [frame(i) for i in range(3, 7)]


def test_tx_below_three_quarters_re_enables_notifications():
    lo = Loopback(capacity=8)
    lo.paused = True
    rig = Rig(V1, lo, sizes=(64, 64))
    for i in range(5):                                 # 5 of 8: below three quarters
        assert rig.drv.start_xmit(frame(i))
    assert not rig.dev.tx_polling
    assert rig.drv.start_xmit(frame(5)) and len(lo.queue) == 6


# --- the runner's glue: how a polling tx queue is woken --------------------------------------------
class FakeWorker:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, fn):
        self.timers.append((delay, fn))
        return fn

    def queue_work(self, fn):
        fn()

    def register(self, *a):
        pass

    modify = unregister = register


def test_runner_retries_a_failed_or_fdless_tx_on_a_timer():
    from host.net.runner import TX_ERROR_RETRY, TX_RETRY, NetBackends
    lo = Loopback(capacity=8)
    lo.paused = True
    rig = Rig(V1, lo, sizes=(64, 64))
    w = FakeWorker()
    glue = NetBackends(rig.dev, w, None)
    rig.dev.worker = None                              # work stays local (rig.run)
    for i in range(6):
        rig.drv.start_xmit(frame(i))
    glue.sync()
    assert [d for d, _ in w.timers] == [TX_RETRY]      # loopback has no fd to poll
    rig.dev.tx_poll_stop()
    rig.dev.tx_poll_start(error=True)
    glue._retry = None
    glue.sync()
    assert w.timers[-1][0] == TX_ERROR_RETRY


def test_good_chains_before_a_bad_one_are_returned_on_the_used_ring():
    """Issue 15 item 7 on vhost-net: a tx batch that meets a bad chain (header only) marks the
    device NEEDS_RESET but the frames sent before it come back on the used ring."""
    sink = Sink()
    rig = Rig(V1, sink)
    txq = rig.vqs[NET_VQ_TX]
    for data in (bytes(HL) + frame(0), bytes(HL) + frame(1), bytes(HL)):   # the last: header only
        g = rig.ram.alloc.alloc(len(data))
        rig.mem.write(g, data)
        assert txq.add_sgs([(g, len(data))], [], g)
    rig.drv.kick(txq)                              # one batch: two good chains, then a bad one
    rig.run()
    assert broken(rig)
    assert list(sink.queue) == [frame(0), frame(1)]
    got = []
    while (r := txq.get_buf()) is not None:
        got.append(r)
    assert len(got) == 2                           # both good chains were returned
