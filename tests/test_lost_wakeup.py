"""Issue 21 item 1: the lost-wakeup re-check, exercised in its window, deterministically.

Every loop that sleeps on a doorbell ends the same way (vhost's handle_tx / handle_rx, Linux's
virtqueue_enable_cb users): it runs out of work with notifications off, re-enables them, and must
look at the ring once more, because the other side may have published a buffer after the last
look but before the re-enable, seen notifications off, and decided not to ring. Under CPython on
x86 that window is a few microseconds wide and a timing test practically never lands in it.

These tests land in it every time: the ring method that re-enables notifications
(VhostVirtqueue.enable_notify on the device side, VirtQueue.enable_cb on the driver side) is
wrapped on its class, and on the first call for the queue under test the wrapper first plays the
other side (publish a buffer, run its notification decision, which must say "no doorbell"), then
runs the real method. A loop that ignores what the re-enable reports leaves that buffer on the
ring with no doorbell coming: the test sees it unconsumed.

The tests drive the devices and the driver only through their kick / interrupt entry points, so
they keep their meaning for whatever loop replaces today's (run to completion, bursts): they fail
with "the window was never reached" if the new loop stops re-enabling notifications altogether.
"""
from __future__ import annotations

import pytest

from guest.virtqueue import VirtQueue
from host.net.backends.loopback import Sink
from host.vhost_vq import VhostVirtqueue
from shared.constants import (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_VSOCK_OP_RST,
                              VIRTIO_VSOCK_OP_RW, VSOCK_VQ_RX, VSOCK_VQ_TX, bit)
from shared.net.hdr import NET_VQ_RX, NET_VQ_TX
from shared.vsock.packet import Packet
from tests.net_rig import MAC, V1, Rig
from tests.test_host_vsock import GUEST_CID, make, pkt


class RaceWindow:
    """Wrap `cls.method` so that, once, for the object `when(obj)` picks, `action()` runs just
    before the real method: the other side acts in the window between the last look at the
    ring and the re-enable of notifications."""

    def __init__(self, monkeypatch, cls, method: str, when, action):
        self.fired = 0
        orig = getattr(cls, method)
        armed = [True]

        def wrapper(obj, *a, **kw):
            if armed[0] and when(obj):
                armed[0] = False
                self.fired += 1
                action()
            return orig(obj, *a, **kw)

        monkeypatch.setattr(cls, method, wrapper)


def _driver_publish_no_kick(vq: VirtQueue, publish) -> None:
    """The driver's half of the race: publish, then the kick decision, which must be 'no'."""
    publish()
    assert not vq.kick_prepare(), ("the device had notifications on: not the lost-wakeup window "
                                   "(the test no longer sets it up)")


# --- device side: vhost-vsock ---------------------------------------------------------------------
@pytest.mark.parametrize("event_idx", [True, False])
def test_vsock_tx_rechecks_after_enable_notify(monkeypatch, event_idx):
    """handle_tx_kick ran the tx ring dry; a packet published before its enable_notify is taken
    in the same run, without another kick."""
    dev, g, w = make(event_idx=event_idx)
    txq = g.vqs[VSOCK_VQ_TX]
    race = RaceWindow(monkeypatch, VhostVirtqueue, "enable_notify",
                      lambda vq: vq is dev.vqs[VSOCK_VQ_TX],
                      lambda: _driver_publish_no_kick(
                          txq, lambda: g.xmit(pkt(VIRTIO_VSOCK_OP_RST, dst_port=2))))
    kicks = dev.stats["kicks"]
    assert g.xmit(pkt(VIRTIO_VSOCK_OP_RST, dst_port=1))
    assert g.kick(VSOCK_VQ_TX)
    w.run()
    assert race.fired == 1, "the device never re-enabled tx notifications: the window was never reached"
    assert dev.stats["kicks"] == kicks + 1                  # the one kick; the raced packet had none
    assert dev.stats["tx_packets"] == 2, "the packet published in the window was left on the ring"
    assert len(g.reap_tx()) == 2 and not dev.broken


@pytest.mark.parametrize("event_idx", [True, False])
def test_vsock_rx_rechecks_after_enable_notify(monkeypatch, event_idx):
    """do_send_pkt found no rx buffer for a waiting packet; a buffer posted before its
    enable_notify is used in the same run, without an rx kick."""
    dev, g, w = make(event_idx=event_idx)
    rxq = g.vqs[VSOCK_VQ_RX]
    g.post_rx(1)
    w.run()

    def to_guest(port):
        return Packet(2, GUEST_CID, 1234, port, 1, VIRTIO_VSOCK_OP_RW, 0, 65536, 0, b"p%d" % port)

    dev.send_pkt(to_guest(1))                   # takes the one buffer (avail_event goes stale)
    w.run()
    assert [p.payload for p in g.recv_rx()] == [b"p1"]
    race = RaceWindow(monkeypatch, VhostVirtqueue, "enable_notify",
                      lambda vq: vq is dev.vqs[VSOCK_VQ_RX],
                      lambda: _driver_publish_no_kick(rxq, lambda: g.post_rx(1, kick=False)))
    kicks = dev.stats["kicks"]
    dev.send_pkt(to_guest(2))
    w.run()
    assert race.fired == 1, "the device never re-enabled rx notifications: the window was never reached"
    assert dev.stats["kicks"] == kicks
    assert [p.payload for p in g.recv_rx()] == [b"p2"], "the buffer posted in the window was not used"
    assert not dev.send_pkt_list and not dev.broken


# --- device side: vhost-net -----------------------------------------------------------------------
def _frame(i: int, size: int = 64) -> bytes:
    body = i.to_bytes(4, "big") * (size // 4 + 1)
    return b"\xff" * 6 + MAC + b"\x88\xb5" + body[:size - 14]


NET_FEATURES = [V1, V1 & ~bit(VIRTIO_RING_F_EVENT_IDX)]


@pytest.mark.parametrize("features", NET_FEATURES, ids=["event_idx", "flags"])
def test_net_tx_rechecks_after_enable_notify(monkeypatch, features):
    """handle_tx ran the tx ring dry (_idle); a frame published before its enable_notify is sent
    in the same run."""
    sink = Sink()
    rig = Rig(features, sink)
    txq = rig.vqs[NET_VQ_TX]
    assert rig.drv.start_xmit(_frame(0))             # the kick runs handle_tx to the end
    race = RaceWindow(monkeypatch, VhostVirtqueue, "enable_notify",
                      lambda vq: vq is rig.dev.vqs[NET_VQ_TX],
                      lambda: _driver_publish_no_kick(
                          txq, lambda: rig.drv.start_xmit(_frame(2), kick=False)))
    assert rig.drv.start_xmit(_frame(1))
    rig.run()
    assert race.fired == 1, "handle_tx never re-enabled notifications: the window was never reached"
    assert list(sink.queue) == [_frame(0), _frame(1), _frame(2)], \
        "the frame published in the window was left on the ring"
    assert not rig.dev.broken


@pytest.mark.parametrize("features", NET_FEATURES, ids=["event_idx", "flags"])
def test_net_rx_rechecks_after_enable_notify(monkeypatch, features):
    """handle_rx holds a frame and found no rx buffer (_idle); a buffer posted before its
    enable_notify receives the frame in the same run, without an rx kick."""
    sink = Sink()
    rig = Rig(features, sink, fill=False)
    rxq = rig.vqs[NET_VQ_RX]
    g = rig.ram.alloc.alloc(rig.drv.rx_buf_size)
    assert rxq.add_sgs([], [(g, rig.drv.rx_buf_size)], g)
    rig.drv.kick(rxq)
    sink.inbox.append(_frame(0))
    rig.dev.backend_readable()
    rig.run()
    token, ln = rxq.get_buf()                       # taken by hand: no refill
    assert token == g and rig.mem.read(g + rig.drv.hdr_len, ln - rig.drv.hdr_len) == _frame(0)
    race = RaceWindow(monkeypatch, VhostVirtqueue, "enable_notify",
                      lambda vq: vq is rig.dev.vqs[NET_VQ_RX],
                      lambda: _driver_publish_no_kick(rxq, rig.drv.try_fill_recv))
    kicks = rig.dev.stats["kicks"]
    sink.inbox.append(_frame(1))
    rig.dev.backend_readable()
    rig.run()
    assert race.fired == 1, "handle_rx never re-enabled notifications: the window was never reached"
    assert rig.dev.stats["kicks"] == kicks
    assert rig.dev.rx_pending is None, "the buffer posted in the window was not used"
    assert rig.drv.receive() == [_frame(1)]


# --- driver side: virtio-vsock transport (virtqueue_enable_cb) ------------------------------------
def test_guest_rx_rechecks_after_enable_cb(monkeypatch):
    """rx_work drained the used ring; a packet the device used before the driver's enable_cb
    (with the interrupt suppressed) is received in the same run."""
    from tests.test_guest_transport import connected_pair, make_env, settle
    e = make_env()
    try:
        gsk, hsk = connected_pair(e)
        rxq = e.vdev.vqs[VSOCK_VQ_RX]
        irq_before = list(e.host.interrupts)

        def device_uses_one():
            e.host.core.send(hsk, b"second")
            n = e.host.vqs[VSOCK_VQ_RX]
            before = e.host.interrupts[VSOCK_VQ_RX]
            assert e.host.handle_rx() == 1
            assert e.host.interrupts[VSOCK_VQ_RX] == before, \
                "the driver had interrupts on: not the lost-wakeup window"
            assert n.last_used_idx != rxq.last_used_idx

        race = RaceWindow(monkeypatch, VirtQueue, "enable_cb", lambda vq: vq is rxq, device_uses_one)
        e.host.core.send(hsk, b"first")
        with e.host.lock:
            e.host.handle_rx()                          # one interrupt: rx_done -> rx_work
        assert e.host.interrupts[VSOCK_VQ_RX] == irq_before[VSOCK_VQ_RX] + 1
        assert race.fired == 1, "rx_work never re-enabled callbacks: the window was never reached"
        assert not rxq.more_used(), "the packet used in the window was left on the ring"
        with e.kernel.lock:
            assert e.core.recv(gsk, 100) == b"firstsecond"
        settle(e.kernel, e.host)
    finally:
        e.t.remove()


def test_guest_tx_rechecks_after_enable_cb(monkeypatch):
    """tx_work (run by a tx interrupt) reaped, refilled the ring and still has packets waiting for
    room; a completion the device published before the driver's enable_cb, its interrupt
    suppressed, lets the rest go out in the same run."""
    from tests.test_guest_transport import connected_pair, make_env, settle
    e = make_env(queue_sizes=(128, 4, 8))       # a tx ring of 4 descriptors: 2 packets
    try:
        gsk, hsk = connected_pair(e)
        txq = e.vdev.vqs[VSOCK_VQ_TX]
        e.host.tx_paused = True
        with e.kernel.lock:
            for i in range(6):
                assert e.core.send(gsk, b"%d" % i) == 1
        e.kernel.run()
        assert len(e.t.send_pkt_list) == 4, "the test needs a full tx ring and packets queued"
        e.host.tx_paused = False

        def device_completes():
            before = e.host.interrupts[VSOCK_VQ_TX]
            assert e.host.handle_tx() == 2
            assert e.host.interrupts[VSOCK_VQ_TX] == before, \
                "the driver had interrupts on: not the lost-wakeup window"

        race = RaceWindow(monkeypatch, VirtQueue, "enable_cb", lambda vq: vq is txq, device_completes)
        irqs = e.host.interrupts[VSOCK_VQ_TX]
        with e.host.lock:
            assert e.host.handle_tx() == 2              # its interrupt runs tx_work
        assert e.host.interrupts[VSOCK_VQ_TX] == irqs + 1
        assert race.fired == 1, "tx_work never re-enabled callbacks: the window was never reached"
        assert not e.t.send_pkt_list, "the completion published in the window was not reaped"
        settle(e.kernel, e.host)
        with e.host.lock:
            assert e.host.core.recv(hsk, 100) == b"012345"
    finally:
        e.t.remove()


def test_ring_features_of_the_fixtures():
    """The rigs above negotiate what the parametrisation says (a guard for the guards)."""
    rig = Rig(NET_FEATURES[1], Sink())
    assert not rig.vqs[0].event_idx and rig.dev.acked_features & bit(VIRTIO_F_VERSION_1)
    dev, g, w = make(event_idx=False)
    assert not g.vqs[0].event_idx
