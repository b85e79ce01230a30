"""The guest virtio-vsock transport against a fake host, in one process on bytearray guest RAM.

The fake host is a device built from the real device-side ring (host/vhost_vq.py VhostVirtqueue)
and the real protocol core (shared/vsock/proto.py VsockCore at CID 2). Tests pump it by hand:
`settle()` alternates the guest's queued work and the host's ring processing until both idle.
"""
from __future__ import annotations

import errno
import struct
import threading
from collections import deque
from types import SimpleNamespace

import pytest

from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from guest.vsock.transport import VirtioVsockTransport
from host.vhost_vq import VhostVirtqueue
from shared.constants import (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_VSOCK_OP_REQUEST,
                              VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_TYPE_STREAM,
                              VRING_AVAIL_F_NO_INTERRUPT, VSOCK_VQ_EVENT, VSOCK_VQ_RX, VSOCK_VQ_TX,
                              bit, has)
from shared.vsock.packet import Packet
from shared.vsock.proto import SockState, VsockCore

GUEST_CID = 3
HOST_CID = 2
HDR = 44
OFFERED = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX)


# --- fakes -----------------------------------------------------------------------------------
class FakeKernel:
    """queue_work/call_later recorded; `run()` runs queued work with the lock held."""

    def __init__(self):
        self.lock = threading.RLock()
        self.queue: deque = deque()
        self.timers: list = []

    def queue_work(self, fn) -> bool:
        if fn in self.queue:
            return False
        self.queue.append(fn)
        return True

    def call_later(self, delay, fn):
        h = SimpleNamespace(delay=delay, fn=fn, cancelled=False)
        h.cancel = lambda: setattr(h, "cancelled", True)
        self.timers.append(h)
        return h

    def run(self, limit: int = 100000) -> int:
        n = 0
        while self.queue:
            fn = self.queue.popleft()
            with self.lock:
                fn()
            n += 1
            assert n < limit, "work never settles"
        return n

    def fire_timers(self) -> int:
        due, self.timers = self.timers, []
        for h in due:
            if not h.cancelled:
                with self.lock:
                    h.fn()
        return len(due)


class FakeVdev:
    """The transport surface VirtioVsockTransport uses, over a GuestRAM; the host is in-process."""

    def __init__(self, ram, cid: int = GUEST_CID, offered: int = OFFERED):
        self.ram = ram
        self.cid = cid
        self.offered = offered
        self.features = 0
        self.vqs: list[VirtQueue] = []
        self.callbacks: list = []
        self.rings: list[tuple[int, int, int]] = []
        self.kicks = [0, 0, 0]
        self.on_kick = None          # callable(qidx) (threaded tests wake the host with it)
        self.driver_ok_called = False
        self.resets = 0
        self.host = None

    def probe(self, wanted: int) -> int:
        self.features = wanted & self.offered
        return self.features

    def find_vqs(self, callbacks, sizes, **sharing):
        self.callbacks = list(callbacks)
        for i, num in enumerate(sizes):
            desc, avail, used = VirtQueue.alloc_rings(self.ram, num)
            self.rings.append((desc, avail, used))
            self.vqs.append(VirtQueue(self.ram.mem, i, num, desc, avail, used,
                                      event_idx=has(self.features, VIRTIO_RING_F_EVENT_IDX),
                                      name=f"vsock-q{i}"))
        return list(self.vqs)

    def config_get(self, offset: int, size: int) -> bytes:
        return struct.pack("<Q", self.cid)[offset:offset + size]

    def driver_ok(self) -> None:
        self.driver_ok_called = True

    def kick(self, vq) -> bool:
        if not vq.kick_prepare():
            return False
        self.kicks[vq.index] += 1
        if self.on_kick is not None:
            self.on_kick(vq.index)
        return True

    def interrupt(self, qidx: int) -> None:
        cb = self.callbacks[qidx]
        if cb is not None:
            cb(self.vqs[qidx])

    def reset(self) -> None:
        self.resets += 1
        if self.host is not None:
            self.host.stopped = True

    def del_vqs(self) -> None:
        for vq, (d, a, u) in zip(self.vqs, self.rings):
            vq.close()
            VirtQueue.free_rings(self.ram, d, a, u)
        self.vqs, self.rings = [], []


def write_iov(iov, data: bytes) -> int:
    off = 0
    for mv in iov:
        n = min(len(mv), len(data) - off)
        if n <= 0:
            break
        mv[:n] = data[off:off + n]
        off += n
    return off


class FakeHost:
    """vhost-vsock in miniature: real VhostVirtqueues over the guest's rings + a VsockCore at CID 2."""

    def __init__(self, vdev: FakeVdev, *, max_pkt_len: int = 4096):
        self.vdev = vdev
        vdev.host = self
        self.mem = vdev.ram.mem
        self.lock = threading.RLock()
        self.core = VsockCore(HOST_CID, self._send_pkt, max_pkt_len=max_pkt_len)
        self.vqs = []
        for i, (vq, (d, a, u)) in enumerate(zip(vdev.vqs, vdev.rings)):
            hv = VhostVirtqueue(i)
            hv.num, hv.desc, hv.avail, hv.used = vq.num, d, a, u
            hv.event_idx = has(vdev.features, VIRTIO_RING_F_EVENT_IDX)
            hv.enabled = True
            self.vqs.append(hv)
        self.pending: deque[Packet] = deque()     # host -> guest, waiting for rx buffers
        self.received: list[Packet] = []         # guest -> host, in order
        self.tx_paused = False                    # stop consuming the guest's tx ring
        self.stopped = False
        self.interrupts = [0, 0, 0]

    def _send_pkt(self, pkt: Packet) -> None:
        self.pending.append(pkt)

    def _signal(self, qidx: int) -> None:
        if self.vqs[qidx].signal(self.mem):
            self.interrupts[qidx] += 1
            self.vdev.interrupt(qidx)

    def handle_tx(self) -> int:
        """vhost_vsock_handle_tx_kick: take packets off the guest's tx ring."""
        if self.tx_paused or self.stopped:
            return 0
        vq = self.vqs[VSOCK_VQ_TX]
        n = 0
        while (chain := vq.get_vq_desc(self.mem)) is not None:
            data = b"".join(bytes(m) for m in chain.out)
            pkt = Packet.from_bytes(data)
            vq.add_used(self.mem, chain.head, len(data))
            self.received.append(pkt)
            if pkt.src_cid == GUEST_CID or pkt.src_cid == self.vdev.cid:
                self.core.recv_pkt(pkt)
            n += 1
        if n:
            self._signal(VSOCK_VQ_TX)
        return n

    def handle_rx(self) -> int:
        """vhost_transport_do_send_pkt: copy pending packets into the guest's rx buffers."""
        if self.stopped:
            return 0
        vq = self.vqs[VSOCK_VQ_RX]
        n = 0
        while self.pending:
            chain = vq.get_vq_desc(self.mem)
            if chain is None:
                break
            pkt = self.pending.popleft()
            data = pkt.pack()
            assert chain.out_len == 0 and chain.in_len >= len(data)
            write_iov(chain.in_, data)
            vq.add_used(self.mem, chain.head, len(data))
            n += 1
        if n:
            self._signal(VSOCK_VQ_RX)
        return n

    def inject_raw(self, data: bytes, used_len: int) -> None:
        """Write `data` into the next rx buffer and claim `used_len` bytes were written."""
        vq = self.vqs[VSOCK_VQ_RX]
        chain = vq.get_vq_desc(self.mem)
        assert chain is not None
        write_iov(chain.in_, data)
        vq.add_used(self.mem, chain.head, used_len)
        self._signal(VSOCK_VQ_RX)

    def send_event(self, event_id: int, length: int = 4) -> None:
        vq = self.vqs[VSOCK_VQ_EVENT]
        chain = vq.get_vq_desc(self.mem)
        assert chain is not None and chain.in_len == 4
        write_iov(chain.in_, struct.pack("<I", event_id))
        vq.add_used(self.mem, chain.head, length)
        self._signal(VSOCK_VQ_EVENT)

    def pump(self) -> int:
        with self.lock:
            total = 0
            while True:
                n = self.handle_tx() + self.handle_rx()
                if not n:
                    return total
                total += n


def settle(kernel: FakeKernel, host: FakeHost, rounds: int = 10000) -> None:
    for _ in range(rounds):
        if not kernel.run() and not host.pump():
            return
    raise AssertionError("guest and host never settled")


def make_env(*, ram_size=4 << 20, queue_sizes=(128, 128, 8), cid=GUEST_CID, capture=None, **kw):
    ram = GuestRAM("unused", ram_size, buf=bytearray(ram_size))
    kernel = FakeKernel()
    vdev = FakeVdev(ram, cid)
    t = VirtioVsockTransport(kernel, vdev, ram, queue_sizes=queue_sizes, capture=capture, **kw)
    t.probe()
    host = FakeHost(vdev)
    settle(kernel, host)
    return SimpleNamespace(ram=ram, kernel=kernel, vdev=vdev, t=t, host=host, core=t.core)


@pytest.fixture
def env():
    e = make_env()
    yield e
    e.t.remove()


def guest_connect(e, port: int, cid: int = HOST_CID):
    with e.kernel.lock:
        sk = e.core.socket()
        e.core.connect(sk, cid, port)
    settle(e.kernel, e.host)
    return sk


def host_listen(e, port: int):
    sk = e.host.core.socket()
    e.host.core.bind(sk, port)
    e.host.core.listen(sk, 16)
    return sk


def connected_pair(e, port: int = 1234):
    lst = host_listen(e, port)
    gsk = guest_connect(e, port)
    assert gsk.state == SockState.ESTABLISHED
    hsk = e.host.core.accept(lst)
    assert hsk is not None and hsk.state == SockState.ESTABLISHED
    return gsk, hsk


def peek_chains(e, qidx: int):
    """All chains the guest has posted on a queue, read by a fresh device-side ring (not consumed)."""
    d, a, u = e.vdev.rings[qidx]
    hv = VhostVirtqueue(qidx)
    hv.num, hv.desc, hv.avail, hv.used = e.vdev.vqs[qidx].num, d, a, u
    hv.event_idx = True
    hv.last_avail_idx = e.host.vqs[qidx].last_avail_idx
    chains = []
    while (c := hv.get_vq_desc(e.ram.mem)) is not None:
        chains.append(c)
    hv.unmap()
    return chains


# --- probe -----------------------------------------------------------------------------------
def test_probe_posts_rx_and_event_buffers():
    e = make_env()
    try:
        assert e.vdev.driver_ok_called
        assert e.t.features == OFFERED
        assert e.t.guest_cid == GUEST_CID and e.core.local_cid == GUEST_CID
        rx = peek_chains(e, VSOCK_VQ_RX)
        assert len(rx) == 64 == e.t.rx_buf_nr == e.t.rx_buf_max_nr   # 128 descriptors, 2 each
        for c in rx:
            assert c.out == [] and [len(m) for m in c.in_] == [44, 4096]
        ev = peek_chains(e, VSOCK_VQ_EVENT)
        assert len(ev) == 8 and all([len(m) for m in c.in_] == [4] for c in ev)
        assert e.vdev.kicks[VSOCK_VQ_RX] == 1 and e.vdev.kicks[VSOCK_VQ_EVENT] == 1
    finally:
        e.t.remove()


def test_one_device_per_guest():
    e = make_env()
    try:
        other = VirtioVsockTransport(e.kernel, FakeVdev(e.ram), e.ram)
        with pytest.raises(OSError) as ei:
            other.probe()
        assert ei.value.errno == errno.EBUSY
    finally:
        e.t.remove()
    # after remove the kernel may probe a device again
    ram = GuestRAM("unused", 1 << 20, buf=bytearray(1 << 20))
    again = VirtioVsockTransport(e.kernel, FakeVdev(ram), ram)
    again.probe()
    again.remove()


def test_failed_probe_gives_everything_back():
    ram = GuestRAM("unused", 1 << 20, buf=bytearray(1 << 20))
    kernel = FakeKernel()
    vdev = FakeVdev(ram)

    def refuse():
        raise OSError(errno.EIO, "device refused DRIVER_OK")
    vdev.driver_ok = refuse
    t = VirtioVsockTransport(kernel, vdev, ram)
    with pytest.raises(OSError):
        t.probe()
    assert ram.alloc.in_use == 0 and not t.probed and vdev.vqs == []
    ok = VirtioVsockTransport(kernel, FakeVdev(ram), ram)      # the slot is free again
    ok.probe()
    ok.remove()
    assert ram.alloc.in_use == 0


# --- connections -------------------------------------------------------------------------------
def test_guest_connects_to_host_and_data_flows_both_ways(env):
    gsk, hsk = connected_pair(env)
    up = bytes(range(256)) * 40          # 10240 B: one guest tx packet, several host rx packets
    with env.kernel.lock:
        assert env.core.send(gsk, up) == len(up)
    settle(env.kernel, env.host)
    assert env.host.core.recv(hsk, 1 << 20) == up
    down = bytes(reversed(up))
    assert env.host.core.send(hsk, down) == len(down)
    settle(env.kernel, env.host)
    with env.kernel.lock:
        assert env.core.recv(gsk, 1 << 20) == down
    s = env.t.stats
    assert s["tx_bytes"] >= len(up) and s["rx_bytes"] >= len(down)
    assert s["rx_packets"] >= 3            # 10240 B in 4096-byte host packets, plus control
    assert s["rx_dropped"] == 0
    assert env.t.rx_buf_nr >= env.t.rx_buf_max_nr // 2     # refilled


def test_host_connects_to_guest(env):
    with env.kernel.lock:
        lst = env.core.socket()
        env.core.bind(lst, 5000)
        env.core.listen(lst, 4)
    hsk = env.host.core.socket()
    env.host.core.connect(hsk, GUEST_CID, 5000)
    settle(env.kernel, env.host)
    assert hsk.state == SockState.ESTABLISHED
    with env.kernel.lock:
        gsk = env.core.accept(lst)
    assert gsk is not None and (gsk.remote_cid, gsk.remote_port) == (HOST_CID, hsk.local_port)
    env.host.core.send(hsk, b"ping")
    settle(env.kernel, env.host)
    with env.kernel.lock:
        assert env.core.recv(gsk, 100) == b"ping"
        env.core.send(gsk, b"pong")
    settle(env.kernel, env.host)
    assert env.host.core.recv(hsk, 100) == b"pong"
    # the RESPONSE was a reply: counted while queued, and nothing is owed now
    assert env.t.queued_replies == 0


def test_connect_to_closed_port_is_refused(env):
    gsk = guest_connect(env, 4321)
    assert gsk.state == SockState.CLOSE and gsk.err == errno.ECONNREFUSED


# --- tx ring full ------------------------------------------------------------------------------
def test_tx_ring_full_keeps_packet_at_head_and_resumes(env):
    e = make_env(queue_sizes=(128, 4, 8))    # 4 descriptors: two RW packets (hdr + buf each)
    try:
        gsk, hsk = connected_pair(e)
        e.host.tx_paused = True
        chunks = [bytes([i]) * 100 for i in range(8)]
        with e.kernel.lock:
            for c in chunks:
                assert e.core.send(gsk, c) == 100
        e.kernel.run()
        tx = e.vdev.vqs[VSOCK_VQ_TX]
        assert tx.num_free == 0
        assert [p.payload for p in e.t.send_pkt_list] == chunks[2:]   # order kept, head = 3rd
        assert e.t.stats["tx_ring_full"] >= 1
        e.host.tx_paused = False
        settle(e.kernel, e.host)
        assert not e.t.send_pkt_list
        assert e.host.core.recv(hsk, 10000) == b"".join(chunks)
        assert e.t.tx_inflight == 0 and tx.num_free == 4
    finally:
        e.t.remove()


# --- queued_replies ---------------------------------------------------------------------------
def _request(src_port: int, dst_port: int) -> Packet:
    return Packet(HOST_CID, GUEST_CID, src_port, dst_port, VIRTIO_VSOCK_TYPE_STREAM,
                  VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0)


def test_owed_replies_stop_rx_until_they_drain():
    # rx ring of 16 descriptors (8 buffers); tx ring of 2 (two header-only RSTs)
    e = make_env(queue_sizes=(16, 2, 8))
    try:
        rxq = e.vdev.vqs[VSOCK_VQ_RX]
        e.host.tx_paused = True
        n_req = 40
        for i in range(n_req):
            e.host.pending.append(_request(10000 + i, 7777))     # nobody listens: each gets RST
        settle(e.kernel, e.host)
        # 2 RSTs sit on the tx ring; 16 (= rx ring size) are owed; rx is stopped
        assert e.t.queued_replies == rxq.num == 16
        assert len(e.t.send_pkt_list) == 16
        assert not e.t.more_replies()
        assert rxq.more_used()                                  # work left on the rx ring
        assert rxq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT   # callbacks left disabled
        assert e.host.pending                                  # the host could not deliver all
        received_before = e.t.stats["rx_packets"]
        assert received_before == 18
        # the device takes the replies: tx completions -> send_pkt_work -> rx restarts
        e.host.tx_paused = False
        settle(e.kernel, e.host)
        assert e.t.stats["rx_packets"] == n_req
        rsts = [p for p in e.host.received if p.op == VIRTIO_VSOCK_OP_RST]
        assert sorted(p.dst_port for p in rsts) == [10000 + i for i in range(n_req)]
        assert e.t.queued_replies == 0 and not e.host.pending
    finally:
        e.t.remove()


# --- loopback ----------------------------------------------------------------------------------
def test_loopback_to_own_cid(env):
    with env.kernel.lock:
        lst = env.core.socket()
        env.core.bind(lst, 600)
        env.core.listen(lst, 4)
        cli = env.core.socket()
        env.core.connect(cli, GUEST_CID, 600)
    settle(env.kernel, env.host)
    with env.kernel.lock:
        srv = env.core.accept(lst)
        assert cli.state == SockState.ESTABLISHED and srv is not None
        env.core.send(cli, b"to myself")
    settle(env.kernel, env.host)
    with env.kernel.lock:
        assert env.core.recv(srv, 100) == b"to myself"
    assert env.host.received == []                   # nothing went to the device
    assert env.t.stats["loopback_packets"] >= 3
    assert env.t.queued_replies == 0


def test_loopback_waits_while_rx_stopped(env):
    env.t.rx_run = False
    pkt = _request(1, 2)
    pkt.src_cid = pkt.dst_cid = GUEST_CID
    env.t.send_pkt(pkt)
    env.kernel.run()
    assert list(env.t.loopback_list) == [pkt]
    env.t.rx_run = True
    env.kernel.queue_work(env.t.loopback_work)
    env.kernel.run()
    # the REQUEST (nobody listens on port 2) and the RST it provoked, both to ourselves
    assert not env.t.loopback_list and env.t.stats["loopback_packets"] == 2
    assert env.core.stats["tx"]["RST"] == 1 and env.host.received == []


# --- cancel_pkt -------------------------------------------------------------------------------
def test_cancel_pkt_purges_a_sockets_packets_and_restarts_rx():
    e = make_env(queue_sizes=(8, 2, 8))
    try:
        e.host.tx_paused = True
        e.vdev.vqs[VSOCK_VQ_TX].num_free = 0          # the tx ring is full from here on
        mine, other = object(), object()

        def pkt(owner, reply):
            return Packet(GUEST_CID, HOST_CID, 1, 2, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW,
                          0, 0, 0, b"x", reply, owner)
        with e.kernel.lock:
            for _ in range(8):
                e.t.send_pkt(pkt(mine, True))
            e.t.send_pkt(pkt(mine, False))
            e.t.send_pkt(pkt(other, True))
        e.kernel.run()
        assert e.t.queued_replies == 9 and not e.t.more_replies()
        with e.kernel.lock:
            assert e.t.cancel_pkt(mine) == 9
        assert [p.owner for p in e.t.send_pkt_list] == [other]
        assert e.t.queued_replies == 1
        assert e.t.rx_work in e.kernel.queue              # 9 -> 1 crossed the ring size (8)
        assert e.t.stats["cancelled_packets"] == 9
        e.vdev.vqs[VSOCK_VQ_TX].num_free = 2
    finally:
        e.t.remove()


# --- events ------------------------------------------------------------------------------------
def _held(lock) -> bool:
    """Is `lock` held by anyone (tried from another thread, without waiting)?"""
    got = []

    def probe() -> None:
        if lock.acquire(timeout=0):
            lock.release()
            got.append(True)
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return not got


def test_transport_reset_resets_connected_keeps_listeners(env):
    gsk, hsk = connected_pair(env)
    with env.kernel.lock:
        lst = env.core.socket()
        env.core.bind(lst, 7000)
        env.core.listen(lst, 4)
    woke = []
    gsk.wake = lambda: woke.append(1)
    env.vdev.cid = 42                                  # migrated: a new CID
    reads = []
    read = env.vdev.config_get
    env.vdev.config_get = lambda off, size: (reads.append(_held(env.kernel.lock)), read(off, size))[1]
    env.host.send_event(0)
    settle(env.kernel, env.host)
    assert gsk.state == SockState.CLOSE and gsk.err == errno.ECONNRESET and woke
    assert lst.state == SockState.LISTEN
    assert reads == []                                 # no control round trip from the interrupt
    assert env.t.refresh_guest_cid() and reads == [False]      # later, with no lock held
    assert env.t.guest_cid == 42 and env.core.local_cid == 42
    assert not env.t.refresh_guest_cid()               # once per reset
    assert env.t.stats["transport_resets"] == 1
    assert len(peek_chains(env, VSOCK_VQ_EVENT)) == 8      # the buffer went back
    # a short event is ignored, and its buffer still goes back
    env.host.send_event(0, length=2)
    settle(env.kernel, env.host)
    assert env.t.stats["transport_resets"] == 1 and len(peek_chains(env, VSOCK_VQ_EVENT)) == 8


# --- bad rx packets ---------------------------------------------------------------------------
def test_short_and_long_rx_packets_are_dropped(env):
    gsk, hsk = connected_pair(env)
    good = Packet(HOST_CID, GUEST_CID, hsk.local_port, gsk.local_port, VIRTIO_VSOCK_TYPE_STREAM,
                  VIRTIO_VSOCK_OP_RW, 0, 65536, 0, b"hello")
    before = env.t.stats["rx_packets"]
    env.host.inject_raw(good.pack(), 20)                       # shorter than a header
    env.host.inject_raw(good.pack(), HDR + 4096 + 1)           # longer than the buffer
    env.host.inject_raw(good.pack(), HDR + 3)                  # hdr.len 5 > 3 bytes written
    settle(env.kernel, env.host)
    assert env.t.stats["rx_dropped"] == 3
    assert env.t.stats["rx_packets"] == before
    env.host.inject_raw(good.pack(), HDR + 5)
    settle(env.kernel, env.host)
    with env.kernel.lock:
        assert env.core.recv(gsk, 100) == b"hello"


# --- remove / memory --------------------------------------------------------------------------
def test_remove_frees_all_guest_ram():
    ram_size = 4 << 20
    ram = GuestRAM("unused", ram_size, buf=bytearray(ram_size))
    kernel = FakeKernel()
    vdev = FakeVdev(ram)
    t = VirtioVsockTransport(kernel, vdev, ram, queue_sizes=(16, 4, 8))
    t.probe()
    host = FakeHost(vdev)
    settle(kernel, host)
    e = SimpleNamespace(ram=ram, kernel=kernel, vdev=vdev, t=t, host=host, core=t.core)
    gsk, hsk = connected_pair(e)
    host.tx_paused = True
    with kernel.lock:
        for _ in range(6):
            t.core.send(gsk, b"y" * 1000)          # 2 on the ring, 4 in send_pkt_list
    kernel.run()
    host.core.send(hsk, b"z" * 100)                 # one used rx buffer not yet reaped
    host.handle_rx()
    assert ram.alloc.in_use > 0 and t.send_pkt_list and t.tx_inflight
    t.remove()
    assert ram.alloc.in_use == 0
    assert gsk.state == SockState.CLOSE and gsk.err == errno.ECONNRESET
    assert vdev.resets == 1 and not t.send_pkt_list and not t.loopback_list
    assert t.send_pkt(Packet(GUEST_CID, HOST_CID, 1, 2, 1, 5, 0, 0, 0, b"late")) == -errno.ENODEV
    kernel.run()                                   # stale work items are harmless
    t.remove()                                     # twice is a no-op


def test_allocator_exhaustion_degrades_without_crashing():
    # 64 KiB of guest RAM: the rings fit, only a handful of 4 KiB rx buffers do
    e = make_env(ram_size=64 << 10)
    try:
        assert 0 < e.t.rx_buf_nr < 64
        assert e.t.stats["rx_alloc_failures"] >= 1
        gsk, hsk = connected_pair(e)
        data = bytes(range(256)) * 160            # 40 KiB through a few rx buffers
        off = 0
        got = b""
        while off < len(data) or len(got) < len(data):
            if off < len(data):
                off += e.host.core.send(hsk, data[off:off + 8192])
            settle(e.kernel, e.host)
            with e.kernel.lock:
                try:
                    got += e.core.recv(gsk, 1 << 20)
                except BlockingIOError:
                    pass
        assert got == data
        settle(e.kernel, e.host)                  # the last CREDIT_UPDATE goes out
        assert not e.t.send_pkt_list
        # tx: a packet whose guest RAM cannot be allocated waits at the head of the list
        hog = []
        while (g := e.ram.alloc.alloc(64)) is not None:
            hog.append(g)
        with e.kernel.lock:
            e.core.send(gsk, b"q" * 2000)
        e.kernel.run()
        assert e.t.stats["tx_alloc_failures"] >= 1 and len(e.t.send_pkt_list) == 1
        assert e.kernel.timers                    # nothing in flight: a retry timer
        for g in hog:
            e.ram.alloc.free(g)
        e.kernel.fire_timers()
        settle(e.kernel, e.host)
        assert e.host.core.recv(hsk, 5000) == b"q" * 2000
    finally:
        e.t.remove()
    assert e.ram.alloc.in_use == 0


# --- capture ----------------------------------------------------------------------------------
def test_capture_sees_tx_and_rx_packets():
    seen = []
    e = make_env(capture=SimpleNamespace(write=seen.append))
    try:
        gsk, hsk = connected_pair(e)
        ops = [(p.op, p.src_cid) for p in seen]
        assert (VIRTIO_VSOCK_OP_REQUEST, GUEST_CID) in ops          # tx, after add_sgs
        assert any(src == HOST_CID for _, src in ops)               # rx, before recv_pkt
    finally:
        e.t.remove()


def test_pcap_capture_records_both_directions(tmp_path):
    from shared.vsock.pcap import PcapWriter, read_pcap
    path = tmp_path / "cap.pcap"
    w = PcapWriter(str(path))
    e = make_env(capture=w)
    try:
        connected_pair(e)
    finally:
        e.t.remove()
        w.close()
    pkts = [p for _, _, p in read_pcap(str(path))]
    assert [(p.op, p.src_cid) for p in pkts][:2] == [(VIRTIO_VSOCK_OP_REQUEST, GUEST_CID),
                                                      (2, HOST_CID)]     # REQUEST, RESPONSE
