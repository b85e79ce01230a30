"""vhost-vsock device (host/vsock/device.py) on bytearray guest RAM, driven by a fake guest.

The fake guest is the driver half built from the real pieces: guest/virtqueue.py VirtQueues over a
GuestRAM on a bytearray, and a VsockCore at the guest's CID. The device's work queue is a fake
worker whose queued work the test runs by hand, so every step is visible.
"""
from __future__ import annotations

import struct
from collections import deque

import pytest

from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from guest.virtqueue_packed import VirtQueuePacked
from host.vsock.device import VhostVsock, iov_read, iov_write
from shared.constants import (VHOST_VSOCK_PKT_WEIGHT, VIRTIO_CONFIG_S_ACKNOWLEDGE,
                              VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                              VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
                              VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                              VIRTIO_VSOCK_OP_REQUEST,
                              VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW,
                              VIRTIO_VSOCK_TYPE_STREAM, VSOCK_VQ_EVENT, VSOCK_VQ_RX, VSOCK_VQ_TX,
                              bit)
from shared.doorbell import LocalDoorbell
from shared.memory import GuestMemory, MemoryRegion
from shared.vsock.packet import HDR, HDR_SIZE, Packet
from shared.vsock.proto import SockState, VsockCore

GUEST_CID = 3
RAM_SIZE = 1 << 23
DRIVER_OK = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
             | VIRTIO_CONFIG_S_DRIVER_OK)


class FakeWorker:
    """VhostWorker's scheduling surface; queued work runs only when the test says so."""

    class Handle:
        def __init__(self, delay, fn):
            self.delay, self.fn, self.cancelled = delay, fn, False

        def cancel(self):
            self.cancelled = True

    def __init__(self):
        self.work: deque = deque()
        self.timers: list = []

    def queue_work(self, fn):
        if fn not in self.work:
            self.work.append(fn)

    def call_later(self, delay, fn):
        h = self.Handle(delay, fn)
        self.timers.append(h)
        return h

    def run(self, limit: int = 10_000) -> int:
        n = 0
        while self.work and n < limit:
            self.work.popleft()()
            n += 1
        return n


class FakeGuest:
    """The guest's driver half: rings in guest RAM, rx buffers, a VsockCore at the guest CID."""

    def __init__(self, dev: VhostVsock, *, cid: int = GUEST_CID, sizes=(64, 64, 8),
                 event_idx: bool = True, rx_layout: str = "two", rx_buf: int = 4096,
                 kick=None, start: bool = True, packed: bool = False):
        self.dev = dev
        self.buf = bytearray(RAM_SIZE)
        self.ram = GuestRAM("t", RAM_SIZE, buf=self.buf)
        self.mem = self.ram.mem
        self.alloc = self.ram.alloc
        self.rx_layout = rx_layout
        self.rx_buf = rx_buf
        self.irq = LocalDoorbell()
        self.vqs: list[VirtQueue] = []
        cls = VirtQueuePacked if packed else VirtQueue
        for i, num in enumerate(sizes):
            d, a, u = cls.alloc_rings(self.ram, num)
            self.vqs.append(cls(self.mem, i, num, d, a, u, event_idx=event_idx))
            hvq = dev.vqs[i]
            hvq.num, hvq.desc, hvq.avail, hvq.used = num, d, a, u
            hvq.enabled = True
            dev.calls[i] = self.irq
            dev.errs[i] = LocalDoorbell()
        dev.set_features(bit(VIRTIO_F_VERSION_1) | (bit(VIRTIO_RING_F_EVENT_IDX) if event_idx else 0)
                         | (bit(VIRTIO_F_RING_PACKED) if packed else 0))
        for i, vq in enumerate(self.vqs):          # SET_VRING_BASE: split 0, packed 0x8000
            dev.vqs[i].last_avail_idx = dev.vqs[i].last_used_idx = vq.resume_base()
        dev.set_mem(self.host_view())
        dev.status = DRIVER_OK
        self._kick = kick or (lambda i: dev.kick_received(i))
        self.out: deque = deque()          # packets the guest core sent, not yet on the tx ring
        self.core = VsockCore(cid, self.out.append)
        self.received: list[Packet] = []
        if start:
            dev.start()

    def host_view(self) -> GuestMemory:
        """The host's own GuestMemory over the same RAM and table (as the host attaches it)."""
        base = memoryview(self.buf)
        return GuestMemory([MemoryRegion(r["guest_phys_addr"], r["memory_size"],
                                         base[r["mmap_offset"]:r["mmap_offset"] + r["memory_size"]],
                                         r["userspace_addr"]) for r in self.ram.table])

    # --- driver verbs ---------------------------------------------------------------------------
    def kick(self, i: int, force: bool = False) -> bool:
        if self.vqs[i].kick_prepare() or force:
            self._kick(i)
            return True
        return False

    def post_rx(self, n: int | None = None, layout: str | None = None, size: int | None = None,
                kick: bool = True) -> int:
        vq = self.vqs[VSOCK_VQ_RX]
        layout = layout or self.rx_layout
        size = size or self.rx_buf
        posted = 0
        while vq.num_free and (n is None or posted < n):
            if layout == "two":
                h = self.alloc.alloc(HDR_SIZE)
                b = self.alloc.alloc(size)
                ok = vq.add_sgs([], [(h, HDR_SIZE), (b, size)], ("two", h, b, size))
            else:
                h = self.alloc.alloc(HDR_SIZE + size)
                ok = vq.add_sgs([], [(h, HDR_SIZE + size)], ("one", h, None, size))
            assert ok
            posted += 1
        if kick and posted:
            self.kick(VSOCK_VQ_RX)
        return posted

    def post_event(self, n: int = 1, size: int = 4) -> list[int]:
        gpas = []
        vq = self.vqs[VSOCK_VQ_EVENT]
        for _ in range(n):
            g = self.alloc.alloc(size)
            self.mem.write(g, b"\xff" * size)
            assert vq.add_sgs([], [(g, size)], g)
            gpas.append(g)
        return gpas

    def add_tx(self, data: bytes, *, split: int | None = None, in_len: int = 0) -> bool:
        """Put raw bytes on the tx ring (one descriptor, or two split at `split`)."""
        g = self.alloc.alloc(max(len(data), 1) + in_len)
        self.mem.write(g, data)
        out = [(g, len(data))] if split is None else [(g, split), (g + split, len(data) - split)]
        ins = [(g + len(data), in_len)] if in_len else []
        return self.vqs[VSOCK_VQ_TX].add_sgs(out, ins, g)

    def xmit(self, pkt: Packet, **kw) -> bool:
        return self.add_tx(pkt.pack(), **kw)

    def flush_tx(self) -> int:
        n = 0
        while self.out:
            if not self.xmit(self.out[0]):
                break
            self.out.popleft()
            n += 1
        if n:
            self.kick(VSOCK_VQ_TX)
        return n

    def reap_tx(self) -> list[tuple[int, int]]:
        got = []
        while (r := self.vqs[VSOCK_VQ_TX].get_buf()) is not None:
            self.alloc.free(r[0])
            got.append(r)
        return got

    def recv_rx(self) -> list[Packet]:
        """Used rx buffers -> packets (header copied out, payload of hdr.len bytes)."""
        pkts = []
        while (r := self.vqs[VSOCK_VQ_RX].get_buf()) is not None:
            (kind, h, b, size), ln = r
            if kind == "two":
                hdr = self.mem.read(h, HDR_SIZE)
                plen = HDR.unpack(hdr)[4]
                assert ln == HDR_SIZE + plen
                payload = self.mem.read(b, plen) if plen else b""
                self.alloc.free(h)
                self.alloc.free(b)
            else:
                hdr = self.mem.read(h, HDR_SIZE)
                plen = HDR.unpack(hdr)[4]
                assert ln == HDR_SIZE + plen
                payload = self.mem.read(h + HDR_SIZE, plen) if plen else b""
                self.alloc.free(h)
            pkts.append(Packet.unpack(hdr, payload))
        self.received += pkts
        return pkts

    def pump(self) -> int:
        """One round of the guest's bottom halves: send queued packets, reclaim tx buffers,
        deliver received packets to the guest core, refill rx. Returns how much moved."""
        moved = self.flush_tx()
        moved += len(self.reap_tx())
        for p in self.recv_rx():
            self.core.recv_pkt(p)
            moved += 1
        if self.vqs[VSOCK_VQ_RX].num_free > self.vqs[VSOCK_VQ_RX].num // 2:
            self.post_rx()
        return moved

    def settle(self, worker: FakeWorker, rounds: int = 100) -> None:
        """Pump both sides until nothing moves: guest tx -> device -> guest rx -> guest core."""
        for _ in range(rounds):
            moved = self.pump() + worker.run()
            if not moved and not self.out:
                return
        raise AssertionError("did not settle")


def make(**kw):
    worker = FakeWorker()
    dev_kw = {k: kw.pop(k) for k in ("credit_policy", "reconnect", "capture") if k in kw}
    dev = VhostVsock(GUEST_CID, **dev_kw)
    dev.worker = worker
    g = FakeGuest(dev, **kw)
    return dev, g, worker


def pkt(op=VIRTIO_VSOCK_OP_RW, *, src_cid=GUEST_CID, dst_cid=2, src_port=5000, dst_port=1234,
        payload=b"", type_=VIRTIO_VSOCK_TYPE_STREAM, flags=0, buf_alloc=65536, fwd_cnt=0):
    return Packet(src_cid, dst_cid, src_port, dst_port, type_, op, flags, buf_alloc, fwd_cnt, payload)


def raw_hdr(length, **kw):
    p = pkt(**kw)
    return HDR.pack(p.src_cid, p.dst_cid, p.src_port, p.dst_port, length, p.type, p.op, p.flags,
                    p.buf_alloc, p.fwd_cnt)


# --- description ----------------------------------------------------------------------------------
def test_device_description():
    dev = VhostVsock(7)
    assert dev.device_id == 19 and dev.num_queues == 3 and len(dev.vqs) == 3
    assert dev.config_bytes() == struct.pack("<Q", 7)
    for bad in (0, 1, 2, 0xFFFFFFFF, 1 << 32, -1):
        with pytest.raises(ValueError):
            VhostVsock(bad)
    from host.vsock import runner as vsock_runner      # the bridge's dialect is the runner's
    with pytest.raises(ValueError):
        vsock_runner.attach(VhostVsock(3), None, dialect="qemu")


def test_iov_helpers_scatter_and_gather():
    bufs = [bytearray(3), bytearray(5), bytearray(4)]
    iov = [memoryview(b) for b in bufs]
    iov_write(iov, 2, b"abcdefghij")
    assert bytes(b"".join(bufs)) == b"\0\0abcdefghij"
    assert iov_read(iov, 4, 6) == b"cdefgh"


def _guest_connects(dev, g, w):
    """A host listener on port 1234 and a guest socket connected to it: (listener, guest sk)."""
    g.post_rx()
    lst = dev.core.socket()
    dev.core.bind(lst, 1234)
    dev.core.listen(lst, 4)
    sk = g.core.socket()
    g.core.connect(sk, 2, 1234)
    g.settle(w)
    assert sk.state == SockState.ESTABLISHED
    return lst, sk


def _other_device_still_connects(other, g2, w2) -> None:
    """Another guest's device, next to a broken one, still takes a connection."""
    _guest_connects(other, g2, w2)
    assert not other.broken


# --- tx: guest -> host ------------------------------------------------------------------------
def test_guest_connects_to_host_listener_and_data_flows_both_ways():
    dev, g, w = make()
    lst, sk = _guest_connects(dev, g, w)
    child = dev.core.accept(lst)
    assert child is not None and child.remote_cid == GUEST_CID and child.remote_port == sk.local_port
    assert g.core.send(sk, b"hello host") == 10
    g.settle(w)
    assert dev.core.recv(child, 100) == b"hello host"
    assert dev.core.send(child, b"x" * 10000) == 10000
    g.settle(w)
    assert g.core.recv(sk, 20000) == b"x" * 10000
    assert dev.stats["tx_bytes"] == 10 and dev.stats["rx_bytes"] == 10000
    assert dev.stats["tx_packets"] >= 2 and dev.stats["rx_packets"] >= 3
    assert dev.stats["interrupts"] > 0 and not dev.broken


def test_header_split_over_two_descriptors_is_accepted():
    dev, g, w = make()
    lst = dev.core.socket()
    dev.core.bind(lst, 1234)
    dev.core.listen(lst, 4)
    assert g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST), split=20)
    g.kick(VSOCK_VQ_TX)
    assert dev.core.accept(lst) is not None
    assert g.reap_tx()[0][1] == HDR_SIZE


def test_wrong_src_cid_is_dropped_and_counted():
    dev, g, w = make()
    lst = dev.core.socket()
    dev.core.bind(lst, 1234)
    dev.core.listen(lst, 4)
    g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST, src_cid=99))
    g.xmit(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, payload=b"spoof"))
    g.kick(VSOCK_VQ_TX)
    assert dev.stats["dropped"] == 2
    assert dev.core.accept(lst) is None and not dev.send_pkt_list
    assert [ln for _, ln in g.reap_tx()] == [HDR_SIZE, HDR_SIZE + 5]   # still returned
    assert not dev.broken


def test_dst_cid_other_than_host_gets_rst():
    dev, g, w = make()
    g.post_rx()
    g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST, dst_cid=42, src_port=777, dst_port=99))
    g.xmit(pkt(VIRTIO_VSOCK_OP_RST, dst_cid=42))     # never an RST in answer to an RST
    g.kick(VSOCK_VQ_TX)
    w.run()
    got = g.recv_rx()
    assert len(got) == 1
    r = got[0]
    assert (r.op, r.src_cid, r.dst_cid, r.src_port, r.dst_port) == (VIRTIO_VSOCK_OP_RST, 42,
                                                                    GUEST_CID, 99, 777)
    assert dev.stats["rst_unroutable"] == 2 and dev.queued_replies == 0


def test_non_stream_packet_carries_no_payload_and_gets_rst():
    dev, g, w = make()
    g.post_rx()
    g.add_tx(raw_hdr(100, op=VIRTIO_VSOCK_OP_REQUEST, type_=2) + b"z" * 100)
    g.kick(VSOCK_VQ_TX)
    w.run()
    assert g.reap_tx()[0][1] == HDR_SIZE           # len ignored for a non-STREAM type
    assert [p.op for p in g.recv_rx()] == [VIRTIO_VSOCK_OP_RST]




@pytest.mark.parametrize("case", ["short header", "in-buffers on tx", "len over 64 KiB",
                                  "len beyond the chain"])
def test_malformed_tx_chain_needs_reset_and_other_device_unaffected(case):
    dev, g, w = make()
    other, g2, w2 = make()
    if case == "short header":
        g.add_tx(raw_hdr(0)[:40])
    elif case == "in-buffers on tx":
        g.add_tx(raw_hdr(0), in_len=16)
    elif case == "len over 64 KiB":
        g.add_tx(raw_hdr(65537) + bytes(65537))
    else:
        g.add_tx(raw_hdr(100) + bytes(60))
    g.kick(VSOCK_VQ_TX, force=True)
    assert dev.broken and dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert dev.stats["errors"] == 1
    assert dev.errs[VSOCK_VQ_TX].pending() == 1          # the err doorbell rang
    # The device refuses work until reset: a good packet stays on the ring.
    lst = dev.core.socket()
    dev.core.bind(lst, 1234)
    dev.core.listen(lst, 4)
    g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST))
    g.kick(VSOCK_VQ_TX, force=True)
    dev.handle_tx_work()
    assert dev.core.accept(lst) is None and dev.stats["tx_packets"] == 0
    _other_device_still_connects(other, g2, w2)
    # After a reset the device is usable again (fresh state).
    dev.reset()
    assert not dev.broken and dev.status == 0 and dev.stats["errors"] == 1


def test_tx_weight_requeues_after_pkt_weight_packets():
    dev, g, w = make(sizes=(64, 512, 8))
    n = VHOST_VSOCK_PKT_WEIGHT + 44
    for i in range(n):                    # RSTs to nowhere: no replies, nothing else happens
        assert g.xmit(pkt(VIRTIO_VSOCK_OP_RST, src_port=i))
    g.kick(VSOCK_VQ_TX)
    assert dev.stats["tx_packets"] == VHOST_VSOCK_PKT_WEIGHT
    assert dev.stats["tx_requeued"] == 1
    assert list(w.work) == [dev.handle_tx_work]
    w.run()
    assert dev.stats["tx_packets"] == n
    assert len(g.reap_tx()) == n


def test_tx_weight_in_bytes():
    dev, g, w = make(sizes=(64, 64, 8))
    lst = dev.core.socket()
    dev.core.bind(lst, 1234)
    dev.core.listen(lst, 4)
    for i in range(10):                   # 10 x 64 KiB > VHOST_VSOCK_WEIGHT (512 KiB)
        g.xmit(pkt(VIRTIO_VSOCK_OP_RW, payload=bytes(65536)))
    g.kick(VSOCK_VQ_TX)
    assert dev.stats["tx_packets"] == 8 and dev.stats["tx_requeued"] == 1
    w.run()
    assert dev.stats["tx_packets"] == 10


def test_queued_replies_bound_stops_and_restarts_tx():
    dev, g, w = make(sizes=(64, 8, 8))
    # REQUESTs to a port nobody listens on: each is answered with an RST (a reply).
    for i in range(8):
        assert g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST, src_port=100 + i))
    g.kick(VSOCK_VQ_TX)
    w.run()                               # no rx buffers: the replies wait
    assert dev.queued_replies == 8 and len(dev.send_pkt_list) == 8
    g.reap_tx()
    for i in range(3):
        assert g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST, src_port=200 + i))
    g.kick(VSOCK_VQ_TX, force=True)
    assert dev.stats["tx_packets"] == 8            # stopped: replies owed == tx ring size
    assert dev.stats["tx_stopped_replies"] >= 1
    g.post_rx()                            # buffers + rx kick: replies drain, tx restarts
    w.run()
    assert dev.stats["tx_packets"] == 11
    w.run()
    got = [p for p in g.recv_rx()]
    assert len(got) == 11 and all(p.op == VIRTIO_VSOCK_OP_RST for p in got)
    assert dev.queued_replies == 0


def test_cancel_pkt_gives_back_replies_and_keeps_a_partly_written_packet():
    """vhost_transport_cancel_pkt: a socket's queued packets go, except one already partly in rx
    buffers; the replies among them are given back, and tx, stopped on owed replies, resumes."""
    dev, g, w = make(sizes=(64, 8, 8))
    sk = object()
    part = pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=bytes(2500))
    part.owner = sk
    dev.send_pkt(part)                       # no rx buffer yet: queued
    g.post_rx(1, size=1000)
    w.run()                                  # one buffer filled: the packet stays, partly sent
    assert len(dev.send_pkt_list) == 1 and 0 < dev.send_pkt_list[0][1] < 2500
    for i in range(8):                       # eight owed replies of sk: tx stops at the ring size
        r = pkt(VIRTIO_VSOCK_OP_RST, src_cid=2, dst_cid=GUEST_CID, src_port=300 + i)
        r.owner, r.reply = sk, True
        dev.send_pkt(r)
    assert dev.queued_replies == 8
    assert g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST, src_port=400))
    g.kick(VSOCK_VQ_TX, force=True)
    w.run()
    assert dev.stats["tx_packets"] == 0 and dev.stats["tx_stopped_replies"] >= 1
    assert dev.cancel_pkt(sk) == 8           # the partly written packet stays
    assert dev.queued_replies == 0 and [e[0] for e in dev.send_pkt_list] == [part]
    assert dev.handle_tx_work in w.work      # replies given back: tx resumes
    w.run()
    assert dev.stats["tx_packets"] == 1


# --- rx: host -> guest ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["one", "two"])
def test_rx_delivery_in_one_and_two_descriptor_layouts(layout):
    dev, g, w = make(rx_layout=layout)
    g.post_rx(4)
    p = pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=b"payload!" * 100)
    assert dev.send_pkt(p) == 800
    w.run()
    got = g.recv_rx()
    assert got == [p]
    assert dev.stats["rx_packets"] == 1 and dev.stats["rx_bytes"] == 800


def test_64k_payload_split_across_4k_buffers():
    dev, g, w = make(sizes=(32, 64, 8))
    g.post_rx(20)
    data = bytes(range(256)) * 256
    p = pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=data, fwd_cnt=77)
    dev.send_pkt(p)
    w.run()
    got = g.recv_rx()
    assert [x.len for x in got] == [4096] * 16
    assert b"".join(x.payload for x in got) == data
    for x in got:     # each piece is a packet of its own with the same header fields
        assert (x.src_cid, x.dst_cid, x.src_port, x.dst_port, x.op, x.fwd_cnt) == (
            2, GUEST_CID, 5000, 1234, VIRTIO_VSOCK_OP_RW, 77)
    assert not dev.send_pkt_list


def test_no_rx_buffers_packet_waits_for_buffers_and_kick():
    dev, g, w = make()
    p = pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=b"later")
    dev.send_pkt(p)
    w.run()
    assert len(dev.send_pkt_list) == 1 and g.recv_rx() == []
    assert g.post_rx(2) == 2               # posts and kicks (the device asked for a kick)
    w.run()
    assert g.recv_rx() == [p] and not dev.send_pkt_list


def test_split_packet_waits_midway_for_more_buffers():
    dev, g, w = make()
    g.post_rx(2, size=1000)
    data = bytes(range(250)) * 10
    dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=data))
    w.run()
    assert [x.len for x in g.recv_rx()] == [1000, 1000]
    g.post_rx(1, size=1000)
    w.run()
    assert [x.len for x in g.recv_rx()] == [500]
    assert b"".join(x.payload for x in g.received) == data


def test_rx_chain_with_out_buffer_needs_reset():
    dev, g, w = make()
    gpa = g.alloc.alloc(4096)
    g.vqs[VSOCK_VQ_RX].add_sgs([(gpa, 16)], [(gpa + 16, 1000)], "bad")
    dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=b"x"))
    w.run()
    assert dev.broken and dev.stats["errors"] == 1 and "Expected 0 output buffers" in dev.stats["last_error"]


def test_rx_buffer_too_small_for_header_needs_reset():
    dev, g, w = make()
    gpa = g.alloc.alloc(64)
    g.vqs[VSOCK_VQ_RX].add_sgs([], [(gpa, 20)], "small")
    dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RST, src_cid=2, dst_cid=GUEST_CID))
    w.run()
    assert dev.broken and "too small" in dev.stats["last_error"]


def test_send_pkt_to_other_cid_is_refused():
    dev, g, w = make()
    assert dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=9, payload=b"x")) < 0
    assert not dev.send_pkt_list


# --- event queue ------------------------------------------------------------------------------
def test_transport_reset_event_on_reconnect():
    dev, g, w = make(reconnect=True, start=False)
    gpas = g.post_event(2)
    dev.start()
    r = g.vqs[VSOCK_VQ_EVENT].get_buf()
    assert r == (gpas[0], 4)
    assert g.mem.read(gpas[0], 4) == b"\0\0\0\0"          # le32 id = TRANSPORT_RESET (0)
    assert g.mem.read(gpas[1], 4) == b"\xff" * 4         # the second buffer is untouched
    assert g.vqs[VSOCK_VQ_EVENT].get_buf() is None
    assert dev.stats["resets_sent"] == 1 and g.irq.pending() >= 1


def test_transport_reset_waits_for_an_event_buffer():
    dev, g, w = make(reconnect=True)
    assert dev.reset_pending and dev.stats["resets_sent"] == 0
    g.post_event(1)
    g.kick(VSOCK_VQ_EVENT, force=True)
    assert not dev.reset_pending and dev.stats["resets_sent"] == 1
    assert g.vqs[VSOCK_VQ_EVENT].get_buf()[1] == 4


def test_guest_reacts_to_transport_reset():
    """The guest's connected sockets learn ECONNRESET when it handles the event (seen end to end)."""
    dev, g, w = make()
    g.post_rx()
    lst = dev.core.socket()
    dev.core.bind(lst, 1234)
    dev.core.listen(lst, 4)
    sk = g.core.socket()
    g.core.connect(sk, 2, 1234)
    g.settle(w)
    gpas = g.post_event(1)
    assert dev.send_transport_reset()
    (tok, ln) = g.vqs[VSOCK_VQ_EVENT].get_buf()
    assert ln == 4 and struct.unpack("<I", g.mem.read(tok, 4))[0] == 0 and tok == gpas[0]
    assert g.core.reset_connected() == 1
    assert sk.state == SockState.CLOSE and sk.err == 104


# --- lifecycle --------------------------------------------------------------------------------
def test_stop_purges_and_releases():
    dev, g, w = make()
    dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RST, src_cid=2, dst_cid=GUEST_CID))
    dev.send_pkt(Packet(2, GUEST_CID, 1, 2, 1, VIRTIO_VSOCK_OP_RESPONSE, 0, 0, 0, b"", True))
    assert dev.queued_replies == 1
    old_core = dev.core
    dev.reset()
    assert not dev.send_pkt_list and dev.queued_replies == 0 and dev.core is not old_core
    assert dev.mem is None and not dev.running
    assert dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID)) < 0   # stopped


def test_capture_sees_tx_and_each_rx_piece():
    class Cap:
        def __init__(self):
            self.pkts = []

        def write(self, p):
            self.pkts.append(p)
    cap = Cap()
    dev, g, w = make(capture=cap)
    g.post_rx(4, size=1000)
    g.xmit(pkt(VIRTIO_VSOCK_OP_RST, src_cid=77))      # captured even though dropped
    g.kick(VSOCK_VQ_TX)
    dev.send_pkt(pkt(VIRTIO_VSOCK_OP_RW, src_cid=2, dst_cid=GUEST_CID, payload=bytes(1500)))
    w.run()
    assert [(p.src_cid, p.len) for p in cap.pkts] == [(77, 0), (2, 1000), (2, 500)]


# --- regression (found by tools.stress: host SIGKILL mid-batch, then restart) ------------------
@pytest.mark.parametrize("event_idx", [False, True])
def test_new_backend_rearms_kicks_left_suppressed_by_a_killed_one(event_idx):
    """A killed backend left kicks suppressed in guest memory; the next one must re-arm them at
    start (vhost_vq_init_access), or the driver never kicks it and connections time out."""
    from shared.constants import VRING_USED_F_NO_NOTIFY
    from shared.ring_layout import avail_event_addr, used_flags_addr
    dev, g, w = make(start=False, event_idx=event_idx)
    for vq in g.vqs:
        if event_idx:
            g.mem.store16(avail_event_addr(vq.used, vq.num), 0x8000)   # far behind the driver
        else:
            g.mem.store16(used_flags_addr(vq.used), VRING_USED_F_NO_NOTIFY)
    dev.start()
    assert not dev.broken
    assert g.post_rx(4, kick=False) == 4
    assert g.vqs[VSOCK_VQ_RX].kick_prepare()          # the driver kicks the new backend again


def test_restarted_backend_takes_tx_left_by_the_killed_one_without_a_kick():
    """The killed host took the guest's last tx kick with it: the new one (reconnect) must look
    at the tx ring at start, or a guest with a full tx ring never kicks again (tools.stress)."""
    dev, g, w = make(reconnect=True, start=False)
    g.post_event(1)
    for i in range(3):
        assert g.xmit(pkt(VIRTIO_VSOCK_OP_RST, src_port=6000 + i))   # on the ring, no kick
    dev.start()
    w.run()
    assert dev.stats["tx_packets"] == 3
    assert len(g.reap_tx()) == 3


def test_good_chains_before_a_bad_one_are_returned_on_the_used_ring():
    """Issue 15 item 7 (vhost_add_used, chain by chain): a batch that meets a bad chain marks
    the device NEEDS_RESET but still returns the good chains it popped before it."""
    dev, g, w = make()
    lst = dev.core.socket()
    dev.core.bind(lst, 1234)
    dev.core.listen(lst, 4)
    for port in (5000, 5001):                       # two good packets (connection requests)
        assert g.xmit(pkt(VIRTIO_VSOCK_OP_REQUEST, src_port=port))
    g.add_tx(raw_hdr(0), in_len=16)                 # then a chain with an input buffer
    g.kick(VSOCK_VQ_TX, force=True)
    assert dev.broken
    used = g.reap_tx()
    assert [ln for _, ln in used] == [HDR_SIZE, HDR_SIZE]   # both good chains came back
    assert dev.vqs[VSOCK_VQ_TX].used_idx(dev.mem) == 2


# --- issue 19: the same device on packed rings ---------------------------------------------------
@pytest.mark.parametrize("event_idx", [True, False])
def test_packed_rings_carry_a_connection_both_ways_over_many_laps(event_idx):
    """VhostVsock does not know which layout it serves: the same verbs on packed rings of 8
    slots; 200 KB each way laps them many times (4 KiB rx buffers, two slots each)."""
    dev, g, w = make(packed=True, sizes=(8, 8, 4), event_idx=event_idx)
    assert all(getattr(q, "packed", False) for q in dev.vqs)
    lst, sk = _guest_connects(dev, g, w)
    child = dev.core.accept(lst)
    assert child is not None
    data = bytes(range(256)) * 800
    got_host, got_guest = b"", b""
    sent_g = sent_h = 0
    for _ in range(2000):
        if sent_g < len(data):
            sent_g += g.core.send(sk, data[sent_g:sent_g + 8192])
        if sent_h < len(data):
            sent_h += dev.core.send(child, data[sent_h:sent_h + 8192])
        g.settle(w)
        got_host += dev.core.recv(child, 65536)
        got_guest += g.core.recv(sk, 65536)
        g.settle(w)
        if len(got_host) == len(got_guest) == len(data):
            break
    assert got_host == data and got_guest == data
    assert not dev.broken and dev.stats["errors"] == 0
    assert g.vqs[VSOCK_VQ_RX].avail_wrap_counter in (0, 1) and dev.stats["rx_packets"] > 50


@pytest.mark.parametrize("case, rule", [("second descriptor of another lap", 15),
                                        ("buffer id out of range", 16),
                                        ("buffer id already in flight", 16),
                                        ("indirect without INDIRECT_DESC", 8)])
def test_packed_hostile_tx_needs_reset_and_other_device_unaffected(case, rule):
    """Wrong flags or ids on a packed tx ring: NEEDS_RESET with the rule, the err doorbell, the
    error counted, nothing else disturbed (the same reaction as on split rings)."""
    from shared.ring_layout import DESC_F_AVAIL, DESC_F_USED, PACKED_DESC
    from shared.constants import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
    dev, g, w = make(packed=True)
    other, g2, w2 = make(packed=True)
    vq = g.vqs[VSOCK_VQ_TX]
    ring = g.mem.view(vq.desc, 16 * vq.num)
    hdr = g.alloc.alloc(HDR_SIZE)
    g.mem.write(hdr, raw_hdr(0, op=VIRTIO_VSOCK_OP_REQUEST))
    if case == "second descriptor of another lap":
        PACKED_DESC.pack_into(ring, 16, hdr, 4, 0, DESC_F_USED)
        PACKED_DESC.pack_into(ring, 0, hdr, HDR_SIZE, 0, VRING_DESC_F_NEXT | DESC_F_AVAIL)
    elif case == "buffer id out of range":
        PACKED_DESC.pack_into(ring, 0, hdr, HDR_SIZE, vq.num, DESC_F_AVAIL)
    elif case == "buffer id already in flight":
        PACKED_DESC.pack_into(ring, 0, hdr, HDR_SIZE, 3, DESC_F_AVAIL)
        PACKED_DESC.pack_into(ring, 16, hdr, HDR_SIZE, 3, DESC_F_AVAIL)
        other_lst = dev.core.socket()            # the first REQUEST is taken and answered
        dev.core.bind(other_lst, 1234)
        dev.core.listen(other_lst, 4)
    else:
        PACKED_DESC.pack_into(ring, 0, hdr, 16, 0, VRING_DESC_F_INDIRECT | DESC_F_AVAIL)
    ring.release()
    g.kick(VSOCK_VQ_TX, force=True)
    w.run()
    assert dev.broken and dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert dev.stats["errors"] == 1 and dev.stats["last_rule"] == rule, dev.stats["last_error"]
    assert dev.errs[VSOCK_VQ_TX].pending() == 1
    _other_device_still_connects(other, g2, w2)
    dev.reset()
    assert not dev.broken and all(not getattr(q, "packed", False) for q in dev.vqs)
