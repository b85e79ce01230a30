"""Issue 21 item 8: guards for plausible bugs that `python -m tools.mutants` found no test catching.

Each test names the mutant (tools/mutants/catalog.toml) it kills; each was seen to fail with that
mutant planted and to pass without it.
"""
from __future__ import annotations

import pytest

from host.net.backends.loopback import Sink
from shared.constants import VIRTIO_VSOCK_OP_RW, VSOCK_VQ_RX, bit
from shared.net.hdr import NET_HDR_MRG, NET_VQ_RX, VIRTIO_NET_F_MRG_RXBUF
from tests.net_rig import MAC, V1, Rig


# --- vhost-vsock: autocorked packets carry the newest credit (vsock-coalesce-credit-*) --------------
def test_coalesced_rw_packet_carries_the_newest_credit_fields():
    """While rx is busy, a small RW joins the one queued before it (autocork). The merged packet
    must advertise the *newest* buf_alloc and fwd_cnt: the guest takes its credit from it."""
    from tests.test_host_vsock import _guest_connects, make
    dev, g, w = make(credit_policy="low-space")     # no CREDIT_UPDATE per read to break the cork
    lst, gsk = _guest_connects(dev, g, w)
    hsk = dev.core.accept(lst)
    assert hsk is not None
    assert g.core.send(gsk, b"xyz") == 3
    g.settle(w)
    g.recv_rx()
    g.reap_tx()
    # fill every rx buffer, so what the host sends next waits on send_pkt_list
    rxq = g.vqs[VSOCK_VQ_RX]
    g.post_rx(kick=True)
    w.run()
    filled = 0
    while not dev.vqs[VSOCK_VQ_RX].avail_empty(dev.mem):
        assert dev.core.send(hsk, b"f") == 1
        w.run()
        filled += 1
        assert filled <= rxq.num
    assert dev.core.send(hsk, b"a") == 1            # queued: no rx buffer
    assert dev.send_pkt_list
    assert dev.core.recv(hsk, 10) == b"xyz"          # fwd_cnt moves (low-space: no update sent)
    hsk_fwd, hsk_buf = hsk.fwd_cnt, hsk.buf_alloc
    assert hsk_fwd == 3
    assert dev.core.send(hsk, b"b") == 1            # joins the queued "a"
    assert dev.stats["rx_coalesced"] == 1 and len(dev.send_pkt_list) == 1
    g.recv_rx()
    g.post_rx()
    w.run()
    got = [p for p in g.recv_rx() if p.op == VIRTIO_VSOCK_OP_RW]
    assert [p.payload for p in got] == [b"ab"]
    assert (got[0].buf_alloc, got[0].fwd_cnt) == (hsk_buf, hsk_fwd), \
        "the merged packet does not carry the socket's newest credit"


# --- vhost-net: mergeable rx that runs dry mid-frame (net-rx-dry-no-discard) -------------------------
FRAME_612 = b"\xff" * 6 + MAC + b"\x88\xb5" + bytes(range(256)) * 2 + b"\x01" * 86   # 3 buffers


def _mergeable_rig_with_two_buffers():
    sink = Sink()
    rig = Rig(V1 | bit(VIRTIO_NET_F_MRG_RXBUF), sink, rx_buf_size=256, fill=False)
    rxq = rig.vqs[NET_VQ_RX]
    bufs = [rig.ram.alloc.alloc(256) for _ in range(4)]
    for g in bufs[:2]:
        assert rxq.add_sgs([], [(g, 256)], g)
    rig.drv.kick(rxq)
    sink.inbox.append(FRAME_612)
    return rig, rxq, bufs


def _check_frame_in(rig, rxq, bufs):
    used = []
    while (r := rxq.get_buf()) is not None:
        used.append(r)
    assert [t for t, _ in used] == bufs[:3], "the buffers popped before running dry were lost"
    assert NET_HDR_MRG.unpack_from(rig.mem.read(bufs[0], NET_HDR_MRG.size))[-1] == 3
    data = b"".join(rig.mem.read(t, ln) for t, ln in used)
    assert data[NET_HDR_MRG.size:] == FRAME_612


def test_mergeable_rx_running_dry_mid_frame_reuses_the_same_buffers(monkeypatch):
    """A frame needing three mergeable buffers finds two: handle_rx must un-pop them
    (vhost_discard_vq_desc), and when the guest posts two more (here: in the window before
    enable_notify, so the same run goes on) fill the same two first, then one new one."""
    from host.vhost_vq import VhostVirtqueue
    from tests.test_lost_wakeup import RaceWindow
    rig, rxq, bufs = _mergeable_rig_with_two_buffers()

    def post_two_more():
        for g in bufs[2:]:
            assert rxq.add_sgs([], [(g, 256)], g)

    race = RaceWindow(monkeypatch, VhostVirtqueue, "enable_notify",
                      lambda vq: vq is rig.dev.vqs[NET_VQ_RX], post_two_more)
    rig.dev.backend_readable()
    rig.run()
    assert race.fired == 1
    assert rig.dev.rx_pending is None
    _check_frame_in(rig, rxq, bufs)


def test_mergeable_rx_running_dry_mid_frame_waits_for_the_guest(monkeypatch):
    """Two buffers posted, three needed: handle_rx must stop (notifications on) and wait for the
    guest's next rx kick, not spin. The spin is bounded here so the test fails, not hangs.
    (The bug this found: after vhost_discard_vq_desc, enable_notify compared avail.idx with
    last_avail_idx, so the chains just un-popped counted as "raced in"; Linux compares with the
    avail.idx it last read, vhost_enable_notify: enable_notify(seen=True) now does.)"""
    from host.vhost_vq import VhostVirtqueue
    rig, rxq, bufs = _mergeable_rig_with_two_buffers()
    orig = VhostVirtqueue.enable_notify
    calls = [0]

    def bounded(vq, mem, *args, **kw):
        calls[0] += 1
        if calls[0] > 100:
            raise AssertionError("handle_rx spins: enable_notify called 100 times with no new buffer")
        return orig(vq, mem, *args, **kw)

    monkeypatch.setattr(VhostVirtqueue, "enable_notify", bounded)
    rig.dev.backend_readable()
    rig.run()
    assert rig.dev.rx_pending is not None and not rig.dev.broken
    monkeypatch.setattr(VhostVirtqueue, "enable_notify", orig)
    for g in bufs[2:]:
        assert rxq.add_sgs([], [(g, 256)], g)
    rig.drv.kick(rxq)
    rig.run()
    _check_frame_in(rig, rxq, bufs)


# --- the control session (cs-features-not-offered, cs-vring-addr-align) ------------------------------
def _session_at_driver():
    from tests.test_control_session import ACK, DRIVER, World
    w = World()
    w.hello()
    w.ok("SET_OWNER")
    w.ok("SET_STATUS", status=ACK)
    w.ok("SET_STATUS", status=ACK | DRIVER)
    return w


def test_set_features_refuses_a_low_bit_the_device_did_not_offer():
    w = _session_at_driver()
    offered = w.ok("GET_FEATURES")["features"]
    low = next(b for b in range(32) if not offered & bit(b))
    w.bad("SET_FEATURES", "EOPNOTSUPP", features=bit(low) | (offered & bit(32)))


@pytest.mark.parametrize("part, off", [("avail_user_addr", 1), ("used_user_addr", 2)])
def test_set_vring_addr_refuses_a_misaligned_avail_or_used_ring(part, off):
    """virtio 1.x 2.7: avail is 2-aligned, used 4-aligned (the desc table's 16 is tested elsewhere)."""
    from tests.test_control_session import World
    w = World()
    w.to_features_ok()
    w.ok("SET_MEM_TABLE", regions=w.ram.table)
    w.ok("SET_VRING_NUM", index=0, num=w.sizes[0])
    fields = w.addr(0)
    fields[part] += off
    rep = w.bad("SET_VRING_ADDR", "EINVAL", **fields)
    assert "aligned" in rep["message"]
