"""vhost-vsock: the host end of one guest's virtio-vsock device (Linux drivers/vhost/vsock.c).

Theory of operation
-------------------
One `VhostVsock` serves one guest (one CID). Its three rings are the guest's (virtio spec §Socket Device "Virtqueues"):

    rx    (0)  guest posts empty buffers; `do_send_pkt` fills them with host -> guest packets
    tx    (1)  guest posts packets; `handle_tx_kick` takes them to the host's VsockCore
    event (2)  guest posts 4-byte buffers; `send_transport_reset` fills one (vhost leaves this
               queue to the VMM, QEMU's vhost-vsock-common.c; here the device does it)

The host's own socket layer is a `VsockCore(local_cid=2)` (shared/vsock/proto.py, the protocol
written once) whose `send_pkt` callback is `VhostVsock.send_pkt`. The bridge (bridge.py) puts
Unix sockets behind that core's sockets.

TX (vhost_vsock_handle_tx_kick): with kick notifications disabled, pop chains until the ring is
empty (then re-enable, and loop again if buffers raced in: the lost-wakeup fix), the per-kick
budget is spent (VHOST_VSOCK_WEIGHT bytes / VHOST_VSOCK_PKT_WEIGHT packets: the work requeues
itself and yields the worker), or the host owes the guest as many replies as the tx ring holds
(`queued_replies`; tx stays stopped, notifications off, until do_send_pkt drains them). Each chain
must be device-readable only (ring rule 14, "Expected 0 input buffers") and begin with a 44-byte
header, copied out of guest memory once before any field is trusted; only STREAM packets carry a
payload, of at most 64 KiB and no more than the chain holds. A packet whose src_cid is not the
guest's is dropped (counted); dst_cid 2 goes to the host core, any other CID gets an RST. Every
chain is returned with add_used(head, 44 + len); one interrupt decision per batch.

RX (vhost_transport_do_send_pkt): packets wait on `send_pkt_list`; each takes one rx chain
(device-writable only: "Expected 0 output buffers"), header then payload scattered over the
chain's buffers, so the Linux 2016 layout (44-byte + 4 KiB descriptors) and the one-buffer layout
both work. A payload larger than the buffer is split: each piece goes out as its own packet with
its own header and len (Linux >= 4.x "split packets to send using multiple buffers"). Without rx
buffers the packet goes back to the head of the list and the queue's notifications are
re-enabled; the guest's next rx kick resumes. When a reply leaves and queued_replies drops below
the tx ring size, tx processing restarts.

A guest mistake (VringError, GuestMemoryError) goes to `vq_err`: NEEDS_RESET, the err doorbell,
and no more work until the driver resets the device. Nothing raises out of a work item.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import struct
import threading
from collections import deque
from functools import partial

from host.device import VhostDevice
from host.iov import iov_read, iov_views, iov_write  # noqa: F401 - re-exported for callers and tests
from shared.constants import (VHOST_F_LOG_ALL, bit, RESERVED_CIDS, VHOST_VSOCK_PKT_WEIGHT, VHOST_VSOCK_WEIGHT,
                              VIRTIO_ID_VSOCK, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
                              VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW,
                              VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST, VSOCK_VQ_EVENT,
                              VSOCK_VQ_RX, VSOCK_VQ_TX)
from shared.batch import Batch
from shared.errors import GuestMemoryError, VringError
from shared.vsock.packet import HDR, HDR_SIZE, Packet, cancel_queued, cork, replies_resume
from shared.vsock.proto import LEND_MIN, Loan, SockState

log = logging.getLogger(__name__)

VSOCK_CONFIG = struct.Struct("<Q")          # struct virtio_vsock_config { le64 guest_cid; }
VSOCK_EVENT = struct.Struct("<I")           # struct virtio_vsock_event { le32 id; }
GUEST_ERRORS = (VringError, GuestMemoryError)
TX_MORE_DELAY = 0.02        # s: the worker takes over a tx ring its serving thread left unfinished


class VhostVsock(VhostDevice):
    device_type = "vsock"
    device_id = VIRTIO_ID_VSOCK
    num_queues = 3
    device_features = bit(VHOST_F_LOG_ALL)      # dirty logging (host/device.py) for migration

    def __init__(self, guest_cid: int, *, credit_policy: str = "every-read",
                 capture=None, reconnect: bool = False,
                 name: str = "", buf_size: int | None = None, lend: bool = True, **kw):
        if not isinstance(guest_cid, int) or guest_cid in RESERVED_CIDS or not 2 < guest_cid <= 0xFFFFFFFF:
            raise ValueError(f"guest CID {guest_cid!r} is reserved or out of range "
                             f"(a guest CID is 3..0xFFFFFFFE)")
        super().__init__(name or f"vsock-{guest_cid}", **kw)
        self.guest_cid = guest_cid
        self.credit_policy = credit_policy
        self.buf_size = buf_size        # the host sockets' receive buffer (None: the core's default)
        self.reconnect = reconnect
        self.capture = capture      # an object with write(pkt) (a PcapWriter the runner opened)
        self.core = self._new_core()
        self.send_pkt_list: deque[list] = deque()   # [packet, bytes of its payload already sent]
        self.queued_replies = 0     # replies in send_pkt_list: bounds how much tx we accept
        self.reset_pending = False  # a TRANSPORT_RESET waits for an event buffer
        self._reset_on_start = reconnect
        self.bridge = None          # set by the runner (host/vsock/runner.py) while it runs one
        self.batch = Batch()        # with dev.batch: one rx interrupt decision for many packets
        # Lending (our addition; vhost-vsock copies every payload into an skb): an RW payload in
        # one tx descriptor is queued on its socket as a view of the guest's buffer, and its chain
        # goes back to the used ring when the reader has copied it out (recv_into: one copy).
        # At most half the tx ring is lent, so control packets always find room.
        self.lend = lend
        self.loans = 0              # tx chains lent to sockets, not yet used
        self.tx_order: deque[list] = deque()   # [head, len, done] of popped tx chains not yet used
        self._tx_more = None        # the timer of _requeue_tx while a program thread serves tx
        self.loan_gen = 0           # bumped when the rings go away: older loans are void
        self.last_rx_sk = None      # the socket of the guest's last RW packet (expected_burst)
        self._notify_rx = lambda: self.notify(self.vqs[VSOCK_VQ_RX])
        # In-device programs (host/vsock/endpoint.py): start_hooks run at the end of start()
        # (DRIVER_OK), stop_hooks(old_core) at the end of stop(), both with self.lock held.
        # The runner's own (host/vsock/runner.py: the bridge, the clock) go in start_hooks and in
        # stopping_hooks, run at the start of stop() while the old core still serves.
        self.start_hooks: list = []
        self.stopping_hooks: list = []
        self.stop_hooks: list = []
        self.stats.update({
            "tx_packets": 0, "tx_bytes": 0,     # guest -> host (taken off the tx ring)
            "rx_packets": 0, "rx_bytes": 0,     # host -> guest (written into rx buffers)
            "dropped": 0,                       # tx packets with a src_cid that is not the guest's
            "rst_unroutable": 0,                # tx packets for a CID other than the host's
            "resets_sent": 0,                   # TRANSPORT_RESET events posted
            "tx_requeued": 0,                   # tx work that spent its budget and requeued
            "tx_stopped_replies": 0,            # times tx stopped on queued_replies
            "rx_coalesced": 0,                  # small RW packets merged while rx was busy
        })

    # --- description ---------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return VSOCK_CONFIG.pack(self.guest_cid)

    def _new_core(self):
        from shared.vsock.proto import VsockCore
        kw = {} if self.buf_size is None else {"buf_size": self.buf_size}
        core = VsockCore(VMADDR_CID_HOST, self.send_pkt, credit_policy=self.credit_policy, **kw)
        core.send_rw = self.send_rw
        return core

    def _tap(self, pkt: Packet) -> None:
        if self.capture is not None:
            try:
                self.capture.write(pkt)
            except Exception as e:  # a full disk must not stop the data path
                log.warning("%s: capture failed, disabled: %s", self.name, e)
                self.capture = None

    def get_stats(self) -> dict:
        out = super().get_stats()
        out.update(guest_cid=self.guest_cid, queued_replies=self.queued_replies,
                   send_pkt_list=len(self.send_pkt_list),
                   connections=len(self.bridge.conns) if self.bridge is not None else 0,
                   sockets=len(self.core.connected))
        if self.bridge is not None:
            out["bridge"] = dict(self.bridge.stats)
        # per-connection credit figures for monitors (the first 64, sorted by local port)
        socks = sorted(self.core.connected.values(), key=lambda sk: (sk.local_port, sk.remote_port))
        out["conns"] = [sk.snapshot() for sk in socks[:64]]
        return out

    def _ready(self) -> bool:
        return self.running and not self.broken and self.mem is not None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        if self._reset_on_start:
            # Host restart: the guest's connections died with the old host (B.6 TRANSPORT_RESET).
            self._reset_on_start = False
            self.send_transport_reset()
            # The old host took the guest's last tx kick with it; a full tx ring would never be
            # kicked again. Look at it once, as if kicked (vhost_poll_queue at start).
            self._queue_work(self.handle_tx_work)
        if self.send_pkt_list:
            self._queue_work(self.do_send_pkt)
        for hook in list(self.start_hooks):
            hook()

    def stop(self) -> None:
        # The device is going away: what the host's sockets say as they close (SHUTDOWN, RST)
        # must not reach the guest's rings any more (vhost_vsock_dev_release resets them locally).
        self.running = False
        for hook in list(self.stopping_hooks):
            hook()                  # the bridge closes its Unix sockets, releases their core sockets
        # Lent views of guest RAM must be gone before the memory is released.
        self.loan_gen += 1
        self.loans = 0
        self.last_rx_sk = None
        self.tx_order.clear()
        if self._tx_more is not None:
            self._tx_more.cancel()
            self._tx_more = None
        self.core.drop_loans()
        super().stop()
        # Forget every connection: the guest's side goes away with the rings (release, purge).
        self.send_pkt_list.clear()
        self.queued_replies = 0
        self.reset_pending = False
        self._local_work.clear()
        old, self.core = self.core, self._new_core()
        for hook in list(self.stop_hooks):
            hook(old)

    def close(self) -> None:
        super().close()
        if self.capture is not None and hasattr(self.capture, "flush"):
            try:
                self.capture.flush()
            except Exception:
                pass

    def tick(self, now: float) -> None:
        """The core's close timeouts, at `now` (the runner's clock, host/vsock/runner.py)."""
        with self.lock:
            if self.running:
                self.core.tick(now)

    # --- kicks ----------------------------------------------------------------------------------
    def handle_kick(self, qidx: int) -> None:
        if qidx == VSOCK_VQ_TX:
            self.handle_tx_kick()
        elif qidx == VSOCK_VQ_RX:
            # vhost_vsock_handle_rx_kick: the guest posted rx buffers, send what waits.
            self._queue_work(self.do_send_pkt)
        elif qidx == VSOCK_VQ_EVENT:
            # Event buffers wait for events; one may already be waiting for a buffer.
            if self.reset_pending:
                self.send_transport_reset()

    def more_replies(self) -> bool:
        """vhost_vsock_more_replies: may tx go on? (replies owed < tx ring size)"""
        return self.queued_replies < self.vqs[VSOCK_VQ_TX].num

    def handle_tx_work(self) -> None:
        """Requeued tx work (budget spent, or replies drained): like a kick on the tx ring."""
        with self.lock:
            self.handle_tx_kick()

    def handle_tx_kick(self) -> None:
        """vhost_vsock_handle_tx_kick: take the guest's packets to the host.

        One batch: every chain popped is returned with one used.idx publish (add_used_n) and
        one interrupt decision at the end, however many packets it held."""
        if not self._ready():
            return
        with self.batch:            # replies and credit made on the way: one rx interrupt
            self._handle_tx()

    def _handle_tx(self) -> None:
        vq, mem = self.vqs[VSOCK_VQ_TX], self.mem
        order = self.tx_order
        pkts = total = 0
        stats = self.stats
        try:
            vq.disable_notify(mem)
            while True:
                if not self.more_replies():
                    # Stop tx until do_send_pkt drains the replies; notifications stay disabled.
                    stats["tx_stopped_replies"] += 1
                    break
                chain = vq.get_vq_desc(mem)
                if chain is None:
                    if vq.enable_notify(mem):
                        vq.disable_notify(mem)
                        continue
                    break
                hdr = self._read_hdr(chain)
                n = hdr[4]
                stats["tx_packets"] += 1
                stats["tx_bytes"] += n
                stats["bytes_in"] += HDR_SIZE + n
                pkts += 1
                total += HDR_SIZE + n
                entry = [chain.head, HDR_SIZE + n, True]
                order.append(entry)
                if not self._rx_rw_fast(chain, hdr, entry):
                    pkt = self._alloc_pkt(chain, hdr)
                    self._tap(pkt)                  # monitors see every packet received
                    self._route(pkt)
                # vhost_exceeds_weight: give the worker to others, continue later
                if pkts >= VHOST_VSOCK_PKT_WEIGHT or total >= VHOST_VSOCK_WEIGHT:
                    stats["tx_requeued"] += 1
                    self._requeue_tx()
                    break
        except GUEST_ERRORS as e:
            self.vq_err(vq, e)
        finally:
            # The good chains popped before a bad one still go back (vhost_add_used, chain by
            # chain): a driver waiting for them must not wait for ever.
            self._used_in_order(vq, mem)
            if self.log_all:
                self.log_ring(vq)           # the notify writes (used.flags, avail_event)

    def _requeue_tx(self) -> None:
        """The rest of the tx ring, after the weight: the worker's queued work (vhost_poll_queue),
        unless a program thread serves the tx ring (run to completion, shared/engine.py). That
        thread loops back to the ring on its own, so waking the worker would only hand the ring
        to a second thread; a timer (TX_MORE_DELAY) takes over if it leaves and does not come
        back. (Our addition: vhost has no caller that serves a ring.)"""
        t = self.kick_threads.get(VSOCK_VQ_TX)
        if t is None or t.lead_owner != threading.get_ident() or self.worker is None:
            self._queue_work(self.handle_tx_work)
        elif self._tx_more is None:
            self._tx_more = self.worker.call_later(TX_MORE_DELAY, self._tx_more_due)

    def _tx_more_due(self) -> None:
        self._tx_more = None
        self.handle_tx_work()

    def _used_in_order(self, vq, mem) -> None:
        """Return the chains done so far, in the order they were popped: a lent chain holds the
        ones after it back until its reader is done, so used.idx always says "everything before
        me is done" (a driver that reconnects resumes at used.idx, as vhost-user does without
        inflight tracking)."""
        order = self.tx_order
        if not order or not order[0][2]:
            return
        used = []
        while order and order[0][2]:
            head, length, _ = order.popleft()
            used.append((head, length))
        try:
            vq.add_used_n(mem, used)
            if self.log_all:
                self.log_ring(vq)
            self.notify(vq)
        except GUEST_ERRORS as e:
            self.vq_err(vq, e)

    # --- the RW fast path (both directions) ------------------------------------------------------
    def _rx_rw_fast(self, chain, hdr, entry) -> bool:
        """A guest RW packet for an ESTABLISHED host socket goes straight to the core's rx_rw,
        its payload lent (`entry`, the chain's place in tx_order, is done only when it is read)
        or copied once. False: the ordinary path (a Packet through _route) must take it."""
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, _flags, buf_alloc, fwd_cnt) = hdr
        if (op != VIRTIO_VSOCK_OP_RW or type_ != VIRTIO_VSOCK_TYPE_STREAM or self.capture is not None
                or src_cid != self.guest_cid or dst_cid != VMADDR_CID_HOST):
            return False
        core = self.core
        sk = core.connected.get((dst_port, src_cid, src_port))
        if sk is None or sk.state is not SockState.ESTABLISHED:
            return False
        out = chain.out
        if not length:
            payload = b""
        elif (self.lend and length >= LEND_MIN and len(out) == 2 and out[0].nbytes == HDR_SIZE
              and out[1].nbytes >= length and self.loans < self.vqs[VSOCK_VQ_TX].num // 2
              and not sk.released):
            payload = Loan(out[1][:length], partial(self._loan_done, entry, self.loan_gen))
            entry[2] = False
            self.loans += 1
        else:
            payload = self._payload(chain, length)
        self.last_rx_sk = sk
        core.rx_rw(sk, buf_alloc, fwd_cnt, payload)
        return True

    def expected_burst(self, qidx: int) -> int:
        """The tx queue: the packets the guest may still send on the connection it sent on last,
        when that is a bulk stream (VsockCore.rx_burst: within its credit, at most BURST_MAX)."""
        sk = self.last_rx_sk
        if (qidx != VSOCK_VQ_TX or sk is None or sk.released
                or sk.state is not SockState.ESTABLISHED):
            return 1
        return self.core.rx_burst(sk)

    def _loan_done(self, entry: list, gen: int) -> None:
        """A lent tx chain was read (or dropped): it goes back to the used ring, with the chains
        popped after it that were waiting for it."""
        if gen != self.loan_gen:
            return                  # the rings it came from are gone
        self.loans -= 1
        entry[2] = True
        self.batch.defer(self._tx_used_flush)   # loans released in one batch: one add_used_n

    def _tx_used_flush(self) -> None:
        if self._ready():
            self._used_in_order(self.vqs[VSOCK_VQ_TX], self.mem)

    def send_rw(self, sk, payload) -> bool:
        """The host core's fast path for one RW packet (VsockCore.send_rw): straight into the
        guest's next rx buffer when nothing waits before it and the payload fits that buffer
        (the seeds' do_send_pkt for one packet: header packed in place, payload copied once).
        False: the ordinary path (send_pkt) must take it."""
        if self.send_pkt_list:
            return self._cork(sk, payload, sk.buf_alloc, sk.fwd_cnt)
        if self.capture is not None or sk.remote_cid != self.guest_cid or not self._ready():
            return False
        vq, mem = self.vqs[VSOCK_VQ_RX], self.mem
        if not self.mem_ok(vq):
            return True              # NEEDS_RESET now: the packet goes with the device
        n = len(payload)
        try:
            chain = self._in_chain(vq, mem)
            if chain is None:
                return False         # no rx buffer: queued, and rx notifications re-armed
            if chain.in_len - HDR_SIZE < n:
                vq.discard_vq_desc(1)
                return False         # the ordinary path splits it over several buffers
            iov = chain.in_
            if n:
                if len(iov) == 2 and iov[0].nbytes == HDR_SIZE:
                    iov[1][:n] = payload
                else:
                    iov_write(iov, HDR_SIZE, payload)
            self._rw_used(vq, mem, chain, sk, n)
        except GUEST_ERRORS as e:
            self.vq_err(vq, e)
            return True
        self._rw_sent(n)
        return True

    @staticmethod
    def _in_chain(vq, mem):
        """The next chain of a queue the device only writes (rx, event), or None when it is
        empty: it must hold device-writable buffers only (ring rule 14, "Expected 0 output
        buffers" in vhost_transport_do_send_pkt)."""
        chain = vq.get_vq_desc(mem)
        if chain is not None and chain.out:
            raise VringError(14, f"Expected 0 output buffers, got {len(chain.out)}")
        return chain

    def _rw_used(self, vq, mem, chain, sk, n: int) -> None:
        """An RW packet of n payload bytes is in the rx chain: its header (the credit fields as
        of now) packed in place, the chain used, and both logged for migration."""
        iov = chain.in_
        first = iov[0]
        fields = (VMADDR_CID_HOST, sk.remote_cid, sk.local_port, sk.remote_port, n,
                  VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 0, sk.buf_alloc, sk.fwd_cnt)
        if first.nbytes >= HDR_SIZE:
            HDR.pack_into(first, 0, *fields)
        else:
            iov_write(iov, 0, HDR.pack(*fields))
        vq.add_used(mem, chain.head, HDR_SIZE + n)
        if self.log_all:
            self.log_iov(chain, HDR_SIZE + n)
            self.log_ring(vq)

    def _rw_sent(self, n: int) -> None:
        stats = self.stats
        stats["rx_packets"] += 1
        stats["rx_bytes"] += n
        stats["bytes_out"] += HDR_SIZE + n
        self.batch.defer(self._notify_rx)

    def fill_rw(self, sk, readinto, limit: int) -> int | None:
        """send_rw for a producer that reads its payload from a source (the bridge's Unix
        socket): the guest's next rx buffer is filled straight from the source, as vhost-net's
        handle_rx receives into the guest's iovec: `readinto(buffers)` reads at most `limit`
        bytes into views of the chain's payload area and returns the count, then the header is
        packed with that length, the chain used and the notify deferred. The caller accounts the
        bytes (VsockCore.rw_filled) and never asks for more than the socket's credit. Returns
        the bytes filled (0: the source had none, and the buffer goes back to the ring), or None
        when this path cannot take it (a packet queued before it, no rx buffer, capture on, a
        broken device): the caller takes the ordinary path. What readinto raises (EAGAIN, a
        reset) is raised after the buffer went back."""
        if (self.send_pkt_list or self.capture is not None or sk.remote_cid != self.guest_cid
                or not self._ready() or limit <= 0):
            return None
        vq, mem = self.vqs[VSOCK_VQ_RX], self.mem
        if not self.mem_ok(vq):
            return None
        try:
            chain = self._in_chain(vq, mem)
            if chain is None:
                return None          # no rx buffer: the ordinary path queues and re-arms
            room = chain.in_len - HDR_SIZE
            if room <= 0:
                raise VringError(14, f"Buffer len [{chain.in_len}] too small")
            bufs = iov_views(chain.in_, HDR_SIZE, min(room, limit))   # the payload area
            try:
                n = readinto(bufs)
            except BaseException:
                vq.discard_vq_desc(1)
                raise
            if not n:
                vq.discard_vq_desc(1)
                return 0
            self._rw_used(vq, mem, chain, sk, n)
        except GUEST_ERRORS as e:
            self.vq_err(vq, e)
            return None
        self._rw_sent(n)
        return n

    def queue_has_work(self, qidx: int) -> bool:
        """Work for the engine's busy-poll: tx chains (while replies may still be queued), or
        packets waiting with rx buffers posted. The event queue is never polled."""
        if qidx == VSOCK_VQ_TX:
            return self.more_replies() and not self.vqs[qidx].avail_empty(self.mem)
        if qidx == VSOCK_VQ_RX:
            return bool(self.send_pkt_list) and not self.vqs[qidx].avail_empty(self.mem)
        return False

    def _read_hdr(self, chain) -> tuple:
        """vhost_vsock_alloc_pkt's checks (ring rule 14): the header's fields, copied out of guest
        memory once (unpack_from makes ints: the guest cannot change them afterwards), with len
        zeroed for a non-STREAM packet and checked against the chain and the 64 KiB limit."""
        if chain.in_:
            raise VringError(14, f"Expected 0 input buffers, got {len(chain.in_)}")
        if chain.out_len < HDR_SIZE:
            raise VringError(14, f"vsock tx chain holds {chain.out_len} bytes, "
                                 f"less than the {HDR_SIZE}-byte header")
        out = chain.out
        first = out[0]
        hdr = (HDR.unpack_from(first, 0) if first.nbytes >= HDR_SIZE
               else HDR.unpack(iov_read(out, 0, HDR_SIZE)))
        length = hdr[4]
        if hdr[5] != VIRTIO_VSOCK_TYPE_STREAM:
            length = 0                              # only STREAM packets carry a payload here
            hdr = hdr[:4] + (0,) + hdr[5:]
        if length > VIRTIO_VSOCK_MAX_PKT_BUF_SIZE:
            raise VringError(14, f"vsock packet len {length} exceeds "
                                 f"{VIRTIO_VSOCK_MAX_PKT_BUF_SIZE} bytes")
        if length > chain.out_len - HDR_SIZE:
            raise VringError(14, f"vsock packet len {length} but the chain holds only "
                                 f"{chain.out_len - HDR_SIZE} payload bytes")
        return hdr

    @staticmethod
    def _payload(chain, length: int) -> bytes:
        """The payload, copied out of guest memory once."""
        if not length:
            return b""
        out = chain.out
        if out[0].nbytes == HDR_SIZE and out[1].nbytes >= length:
            return bytes(out[1][:length])           # the seeds' layout: the one copy
        return iov_read(out, HDR_SIZE, length)

    def _alloc_pkt(self, chain, hdr: tuple | None = None) -> Packet:
        """vhost_vsock_alloc_pkt: a Packet of the chain (header checked and copied once)."""
        if hdr is None:
            hdr = self._read_hdr(chain)
        return Packet(*hdr[:4], hdr[5], hdr[6], hdr[7], hdr[8], hdr[9],
                      self._payload(chain, hdr[4]))

    def _route(self, pkt: Packet) -> None:
        if pkt.src_cid != self.guest_cid:
            # Only the guest's own CID may appear as the source (vhost_vsock_handle_tx_kick).
            self.stats["dropped"] += 1
            log.debug("%s: dropped %r: src_cid is not the guest's %d", self.name, pkt, self.guest_cid)
            return
        if pkt.dst_cid == VMADDR_CID_HOST:
            self.core.recv_pkt(pkt)
            return
        # No route to another CID from this device: answer RST, never an RST to an RST.
        self.stats["rst_unroutable"] += 1
        if pkt.op != VIRTIO_VSOCK_OP_RST:
            self.send_pkt(Packet(pkt.dst_cid, pkt.src_cid, pkt.dst_port, pkt.src_port, pkt.type,
                                 VIRTIO_VSOCK_OP_RST, 0, 0, 0, b"", True))

    # --- host -> guest --------------------------------------------------------------------------
    def cancel_pkt(self, sk) -> int:
        """vhost_transport_cancel_pkt: drop a socket's packets not yet (even partly) in rx
        buffers; returns how many. Replies given back may let tx resume."""
        self.send_pkt_list, removed, replies = cancel_queued(
            self.send_pkt_list, sk, lambda e, sk: e[0] if e[0].owner is sk and not e[1] else None)
        if replies:
            before = self.queued_replies
            self.queued_replies -= replies
            if replies_resume(before, self.queued_replies, self.vqs[VSOCK_VQ_TX].num):
                self._queue_work(self.handle_tx_work)
        return removed

    def send_pkt(self, pkt: Packet) -> int:
        """vhost_transport_send_pkt: the host core's transmit callback; returns the payload length.

        The payload may be a view of the sender's buffer, valid only during this call. With
        nothing queued before it and an rx buffer posted, the packet is written straight into
        the guest's buffer (one copy); otherwise it is copied onto send_pkt_list, where a small
        RW packet joins the one before it of the same socket (autocork)."""
        if pkt.dst_cid != self.guest_cid:
            log.debug("%s: no guest with CID %d for %r", self.name, pkt.dst_cid, pkt)
            return -errno.ENODEV
        if not self.running:
            return -errno.ENODEV
        n = pkt.len
        if pkt.reply:
            self.queued_replies += 1
        if not self.send_pkt_list and self._ready():
            self.send_pkt_list.append([pkt, 0])
            with self.lock:
                self._do_send_pkt()
            if not self.send_pkt_list:
                return n
            entry = self.send_pkt_list.pop()        # not sent (whole or in part): keep a copy
            if entry[0] is not pkt:
                self.send_pkt_list.append(entry)
                return n
            pkt, off = entry
            if off:
                pkt = dataclasses.replace(pkt, payload=pkt.payload[off:])
                entry = [pkt, 0]
            self._own(pkt)
            self.send_pkt_list.append(entry)
            return n
        if (pkt.op == VIRTIO_VSOCK_OP_RW and pkt.owner is not None
                and self._cork(pkt.owner, pkt.payload, pkt.buf_alloc, pkt.fwd_cnt)):
            return n
        self._own(pkt)
        self.send_pkt_list.append([pkt, 0])
        self._queue_work(self.do_send_pkt)
        return n

    def _cork(self, sk, payload, buf_alloc: int, fwd_cnt: int) -> bool:
        """Autocork (shared/vsock/packet.py cork) onto the tail of send_pkt_list, unless that
        packet is already partly in rx buffers."""
        lst = self.send_pkt_list
        if not lst or lst[-1][1] or not cork(lst[-1][0], sk, payload, buf_alloc, fwd_cnt):
            return False
        self.stats["rx_coalesced"] += 1
        return True

    @staticmethod
    def _own(pkt: Packet) -> None:
        """Copy a queued packet's payload out of the sender's buffer (RW: open for coalescing)."""
        if pkt.op == VIRTIO_VSOCK_OP_RW:
            if type(pkt.payload) is not bytearray:
                pkt.payload = bytearray(pkt.payload)
        elif type(pkt.payload) is not bytes:
            pkt.payload = bytes(pkt.payload)

    def do_send_pkt(self) -> None:
        """vhost_transport_do_send_pkt: fill the guest's rx buffers from send_pkt_list."""
        with self.lock:
            self._do_send_pkt()

    def _do_send_pkt(self) -> None:
        if not self._ready():
            return
        vq, mem = self.vqs[VSOCK_VQ_RX], self.mem
        if not self.mem_ok(vq):          # a guest that shrank its RAM: NEEDS_RESET, not SIGBUS
            return
        tx_num = self.vqs[VSOCK_VQ_TX].num
        used: list[tuple[int, int]] = []
        restart_tx = False
        pkts = total = 0
        lst = self.send_pkt_list
        stats = self.stats
        try:
            vq.disable_notify(mem)
            while lst:
                entry = lst[0]
                pkt, off = entry
                chain = self._in_chain(vq, mem)
                if chain is None:
                    # No buffer: wait for the rx kick, unless buffers raced in meanwhile.
                    if vq.enable_notify(mem):
                        vq.disable_notify(mem)
                        continue
                    break
                plen = pkt.len
                remaining = plen - off
                room = chain.in_len - HDR_SIZE
                if room < 0 or (remaining and not room):
                    raise VringError(14, f"Buffer len [{chain.in_len}] too small")
                n = min(room, remaining)
                iov = chain.in_
                first = iov[0]
                hdr = (pkt.src_cid, pkt.dst_cid, pkt.src_port, pkt.dst_port, n, pkt.type,
                       pkt.op, pkt.flags, pkt.buf_alloc, pkt.fwd_cnt)
                if first.nbytes >= HDR_SIZE:
                    HDR.pack_into(first, 0, *hdr)      # the header, packed in place
                else:
                    iov_write(iov, 0, HDR.pack(*hdr))
                if n:
                    payload = pkt.payload
                    piece = payload[off:off + n] if (off or n < remaining) else payload
                    if len(iov) == 2 and first.nbytes == HDR_SIZE:
                        iov[1][:n] = piece             # the seeds' layout: one copy, no helper
                    else:
                        iov_write(iov, HDR_SIZE, piece)
                else:
                    piece = b""
                used.append((chain.head, HDR_SIZE + n))
                if self.log_all:
                    self.log_iov(chain, HDR_SIZE + n)
                off += n
                stats["rx_packets"] += 1
                stats["rx_bytes"] += n
                stats["bytes_out"] += HDR_SIZE + n
                if self.capture is not None:
                    self._tap(pkt if n == plen else dataclasses.replace(pkt, payload=bytes(piece)))
                if off < plen:
                    entry[1] = off                     # the rest goes out as its own packet
                else:
                    lst.popleft()
                    if pkt.reply:
                        self.queued_replies -= 1
                        if replies_resume(self.queued_replies + 1, self.queued_replies, tx_num):
                            restart_tx = True
                pkts += 1
                total += HDR_SIZE + n
                if pkts >= VHOST_VSOCK_PKT_WEIGHT or total >= VHOST_VSOCK_WEIGHT:
                    self._queue_work(self.do_send_pkt)
                    break
        except GUEST_ERRORS as e:
            self.vq_err(vq, e)
        finally:
            if used:                 # filled before a bad chain: still the guest's (add_used)
                try:
                    vq.add_used_n(mem, used)
                    self.batch.defer(self._notify_rx)
                except GUEST_ERRORS as e:
                    self.vq_err(vq, e)
            if self.log_all:
                self.log_ring(vq)
        if restart_tx and not self.broken:
            self._queue_work(self.handle_tx_work)

    # --- event queue ----------------------------------------------------------------------------
    def send_transport_reset(self) -> bool:
        """Post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: the guest resets its connected sockets.

        Returns False when no event buffer is posted yet (the event waits for the next event kick)
        or the device cannot work.
        """
        with self.lock:
            if not self._ready():
                self.reset_pending = True
                return False
            vq, mem = self.vqs[VSOCK_VQ_EVENT], self.mem
            try:
                chain = self._in_chain(vq, mem)
                if chain is None:
                    self.reset_pending = True
                    return False
                if chain.in_len < VSOCK_EVENT.size:
                    raise VringError(14, f"event buffer of {chain.in_len} bytes cannot hold "
                                         f"struct virtio_vsock_event")
                iov_write(chain.in_, 0, VSOCK_EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                vq.add_used(mem, chain.head, VSOCK_EVENT.size)
                if self.log_all:
                    self.log_iov(chain, VSOCK_EVENT.size)
                    self.log_ring(vq)
            except GUEST_ERRORS as e:
                self.vq_err(vq, e)
                return False
            self.reset_pending = False
            self.stats["resets_sent"] += 1
            self.notify(vq)
            return True
