"""The fast data path on both sides, in one process on bytearray guest RAM: packets go straight
onto rings from the sender's buffer, fixed buffer pools, autocork of small writes while the ring
is busy, one kick or interrupt per batch, lazy tx reaping. Built on the fakes of
tests/test_guest_transport.py (guest) and tests/test_host_vsock.py (host)."""
from __future__ import annotations

from shared.constants import VIRTIO_VSOCK_OP_RW, VSOCK_VQ_RX, VSOCK_VQ_TX
from shared.vsock.packet import HDR_SIZE
from tests.test_guest_transport import connected_pair, make_env, settle
from tests.test_host_vsock import GUEST_CID, make, pkt


# --- guest ------------------------------------------------------------------------------------
def fast_env(**kw):
    return make_env(ram_size=16 << 20, pool=True, coalesce=True, rx_buf_size=65536, **kw)


def test_pools_are_carved_at_probe_and_all_returned_at_remove():
    e = fast_env()
    try:
        rx = e.vdev.vqs[VSOCK_VQ_RX]
        assert e.t.rx_pool.fixed and len(e.t.rx_pool.all) == rx.num // 2
        assert e.t.tx_pool.fixed and len(e.t.tx_pool.all) == e.vdev.vqs[VSOCK_VQ_TX].num // 2
        assert e.t.rx_buf_nr == rx.num // 2            # every rx buffer posted, 64 KiB each
        in_use = e.ram.alloc.in_use
        gsk, hsk = connected_pair(e)
        data = bytes(range(256)) * 1024                 # 256 KiB through the pools
        with e.kernel.lock:
            assert e.core.send(gsk, data) == len(data)
        settle(e.kernel, e.host)
        assert e.host.core.recv(hsk, 1 << 20) == data
        assert e.ram.alloc.in_use == in_use             # nothing allocated per packet
    finally:
        e.t.remove()
    assert e.ram.alloc.in_use == 0


def test_send_goes_straight_onto_the_ring_and_copies_the_callers_buffer_once():
    e = fast_env()
    try:
        gsk, hsk = connected_pair(e)
        buf = bytearray(b"A" * 5000)
        with e.kernel.lock:
            assert e.core.send(gsk, buf) == 5000
        assert not e.t.send_pkt_list and e.t.stats["tx_direct"] >= 1
        buf[:] = b"B" * 5000                           # the caller reuses its buffer at once
        settle(e.kernel, e.host)
        assert e.host.core.recv(hsk, 10000) == b"A" * 5000
    finally:
        e.t.remove()


def test_small_writes_are_corked_while_the_ring_is_busy():
    e = fast_env()
    try:
        gsk, hsk = connected_pair(e)
        e.host.tx_paused = True                        # the device is busy: nothing is used
        chunks = [bytes([65 + i % 26]) * 64 for i in range(100)]
        direct = e.t.stats["tx_direct"]
        with e.kernel.lock:
            for c in chunks:
                assert e.core.send(gsk, c) == 64
        # the first write went out alone; the 99 behind it became one queued RW packet
        assert e.t.stats["tx_direct"] == direct + 1 and e.t.stats["tx_coalesced"] == 98
        assert len(e.t.send_pkt_list) == 1 and len(e.t.send_pkt_list[0].payload) == 99 * 64
        e.host.tx_paused = False
        before = len(e.host.received)
        settle(e.kernel, e.host)
        rw = [p for p in e.host.received[before:] if p.op == VIRTIO_VSOCK_OP_RW]
        assert len(rw) == 2                            # 100 writes, 2 packets on the wire
        assert e.host.core.recv(hsk, 1 << 20) == b"".join(chunks)   # order and bytes kept
    finally:
        e.t.remove()


def test_writes_are_not_corked_when_the_ring_is_idle():
    e = fast_env()
    try:
        gsk, hsk = connected_pair(e)
        for i in range(5):
            with e.kernel.lock:
                e.core.send(gsk, b"x" * 64)
            settle(e.kernel, e.host)                   # the device consumes each one
        assert e.t.stats["tx_coalesced"] == 0
        assert e.host.core.recv(hsk, 1000) == b"x" * 320
    finally:
        e.t.remove()


def test_one_kick_for_a_batch_of_packets():
    e = fast_env()
    try:
        gsk, hsk = connected_pair(e)
        settle(e.kernel, e.host)
        decisions = []                                  # virtqueue_kick calls (kick_prepare)
        real_kick = e.vdev.kick
        e.vdev.kick = lambda vq: decisions.append(vq.index) or real_kick(vq)
        with e.kernel.lock, e.t.batch:
            for _ in range(8):
                e.core.send(gsk, b"y" * 4096)
            assert decisions == []                      # nothing decided inside the batch
        assert decisions == [VSOCK_VQ_TX]               # one decision at its end
        settle(e.kernel, e.host)
        assert e.host.core.recv(hsk, 1 << 16) == b"y" * 8 * 4096
    finally:
        e.t.remove()


def test_tx_completions_raise_no_interrupt_unless_packets_wait():
    e = fast_env()
    try:
        gsk, hsk = connected_pair(e)
        settle(e.kernel, e.host)
        irqs = e.host.interrupts[VSOCK_VQ_TX]
        for _ in range(20):
            with e.kernel.lock:
                e.core.send(gsk, b"z" * 1000)
            settle(e.kernel, e.host)
        assert e.host.interrupts[VSOCK_VQ_TX] == irqs    # reaped lazily by the send path
        assert e.t.tx_inflight <= e.vdev.vqs[VSOCK_VQ_TX].num
    finally:
        e.t.remove()


# --- host -------------------------------------------------------------------------------------
def test_device_writes_straight_into_rx_buffers_from_the_senders_buffer():
    dev, g, w = make(rx_buf=65536)
    g.post_rx(4)
    w.run()                                           # the rx kick's work: nothing to send yet
    buf = bytearray(b"q" * 60000)
    p = pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=memoryview(buf))
    assert dev.send_pkt(p) == 60000
    assert not dev.send_pkt_list and not w.work         # delivered in the call, no work queued
    buf[:] = b"r" * 60000
    got = g.recv_rx()
    assert len(got) == 1 and got[0].payload == b"q" * 60000


def test_device_keeps_its_own_copy_when_no_rx_buffer_is_posted():
    dev, g, w = make(rx_buf=65536)
    buf = bytearray(b"k" * 1000)
    dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=memoryview(buf)))
    buf[:] = b"m" * 1000                              # the sender's buffer is reused
    assert len(dev.send_pkt_list) == 1
    g.post_rx(2)
    w.run()
    assert [p.payload for p in g.recv_rx()] == [b"k" * 1000]


def test_device_corks_small_writes_of_a_socket_while_rx_is_full():
    dev, g, w = make(rx_buf=65536)
    owner = object()
    for i in range(50):
        p = pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=bytes([i]) * 64,
                fwd_cnt=i)
        p.owner = owner
        dev.send_pkt(p)
    assert len(dev.send_pkt_list) == 1 and dev.stats["rx_coalesced"] == 49
    g.post_rx(2)
    w.run()
    got = g.recv_rx()
    assert len(got) == 1 and got[0].payload == b"".join(bytes([i]) * 64 for i in range(50))
    assert got[0].fwd_cnt == 49                        # the newest credit information


def test_device_interrupts_once_per_batch():
    dev, g, w = make(rx_buf=4096)
    g.post_rx(16)
    g.irq.wait(0)
    with dev.lock, dev.batch:
        for _ in range(8):
            dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=b"b" * 100))
        assert g.irq.pending() == 0
    assert g.irq.wait(0) == 1                           # one interrupt for eight packets
    assert len(g.recv_rx()) == 8
    assert dev.stats["bytes_out"] == 8 * (HDR_SIZE + 100)


# --- the real pair (tests/pair.py): run-to-completion fast path, loans, zero copy -----------------
def test_recv_into_copies_once_from_the_lent_guest_buffer_then_the_chain_goes_back():
    """g2h 64 KiB: the host socket queues a view of the guest's tx buffer (a Loan); the tx chain
    is used only when recv_into has copied it out (issue 15 item 3)."""
    from tests.pair import VsockPair
    p = VsockPair()
    try:
        gsk, hsk = p.connect()
        data = bytes(range(256)) * 256                 # 64 KiB
        with p.lock, p.t.batch:
            assert p.t.core.send(gsk, data) == len(data)
        p.pump()
        txq = p.dev.vqs[1]
        used_before = txq.used_idx(p.dev.mem)
        assert p.dev.loans == 1 and hsk.rx_bytes == len(data)
        out = bytearray(len(data))
        with p.lock:
            assert p.dev.core.recv_into(hsk, memoryview(out)) == len(data)
        assert bytes(out) == data
        assert p.dev.loans == 0 and txq.used_idx(p.dev.mem) == used_before + 1
    finally:
        p.close()


def test_small_payloads_are_copied_not_lent():
    from tests.pair import VsockPair
    p = VsockPair()
    try:
        gsk, hsk = p.connect()
        with p.lock, p.t.batch:
            p.t.core.send(gsk, b"x" * 100)
        p.pump()
        assert p.dev.loans == 0 and hsk.rx_bytes == 100
    finally:
        p.close()


def test_the_kick_thread_expects_a_burst_only_after_bulk_packets_of_a_live_connection():
    """VhostVsock.expected_burst (the tx kick thread's moderation, PollOps.burst): the packets
    the guest may still send on the connection it sent on last, when it sends bulk; 1 after a
    small packet, on other queues, and once the connection or the rings are gone."""
    from shared.constants import VSOCK_VQ_RX, VSOCK_VQ_TX
    from shared.vsock.proto import BURST_MAX
    from tests.pair import VsockPair
    p = VsockPair(buf_size=4 << 20)
    try:
        gsk, hsk = p.connect()
        dev = p.dev
        assert dev.expected_burst(VSOCK_VQ_TX) == 1        # nothing sent yet
        with p.lock, p.t.batch:
            p.t.core.send(gsk, b"x" * 100)
        p.pump()
        assert dev.expected_burst(VSOCK_VQ_TX) == 1        # request/response sized
        with p.lock, p.t.batch:
            p.t.core.send(gsk, b"x" * 65536)
        p.pump()
        assert dev.expected_burst(VSOCK_VQ_TX) == BURST_MAX
        assert dev.expected_burst(VSOCK_VQ_RX) == 1
        with p.lock:
            dev.core.release(hsk)                           # the host closes it
        assert dev.expected_burst(VSOCK_VQ_TX) == 1
        p.pump()
    finally:
        p.close()


def test_small_writes_stop_at_the_peers_credit_and_advertise_their_own():
    """VsockCore.send's one-packet path (a write within the credit and one packet): each write
    counts against the peer's credit (tx_cnt), so a sender stops at exactly the peer's buffer;
    and the packet's header advertises our fwd_cnt (last_fwd_cnt), so no CREDIT_UPDATE repeats it."""
    from tests.pair import VsockPair
    p = VsockPair(buf_size=64 * 1024)
    try:
        gsk, hsk = p.connect()
        sent = 0
        while True:
            with p.lock, p.t.batch:
                n = p.t.core.send(gsk, b"s" * 100)
            p.pump()
            if not n:
                break
            sent += n
            assert sent <= 64 * 1024, "wrote past the peer's buffer"
        assert sent == 64 * 1024                          # the last write taken in part
    finally:
        p.close()
    p = VsockPair(buf_size=1 << 20)
    try:
        gsk, hsk = p.connect()
        with p.lock, p.t.batch:
            assert p.t.core.send(gsk, b"s" * 1000) == 1000
        p.pump()
        with p.lock:
            assert p.dev.core.recv_into(hsk, memoryview(bytearray(500))) == 500
        assert hsk.last_fwd_cnt != hsk.fwd_cnt              # too little read for a CREDIT_UPDATE
        with p.lock, p.dev.batch:
            assert p.dev.core.send(hsk, b"r" * 10) == 10      # the header carries fwd_cnt
        assert hsk.last_fwd_cnt == hsk.fwd_cnt
    finally:
        p.close()


def test_recv_view_is_zero_copy_and_release_returns_the_buffer():
    """h2g: the guest's recv_view hands out the rx buffer itself; it goes back to the rx pool
    only at release()."""
    from guest.vsock.socket import GuestVsock
    from host.vsock.endpoint import HostVsock
    from tests.pair import VsockPair
    p = VsockPair()
    try:
        gsk, hsk = p.connect()
        g = GuestVsock(p.t)
        # a VsockSocket over the connected core socket, as accept would make it
        from shared.vsock.socket import VsockSocket
        s = VsockSocket(g, p.t.core, gsk)
        data = bytes(range(256)) * 256
        with p.lock, p.dev.batch:
            assert p.dev.core.send(hsk, data) == len(data)
        p.pump()
        assert p.t.rx_loans == 1
        free = p.t.rx_pool.available
        v = s.recv_view(1 << 20)
        assert len(v) == len(data) and bytes(v.data) == data
        assert p.t.rx_loans == 1 and p.t.rx_pool.available == free      # still lent
        v.release()
        assert p.t.rx_loans == 0
        v.release()                                    # twice is harmless
        import pytest
        with pytest.raises(ValueError):
            v.data[0]                                  # the view ended with the release
        assert HostVsock                               # (the host family exists too)
    finally:
        p.close()


def test_a_lent_chain_holds_later_chains_back_so_used_idx_means_all_before_it_is_done():
    """Lent tx chains are used in the order they were popped: a 64 KiB packet not yet read keeps
    the small packet after it (copied at once) off the used ring, so a driver that reconnects
    and resumes at used.idx never sees a chain twice."""
    from tests.pair import VsockPair
    p = VsockPair(coalesce=False)                     # the small write goes out, not corked
    try:
        gsk, hsk = p.connect()
        txq = p.dev.vqs[1]
        base = txq.used_idx(p.dev.mem)
        with p.lock, p.t.batch:
            p.t.core.send(gsk, b"L" * 65536)          # lent
            p.t.core.send(gsk, b"s" * 10)             # copied
        p.pump()
        assert p.dev.loans == 1 and hsk.rx_bytes == 65546
        assert txq.used_idx(p.dev.mem) == base          # both wait for the lent one
        out = bytearray(1 << 17)
        with p.lock:
            assert p.dev.core.recv_into(hsk, memoryview(out)) == 65546
        assert txq.used_idx(p.dev.mem) == base + 2 and p.dev.loans == 0
    finally:
        p.close()


def test_a_corked_packet_carries_the_newest_credit_fields():
    """Autocork (guest): small writes joining the socket's queued RW packet leave it with the
    credit fields of the newest write (virtio_transport_inc_tx_pkt advertises the current
    buf_alloc and fwd_cnt), not the first one's."""
    from tests.pair import VsockPair
    p = VsockPair()
    try:
        gsk, hsk = p.connect()
        with p.lock, p.t.batch:
            p.t.core.send(gsk, b"a" * 64)          # straight onto the ring: it is now busy
            p.t.core.send(gsk, b"b" * 64)          # queued (corked behind the busy ring)
            gsk.fwd_cnt = 777                     # the socket consumed more meanwhile
            gsk.buf_alloc = 123456
            p.t.core.send(gsk, b"c" * 64)          # joins the queued packet
        (tail,) = p.t.send_pkt_list
        assert bytes(tail.payload) == b"b" * 64 + b"c" * 64
        assert (tail.buf_alloc, tail.fwd_cnt) == (123456, 777)
    finally:
        p.close()


def test_a_serving_thread_keeps_the_tx_ring_past_the_weight_and_a_timer_covers_it():
    """vhost_exceeds_weight requeues tx to the worker; while a program thread serves the tx ring
    (run to completion) it loops back itself, so no worker hand-off, only a timer in case it
    leaves: the rest of the ring is taken when that timer fires."""
    import threading
    from types import SimpleNamespace
    from tests.pair import VsockPair
    for serving in (False, True):
        p = VsockPair()
        try:
            gsk, hsk = p.connect()
            if serving:
                p.dev.kick_threads[1] = SimpleNamespace(lead_owner=threading.get_ident())
            with p.lock, p.t.batch:
                assert p.t.core.send(gsk, b"w" * (12 * 65536)) == 12 * 65536   # > 0x80000
            while p.kicks:                                  # the kick, nothing else
                with p.lock:
                    p.dev.kick_received(p.kicks.popleft())
            assert p.dev.stats["tx_requeued"] == 1
            requeued = p.dev.handle_tx_work in p.host_work.queue
            timers = [h for h in p.host_work.timers if not h.cancelled]
            assert requeued is not serving and bool(timers) is serving
            assert hsk.rx_bytes == 8 * 65536                # the weight's worth so far
            if serving:
                timers[0].fn()                              # the serving thread left: timer
            p.pump()
            assert hsk.rx_bytes == 12 * 65536
        finally:
            p.close()
