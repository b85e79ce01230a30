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
the guest CID read from the device config; its `send_pkt` is this transport's `send_pkt`, which
only queues: packets to our own CID go to `loopback_list`, the rest to `send_pkt_list`, and the
deferred work items move them along:

    send_pkt_work   send_pkt_list -> guest RAM -> tx ring; kick
    tx_work         tx completions: free the guest RAM, requeue send_pkt_work
    rx_work         rx completions: copy the packet out, core.recv_pkt, refill at half empty
    event_work      TRANSPORT_RESET: re-read the CID, reset connected sockets, re-post the buffer
    loopback_work   loopback_list -> core.recv_pkt (only while rx_run)

Replies the core owes the peer (`pkt.reply`, e.g. RST for an unknown port, RESPONSE, CREDIT_UPDATE)
are counted in `queued_replies` until they are on the tx ring. While that count has reached the rx
ring size, rx_work stops consuming rx buffers and leaves rx callbacks disabled, so a peer that
floods us with requests cannot make us queue unbounded replies; send_pkt_work (or cancel_pkt)
restarts rx when the count drops back below the ring size.

Interrupt callbacks (rx_done, tx_done, event_done) only `kernel.queue_work`. Every other method
runs with `kernel.lock` held: work items are run with it held by the kernel, and socket calls
(guest/vsock/socket.py) take it. Guest RAM for packets comes from `ram.alloc`; an allocation
failure never raises: rx_fill posts fewer buffers, send_pkt_work leaves the packet at the head of
the list, and both are retried later (on the next completion, or a short timer when nothing is in
flight).

Legal order: probe() once -> (work, send_pkt, cancel_pkt)* -> remove() once.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import struct
import weakref
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
from shared.vsock.packet import HDR, Packet
from shared.vsock.proto import VsockCore

log = logging.getLogger(__name__)

HDR_SIZE = VIRTIO_VSOCK_HDR_SIZE
EVENT = struct.Struct("<I")            # struct virtio_vsock_event { le32 id; }
EVENT_LIST_LEN = 8                     # virtio_vsock.event_list[8]
CONFIG_GUEST_CID = struct.Struct("<Q")  # struct virtio_vsock_config { le64 guest_cid; }
RETRY_DELAY = 0.01                     # seconds before retrying a failed allocation with nothing in flight

assert HDR.size == HDR_SIZE

# One virtio-vsock device per guest kernel (the seeds' the_virtio_vsock, per VM here).
_the_virtio_vsock: "weakref.WeakKeyDictionary[object, VirtioVsockTransport]" = weakref.WeakKeyDictionary()


class _Buf:
    """A guest-RAM block posted on a ring (the token handed to add_sgs)."""

    __slots__ = ("gpa", "size", "pkt")

    def __init__(self, gpa: int, size: int, pkt: Packet | None = None):
        self.gpa = gpa
        self.size = size          # payload bytes the block holds after the header
        self.pkt = pkt            # tx: the packet it carries (for stats / debugging)


class _EventBuf:
    """One of the 8 pre-posted event buffers."""

    __slots__ = ("gpa",)

    def __init__(self, gpa: int):
        self.gpa = gpa


class VirtioVsockTransport:
    def __init__(self, kernel, vdev, ram, *, rx_buf_size: int = VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE,
                 queue_sizes: tuple[int, int, int] = (128, 128, 8), credit_policy: str = "every-read",
                 buf_size: int = VIRTIO_VSOCK_DEFAULT_BUF_SIZE, capture=None):
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

        self.vqs: list = []
        self.features = 0
        self.guest_cid = VMADDR_CID_ANY
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
            "event_kicks", "events", "transport_resets", "cancelled_packets", "dropped_no_device"), 0)

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
            self.vqs = list(self.vdev.find_vqs([self.rx_done, self.tx_done, self.event_done],
                                               list(self.queue_sizes)))
            try:
                if len(self.vqs) != VSOCK_VQ_MAX:
                    raise OSError(errno.ENODEV, f"virtio-vsock needs {VSOCK_VQ_MAX} virtqueues")
                self.update_guest_cid()
                self.core = VsockCore(self.guest_cid, self.send_pkt, buf_size=self.buf_size,
                                      credit_policy=self.credit_policy)
                _the_virtio_vsock[self.kernel] = self
                self.probed = True
                self.rx_buf_nr = 0
                self.rx_buf_max_nr = 0
                self.queued_replies = 0
                self.rx_run = True
                self.rx_fill()
                self.tx_run = True
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
            if self.core is not None:
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
            try:
                self.vdev.del_vqs()
            except Exception:
                log.exception("virtio-vsock: del_vqs failed")
            self.vqs = []
            if _the_virtio_vsock.get(self.kernel) is self:
                del _the_virtio_vsock[self.kernel]

    def _free_token(self, tok) -> None:
        if isinstance(tok, (_Buf, _EventBuf)):
            self.alloc.free(tok.gpa)

    # --- config --------------------------------------------------------------------------------
    def update_guest_cid(self) -> None:
        """virtio_vsock_update_guest_cid: le64 guest_cid at offset 0 of the config space."""
        raw = self.vdev.config_get(0, CONFIG_GUEST_CID.size)
        self.guest_cid = CONFIG_GUEST_CID.unpack(bytes(raw))[0]

    def get_local_cid(self) -> int:
        return self.guest_cid

    # --- interrupt callbacks (interrupt threads: only queue work) ---------------------------
    def rx_done(self, vq) -> None:
        self.kernel.queue_work(self.rx_work)

    def tx_done(self, vq) -> None:
        self.kernel.queue_work(self.tx_work)

    def event_done(self, vq) -> None:
        self.kernel.queue_work(self.event_work)

    # --- send side --------------------------------------------------------------------------
    def send_pkt(self, pkt: Packet) -> int:
        """virtio_transport_send_pkt: queue a packet from the core; returns its payload length."""
        if not self.probed:
            self.stats["dropped_no_device"] += 1
            return -errno.ENODEV
        if pkt.dst_cid == self.guest_cid:
            return self.send_pkt_loopback(pkt)
        if pkt.reply:
            self.queued_replies += 1
        self.send_pkt_list.append(pkt)
        self.kernel.queue_work(self.send_pkt_work)
        return len(pkt.payload)

    def send_pkt_loopback(self, pkt: Packet) -> int:
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
        """virtio_transport_send_pkt_work: move send_pkt_list onto the tx ring."""
        if not self.tx_run:
            return
        vq = self.vqs[VSOCK_VQ_TX]
        added = False
        restart_rx = False
        while self.send_pkt_list:
            pkt = self.send_pkt_list.popleft()
            n = len(pkt.payload)
            gpa = self.alloc.alloc(HDR_SIZE + n)
            if gpa is None:
                # -ENOMEM: leave it at the head; a tx completion (or a timer) retries
                self.send_pkt_list.appendleft(pkt)
                self.stats["tx_alloc_failures"] += 1
                if self.tx_inflight == 0:
                    self._retry_tx()
                break
            self.mem.write(gpa, pkt.pack_hdr())
            out = [(gpa, HDR_SIZE)]
            if n:
                self.mem.write(gpa + HDR_SIZE, pkt.payload)
                out.append((gpa + HDR_SIZE, n))
            if not vq.add_sgs(out, [], _Buf(gpa, n, pkt)):
                # Usually no more space in the vq: back at the head, stop (send_pkt_work)
                self.alloc.free(gpa)
                self.send_pkt_list.appendleft(pkt)
                self.stats["tx_ring_full"] += 1
                break
            self.tx_inflight += 1
            self.stats["tx_packets"] += 1
            self.stats["tx_bytes"] += n
            if self.capture is not None:
                self._tap(pkt)
            if pkt.reply:
                self.queued_replies -= 1
                # Do we now have resources to resume rx processing?
                if self.queued_replies + 1 == self.vqs[VSOCK_VQ_RX].num:
                    restart_rx = True
            added = True
        if added:
            self._kick(vq, "tx_kicks")
        if restart_rx:
            self.kernel.queue_work(self.rx_work)

    def tx_work(self) -> None:
        """virtio_transport_tx_work: reap tx completions, free their guest RAM."""
        if not self.tx_run:
            return
        vq = self.vqs[VSOCK_VQ_TX]
        freed = False
        while True:
            vq.disable_cb()
            while (got := vq.get_buf()) is not None:
                tok, _len = got
                self._free_token(tok)
                self.tx_inflight -= 1
                freed = True
            if vq.enable_cb():
                break
        if freed:
            self.kernel.queue_work(self.send_pkt_work)

    def cancel_pkt(self, sk) -> int:
        """virtio_transport_cancel_pkt: drop a closing socket's queued packets; returns how many."""
        keep: deque[Packet] = deque()
        cnt = 0
        removed = 0
        for pkt in self.send_pkt_list:
            if pkt.owner is sk:
                removed += 1
                if pkt.reply:
                    cnt += 1
            else:
                keep.append(pkt)
        self.send_pkt_list = keep
        self.stats["cancelled_packets"] += removed
        if cnt and self.vqs:
            self.queued_replies -= cnt
            num = self.vqs[VSOCK_VQ_RX].num
            # rx stopped because of owed replies, and now it may resume
            if self.queued_replies + cnt >= num > self.queued_replies:
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
        while vq.num_free:
            gpa = self.alloc.alloc(HDR_SIZE + size)
            if gpa is None:
                self.stats["rx_alloc_failures"] += 1
                break
            if not vq.add_sgs([], [(gpa, HDR_SIZE), (gpa + HDR_SIZE, size)], _Buf(gpa, size)):
                self.alloc.free(gpa)
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
        vq = self.vqs[VSOCK_VQ_RX]
        stopped = False
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
                try:
                    pkt = self._rx_pkt(tok, length)
                finally:
                    self.alloc.free(tok.gpa)
                if pkt is None:
                    self.stats["rx_dropped"] += 1
                    continue
                self.stats["rx_packets"] += 1
                self.stats["rx_bytes"] += len(pkt.payload)
                if self.capture is not None:
                    self._tap(pkt)
                self.core.recv_pkt(pkt)
            if stopped or vq.enable_cb():
                break
        if self.rx_buf_nr < self.rx_buf_max_nr // 2:
            self.rx_fill()

    def _rx_pkt(self, tok: _Buf, length: int) -> Packet | None:
        """Copy one received packet out of guest RAM; None = drop it."""
        # Drop short/long packets (virtio_transport_rx_work): the device claims `length` bytes
        # written; it must cover the header and fit the buffer we posted.
        if length < HDR_SIZE or length > HDR_SIZE + tok.size:
            return None
        hdr = self.mem.read(tok.gpa, HDR_SIZE)          # copy the header out before trusting it
        payload_len = HDR.unpack(hdr)[4]
        # the header's len must fit what was written (modern virtio_transport_rx_work)
        if payload_len > length - HDR_SIZE:
            return None
        payload = self.mem.read(tok.gpa + HDR_SIZE, payload_len) if payload_len else b""
        try:
            return Packet.unpack(hdr, payload)
        except Exception as e:  # a malformed header is the device's fault: drop, never raise
            log.debug("virtio-vsock: dropping malformed rx packet: %s", e)
            return None

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
            self.stats["transport_resets"] += 1
            self.update_guest_cid()
            self.core.set_local_cid(self.guest_cid)
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
