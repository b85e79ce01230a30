"""vhost-net: one guest's virtio-net device on the host (Linux drivers/vhost/net.c, seed 004).

Theory of operation
-------------------
Two rings (rx 0, tx 1), each with its own backend (`set_backend(index, backend)`, the seed's
VHOST_NET_SET_BACKEND; usually the same object for both). A backend is pure non-blocking I/O:

    send(frame) -> bool     one Ethernet frame out; False = would block (sndbuf full, -EAGAIN)
    recv() -> bytes | None  the next frame in, None when nothing is queued
    writable() -> bool      the send buffer drained below half (the seed's wmem < sndbuf / 2)
    send_queue() -> (wmem, sndbuf) | None   optional: bytes queued to send and the buffer size
    vnet_hdr: bool          the backend carries the virtio_net_hdr itself (tap IFF_VNET_HDR); who
                            adds and strips the header is the feature bit's choice, not this one's
                            (the VMM acks VHOST_NET_F_VIRTIO_NET_HDR only for a backend without it)

handle_tx (the seed's handle_tx): with kicks disabled, pop chains; a chain with device-writable
buffers is vq_err; vhost_hlen bytes of header are skipped (VHOST_NET_F_VIRTIO_NET_HDR acked: the
header is vhost's to strip; clear: it goes to the backend as is, sock_hlen) and a chain with nothing
after them is vq_err ("Unexpected header len for TX"), the only length the seed refuses. Anything
else is passed on: VLAN and jumbo frames, header flags (the seed ignores the stripped header). The
backend may refuse a frame it cannot carry (send raises EINVAL / EMSGSIZE): counted (tx_refused,
tx_dropped) and the chain completed, as modern vhost does for errors other than -EAGAIN. Any other
send error keeps the frame: the chain is un-popped (vhost_discard_vq_desc) and tx polling starts,
as for a full backend (send returns False); an error is retried on a timer, a full backend when it
polls writable. The runner then calls `backend_writable()`, which stops the poll (tx_poll_stop)
and requeues handle_tx. When the ring runs dry while the backend's send queue is three quarters
full (`send_queue()` -> (wmem, sndbuf)), tx stops with guest notifications left off and polls
(the seed's sk_wmem_alloc >= sk_sndbuf * 3 / 4 branch): the backend's drain, not a kick, resumes it.
Used entries are written in batches (add_used_n), one interrupt decision per batch.

Weights (vhost_exceeds_weight): after VHOST_NET_WEIGHT bytes, counted as the seed counts them (tx:
the bytes after vhost's header; rx: header + frame), the work requeues itself so one queue cannot
starve the other. `pkt_weight` (VHOST_NET_PKT_WEIGHT frames by default, modern vhost's addition;
0 = none, the seed's) also bounds a pass of small frames; jumbo frames reach the byte weight first.

handle_rx: while the backend has a frame, or one taken from it waits for buffers (`rx_pending`,
kept across a backend swap: it is delivered, or counted in rx_dropped if the device resets first).
A chain with device-readable buffers is vq_err, so is a buffer with no room after vhost's header
(the seed's "Unexpected header len for RX"; with MRG_RXBUF every buffer must hold the 12-byte
header, spec 5.1.6.3.1). Without MRG_RXBUF the frame needs one chain with room for header + frame;
a frame larger than the chain is dropped and counted and the chain un-popped (the seed's
"Discarded truncated rx packet"). With MRG_RXBUF (get_rx_bufs) several chains are taken until the
frame fits and num_buffers says how many. The header is written (flags 0, GSO_NONE), used entries
added, one signal per batch, same weights.

Dirty logging: with VHOST_F_LOG_ALL acked (only with a log, set_log_base: -EFAULT otherwise) every
write into guest RAM, rx buffers and the used ring (elements, idx, flags, avail_event), marks its
page; the used ring is logged at the ring's log address when the frontend gave one
(VHOST_VRING_F_LOG, `log_addr`), else at its guest-physical address.
"""
from __future__ import annotations

import errno
import logging

from host.device import VhostDevice
from host.iov import iov_read, iov_write
from shared.constants import (VHOST_F_LOG_ALL, VHOST_NET_PKT_WEIGHT, VHOST_NET_WEIGHT,
                              VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_ID_NET, bit, has)
from shared.errors import GuestMemoryError, VringError
from shared.net.hdr import (NET_CONFIG, NET_HDR_MRG, NET_VQ_RX, NET_VQ_TX,
                            VHOST_NET_F_VIRTIO_NET_HDR, VIRTIO_NET_F_MAC,
                            VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
                            format_mac, hdr_len, pack_hdr)

log = logging.getLogger(__name__)

# tx_poll_state (the seed's enum)
VHOST_NET_POLL_DISABLED = 0
VHOST_NET_POLL_STARTED = 1
VHOST_NET_POLL_STOPPED = 2
VHOST_NET_BATCH = 64        # used entries written per add_used_n (modern vhost-net)
UIO_MAXIOV = 1024           # bound on chains one mergeable frame may take (get_rx_bufs)
GUEST_ERRORS = (VringError, GuestMemoryError)
RULE_NET = 14               # ring rule 14: the chain's format does not fit the queue
# send errors that mean "this frame cannot be carried" (tun: short frame or bad header -EINVAL;
# datagram / packet sockets: larger than the link -EMSGSIZE): dropped and counted, never retried
TX_REFUSED = frozenset({errno.EINVAL, errno.EMSGSIZE})


class VhostNet(VhostDevice):
    device_type = "net"
    device_id = VIRTIO_ID_NET
    num_queues = 2
    device_features = (bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_STATUS)
                       | bit(VHOST_NET_F_VIRTIO_NET_HDR) | bit(VHOST_F_LOG_ALL))

    def __init__(self, mac: bytes, *, name: str = "", backend=None, backend_name: str = "",
                 pkt_weight: int = VHOST_NET_PKT_WEIGHT, hdr_from_backend: bool = False, **kw):
        if not isinstance(mac, (bytes, bytearray)) or len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        super().__init__(name or f"net-{format_mac(mac)}", **kw)
        self.mac = bytes(mac)
        self.backends = [None, None]        # per queue (vq->private_data)
        self.backend_name = backend_name
        self.vhost_hlen = 0                 # header bytes vhost adds/strips
        self.sock_hlen = 0                  # header bytes the backend carries
        self.guest_hlen = 0
        self.mrg_rxbuf = False
        self.tx_poll_state = VHOST_NET_POLL_DISABLED
        self.tx_poll_error = False          # polling because send failed (retry on a timer)
        self.pkt_weight = pkt_weight        # frames per pass (0: the seed's byte weight only)
        # vhost-user (QEMU's vhost_net_init for a kernel backend): the VMM decides the header from
        # the backend, acking VHOST_NET_F_VIRTIO_NET_HDR exactly when the backend has no vnet_hdr
        self.hdr_from_backend = hdr_from_backend
        self.rx_pending = None              # a frame taken from the backend, waiting for buffers
        self.on_tx_poll = None              # runner hook: tx polling state changed
        self.on_rx_wait = None              # runner hook: rx_wanted() changed from rx_watch
        self.rx_watch = None                # whether the runner watches the rx backend now
        self.backend_opener = None          # runner hook: spec -> backend (SET_BACKEND)
        self.backend_closer = None          # runner hook: close a backend no queue uses
        self.stats.update({"rx_frames": 0, "rx_bytes": 0, "tx_frames": 0, "tx_bytes": 0,
                           "rx_dropped": 0, "tx_dropped": 0, "tx_refused": 0, "tx_errors": 0,
                           "tx_full": 0, "tx_wmem_stop": 0, "tx_requeued": 0,
                           "rx_requeued": 0, "backend_swaps": 0})
        if backend is not None:
            self.set_backend(NET_VQ_RX, backend)
            self.set_backend(NET_VQ_TX, backend)

    # --- description -----------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)

    def set_features(self, features: int) -> None:
        """vhost_net_set_features: choose who handles the header, then the ring features (LOG_ALL:
        host/device.py)."""
        super().set_features(features)
        self.guest_hlen = hdr_len(features)
        self.mrg_rxbuf = has(features, VIRTIO_NET_F_MRG_RXBUF)
        self._choose_hlen()

    def _choose_hlen(self) -> None:
        """vhost_net_set_features: VHOST_NET_F_VIRTIO_NET_HDR acked -> vhost strips and adds the
        header (vhost_hlen); clear -> the backend gets and gives it as is (sock_hlen), whatever
        the backend is. With `hdr_from_backend` (vhost-user, where no VMM acks the bit for us) the
        bit is taken as acked exactly when the backend has no vnet_hdr, QEMU's choice."""
        if self.hdr_from_backend:
            be = self.backends[NET_VQ_TX] or self.backends[NET_VQ_RX]
            strip = not getattr(be, "vnet_hdr", False)
        else:
            strip = has(self.acked_features, VHOST_NET_F_VIRTIO_NET_HDR)
        if strip:
            self.vhost_hlen, self.sock_hlen = self.guest_hlen, 0
        else:
            self.vhost_hlen, self.sock_hlen = 0, self.guest_hlen

    # --- backends (VHOST_NET_SET_BACKEND) -------------------------------------------------------
    def set_backend(self, index: int, backend) -> object:
        """vhost_net_set_backend: swap queue `index`'s backend (None = detach, fd -1).

        Under the device lock: stop polling the old one, install the new one, requeue the queue's
        handler (flush), return the old backend for the caller to close when no queue uses it.
        """
        if index not in (NET_VQ_RX, NET_VQ_TX):
            raise OSError(errno.ENOBUFS, f"no queue {index} (vhost_net_set_backend: -ENOBUFS)")
        with self.lock:
            old = self.backends[index]
            if old is backend:
                return None
            if index == NET_VQ_TX:
                self.tx_poll_stop()
            # rx: a frame already taken from the old backend (rx_pending) stays: it came off the
            # wire for this guest and is delivered with the next buffers (counted if reset first)
            self.backends[index] = backend
            if index == NET_VQ_RX:       # a multi-queue tap: frames are steered to the rx queue's
                for b in (old, backend):
                    if hasattr(b, "steer"):
                        b.steer(b is self.backends[NET_VQ_RX])
            self.stats["backend_swaps"] += 1
            self._choose_hlen()
            if backend is not None and self.running:
                self._queue_work(self.handle_rx if index == NET_VQ_RX else self.handle_tx)
        log.info("%s: queue %d backend %s -> %s", self.name, index, _bname(old), _bname(backend))
        return None if old in self.backends else old

    def reset(self) -> None:
        """Status 0: forget the rings; the backends stay attached (the daemon configured them)."""
        self.tx_poll_state = VHOST_NET_POLL_DISABLED
        self.tx_poll_error = False
        self._clear_rx_pending()
        super().reset()

    def _clear_rx_pending(self) -> None:
        if self.rx_pending is not None:
            self.rx_pending = None
            self.stats["rx_dropped"] += 1       # taken from a backend, no ring left to take it
            self._rx_watch_check()

    # --- when the runner should watch the rx backend ----------------------------------------------
    def rx_wanted(self) -> bool:
        """Would handle_rx take a frame now? Not while one waits for rx buffers (rx_pending), nor
        while the device or its rx ring is not running: then a readable backend fd would only
        make a level-triggered poller spin. The runner watches POLLIN exactly while this holds."""
        return (self.rx_pending is None and self._ready()
                and getattr(self.vqs[NET_VQ_RX], "enabled", True))

    def _rx_watch_check(self) -> None:
        if self.on_rx_wait is not None and self.rx_watch is not None and self.rx_wanted() != self.rx_watch:
            self.on_rx_wait()

    def start(self) -> None:
        super().start()
        self._rx_watch_check()

    def stop(self) -> None:
        super().stop()
        self._rx_watch_check()

    def vq_err(self, vq, exc: BaseException) -> None:
        super().vq_err(vq, exc)
        self._rx_watch_check()

    def reset_owner(self) -> list:
        """vhost_net_reset_owner: stop, detach both backends (vhost_net_stop), reset the device.
        Returns the detached backends for the caller to close (the seed's fput)."""
        with self.lock:
            old = [b for i, b in enumerate(self.backends) if b is not None and b not in self.backends[:i]]
            self.backends = [None, None]
            self.reset()
        return old

    def set_backend_spec(self, index: int, spec: str) -> None:
        """SET_BACKEND from the control plane, vhost_net_set_backend's checks in its order: a queue
        index out of range OSError(ENOBUFS), a ring set up but not accessible OSError(EFAULT)
        (vhost_vq_access_ok), then open `spec` ("" = detach, the seed's fd -1; ValueError: one
        line), swap it in, close the old backend when no queue uses it. A failure changes
        nothing: the device goes on with the backend it had."""
        if self.backend_opener is None:
            raise ValueError("this device cannot open backends")
        if index not in (NET_VQ_RX, NET_VQ_TX):
            raise OSError(errno.ENOBUFS, f"no queue {index} (vhost_net_set_backend: -ENOBUFS)")
        vq = self.vqs[index]
        if vq.num or vq.desc or vq.avail or vq.used:        # a ring not set up at all passes
            if self.mem is None or not vq.access_ok(self.mem):
                raise OSError(errno.EFAULT, f"queue {index}: ring memory is not accessible "
                                            "(vhost_net_set_backend: -EFAULT)")
        # the spec the other queue's backend was opened from: that backend, shared (QEMU gives
        # vhost-net one tap fd for both queues; a second open of a udp port or tap would fail)
        other = self.backends[NET_VQ_TX if index == NET_VQ_RX else NET_VQ_RX]
        if spec and other is not None and getattr(other, "name", None) == spec:
            new = other
        else:
            new = self.backend_opener(spec) if spec else None
        old = self.set_backend(index, new)
        self.backend_name = spec if spec else self.backend_name
        if old is not None:
            self.close_backend(old)

    def close_backend(self, b) -> None:
        try:
            (self.backend_closer or (lambda x: x.close()))(b)
        except OSError:
            log.debug("%s: closing backend failed", self.name, exc_info=True)

    def close(self) -> None:
        """The connection is gone: detach and close the backends (nothing left behind)."""
        for b in self.reset_owner():
            self.close_backend(b)

    def _ready(self) -> bool:
        return (self.running and not self.broken and self.mem is not None
                and not self.status & VIRTIO_CONFIG_S_NEEDS_RESET)

    def handle_kick(self, qidx: int) -> None:
        """handle_tx_kick / handle_rx_kick."""
        if qidx == NET_VQ_TX:
            self.handle_tx()
        elif qidx == NET_VQ_RX:
            self.handle_rx()

    def backend_readable(self) -> None:
        """handle_rx_net: the backend has frames."""
        self._queue_work(self.handle_rx)

    def backend_writable(self) -> None:
        """handle_tx_net: the backend's send buffer drained (POLLOUT)."""
        if self.tx_poll_state == VHOST_NET_POLL_STARTED:
            self.tx_poll_stop()
            self._queue_work(self.handle_tx)

    def tx_poll_start(self, error: bool = False) -> None:
        """tx_poll_start: watch the backend for POLLOUT instead of spinning on a full one (after a
        send error: the runner retries on a timer, POLLOUT of a failing backend says nothing)."""
        if self.tx_poll_state != VHOST_NET_POLL_STARTED:
            self.tx_poll_state = VHOST_NET_POLL_STARTED
            self.tx_poll_error = error
            self.stats["tx_full"] += 1
            if self.on_tx_poll is not None:
                self.on_tx_poll()

    def tx_poll_stop(self) -> None:
        if self.tx_poll_state == VHOST_NET_POLL_STARTED:
            self.tx_poll_state = VHOST_NET_POLL_STOPPED
            self.tx_poll_error = False
            if self.on_tx_poll is not None:
                self.on_tx_poll()

    @property
    def tx_polling(self) -> bool:
        return self.tx_poll_state == VHOST_NET_POLL_STARTED

    def _disable_notify(self, vq, mem) -> None:
        vq.disable_notify(mem)
        if self.log_all:
            self.log_notify(vq)

    def _enable_notify(self, vq, mem) -> bool:
        # seen=True: chains un-popped by discard_vq_desc (a mergeable frame still waiting for
        # buffers) are not new; a kick is asked for past the avail.idx last read
        raced = vq.enable_notify(mem, seen=True)
        if self.log_all:
            self.log_notify(vq)
        return raced

    def _add_used(self, vq, mem, used: list) -> None:
        first = vq.last_used_idx
        vq.add_used_n(mem, used)
        if self.log_all:
            self.log_used(vq, first, len(used))
        self.notify(vq)

    def _return_used(self, vq, mem, used: list) -> None:
        """The chains a batch finished go back even when a bad chain after them broke the device
        (vhost_add_used, chain by chain): the driver must not wait for them for ever."""
        if used:
            try:
                self._add_used(vq, mem, used)
            except GUEST_ERRORS as e:
                self.vq_err(vq, e)

    def _idle(self, vq, mem, used: list) -> bool:
        """handle_tx/handle_rx ran out (no chain, or no rx buffers): publish what was used,
        re-enable notifications and look again (vhost_enable_notify); True if the guest added
        buffers meanwhile: notifications are off again, go on."""
        if used:
            self._add_used(vq, mem, used)
            used.clear()
        if self._enable_notify(vq, mem):
            self._disable_notify(vq, mem)
            return True
        return False

    # --- the data path ----------------------------------------------------------------------------
    def handle_tx(self) -> None:
        """The seed's handle_tx: guest tx ring -> backend. A guest error becomes vq_err."""
        try:
            self._handle_tx()
        except GUEST_ERRORS as e:
            self.vq_err(self.vqs[NET_VQ_TX], e)

    def handle_rx(self) -> None:
        """The seed's handle_rx: backend -> guest rx ring. A guest error becomes vq_err."""
        try:
            self._handle_rx()
        except GUEST_ERRORS as e:
            self.vq_err(self.vqs[NET_VQ_RX], e)
        finally:
            self._rx_watch_check()          # the runner stops / resumes watching the backend

    def _handle_tx(self) -> None:
        with self.lock:
            sock = self.backends[NET_VQ_TX]
            vq = self.vqs[NET_VQ_TX]
            if sock is None or not self._ready() or not vq.enabled:
                return                          # (vhost-user: a ring not started yet)
            mem = self.mem
            if self.tx_poll_state == VHOST_NET_POLL_STARTED:
                if not sock.writable():
                    return                      # still full: wait for POLLOUT
                self.tx_poll_stop()
            hlen = self.vhost_hlen
            total = pkts = 0
            used: list[tuple[int, int]] = []
            self._disable_notify(vq, mem)
            try:
                while True:
                    chain = vq.get_vq_desc(mem)
                    if chain is None:
                        if _wmem_high(sock):
                            # the seed: sk_wmem_alloc >= sk_sndbuf * 3 / 4 -> tx_poll_start and
                            # stop with guest notifications left off: the drain resumes us
                            self.stats["tx_wmem_stop"] += 1
                            self.tx_poll_start()
                            break
                        if self._idle(vq, mem, used):
                            continue
                        break
                    if chain.in_:
                        # handle_tx: "Unexpected descriptor format for TX"
                        raise VringError(RULE_NET, f"Unexpected descriptor format for TX: out "
                                         f"{len(chain.out)}, int {len(chain.in_)}")
                    ln = chain.out_len - hlen
                    if ln <= 0:
                        # handle_tx's one length check: nothing after vhost's header
                        raise VringError(RULE_NET, f"Unexpected header len for TX: {chain.out_len}"
                                         f" expected more than {hlen}")
                    frame = iov_read(chain.out, hlen, ln)     # the one copy out of guest RAM
                    try:
                        ok = sock.send(frame)
                    except OSError as e:
                        if e.errno not in TX_REFUSED:
                            # the seed: vhost_discard_vq_desc + tx_poll_start, retried later
                            log.debug("%s: tx send failed: %s (frame kept)", self.name, e)
                            self.stats["tx_errors"] += 1
                            vq.discard_vq_desc(1)
                            self.tx_poll_start(error=True)
                            break
                        # a frame the backend cannot carry: counted, its chain completed
                        log.debug("%s: backend refused a %d-byte frame: %s", self.name, ln, e)
                        self.stats["tx_refused"] += 1
                        self.stats["tx_dropped"] += 1
                    else:
                        if not ok:
                            vq.discard_vq_desc(1)             # vhost_discard_vq_desc
                            self.tx_poll_start()
                            break
                        self.stats["tx_frames"] += 1
                        self.stats["tx_bytes"] += ln
                    self.stats["bytes_in"] += chain.out_len
                    used.append((chain.head, 0))
                    if len(used) >= VHOST_NET_BATCH:
                        self._add_used(vq, mem, used)
                        used = []
                    total += ln                               # the seed's total_len += len
                    pkts += 1
                    if self._exceeds_weight(total, pkts):
                        self.stats["tx_requeued"] += 1
                        self._queue_work(self.handle_tx)
                        break
            finally:
                self._return_used(vq, mem, used)

    def _exceeds_weight(self, total: int, pkts: int) -> bool:
        """vhost_exceeds_weight: the seed's byte weight, and the packet weight if one is set."""
        return total >= VHOST_NET_WEIGHT or (self.pkt_weight > 0 and pkts >= self.pkt_weight)

    def _handle_rx(self) -> None:
        with self.lock:
            sock = self.backends[NET_VQ_RX]
            vq = self.vqs[NET_VQ_RX]
            if (sock is None and self.rx_pending is None) or not self._ready() or not vq.enabled:
                return
            mem = self.mem
            total = pkts = 0
            hlen = self.vhost_hlen
            used: list[tuple[int, int]] = []
            self._disable_notify(vq, mem)
            try:
                while True:
                    frame = self.rx_pending
                    if frame is None:
                        if sock is None:
                            break                   # the held frame went; no backend to read
                        try:
                            frame = sock.recv()
                        except OSError as e:        # the backend's trouble, not the guest's
                            log.debug("%s: rx recv failed: %s", self.name, e)
                            self.stats["rx_dropped"] += 1
                            break
                        if frame is None:
                            break                   # sk_receive_queue empty
                        if len(frame) < self.sock_hlen:
                            self.stats["rx_dropped"] += 1      # no room for the backend's header
                            continue
                        self.rx_pending = frame
                    need = hlen + len(frame)
                    heads = self._get_rx_bufs(vq, mem, need)
                    if heads is None:               # no buffers: wait for the guest's rx kick
                        if self._idle(vq, mem, used):
                            continue
                        break
                    self.rx_pending = None
                    if heads == "truncated":
                        self.stats["rx_dropped"] += 1          # "Discarded truncated rx packet"
                        continue
                    if hlen:
                        data = pack_hdr(hlen, len(heads)) + frame
                    elif self.sock_hlen == NET_HDR_MRG.size:
                        # the backend's own header: vhost still owns num_buffers (handle_rx)
                        data = bytearray(frame)
                        data[10:12] = len(heads).to_bytes(2, "little")
                    else:
                        data = frame
                    left = len(data)
                    off = 0
                    for chain in heads:
                        n = min(chain.in_len, left)
                        iov_write(chain.in_, 0, memoryview(data)[off:off + n])
                        if self.log_all:
                            self.dirty_log.log_iov(chain.in_addrs, n)
                        used.append((chain.head, n))
                        off += n
                        left -= n
                    self.stats["rx_frames"] += 1
                    self.stats["rx_bytes"] += len(frame)
                    self.stats["bytes_out"] += len(data)
                    if len(used) >= VHOST_NET_BATCH:
                        self._add_used(vq, mem, used)
                        used = []
                    total += len(data)                  # the seed: len += hdr_size; total_len += len
                    pkts += 1
                    if self._exceeds_weight(total, pkts):
                        self.stats["rx_requeued"] += 1
                        self._queue_work(self.handle_rx)
                        break
            finally:
                self._return_used(vq, mem, used)

    def _get_rx_bufs(self, vq, mem, need: int):
        """get_rx_bufs: chains enough for `need` bytes (one without MRG_RXBUF); None when the ring
        ran dry (chains un-popped), "truncated" when the frame cannot fit (chains un-popped).
        A buffer with no room after vhost's header is a ring error (the seed's "Unexpected header
        len for RX"); with MRG_RXBUF every buffer must hold the whole header (spec 5.1.6.3.1)."""
        heads = []
        have = 0
        while have < need:
            chain = vq.get_vq_desc(mem)
            if chain is None:
                vq.discard_vq_desc(len(heads))
                return None
            if chain.out:
                # handle_rx: "Unexpected descriptor format for RX"
                raise VringError(RULE_NET, f"Unexpected descriptor format for RX: out "
                                 f"{len(chain.out)}, in {len(chain.in_)}")
            if self.mrg_rxbuf and chain.in_len < self.guest_hlen:
                raise VringError(RULE_NET, f"Unexpected header len for RX: buffer {chain.in_len} "
                                 f"< header {self.guest_hlen} (MRG_RXBUF)")
            if not self.mrg_rxbuf and chain.in_len <= self.vhost_hlen:
                raise VringError(RULE_NET, f"Unexpected header len for RX: buffer {chain.in_len}"
                                 f", header {self.vhost_hlen}")
            heads.append(chain)
            have += chain.in_len
            if not self.mrg_rxbuf or len(heads) >= min(UIO_MAXIOV, vq.num):
                break
        if have < need:
            vq.discard_vq_desc(len(heads))
            return "truncated"
        return heads

    def get_stats(self) -> dict:
        out = super().get_stats()
        out.update(backend=self.backend_name or _bname(self.backends[NET_VQ_TX]),
                   mac=format_mac(self.mac), tx_polling=self.tx_polling,
                   drops=self.stats["rx_dropped"] + self.stats["tx_dropped"],
                   # the monitor's names (docs/monitor.md): tx = guest -> host, rx = host -> guest
                   tx_packets=self.stats["tx_frames"], rx_packets=self.stats["rx_frames"])
        return out


def _wmem_high(sock) -> bool:
    """The seed's wmem >= sndbuf * 3 / 4, for a backend that reports its send queue."""
    q = getattr(sock, "send_queue", None)
    if q is None:
        return False
    try:
        got = q()
    except OSError:
        return False
    if not got:
        return False
    wmem, sndbuf = got
    return sndbuf > 0 and wmem * 4 >= sndbuf * 3


def _bname(b) -> str:
    return "none" if b is None else getattr(b, "name", type(b).__name__)
