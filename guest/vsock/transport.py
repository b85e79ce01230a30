"""The guest's virtio-vsock transport (Linux net/vmw_vsock/virtio_transport.c, 2016-17 shape).

Theory of operation
-------------------
One `VirtioVsockTransport` drives one virtio-vsock device (one per guest kernel, as the seeds'
`the_virtio_vsock`). It owns three split virtqueues in guest RAM:

    rx     (0)  device -> driver packets. The driver pre-posts buffers of two device-writable
                descriptors each: a 44-byte header and an `rx_buf_size` payload buffer (rx_fill).
    tx     (1)  driver -> device packets: one device-readable header descriptor, plus one payload
                descriptor when the packet carries data (send_pkt_work).
    event  (2)  device -> driver events: 8 pre-posted 4-byte `virtio_vsock_event` buffers.

The stream protocol and credit live in a `VsockCore` (shared/vsock/proto.py) whose local CID is
the guest CID read from the device config; its `send_pkt` is this transport's `send_pkt`:

    send_pkt        packets to our own CID go to `loopback_list`; any other packet goes straight
                    onto the tx ring when nothing waits before it and there is room (header packed
                    in place in a guest-RAM buffer, the payload copied once from the caller's
                    buffer, which is only valid during the call); else a copy joins
                    `send_pkt_list`. With `coalesce`, a small RW packet of a socket joins the RW
                    packet queued before it while the device has not used everything on the tx
                    ring yet (TCP autocork's idea), so a stream of 64 B writes is not a packet each.
    send_pkt_work   send_pkt_list -> tx ring; one kick decision for all of them
    tx_work         tx completions; tx interrupts are enabled only while packets wait for room,
                    otherwise completed buffers are reaped by the send path (free_old_xmit)
    rx_work         rx completions: header fields unpacked out of guest RAM, the payload copied
                    once into the packet the core queues; refill at half empty
    event_work      TRANSPORT_RESET: re-read the CID, reset connected sockets, re-post the buffer
    loopback_work   loopback_list -> core.recv_pkt (only while rx_run)

Kicks are decided once per batch: inside `with transport.batch:` (the socket layer wraps its
calls, rx_work wraps its loop) every kick is deferred to the batch's end (shared/batch.py).
Buffers come from `BufPool`s (guest/bufpool.py): with `pool`, fixed pools carved at probe (rx:
one buffer per two rx descriptors, tx: one per two tx descriptors, each 44 + 64 KiB), so nothing on
the hot path touches the allocator; without it, one allocation per packet as the seeds do (their
-ENOMEM degradation is what the tests exercise). The class defaults are the seeds' behaviour
(4 KiB rx buffers, allocator per packet, no autocork); guest/vm.py turns the fast path on.

Replies the core owes the peer (`pkt.reply`, e.g. RST for an unknown port, RESPONSE, CREDIT_UPDATE)
are counted in `queued_replies` until they are on the tx ring. While that count has reached the rx
ring size, rx_work stops consuming rx buffers and leaves rx callbacks disabled, so a peer that
floods us with requests cannot make us queue unbounded replies; send_pkt_work (or cancel_pkt)
restarts rx when the count drops back below the ring size.

Interrupt callbacks (rx_done, tx_done, event_done) run on the interrupt's own thread (the guest
kernel's engine, shared/engine.py) and do the work there, with `kernel.lock` held: no relay
through a workqueue. Every other method runs with `kernel.lock` held: socket calls
(guest/vsock/socket.py) take it. An allocation failure never raises: rx_fill posts fewer
buffers, send_pkt_work leaves the packet at the head of the list, and both are retried later (on
the next completion, or a short timer when nothing is in flight).

Legal order: probe() once -> (work, send_pkt, cancel_pkt)* -> remove() once.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import struct
import weakref
from functools import partial
from collections import deque

from shared.constants import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_VSOCK_DEFAULT_BUF_SIZE,
    VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_HDR_SIZE,
    VMADDR_CID_ANY,
    VSOCK_VQ_EVENT,
    VSOCK_VQ_MAX,
    VSOCK_VQ_RX,
    VSOCK_VQ_TX,
    bit,
)
from guest.bufpool import BufPool
from shared.batch import Batch
from shared.vsock.packet import HDR, Packet, cancel_queued, cork, replies_resume
from shared.constants import VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_TYPE_STREAM
from shared.vsock.proto import LEND_MIN, Loan, SockState, VsockCore

log = logging.getLogger(__name__)

HDR_SIZE = VIRTIO_VSOCK_HDR_SIZE
EVENT = struct.Struct("<I")            # struct virtio_vsock_event { le32 id; }
EVENT_LIST_LEN = 8                     # virtio_vsock.event_list[8]
CONFIG_GUEST_CID = struct.Struct("<Q")  # struct virtio_vsock_config { le64 guest_cid; }
RETRY_DELAY = 0.01                     # seconds before retrying a failed allocation with nothing in flight
SMALL_WRITE = 4096                     # RW payloads below this may be corked while the tx ring is busy
TX_OK, TX_NOBUF, TX_FULL = 0, 1, 2     # _tx_one results

assert HDR.size == HDR_SIZE

# One virtio-vsock device per guest kernel (the seeds' the_virtio_vsock, per VM here).
_the_virtio_vsock: "weakref.WeakKeyDictionary[object, VirtioVsockTransport]" = weakref.WeakKeyDictionary()


class _EventBuf:
    """One of the 8 pre-posted event buffers."""

    __slots__ = ("gpa",)

    def __init__(self, gpa: int):
        self.gpa = gpa


class VirtioVsockTransport:
    def __init__(self, kernel, vdev, ram, *, rx_buf_size: int = VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE,
                 queue_sizes: tuple[int, int, int] = (128, 128, 8), credit_policy: str = "every-read",
                 buf_size: int = VIRTIO_VSOCK_DEFAULT_BUF_SIZE, capture=None,
                 pool: bool = False, coalesce: bool = False):
        if rx_buf_size <= 0:
            raise ValueError("rx_buf_size must be positive")
        if len(queue_sizes) != VSOCK_VQ_MAX:
            raise ValueError(f"queue_sizes needs {VSOCK_VQ_MAX} sizes (rx, tx, event)")
        self.kernel = kernel
        self.vdev = vdev
        self.ram = ram
        self.mem = ram.mem
        self.alloc = ram.alloc
        self.rx_buf_size = rx_buf_size
        self.queue_sizes = tuple(queue_sizes)
        self.credit_policy = credit_policy
        self.buf_size = buf_size
        self.capture = capture
        self.pool = pool              # fixed buffer pools carved at probe (else kmalloc per packet)
        self.coalesce = coalesce      # merge small RW packets while the tx ring is busy (autocork)
        self.batch = Batch()          # with transport.batch: one tx kick for many packets
        self._kick_tx = lambda: self._kick(self.vqs[VSOCK_VQ_TX], "tx_kicks") if self.vqs else None
        self.rx_pool: BufPool | None = None
        self.tx_pool: BufPool | None = None
        self.rx_loans = 0             # rx buffers lent to sockets (with `pool`), not yet read
        self.loan_gen = 0             # bumped at remove: older loans are void

        self.vqs: list = []
        self.features = 0
        self.guest_cid = VMADDR_CID_ANY
        self.cid_stale = False      # a TRANSPORT_RESET came: refresh_guest_cid() re-reads the CID
        self.core: VsockCore | None = None

        self.send_pkt_list: deque[Packet] = deque()     # waiting for the tx ring
        self.loopback_list: deque[Packet] = deque()     # to our own CID
        self.queued_replies = 0                          # replies queued, not yet on the tx ring
        self.rx_buf_nr = 0                               # rx buffers posted
        self.rx_buf_max_nr = 0                           # most rx buffers ever posted
        self.tx_inflight = 0                             # tx buffers on the ring
        self.event_list: list[_EventBuf] = []
        self.rx_run = self.tx_run = self.event_run = False
        self.probed = False
        self._rx_retry = None
        self._tx_retry = None
        self.stats: dict[str, int] = dict.fromkeys((
            "rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_ring_full",
            "tx_alloc_failures", "rx_alloc_failures", "loopback_packets", "rx_kicks", "tx_kicks",
            "event_kicks", "events", "transport_resets", "cancelled_packets", "dropped_no_device",
            "tx_direct", "tx_coalesced"), 0)

    # --- lifecycle ---------------------------------------------------------------------------
    def probe(self) -> None:
        """virtio_vsock_probe: negotiate, find the three vqs, read the CID, fill rx/event, go."""
        with self.kernel.lock:
            if self.probed:
                raise OSError(errno.EBUSY, "virtio-vsock transport already probed")
            # Only one virtio-vsock device per guest is supported (virtio_vsock_probe).
            if _the_virtio_vsock.get(self.kernel) is not None:
                raise OSError(errno.EBUSY, "this guest already has a virtio-vsock device")
            self.features = self.vdev.probe(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX))
            # One interrupt vector for the three queues (one interrupt thread), and the event
            # queue's "buffers posted" kick shares the rx queue's (one kick thread less).
            self.vqs = list(self.vdev.find_vqs([self.rx_done, self.tx_done, self.event_done],
                                               list(self.queue_sizes), shared_irq=True,
                                               kick_alias={VSOCK_VQ_EVENT: VSOCK_VQ_RX}))
            try:
                if len(self.vqs) != VSOCK_VQ_MAX:
                    raise OSError(errno.ENODEV, f"virtio-vsock needs {VSOCK_VQ_MAX} virtqueues")
                self.update_guest_cid()
                self.core = VsockCore(self.guest_cid, self.send_pkt, buf_size=self.buf_size,
                                      credit_policy=self.credit_policy)
                self.core.send_rw = self.send_rw
                rx_bufs = self.vqs[VSOCK_VQ_RX].num // 2 if self.pool else 0   # 2 descriptors each
                tx_bufs = self.vqs[VSOCK_VQ_TX].num // 2 if self.pool else 0
                self.rx_pool = BufPool(self.mem, self.alloc, HDR_SIZE + self.rx_buf_size, rx_bufs,
                                       writable=False)   # device-written: read-only views
                self.tx_pool = BufPool(self.mem, self.alloc,
                                       HDR_SIZE + VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, tx_bufs)
                _the_virtio_vsock[self.kernel] = self
                self.probed = True
                self.rx_buf_nr = 0
                self.rx_buf_max_nr = 0
                self.queued_replies = 0
                self.rx_run = True
                self.rx_fill()
                self.tx_run = True
                self.vqs[VSOCK_VQ_TX].disable_cb()   # until packets wait for room (tx_work)
                self.event_run = True
                self.event_fill()
                self.vdev.driver_ok()
            except BaseException:
                # out_vqs: give back what we took; the device never went live
                self.rx_run = self.tx_run = self.event_run = False
                self._cancel_retries()
                self.probed = False
                if _the_virtio_vsock.get(self.kernel) is self:
                    del _the_virtio_vsock[self.kernel]
                for vq in self.vqs:
                    while (tok := vq.detach_unused_buf()) is not None:
                        self._free_token(tok)
                self._release_pools()
                self.rx_buf_nr = 0
                self.event_list.clear()
                self.vqs = []
                try:
                    self.vdev.del_vqs()
                except Exception:
                    log.exception("virtio-vsock: del_vqs after a failed probe")
                raise
            # Packets queued before the device was up go out now.
            self.kernel.queue_work(self.send_pkt_work)

    def remove(self) -> None:
        """virtio_vsock_remove: reset sockets, stop work, reset the device, free every buffer."""
        with self.kernel.lock:
            if not self.probed:
                return
            self.probed = False
            self.loan_gen += 1          # buffers lent to sockets are freed with the pools
            self.rx_loans = 0
            if self.core is not None:
                self.core.drop_loans()
                self.core.reset_connected(errno.ECONNRESET)
            self.rx_run = self.tx_run = self.event_run = False
            self._cancel_retries()
            try:
                self.vdev.reset()
            except (ConnectionError, TimeoutError, OSError) as e:   # the host is gone: expected
                log.info("virtio-vsock: device reset without a host: %s", e)
            except Exception:  # a gone host must not keep us from freeing our own memory
                log.exception("virtio-vsock: device reset failed")
            for vq in self.vqs:
                while (tok := vq.detach_unused_buf()) is not None:
                    self._free_token(tok)
            self.rx_buf_nr = 0
            self.tx_inflight = 0
            self.event_list.clear()
            self.send_pkt_list.clear()
            self.loopback_list.clear()
            self.queued_replies = 0
            self._release_pools()
            try:
                self.vdev.del_vqs()
            except Exception:
                log.exception("virtio-vsock: del_vqs failed")
            self.vqs = []
            if _the_virtio_vsock.get(self.kernel) is self:
                del _the_virtio_vsock[self.kernel]

    def _free_token(self, tok) -> None:
        if isinstance(tok, _EventBuf):
            self.alloc.free(tok.gpa)
        elif tok is not None:
            tok.pool.put(tok)

    def _release_pools(self) -> None:
        for pool in (self.rx_pool, self.tx_pool):
            if pool is not None:
                pool.release()

    # --- config --------------------------------------------------------------------------------
    def update_guest_cid(self) -> None:
        """virtio_vsock_update_guest_cid: le64 guest_cid at offset 0 of the config space."""
        raw = self.vdev.config_get(0, CONFIG_GUEST_CID.size)
        self.guest_cid = CONFIG_GUEST_CID.unpack(bytes(raw))[0]

    def refresh_guest_cid(self) -> bool:
        """After a TRANSPORT_RESET: re-read the CID and give it to the core. Call with no lock
        held (GET_CONFIG is a blocking control round trip); True when it ran."""
        if not self.cid_stale:
            return False
        self.cid_stale = False
        self.update_guest_cid()
        with self.kernel.lock:
            self.core.set_local_cid(self.guest_cid)
        return True

    def get_local_cid(self) -> int:
        return self.guest_cid

    # --- interrupt callbacks (vring_interrupt: the thread that took the interrupt does the work)
    def rx_done(self, vq) -> None:
        with self.kernel.lock:
            self.rx_work()

    def tx_done(self, vq) -> None:
        with self.kernel.lock:
            self.tx_work()

    def event_done(self, vq) -> None:
        with self.kernel.lock:
            self.event_work()

    def poll_ops(self, qidx: int):
        """How the engine busy-polls a queue after an interrupt (NAPI): rx only; tx completions
        are reaped when the send path needs room, events are rare."""
        if qidx != VSOCK_VQ_RX or qidx >= len(self.vqs):
            return None
        from shared.engine import PollOps
        vq = self.vqs[VSOCK_VQ_RX]
        return PollOps(pending=lambda: self.rx_run and self.more_replies() and vq.more_used(),
                       suppress=vq.suppress_cb,
                       rearm=lambda: self.rx_run and not vq.enable_cb(),
                       handler=lambda: self.rx_done(vq),      # polled: not an interrupt
                       delay=lambda k: self.rx_run and not vq.enable_cb_after(k))

    def rx_doorbell(self):
        """The rx interrupt's doorbell thread, which a waiting socket call serves itself."""
        threads = getattr(self.vdev, "irq_threads", None)
        return threads.get(VSOCK_VQ_RX) if threads and self.rx_run else None

    # --- send side --------------------------------------------------------------------------
    def send_pkt(self, pkt: Packet) -> int:
        """virtio_transport_send_pkt: a packet from the core; returns its payload length.

        The payload may be a view of the caller's buffer, valid only during this call. When the
        tx ring has room and nothing waits before it, the packet goes straight onto the ring
        (header packed in place, payload copied once into guest RAM) and the queue is kicked if
        the device asked for it. Otherwise it is copied into send_pkt_list (with `coalesce`, a
        small RW packet joins the queued packet before it of the same socket: autocork)."""
        if not self.probed:
            self.stats["dropped_no_device"] += 1
            return -errno.ENODEV
        if pkt.dst_cid == self.guest_cid:
            return self.send_pkt_loopback(pkt)
        n = len(pkt.payload)
        if pkt.reply:
            self.queued_replies += 1
        if not self.send_pkt_list and self.tx_run:
            vq = self.vqs[VSOCK_VQ_TX]
            if not (self.coalesce and pkt.op == VIRTIO_VSOCK_OP_RW and n < SMALL_WRITE
                    and self._tx_busy(vq)):
                if self._tx_one(vq, pkt) == TX_OK:
                    self.stats["tx_direct"] += 1
                    if pkt.reply:
                        self._reply_sent()
                    self.batch.defer(self._kick_tx)
                    return n
        self._queue_pkt(pkt)
        return n

    def _queue_pkt(self, pkt: Packet) -> None:
        lst = self.send_pkt_list
        if (pkt.op == VIRTIO_VSOCK_OP_RW and pkt.owner is not None
                and self._cork(pkt.owner, pkt.payload, pkt.buf_alloc, pkt.fwd_cnt)):
            return
        payload = pkt.payload
        if self.coalesce and pkt.op == VIRTIO_VSOCK_OP_RW:
            pkt.payload = bytearray(payload)           # our copy, open for later small writes
        elif type(payload) is not bytes:
            pkt.payload = bytes(payload)               # our copy: the caller's view dies with its call
        was_empty = not lst
        lst.append(pkt)
        if not self.tx_run:
            return
        # Something must flush the list: a tx completion (re-arm its interrupt) or, if the
        # device already used everything, the work item right away.
        if was_empty and self.vqs and not self.vqs[VSOCK_VQ_TX].enable_cb():
            self.kernel.queue_work(self.tx_work)
        elif self.tx_inflight == 0:
            self.kernel.queue_work(self.send_pkt_work)

    @staticmethod
    def _tx_busy(vq) -> bool:
        """Has the device not yet used everything on the tx ring? (autocork's "in flight")"""
        return vq.device_pending()

    def _tx_one(self, vq, pkt: Packet) -> int:
        """Put one packet on the tx ring: TX_OK, TX_NOBUF or TX_FULL (nothing changed)."""
        r = self._tx_raw(vq, pkt.src_cid, pkt.dst_cid, pkt.src_port, pkt.dst_port, pkt.type,
                         pkt.op, pkt.flags, pkt.buf_alloc, pkt.fwd_cnt, pkt.payload)
        if r == TX_OK and self.capture is not None:
            self._tap(pkt)
        return r

    def _tx_raw(self, vq, src_cid, dst_cid, src_port, dst_port, type_, op, flags, buf_alloc,
                fwd_cnt, payload) -> int:
        """One packet onto the tx ring from its header fields (add_sgs of a pool buffer: header
        packed in place, payload copied once): TX_OK, TX_NOBUF or TX_FULL (nothing changed)."""
        n = len(payload)
        descs = 2 if n else 1
        if vq.num_free < descs:
            self._reap_tx(vq)
            if vq.num_free < descs:
                self.stats["tx_ring_full"] += 1
                return TX_FULL
        buf = self.tx_pool.get(HDR_SIZE + n)
        if buf is None:
            self._reap_tx(vq)
            buf = self.tx_pool.get(HDR_SIZE + n)
            if buf is None:
                self.stats["tx_alloc_failures"] += 1
                return TX_NOBUF
        view = buf.view
        HDR.pack_into(view, 0, src_cid, dst_cid, src_port, dst_port, n, type_, op, flags,
                      buf_alloc, fwd_cnt)
        gpa = buf.gpa
        if n:
            view[HDR_SIZE:HDR_SIZE + n] = payload        # the one copy of the payload
            out = [(gpa, HDR_SIZE), (gpa + HDR_SIZE, n)]
        else:
            out = [(gpa, HDR_SIZE)]
        if not vq.add_sgs(out, [], buf):
            buf.pool.put(buf)
            self.stats["tx_ring_full"] += 1
            return TX_FULL
        buf.pkt = op
        self.tx_inflight += 1
        stats = self.stats
        stats["tx_packets"] += 1
        stats["tx_bytes"] += n
        return TX_OK

    def _cork(self, sk, payload, buf_alloc: int, fwd_cnt: int) -> bool:
        """Autocork (with `coalesce`; shared/vsock/packet.py cork) onto the tail of
        send_pkt_list."""
        lst = self.send_pkt_list
        if not self.coalesce or not lst or not cork(lst[-1], sk, payload, buf_alloc, fwd_cnt):
            return False
        self.stats["tx_coalesced"] += 1
        return True

    def send_rw(self, sk, payload) -> bool:
        """The core's fast path for one RW packet (VsockCore.send_rw): straight onto the tx ring
        when nothing waits before it (send_pkt's direct case, without a Packet). False: the
        ordinary path (send_pkt: loopback, corking, queueing, capture) must take it.
        A small write that finds its socket's corked packet at the tail of send_pkt_list joins
        it here too (autocork without a Packet)."""
        if self.send_pkt_list:
            return self._cork(sk, payload, sk.buf_alloc, sk.fwd_cnt)
        if not self.tx_run or self.capture is not None or sk.remote_cid == self.guest_cid:
            return False
        vq = self.vqs[VSOCK_VQ_TX]
        if self.coalesce and len(payload) < SMALL_WRITE and self._tx_busy(vq):
            return False
        if self._tx_raw(vq, self.guest_cid, sk.remote_cid, sk.local_port, sk.remote_port,
                        VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 0, sk.buf_alloc, sk.fwd_cnt,
                        payload) != TX_OK:
            return False
        self.stats["tx_direct"] += 1
        self.batch.defer(self._kick_tx)
        return True

    def _reply_sent(self) -> None:
        """A reply reached the tx ring: resume rx if the owed replies had stopped it."""
        self.queued_replies -= 1
        if replies_resume(self.queued_replies + 1, self.queued_replies, self.vqs[VSOCK_VQ_RX].num):
            self.kernel.queue_work(self.rx_work)

    def send_pkt_loopback(self, pkt: Packet) -> int:
        if type(pkt.payload) is not bytes:
            pkt.payload = bytes(pkt.payload)           # the caller's view dies with its call
        self.loopback_list.append(pkt)
        self.kernel.queue_work(self.loopback_work)
        return len(pkt.payload)

    def loopback_work(self) -> None:
        """virtio_transport_loopback_work: deliver our own packets to ourselves while rx runs."""
        if not self.rx_run:
            return
        pkts, self.loopback_list = self.loopback_list, deque()
        for pkt in pkts:
            self.stats["loopback_packets"] += 1
            # the receiver gets its own copy, without the sender's bookkeeping
            self.core.recv_pkt(dataclasses.replace(pkt, reply=False, owner=None))

    def send_pkt_work(self) -> None:
        """virtio_transport_send_pkt_work: move send_pkt_list onto the tx ring, kick once."""
        if not self.tx_run:
            return
        vq = self.vqs[VSOCK_VQ_TX]
        added = False
        lst = self.send_pkt_list
        while lst:
            pkt = lst[0]
            r = self._tx_one(vq, pkt)
            if r != TX_OK:
                # -ENOMEM: a tx completion (or, with nothing in flight, a timer) retries;
                # ring full: the next tx completion does (send_pkt_work's "break").
                if r == TX_NOBUF and self.tx_inflight == 0:
                    self._retry_tx()
                break
            lst.popleft()
            if pkt.reply:
                self._reply_sent()
            added = True
        if added:
            self.batch.defer(self._kick_tx)

    def _reap_tx(self, vq) -> bool:
        """Free the buffers of every completed tx packet (free_old_xmit); True if any."""
        freed = False
        while (got := vq.get_buf()) is not None:
            self._free_token(got[0])
            self.tx_inflight -= 1
            freed = True
        return freed

    def tx_work(self) -> None:
        """virtio_transport_tx_work: reap tx completions, then move what waits onto the ring.

        Tx interrupts are wanted only while packets wait for room (virtio-net's free_old_xmit
        without tx NAPI): otherwise they stay disabled and the send path reaps completions
        when it needs descriptors or buffers (_tx_one)."""
        if not self.tx_run:
            return
        vq = self.vqs[VSOCK_VQ_TX]
        while True:
            vq.disable_cb()
            self._reap_tx(vq)
            if not self.send_pkt_list:
                break                   # nothing waits for room: no tx interrupts until it does
            self.send_pkt_work()
            if self.send_pkt_list:
                if vq.enable_cb():      # still waiting for room: the next completion
                    break
            elif vq.enable_cb_delayed():
                break                   # drained: one more interrupt reaps the tail, then quiet

    def cancel_pkt(self, sk) -> int:
        """virtio_transport_cancel_pkt: drop a closing socket's queued packets; returns how many."""
        self.send_pkt_list, removed, cnt = cancel_queued(
            self.send_pkt_list, sk, lambda pkt, sk: pkt if pkt.owner is sk else None)
        self.stats["cancelled_packets"] += removed
        if cnt and self.vqs:
            self.queued_replies -= cnt
            # rx stopped because of owed replies, and now it may resume
            if replies_resume(self.queued_replies + cnt, self.queued_replies, self.vqs[VSOCK_VQ_RX].num):
                self.kernel.queue_work(self.rx_work)
        return removed

    # --- receive side -----------------------------------------------------------------------
    def more_replies(self) -> bool:
        """virtio_transport_more_replies: is there room left for replies to rx packets?"""
        return self.queued_replies < self.vqs[VSOCK_VQ_RX].num

    def rx_fill(self) -> None:
        """virtio_vsock_rx_fill: post (44-byte header, rx_buf_size buffer) pairs while there is room."""
        vq = self.vqs[VSOCK_VQ_RX]
        size = self.rx_buf_size
        pool = self.rx_pool
        while vq.num_free >= 2:
            buf = pool.get(HDR_SIZE + size)
            if buf is None:
                self.stats["rx_alloc_failures"] += 1
                break
            gpa = buf.gpa
            if not vq.add_sgs([], [(gpa, HDR_SIZE), (gpa + HDR_SIZE, size)], buf):
                pool.put(buf)
                break
            self.rx_buf_nr += 1
        if self.rx_buf_nr > self.rx_buf_max_nr:
            self.rx_buf_max_nr = self.rx_buf_nr
        if self.rx_buf_nr == 0:
            # nothing posted, so no rx interrupt will ever come to retry from
            self._retry_rx()
        self._kick(vq, "rx_kicks")

    def rx_work(self) -> None:
        """virtio_transport_rx_work: consume rx completions while replies may still be queued."""
        if not self.rx_run:
            return
        with self.batch:            # replies made while handling the batch: one kick at the end
            self._rx_work()

    def _rx_work(self) -> None:
        vq = self.vqs[VSOCK_VQ_RX]
        stopped = False
        recv_pkt = self.core.recv_pkt
        stats = self.stats
        while not stopped:
            vq.disable_cb()
            while True:
                if not self.more_replies():
                    # Stop rx until the device has taken the pending replies; leave rx
                    # callbacks disabled (send_pkt_work / cancel_pkt restart us).
                    stopped = True
                    break
                got = vq.get_buf()
                if got is None:
                    break
                tok, length = got
                self.rx_buf_nr -= 1
                if self._rx_rw_fast(tok, length):
                    continue
                try:
                    pkt = self._rx_pkt(tok, length)
                finally:
                    tok.pool.put(tok)
                if pkt is None:
                    stats["rx_dropped"] += 1
                    continue
                stats["rx_packets"] += 1
                stats["rx_bytes"] += len(pkt.payload)
                if self.capture is not None:
                    self._tap(pkt)
                recv_pkt(pkt)
            if stopped or vq.enable_cb():
                break
        if self.rx_buf_nr < self.rx_buf_max_nr // 2:
            self.rx_fill()

    def _rx_rw_fast(self, tok, length: int) -> bool:
        """An RW packet for an ESTABLISHED socket goes straight to the core's rx_rw: with `pool`,
        its rx buffer is lent to the socket (given back to the pool, and the ring refilled,
        when the reader has copied it out: one copy, rx buffer to the reader's buffer); else
        copied once. False: the ordinary path (_rx_pkt, a Packet, recv_pkt) takes it."""
        if length < HDR_SIZE or length > tok.size or self.capture is not None:
            return False
        view = tok.view
        (src_cid, dst_cid, src_port, dst_port, plen, type_, op, _flags, buf_alloc,
         fwd_cnt) = HDR.unpack_from(view, 0)
        if (op != VIRTIO_VSOCK_OP_RW or type_ != VIRTIO_VSOCK_TYPE_STREAM
                or dst_cid != self.guest_cid or plen > length - HDR_SIZE):
            return False
        core = self.core
        sk = core.connected.get((dst_port, src_cid, src_port))
        if sk is None or sk.state is not SockState.ESTABLISHED:
            return False
        stats = self.stats
        stats["rx_packets"] += 1
        stats["rx_bytes"] += plen
        if (plen >= LEND_MIN and self.pool and self.rx_loans < self.rx_buf_max_nr // 2
                and not sk.released):
            self.rx_loans += 1
            payload = Loan(view[HDR_SIZE:HDR_SIZE + plen], partial(self._rx_loan_done, tok,
                                                                    self.loan_gen))
        else:
            payload = bytes(view[HDR_SIZE:HDR_SIZE + plen]) if plen else b""
            tok.pool.put(tok)
        core.rx_rw(sk, buf_alloc, fwd_cnt, payload)
        return True

    def _rx_loan_done(self, tok, gen: int) -> None:
        """A lent rx buffer was read (or dropped): back to its pool, and the ring refilled."""
        if gen != self.loan_gen:
            return                      # the device went away with its rings and pools
        self.rx_loans -= 1
        tok.pool.put(tok)
        if self.rx_run and self.rx_buf_nr < self.rx_buf_max_nr // 2:
            self.rx_fill()

    def _rx_pkt(self, tok, length: int) -> Packet | None:
        """Copy one received packet out of guest RAM; None = drop it."""
        # Drop short/long packets (virtio_transport_rx_work): the device claims `length` bytes
        # written; it must cover the header and fit the buffer we posted.
        if length < HDR_SIZE or length > tok.size:
            return None
        view = tok.view
        # unpack_from copies the header's fields out before any of them is trusted
        (src_cid, dst_cid, src_port, dst_port, payload_len, type_, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack_from(view, 0)
        # the header's len must fit what was written (modern virtio_transport_rx_work)
        if payload_len > length - HDR_SIZE:
            return None
        payload = bytes(view[HDR_SIZE:HDR_SIZE + payload_len]) if payload_len else b""
        return Packet(src_cid, dst_cid, src_port, dst_port, type_, op, flags, buf_alloc, fwd_cnt,
                      payload)

    # --- event queue ------------------------------------------------------------------------
    def event_fill_one(self, ev: _EventBuf) -> bool:
        return self.vqs[VSOCK_VQ_EVENT].add_sgs([], [(ev.gpa, EVENT.size)], ev)

    def event_fill(self) -> None:
        """virtio_vsock_event_fill: post the 8 event buffers."""
        for _ in range(EVENT_LIST_LEN):
            gpa = self.alloc.alloc(EVENT.size)
            if gpa is None:
                break
            ev = _EventBuf(gpa)
            if not self.event_fill_one(ev):
                self.alloc.free(gpa)
                break
            self.event_list.append(ev)
        self._kick(self.vqs[VSOCK_VQ_EVENT], "event_kicks")

    def event_work(self) -> None:
        """virtio_transport_event_work: handle completed events, re-post their buffers."""
        if not self.event_run:
            return
        vq = self.vqs[VSOCK_VQ_EVENT]
        while True:
            vq.disable_cb()
            while (got := vq.get_buf()) is not None:
                ev, length = got
                if length == EVENT.size:
                    self.event_handle(EVENT.unpack(self.mem.read(ev.gpa, EVENT.size))[0])
                if not self.event_fill_one(ev):  # cannot happen: we just took its slot
                    self.alloc.free(ev.gpa)
                    self.event_list.remove(ev)
            if vq.enable_cb():
                break
        self._kick(vq, "event_kicks")

    def event_handle(self, event_id: int) -> None:
        """virtio_vsock_event_handle."""
        self.stats["events"] += 1
        if event_id == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET:
            # The device was migrated or its host restarted: our CID may have changed and every
            # connection is gone; listeners stay (virtio_vsock_reset_sock is for connected ones).
            # The new CID is read from the config space by refresh_guest_cid(), a control round
            # trip the VM makes with no lock held, not here (an interrupt thread, lock held).
            self.stats["transport_resets"] += 1
            self.cid_stale = True
            self.core.reset_connected(errno.ECONNRESET)
        else:
            log.debug("virtio-vsock: ignoring unknown event %d", event_id)

    # --- helpers ----------------------------------------------------------------------------
    def _kick(self, vq, counter: str) -> None:
        """virtqueue_kick; counts the kicks that rang the doorbell (EVENT_IDX may suppress them)."""
        if self.vdev.kick(vq):
            self.stats[counter] += 1

    def _tap(self, pkt: Packet) -> None:
        try:
            self.capture.write(pkt)
        except Exception:  # capture is best effort (vsock_deliver_tap)
            log.exception("virtio-vsock: capture failed; disabling it")
            self.capture = None

    def _cancel_retries(self) -> None:
        for h in (self._rx_retry, self._tx_retry):
            if h is not None:
                h.cancel()
        self._rx_retry = self._tx_retry = None

    def _retry_rx(self) -> None:
        if self._rx_retry is None and self.rx_run:
            def retry():
                self._rx_retry = None
                if self.rx_run:
                    self.rx_fill()
            self._rx_retry = self.kernel.call_later(RETRY_DELAY, retry)

    def _retry_tx(self) -> None:
        if self._tx_retry is None and self.tx_run:
            def retry():
                self._tx_retry = None
                self.send_pkt_work()
            self._tx_retry = self.kernel.call_later(RETRY_DELAY, retry)
