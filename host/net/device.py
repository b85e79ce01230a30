"""vhost-net: one guest's virtio-net device on the host (Linux drivers/vhost/net.c, seed 004).

Theory of operation
-------------------
Two rings (rx 0, tx 1), each with its own backend (`set_backend(index, backend)`, the seed's
VHOST_NET_SET_BACKEND; usually the same object for both). A backend is pure non-blocking I/O:

    send(frame) -> bool     one Ethernet frame out; False = would block (sndbuf full, -EAGAIN)
    recv() -> bytes | None  the next frame in, None when nothing is queued
    writable() -> bool      the send buffer drained below half (the seed's wmem < sndbuf / 2)
    vnet_hdr: bool          the backend carries the virtio_net_hdr itself (tap IFF_VNET_HDR)

handle_tx (the seed's handle_tx): with kicks disabled, pop chains; a chain with device-writable
buffers is vq_err; the header (vhost_hlen bytes, stripped by us when VHOST_NET_F_VIRTIO_NET_HDR is
acked, else passed to the backend) is copied out once and checked (no offload was offered, so
flags and gso_type must be 0); an empty frame is vq_err. The frame goes to backend.send; when the
backend is full the chain is un-popped (discard_vq_desc) and tx polling starts (tx_poll_start):
the runner watches the backend for writability and calls `backend_writable()`, which stops the
poll (tx_poll_stop) and requeues handle_tx. Used entries are written in batches (add_used_n) and
one interrupt decision is made per batch. After VHOST_NET_WEIGHT bytes or VHOST_NET_PKT_WEIGHT
frames the work requeues itself (vhost_exceeds_weight) so one queue cannot starve the others.

handle_rx: only while the backend has a frame (held in `rx_pending` until buffers arrive). A
chain with device-readable buffers is vq_err. Without MRG_RXBUF the frame needs one chain with room
for header + frame; a frame larger than the chain is dropped and counted and the chain un-popped
(the seed's "Discarded truncated rx packet"). With MRG_RXBUF (get_rx_bufs) several chains are
taken until the frame fits and num_buffers says how many. The header is written (flags 0,
GSO_NONE), used entries added, one signal per batch, same weights.

Dirty logging: with VHOST_F_LOG_ALL acked (only with a log, set_log_base) every write into guest
RAM, rx buffers and the used ring (elements, idx, flags, avail_event), marks its page.
"""
from __future__ import annotations

import logging

from host.device import VhostDevice
from host.dirty_log import DirtyLog
from host.iov import iov_read, iov_write
from shared.constants import (VHOST_F_LOG_ALL, VHOST_NET_PKT_WEIGHT, VHOST_NET_WEIGHT,
                              VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_ID_NET, bit, has)
from shared.errors import GuestMemoryError, VringError
from shared.net.hdr import (ETH_MAX_FRAME, ETH_MIN_FRAME, NET_CONFIG, NET_HDR, NET_HDR_MRG, NET_VQ_RX,
                            NET_VQ_TX, VHOST_NET_F_VIRTIO_NET_HDR, VIRTIO_NET_F_MAC,
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


class VhostNet(VhostDevice):
    device_type = "net"
    device_id = VIRTIO_ID_NET
    num_queues = 2
    device_features = (bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_STATUS)
                       | bit(VHOST_NET_F_VIRTIO_NET_HDR) | bit(VHOST_F_LOG_ALL))

    def __init__(self, mac: bytes, *, name: str = "", backend=None, backend_name: str = "", **kw):
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
        self.rx_pending = None              # a frame taken from the backend, waiting for buffers
        self.dirty_log: DirtyLog | None = None
        self.log_all = False
        self.on_tx_poll = None              # runner hook: tx polling state changed
        self.on_rx_wait = None              # runner hook: rx_wanted() changed from rx_watch
        self.rx_watch = None                # whether the runner watches the rx backend now
        self.backend_opener = None          # runner hook: spec -> backend (SET_BACKEND)
        self.backend_closer = None          # runner hook: close a backend no queue uses
        self.stats.update({"rx_frames": 0, "rx_bytes": 0, "tx_frames": 0, "tx_bytes": 0,
                           "rx_dropped": 0, "tx_dropped": 0, "tx_full": 0, "tx_requeued": 0,
                           "rx_requeued": 0, "backend_swaps": 0})
        if backend is not None:
            self.set_backend(NET_VQ_RX, backend)
            self.set_backend(NET_VQ_TX, backend)

    # --- description -----------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)

    def features_ok(self, features: int) -> bool:
        if has(features, VHOST_F_LOG_ALL) and self.dirty_log is None:
            return False        # vhost_net_set_features: LOG_ALL without a usable log (-EFAULT)
        return super().features_ok(features)

    def set_features(self, features: int) -> None:
        """vhost_net_set_features: choose who handles the header, then the ring features."""
        if has(features, VHOST_F_LOG_ALL) and self.dirty_log is None:
            raise ValueError("VHOST_F_LOG_ALL needs a dirty log (SET_LOG_BASE first)")
        super().set_features(features)
        self.guest_hlen = hdr_len(features)
        self.mrg_rxbuf = has(features, VIRTIO_NET_F_MRG_RXBUF)
        self.log_all = has(features, VHOST_F_LOG_ALL)
        self._choose_hlen()

    def _choose_hlen(self) -> None:
        # The seed: hdr_size = VHOST_NET_F_VIRTIO_NET_HDR ? sizeof(hdr) : 0, a choice its VMM makes
        # from the tap's abilities. Here the device makes it per backend: a backend that carries
        # the header (a tap with IFF_VNET_HDR) gets it passed through, every other one stripped.
        be = self.backends[NET_VQ_TX] or self.backends[NET_VQ_RX]
        if not getattr(be, "vnet_hdr", False):
            self.vhost_hlen, self.sock_hlen = self.guest_hlen, 0
        else:
            self.vhost_hlen, self.sock_hlen = 0, self.guest_hlen

    def set_log_base(self, bitmap) -> None:
        """SET_LOG_BASE: the bitmap every write is logged into (None drops it, LOG_ALL then off)."""
        with self.lock:
            if self.dirty_log is not None:
                self.dirty_log.release()
            self.dirty_log = DirtyLog(bitmap) if bitmap is not None else None
            if self.dirty_log is None:
                self.log_all = False

    # --- backends (VHOST_NET_SET_BACKEND) -------------------------------------------------------
    def set_backend(self, index: int, backend) -> object:
        """vhost_net_set_backend: swap queue `index`'s backend (None = detach, fd -1).

        Under the device lock: stop polling the old one, install the new one, requeue the queue's
        handler (flush), return the old backend for the caller to close when no queue uses it.
        """
        if index not in (NET_VQ_RX, NET_VQ_TX):
            raise ValueError(f"no queue {index} (vhost_net_set_backend: -ENOBUFS)")
        with self.lock:
            old = self.backends[index]
            if old is backend:
                return None
            if index == NET_VQ_TX:
                self.tx_poll_stop()
            else:
                self._clear_rx_pending()    # a frame of the old backend's is not the new one's
            self.backends[index] = backend
            self.stats["backend_swaps"] += 1
            self._choose_hlen()
            if backend is not None and self.running:
                self._queue_work(self.handle_rx if index == NET_VQ_RX else self.handle_tx)
        log.info("%s: queue %d backend %s -> %s", self.name, index, _bname(old), _bname(backend))
        return None if old in self.backends else old

    def reset(self) -> None:
        """Status 0: forget the rings; the backends stay attached (the daemon configured them)."""
        self.tx_poll_state = VHOST_NET_POLL_DISABLED
        self._clear_rx_pending()
        super().reset()

    def _clear_rx_pending(self) -> None:
        if self.rx_pending is not None:
            self.rx_pending = None
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
        """SET_BACKEND from the control plane: open `spec` ("" = detach, the seed's fd -1), swap it
        in, close the old backend when no queue uses it. ValueError: one line for the reply."""
        if self.backend_opener is None:
            raise ValueError("this device cannot open backends")
        if index not in (NET_VQ_RX, NET_VQ_TX):
            raise ValueError(f"no queue {index} (vhost_net_set_backend: -ENOBUFS)")
        new = self.backend_opener(spec) if spec else None
        old = self.set_backend(index, new)
        self.backend_name = spec if spec else self.backend_name
        if old is not None:
            self._close_backend(old)

    def _close_backend(self, b) -> None:
        try:
            (self.backend_closer or (lambda x: x.close()))(b)
        except OSError:
            log.debug("%s: closing backend failed", self.name, exc_info=True)

    def close(self) -> None:
        """The connection is gone: detach and close the backends (nothing left behind)."""
        for b in self.reset_owner():
            self._close_backend(b)

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

    def tx_poll_start(self) -> None:
        """tx_poll_start: watch the backend for POLLOUT instead of spinning on a full one."""
        if self.tx_poll_state != VHOST_NET_POLL_STARTED:
            self.tx_poll_state = VHOST_NET_POLL_STARTED
            self.stats["tx_full"] += 1
            if self.on_tx_poll is not None:
                self.on_tx_poll()

    def tx_poll_stop(self) -> None:
        if self.tx_poll_state == VHOST_NET_POLL_STARTED:
            self.tx_poll_state = VHOST_NET_POLL_STOPPED
            if self.on_tx_poll is not None:
                self.on_tx_poll()

    @property
    def tx_polling(self) -> bool:
        return self.tx_poll_state == VHOST_NET_POLL_STARTED

    # --- logging helpers --------------------------------------------------------------------------
    def _log_used(self, vq, first: int, count: int) -> None:
        """Log used-ring writes: `count` elements from index `first`, and used.idx."""
        dl = self.dirty_log
        used = vq.used
        num = vq.num
        for k in range(count):
            dl.log_write(used + 4 + 8 * ((first + k) % num), 8)
        dl.log_write(used + 2, 2)

    def _log_notify(self, vq) -> None:
        """enable/disable_notify wrote used.flags or avail_event."""
        self.dirty_log.log_write(vq.used, 2)
        self.dirty_log.log_write(vq.used + 4 + 8 * vq.num, 2)

    def _disable_notify(self, vq, mem) -> None:
        vq.disable_notify(mem)
        if self.log_all:
            self._log_notify(vq)

    def _enable_notify(self, vq, mem) -> bool:
        raced = vq.enable_notify(mem)
        if self.log_all:
            self._log_notify(vq)
        return raced

    def _add_used(self, vq, mem, used: list) -> None:
        first = vq.last_used_idx
        vq.add_used_n(mem, used)
        if self.log_all:
            self._log_used(vq, first, len(used))
        self.notify(vq)

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
                        if self._idle(vq, mem, used):
                            continue
                        break
                    if chain.in_:
                        # handle_tx: "Unexpected descriptor format for TX"
                        raise VringError(RULE_NET, f"Unexpected descriptor format for TX: out "
                                         f"{len(chain.out)}, int {len(chain.in_)}")
                    ln = chain.out_len - hlen
                    if chain.out_len < self.guest_hlen:
                        raise VringError(RULE_NET, f"Unexpected header len for TX: {chain.out_len}"
                                         f" < {self.guest_hlen}")
                    _check_tx_hdr(iov_read(chain.out, 0, NET_HDR.size))   # copied out, then checked
                    if ln <= 0 or ln - self.sock_hlen < ETH_MIN_FRAME or ln - self.sock_hlen > ETH_MAX_FRAME:
                        raise VringError(RULE_NET, f"Unexpected TX frame length {ln - self.sock_hlen}")
                    frame = iov_read(chain.out, hlen, ln)     # the one copy out of guest RAM
                    try:
                        ok = sock.send(frame)
                    except OSError as e:                      # the seed logs and moves on
                        log.debug("%s: tx send failed: %s", self.name, e)
                        self.stats["tx_dropped"] += 1
                        ok = True
                    else:
                        if ok:
                            self.stats["tx_frames"] += 1
                            self.stats["tx_bytes"] += ln
                    if not ok:
                        vq.discard_vq_desc(1)                 # vhost_discard_vq_desc
                        self.tx_poll_start()
                        break
                    self.stats["bytes_in"] += chain.out_len
                    used.append((chain.head, 0))
                    if len(used) >= VHOST_NET_BATCH:
                        self._add_used(vq, mem, used)
                        used = []
                    total += ln
                    pkts += 1
                    if total >= VHOST_NET_WEIGHT or pkts >= VHOST_NET_PKT_WEIGHT:
                        self.stats["tx_requeued"] += 1       # vhost_exceeds_weight
                        self._queue_work(self.handle_tx)
                        break
            finally:
                if used and not self.broken:
                    self._add_used(vq, mem, used)

    def _handle_rx(self) -> None:
        with self.lock:
            sock = self.backends[NET_VQ_RX]
            vq = self.vqs[NET_VQ_RX]
            if sock is None or not self._ready() or not vq.enabled:
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
                        try:
                            frame = sock.recv()
                        except OSError as e:        # the backend's trouble, not the guest's
                            log.debug("%s: rx recv failed: %s", self.name, e)
                            self.stats["rx_dropped"] += 1
                            break
                        if frame is None:
                            break                   # sk_receive_queue empty
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
                    total += len(frame)
                    pkts += 1
                    if total >= VHOST_NET_WEIGHT or pkts >= VHOST_NET_PKT_WEIGHT:
                        self.stats["rx_requeued"] += 1
                        self._queue_work(self.handle_rx)
                        break
            finally:
                if used and not self.broken:
                    self._add_used(vq, mem, used)

    def _get_rx_bufs(self, vq, mem, need: int):
        """get_rx_bufs: chains enough for `need` bytes (one without MRG_RXBUF); None when the ring
        ran dry (chains un-popped), "truncated" when the frame cannot fit (chains un-popped)."""
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
            heads.append(chain)
            have += chain.in_len
            if not self.mrg_rxbuf or len(heads) >= min(UIO_MAXIOV, vq.num):
                break
        if have < need or (self.mrg_rxbuf and heads[0].in_len < self.vhost_hlen):
            # The header must fit in the first buffer (spec 5.1.6.3.1)
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


def _check_tx_hdr(raw: bytes) -> None:
    """A copied-out tx header: no offload was offered, so anything but zeros is malformed."""
    flags, gso_type, _hdr_len, _gso_size, _cs, _co = NET_HDR.unpack(raw)
    if flags or gso_type:
        # spec 5.1.6.2.1: the driver MUST NOT set NEEDS_CSUM / GSO without the feature
        raise VringError(RULE_NET, f"TX header asks for offloads not negotiated: flags {flags:#x} "
                         f"gso_type {gso_type:#x}")


def _bname(b) -> str:
    return "none" if b is None else getattr(b, "name", type(b).__name__)
