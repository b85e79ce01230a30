"""The generic vhost device: what every backend device holds, whatever it does with its rings.

Theory of operation
-------------------
A `VhostDevice` is the state behind one control connection (drivers/vhost/vhost.c's
`struct vhost_dev` plus the virtio device status a vhost-user backend keeps):

    features        offered feature bits (VERSION_1 | EVENT_IDX | INDIRECT_DESC | NOTIFY_ON_EMPTY
                    | the device's own bits, `device_features`)
    acked_features  what the driver acknowledged (SET_FEATURES)
    status          the virtio device status byte (ACKNOWLEDGE ... DRIVER_OK, NEEDS_RESET)
    mem             the GuestMemory of the memory table (None until SET_MEM_TABLE)
    vqs             one VhostVirtqueue per queue (ring configuration and indices)
    kicks/calls/errs  per-queue doorbells: kick (driver -> device), call (device -> driver
                    interrupt), err (device -> frontend: "this ring is broken", vhost's error_ctx)
    stats           counters for monitors (GET_STATS)

The Session (host/session.py) configures it; the runner (host/runner.py) delivers kicks with `kick_received`
and holds `lock` while doing so, as the session holds it for every control message (vhost's
per-vq mutex, simplified to one per device). Subclasses implement `handle_kick(qidx)` and may
override `start()` (DRIVER_OK), `stop()` and `reset()`, calling the base methods.

Lifecycle (a small grammar):

    created  (SET_FEATURES | SET_MEM_TABLE | vring setup)*  start  (kick_received* notify*)
             [vq_err -> broken]  stop  reset  -> created

Dirty logging (vhost.c's log: VHOST_F_LOG_ALL, VHOST_SET_LOG_BASE, VHOST_VRING_F_LOG), for live
migration, belongs to the vhost core: a device that offers VHOST_F_LOG_ALL in `device_features`
gets `set_log_base`, and while LOG_ALL is acked it logs every buffer it writes (`log_iov`, the
kernel's vhost_log_write) and every used-ring write (`log_used`, `log_notify`: the used ring at
its VHOST_VRING_F_LOG log address, else its gpa). LOG_ALL without a usable log is refused (EFAULT).

A guest error found while processing a ring (a `VringError` or `GuestMemoryError`) goes to
`vq_err`: log, count, set NEEDS_RESET, ring the queue's err doorbell and stop processing the device
(`broken`) until the driver resets it (status 0) — Linux's vq_err() plus the virtio 1.x
DEVICE_NEEDS_RESET status (spec 2.1.2).
"""
from __future__ import annotations

import errno
import logging
import threading
from collections import deque
from typing import Any, Callable

from host.dirty_log import DirtyLog
from shared.constants import (VHOST_F_LOG_ALL, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
                              VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
                              VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, bit, has)
from shared.errors import GuestMemoryError, VringError
from shared.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

# What the vhost core itself supports (vhost.h VHOST_FEATURES, with VERSION_1 as modern vhost)
VHOST_FEATURES = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX)
                  | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_F_NOTIFY_ON_EMPTY))


def _default_vq_factory(index: int, name: str):
    from host.vhost_vq import VhostVirtqueue
    return VhostVirtqueue(index, name)


def _packed_vq_factory(index: int, name: str):
    from host.vhost_vq_packed import VhostVirtqueuePacked
    return VhostVirtqueuePacked(index, name)


class VhostDevice:
    device_type: str = ""            # "vsock" | "net" (HELLO.device)
    device_id: int = 0               # virtio device id (virtio_ids.h)
    num_queues: int = 0
    max_queue_size: int = 1024       # libvhost-user VIRTQUEUE_MAX_SIZE
    device_features: int = 0         # the device's own feature bits

    def __init__(self, name: str = "", *, num_queues: int | None = None,
                 max_queue_size: int | None = None,
                 vq_factory: Callable[[int, str], Any] | None = None):
        self.name = name or self.device_type or "vhost"
        if num_queues is not None:
            self.num_queues = num_queues
        if max_queue_size is not None:
            self.max_queue_size = max_queue_size
        self.features = VHOST_FEATURES | self.device_features     # offered
        self.acked_features = 0
        self.status = 0
        self.mem = None
        self.dirty_log: DirtyLog | None = None     # SET_LOG_BASE
        self.log_all = False                       # VHOST_F_LOG_ALL acked: log every write
        self.log_addr: list[int | None] = [None] * self.num_queues   # VHOST_VRING_F_LOG log_guest_addr
        factory = vq_factory or _default_vq_factory
        self._vq_factory = factory
        self.vqs = [factory(i, f"{self.name}-q{i}") for i in range(self.num_queues)]
        self.kicks: list = [None] * self.num_queues
        # The runner's doorbell threads per queue (host/runner.py Kicks; none for eventfds), for
        # program threads that serve a ring themselves (run to completion, shared/engine.py).
        self.kick_threads: dict = {}
        self.calls: list = [None] * self.num_queues
        self.errs: list = [None] * self.num_queues
        self.broken = False          # a guest error stopped this device until reset
        self.running = False         # between start() and stop()
        self.reconnect = False       # HELLO.reconnect of the connection that made us
        self.hello: dict = {}
        self.worker = None           # set by the runner (queue_work); None in tests
        self.lock = threading.RLock()
        self._local_work: deque = deque()   # work queued while no worker is attached (tests)
        self._error_log = RateLimitedLog()      # NEEDS_RESET lines: the first, then counts
        self.stats: dict[str, Any] = {
            "kicks": 0, "interrupts": 0, "errors": 0, "resets": 0,
            "bytes_in": 0,           # bytes the device read from guest buffers
            "bytes_out": 0,          # bytes the device wrote into guest buffers
            "vq_kicks": [0] * self.num_queues,
            "vq_interrupts": [0] * self.num_queues,
            "last_error": "",
            # for monitors (tools.monitor): per-queue errors, the rule last broken, interrupts
            # that the driver's suppression (NO_INTERRUPT / used_event) made unnecessary
            "vq_errors": [0] * self.num_queues,
            "last_rule": None,
            "vq_interrupts_suppressed": [0] * self.num_queues,
        }

    # --- device description ---------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        """The device-specific configuration space (GET_CONFIG reads from it)."""
        return b""

    def features_ok(self, features: int) -> bool:
        """May FEATURES_OK be set with these acked features? (spec 3.1.1 step 5).

        This device model is virtio 1.x only: VERSION_1 must be acked (a legacy driver is refused).
        """
        if has(features, VHOST_F_LOG_ALL) and self.dirty_log is None:
            return False        # vhost_set_features: LOG_ALL without a usable log (-EFAULT)
        return has(features, VIRTIO_F_VERSION_1) and features & ~self.features == 0

    def offer_packed(self, on: bool = True) -> None:
        """Offer VIRTIO_F_RING_PACKED (the host's --packed): the driver may then choose the packed
        layout; split stays the default."""
        if on:
            self.features |= bit(VIRTIO_F_RING_PACKED)
        else:
            self.features &= ~bit(VIRTIO_F_RING_PACKED)

    def _select_layout(self, packed: bool) -> None:
        """Give every queue the ring layout the features chose (VIRTIO_F_RING_PACKED), keeping
        whatever the control plane already set on it. The devices reach their rings through
        self.vqs[i] each time, so the new objects are what they use from here on."""
        factory = _packed_vq_factory if packed else self._vq_factory
        for i, vq in enumerate(self.vqs):
            if bool(getattr(vq, "packed", False)) == packed:
                continue
            new = factory(vq.index, vq.name)
            for attr in ("num", "desc", "avail", "used"):
                setattr(new, attr, getattr(vq, attr))
            new.enabled = getattr(vq, "enabled", False)
            unmap = getattr(vq, "unmap", None)
            if callable(unmap):
                unmap()
            self.vqs[i] = new

    def set_features(self, features: int) -> None:
        """SET_FEATURES: record and apply the ring features to every queue (vhost_set_features).
        LOG_ALL without a usable log is OSError(EFAULT), as the ioctl answers (nothing changes)."""
        if has(features, VHOST_F_LOG_ALL) and self.dirty_log is None:
            raise OSError(errno.EFAULT, "VHOST_F_LOG_ALL needs a dirty log (SET_LOG_BASE first)")
        self.acked_features = features
        self._select_layout(has(features, VIRTIO_F_RING_PACKED))
        self.log_all = has(features, VHOST_F_LOG_ALL)
        for vq in self.vqs:
            vq.event_idx = has(features, VIRTIO_RING_F_EVENT_IDX)
            vq.indirect = has(features, VIRTIO_RING_F_INDIRECT_DESC)
            vq.notify_on_empty = has(features, VIRTIO_F_NOTIFY_ON_EMPTY)

    def set_mem(self, mem) -> None:
        """SET_MEM_TABLE: adopt a new memory table, dropping the old one's views."""
        old, self.mem = self.mem, mem
        if old is not None and old is not mem:
            self._unmap_vqs()
            old.release()

    def _unmap_vqs(self) -> None:
        for vq in self.vqs:              # the rings' cached views point into the old table
            unmap = getattr(vq, "unmap", None)
            if callable(unmap):
                unmap()

    # --- hooks ---------------------------------------------------------------------------------
    def start(self) -> None:
        """DRIVER_OK: the rings are set up; begin processing. Subclasses call super().start()."""
        self.running = True
        if self.mem is not None:
            for vq in self.vqs:
                init = getattr(vq, "init_access", None)
                if callable(init) and getattr(vq, "enabled", True):
                    try:
                        init(self.mem)
                    except (VringError, GuestMemoryError) as e:
                        self.vq_err(vq, e)
        log.info("%s: started (features %#x)", self.name, self.acked_features)

    def stop(self) -> None:
        """Stop processing (before reset or disconnect). Subclasses call super().stop()."""
        if self.running:
            log.info("%s: stopped", self.name)
        self.running = False

    def reset(self) -> None:
        """Status 0 / RESET_OWNER / disconnect: forget everything the driver gave us.

        Drops the memory table's views (mem.release()), closes the doorbells (the guest owns and
        unlinks them), returns every queue to its initial state (vhost_dev_reset_owner).
        """
        self.stop()
        self.status = 0
        self.acked_features = 0
        self.log_addr = [None] * self.num_queues
        if self.dirty_log is not None:           # the log goes with the frontend's other memory
            self.dirty_log.release()
            self.dirty_log = None
        self.log_all = False
        self.broken = False
        self._unmap_vqs()
        for i, vq in enumerate(self.vqs):
            self._close_doorbells(i)
            reset = getattr(vq, "reset", None)
            if callable(reset):
                reset()
            else:
                vq.__init__(vq.index, vq.name)   # back to the freshly constructed state, in place
        self._select_layout(False)               # split again until features say otherwise
        if self.mem is not None:
            self.mem.release()
            self.mem = None
        self.stats["resets"] += 1

    # --- dirty logging (vhost.c log_write / log_used) ----------------------------------------------
    def set_log_base(self, bitmap, owner=None) -> None:
        """SET_LOG_BASE: the bitmap every write is logged into (None drops it, LOG_ALL then off).
        `owner` (an mmap or shm the bitmap views) is closed with the log. A bitmap that cannot be
        used (read-only) is OSError(EFAULT) and the old log stays. Under the device lock: once it
        returns, the old log is never written again (a migration reads it then)."""
        with self.lock:
            if bitmap is not None:
                try:
                    new = DirtyLog(bitmap, owner=owner)
                except (ValueError, TypeError) as e:
                    raise OSError(errno.EFAULT, f"SET_LOG_BASE: the log is not usable: {e}") from None
                new.stats = self.stats       # "dirty_logged": pages the device marked, for monitors
            else:
                new = None
            if self.dirty_log is not None:
                self.dirty_log.release()
            self.dirty_log = new
            if self.dirty_log is None:
                self.log_all = False

    def _log_base(self, vq) -> int:
        """Where the used ring is logged: the ring's log_guest_addr (VHOST_VRING_F_LOG), else its gpa."""
        la = self.log_addr[vq.index] if 0 <= vq.index < len(self.log_addr) else None
        return vq.used if la is None else la

    def log_used(self, vq, first: int, count: int) -> None:
        """Log used-ring writes: `count` elements from index `first`, and used.idx (vhost log_used;
        the ring says where it wrote them: host/vhost_vq.py, host/vhost_vq_packed.py)."""
        dl = self.dirty_log
        for gpa, n in vq.used_log_ranges(first, count, self._log_base(vq)):
            dl.log_write(gpa, n)

    def log_notify(self, vq) -> None:
        """enable/disable_notify wrote used.flags or avail_event (a packed ring: its device area)."""
        for gpa, n in vq.notify_log_ranges(self._log_base(vq)):
            self.dirty_log.log_write(gpa, n)

    def log_ring(self, vq) -> None:
        """Everything the device writes in the ring (split: the used ring; packed: the descriptor
        ring and the device area): for a device that does not log element by element (vsock);
        over-logs at most the ring's own pages."""
        for gpa, n in vq.ring_log_ranges(self._log_base(vq)):
            self.dirty_log.log_write(gpa, n)

    def log_iov(self, chain, written: int) -> None:
        """vhost_log_write: a chain's device-writable buffers, up to `written` bytes."""
        self.dirty_log.log_iov(chain.in_addrs, written)

    def close(self) -> None:
        """The connection is gone: stop and release everything."""
        self.reset()

    def _close_doorbells(self, i: int) -> None:
        for table in (self.kicks, self.calls, self.errs):
            db, table[i] = table[i], None
            if db is not None:
                try:
                    db.close()
                except Exception:  # closing is best effort; the guest unlinks the names
                    log.debug("%s: closing doorbell of queue %d failed", self.name, i, exc_info=True)

    def set_doorbell(self, kind: str, i: int, db) -> None:
        """SET_VRING_KICK/CALL/ERR: install (or with None remove) one doorbell of queue i."""
        table = {"kick": self.kicks, "call": self.calls, "err": self.errs}[kind]
        old, table[i] = table[i], db
        if old is not None and old is not db:
            old.close()

    # --- the data path -------------------------------------------------------------------------
    def handle_kick(self, qidx: int) -> None:
        """Process queue qidx after a kick (vhost's handle_kick). Subclasses override."""

    def kick_received(self, qidx: int) -> None:
        """A runner got a kick on queue qidx: count it and run handle_kick unless stopped.

        A guest error (VringError, GuestMemoryError) becomes vq_err; any other exception is a
        device bug, logged and also reported with vq_err so the worker survives.
        """
        self.stats["kicks"] += 1
        self.stats["vq_kicks"][qidx] += 1
        if not self.running or self.broken or not self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            return
        if not getattr(self.vqs[qidx], "enabled", True):
            return
        if not self.mem_ok(self.vqs[qidx]):
            return
        try:
            self.handle_kick(qidx)
        except (VringError, GuestMemoryError) as e:
            self.vq_err(self.vqs[qidx], e)
        except Exception as e:  # pragma: no cover - a device bug must not kill the worker
            log.exception("%s: handle_kick(%d) failed", self.name, qidx)
            self.vq_err(self.vqs[qidx], e)

    # --- work scheduling ------------------------------------------------------------------------
    def _queue_work(self, fn) -> None:
        """vhost_work_queue: on the worker; without one (single-threaded tests), kept for
        run_local_work. A pending fn is not queued twice."""
        if self.worker is not None:
            self.worker.queue_work(fn)
        elif fn not in self._local_work:
            self._local_work.append(fn)

    def run_local_work(self, limit: int = 10_000) -> int:
        """Run work queued while no worker was attached (single-threaded tests); returns count."""
        n = 0
        while self._local_work and n < limit:
            self._local_work.popleft()()
            n += 1
        return n

    # --- adaptive polling (shared/engine.py PollOps) ------------------------------------------
    def queue_has_work(self, qidx: int) -> bool:
        """Is there work on queue qidx for handle_kick? (lock held; a cheap check).

        The default: the driver made buffers available. Devices whose queue holds buffers
        waiting for data (an rx queue) override this."""
        return not self.vqs[qidx].avail_empty(self.mem)

    def poll_ops(self, qidx: int):
        """How the engine busy-polls queue qidx between kicks (vhost_net_busy_poll)."""
        from shared.engine import PollOps
        vq = self.vqs[qidx]

        def usable() -> bool:
            return (self.running and not self.broken and self.mem is not None
                    and bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK))

        def pending() -> bool:
            if not usable():
                return False
            try:
                return self.queue_has_work(qidx)
            except (VringError, GuestMemoryError) as e:
                self.vq_err(vq, e)
                return False

        def suppress() -> None:
            if usable():
                try:
                    vq.suppress_notify(self.mem)
                except (VringError, GuestMemoryError) as e:
                    self.vq_err(vq, e)

        def rearm() -> bool:
            if not usable():
                return False
            try:
                return vq.enable_notify(self.mem) and self.queue_has_work(qidx)
            except (VringError, GuestMemoryError) as e:
                self.vq_err(vq, e)
                return False
        def delay(k: int) -> bool:
            if not usable():
                return False
            try:
                return vq.enable_notify_after(self.mem, k) and self.queue_has_work(qidx)
            except (VringError, GuestMemoryError) as e:
                self.vq_err(vq, e)
                return False

        def polled() -> None:                   # work found by polling: not a kick
            if usable() and getattr(vq, "enabled", True) and self.mem_ok(vq):
                try:
                    self.handle_kick(qidx)
                except (VringError, GuestMemoryError) as e:
                    self.vq_err(vq, e)
        def burst() -> int:
            return self.expected_burst(qidx) if usable() else 1
        return PollOps(pending, suppress, rearm, polled, delay, burst)

    def expected_burst(self, qidx: int) -> int:
        """How many buffers the guest should add to queue qidx soon (the kick thread then asks
        for the kick only after that many: shared/engine.py PollOps.burst). 1: no idea."""
        return 1

    def mem_ok(self, vq=None) -> bool:
        """The data path's guard before touching guest memory (a batch, a wake, a kick).

        False when the guest shrank its shared memory under the memory table (the next access
        would be SIGBUS): the device is then marked NEEDS_RESET through vq_err on `vq` (queue 0
        when not given). Cheap: one fstat per segment. A shrink between this check and the
        access is not caught: see docs/DESIGN.md "Guest memory that shrinks"."""
        if self.mem is None or self.broken:
            return not self.broken
        why = self.mem.mem_ok() if hasattr(self.mem, "mem_ok") else None
        if why is None:
            return True
        if vq is None and self.vqs:
            vq = self.vqs[0]
        self.vq_err(vq, GuestMemoryError(why))
        return False

    def notify(self, vq) -> bool:
        """Interrupt the driver if the ring says so (vhost_signal: vhost_notify + eventfd_signal)."""
        if self.mem is None:
            return False
        if not vq.signal(self.mem):
            self.stats["vq_interrupts_suppressed"][vq.index] += 1
            return False
        call = self.calls[vq.index]
        if call is None:
            return False
        call.ring()
        self.stats["interrupts"] += 1
        self.stats["vq_interrupts"][vq.index] += 1
        return True

    def vq_err(self, vq, exc: BaseException) -> None:
        """The guest broke a ring rule: stop this device until reset (vhost vq_err + NEEDS_RESET)."""
        rule = getattr(exc, "rule", None)
        msg = f"queue {vq.index}: {exc}"
        self._error_log.log(log, f"{self.name}: {msg}")
        self.stats["errors"] += 1
        self.stats["last_error"] = msg[:200]
        self.stats["last_rule"] = rule
        if 0 <= vq.index < len(self.stats["vq_errors"]):
            self.stats["vq_errors"][vq.index] += 1
        self.broken = True
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET       # spec 2.1.2 DEVICE_NEEDS_RESET
        err = self.errs[vq.index] if 0 <= vq.index < len(self.errs) else None
        if err is not None:
            err.ring()

    def get_stats(self) -> dict:
        """The stats map of GET_STATS (a copy; lists copied too)."""
        out = {k: (list(v) if isinstance(v, list) else v) for k, v in self.stats.items()}
        out.update(name=self.name, device=self.device_type, status=self.status,
                   features=self.acked_features, broken=self.broken, running=self.running)
        out["vqs"] = [vq.snapshot() for vq in self.vqs if callable(getattr(vq, "snapshot", None))]
        if self.mem is not None:
            out["mem_table"] = list(getattr(self, "mem_table", []))
        return out
