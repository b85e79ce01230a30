"""The guest's virtio transport for one device (the virtio_pci / QEMU vhost-user frontend role).

Theory of operation
-------------------
The guest process is its own VMM: it owns guest RAM and every doorbell, and it drives the device
on the host through the control protocol (docs/PROTOCOL.md). A driver uses a VirtioDevice as Linux
drivers use `struct virtio_device` + its config ops:

    dev = VirtioDevice(ram, run_dir, path, "vsock", "g1", {"cid": 3}, resource_base=..., owner=...)
    dev.connect()                              # HELLO, SET_OWNER
    feats = dev.probe(wanted)                  # reset, ACK, DRIVER, features, FEATURES_OK, check
    vqs = dev.find_vqs([rx_done, tx_done, None], [256, 256, 64])   # rings, doorbells, vrings
    dev.driver_ok()                            # virtio_device_ready
    dev.start_irq_threads(stop_event)          # interrupts -> callbacks
    ... vq.add_sgs(...); dev.kick(vq) ...      # virtqueue_kick: kick_prepare + notify
    dev.reset(); dev.del_vqs(); dev.close()    # remove: reset first, then free the rings

Order of calls (a grammar): connect probe find_vqs driver_ok (kick | notify | config_get |
get_status | reconnect)* reset del_vqs close. `reset` followed by `probe` starts over.

Doorbells are per queue (kick, call, err), POSIX semaphores created here 0600 with the names
f"/{resource_base}-q{i}k|c|e", recorded in the owner record BEFORE they are created (so a
SIGKILL between the two leaks nothing) and unlinked by del_vqs; or, with doorbell="eventfd"
(--doorbell eventfd), eventfds passed to the host with SCM_RIGHTS on the SET_VRING_* request that
names them (nothing named to leak). `reconnect()` replays the whole
device state to a new host connection (HELLO.reconnect = True) with SET_VRING_BASE = the ring's
current used.idx, read from guest memory, as a vhost-user frontend does without inflight tracking.

Interrupt threads (start_irq_threads) only wait and call the driver's callback; the callback is
expected to schedule work (Kernel.queue_work), like an IRQ handler.
"""
from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Callable

from shared.constants import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
                              VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
                              VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX,
                              VIRTIO_RING_F_INDIRECT_DESC, bit, has)
from shared.control import PROTOCOL_VERSION, ControlError
from shared.doorbell import EventFdDoorbell, SemDoorbell
from shared.engine import Engine
from shared.resources import unlink_sem

from .control_client import ControlClient
from .virtqueue import VirtQueue
from .virtqueue_packed import VirtQueuePacked

log = logging.getLogger(__name__)
IRQ_POLL = 0.2          # seconds the err watcher waits between looks


class ProbeError(ControlError):
    """The device refused the driver (features not accepted, or a failed handshake step)."""


class _Ring:
    """What the transport remembers of one queue to set it up (again, on reconnect)."""
    __slots__ = ("index", "num", "desc", "avail", "used", "vq", "callback", "kick", "call", "err", "names")

    def __init__(self, index, num, desc, avail, used):
        self.index, self.num, self.desc, self.avail, self.used = index, num, desc, avail, used
        self.vq = None
        self.callback = None
        self.kick = self.call = self.err = None
        self.names: list[str] = []


class VirtioDevice:
    def __init__(self, ram, run_dir, control_path, device: str, guest_name: str, params: dict | None = None,
                 *, resource_base: str, owner, timeout: float = 5.0, doorbell: str = "sem",
                 packed: bool = False):
        self.ram = ram
        self.run_dir = run_dir
        self.control_path = str(control_path)
        self.device = device
        self.guest_name = guest_name
        self.params = dict(params or {})
        self.resource_base = resource_base
        self.owner = owner
        self.timeout = timeout
        if doorbell not in ("sem", "eventfd"):
            raise ValueError(f"unknown doorbell kind {doorbell!r} (sem or eventfd)")
        self.doorbell = doorbell         # named POSIX semaphores, or eventfds passed by SCM_RIGHTS
        self.packed = packed             # ask for VIRTIO_F_RING_PACKED in every probe
        self.client: ControlClient | None = None
        self.info: dict = {}             # HELLO reply: device_id, num_queues, max_queue_size, config_size
        self.offered = 0                 # GET_FEATURES
        self.features = 0                # negotiated
        self.status = 0                  # last status the device reported
        self.rings: list[_Ring] = []
        self.vqs: list = []
        self.kicks: list[int] = []       # per queue: doorbell rings sent
        self.interrupts: list[int] = []  # per queue: interrupts consumed
        self.needs_reset = False
        self.on_error: Callable[[int, int], None] | None = None   # (queue, status) after an err ring
        self._mem_table_sent = False
        self._threads: list[threading.Thread] = []
        self._irq_threads: list = []           # engine doorbell threads, one per call doorbell
        self.irq_threads: dict = {}            # the same by queue index (run to completion)
        self._engine = None
        self._own_engine = None
        self.log = logging.getLogger(f"{__name__}.{guest_name}.{device}")

    # --- connection ----------------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return self.info.get("num_queues", 0)

    def _req(self, op: str, fds=(), **fields) -> dict:
        if self.client is None:
            raise ConnectionError(f"{self.device}: not connected (call connect())")
        return self.client.request(op, fds=fds, **fields)

    def _set_doorbell(self, op: str, i: int, db) -> None:
        """SET_VRING_KICK/CALL/ERR: a semaphore by name, an eventfd with its fd (SCM_RIGHTS)."""
        self._req(op, [db.fileno()] if isinstance(db, EventFdDoorbell) else (), index=i, doorbell=db.spec())

    def connect(self, *, reconnect: bool = False) -> dict:
        """Open the control connection: HELLO, then SET_OWNER. Returns the HELLO reply."""
        if self.client is not None:
            self.client.close()
        self.client = ControlClient(self.control_path, timeout=self.timeout)
        rep = self._req("HELLO", version=PROTOCOL_VERSION, device=self.device, guest=self.guest_name,
                        reconnect=reconnect, params=self.params)
        if rep.get("version") != PROTOCOL_VERSION:
            raise ControlError("EPROTONOSUPPORT", f"host speaks protocol {rep.get('version')}")
        self.info = {k: rep[k] for k in ("device_id", "num_queues", "max_queue_size", "config_size") if k in rep}
        self._req("SET_OWNER")
        self._mem_table_sent = False
        self.log.info("connected to %s: %s", self.control_path, self.info)
        return rep

    def close(self) -> None:
        """Close the control connection (the host then releases the device). Idempotent."""
        client, self.client = self.client, None
        if client is not None:
            client.close()

    # --- status and features (virtio_dev_probe / virtio_features_ok) --------------------------
    def _set_status(self, status: int) -> int:
        self.status = self._req("SET_STATUS", status=status)["status"]
        return self.status

    def get_status(self) -> int:
        self.status = self._req("GET_STATUS")["status"]
        return self.status

    def reset(self) -> None:
        """Write status 0: the device stops and forgets rings, memory table and doorbells."""
        self._set_status(0)
        self._mem_table_sent = False
        self.needs_reset = False

    def _negotiate(self, wanted: int, *, exact: bool) -> int:
        self._set_status(0)
        self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self._set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        self.offered = self._req("GET_FEATURES")["features"]
        features = wanted & self.offered
        if exact and features != wanted:
            self._fail_status()
            raise ProbeError("ENODEV", f"the new host no longer offers features {wanted & ~self.offered:#x}")
        self._req("SET_FEATURES", features=features)
        self._set_status(self.status | VIRTIO_CONFIG_S_FEATURES_OK)
        if not self.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:     # spec 3.1.1 step 6: re-read
            self._fail_status()
            raise ProbeError("ENODEV", f"device refused features {features:#x}")
        self.features = features
        return features

    def _fail_status(self) -> None:
        try:
            self._set_status(self.status | VIRTIO_CONFIG_S_FAILED)
        except (ControlError, OSError):
            pass

    def probe(self, driver_features_wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, negotiate, FEATURES_OK and check it stuck. Returns the features."""
        if self.packed:
            driver_features_wanted |= bit(VIRTIO_F_RING_PACKED)
        f = self._negotiate(driver_features_wanted, exact=False)
        self.log.info("probed: offered %#x, wanted %#x, negotiated %#x", self.offered,
                      driver_features_wanted, f)
        return f

    def driver_ok(self) -> None:
        """virtio_device_ready: set DRIVER_OK (the host checks every enabled ring first)."""
        self._set_status(self.status | VIRTIO_CONFIG_S_DRIVER_OK)
        self.log.info("DRIVER_OK")

    def config_get(self, offset: int, size: int) -> bytes:
        return bytes(self._req("GET_CONFIG", offset=offset, size=size)["data"])

    def get_stats(self) -> dict:
        return self._req("GET_STATS")["stats"]

    # --- virtqueues ------------------------------------------------------------------------------
    def find_vqs(self, callbacks: list, sizes: list[int], *, shared_irq: bool = False,
                 kick_alias: dict[int, int] | None = None, at: list | None = None,
                 bases: list[int] | None = None) -> list:
        """Allocate rings and doorbells for each queue and describe them to the device.

        shared_irq: every queue signals one call doorbell (one interrupt vector for all queues,
        as virtio-pci with a shared MSI-X vector: vp_vring_interrupt runs each queue's callback
        that has used buffers), so one interrupt thread serves the device. kick_alias {i: j}:
        queue i notifies through queue j's kick doorbell (the device then looks at both: for
        queues whose kick only says "buffers posted", like vsock's rx and event queues).
        at [(desc, avail, used)]: rings already in guest RAM (an incoming migration: they came
        with it) instead of new ones; bases: each ring's SET_VRING_BASE (default 0)."""
        kick_alias = dict(kick_alias or {})
        if any(j >= i or j in kick_alias for i, j in kick_alias.items()):
            raise ValueError("kick_alias maps a queue to an earlier queue with its own kick")
        if self.rings:
            raise RuntimeError("find_vqs called twice without del_vqs")
        if len(callbacks) != len(sizes):
            raise ValueError("one callback (or None) per queue size")
        if len(sizes) > self.num_queues:
            raise ValueError(f"{len(sizes)} queues requested, the device has {self.num_queues}")
        maxq = self.info.get("max_queue_size", 1 << 15)
        for n in sizes:
            if n < 1 or n & (n - 1):
                raise ValueError(f"queue size {n} is not a power of 2")
            if n > maxq:
                raise ValueError(f"queue size {n} is larger than the host's maximum {maxq} "
                                 f"(see the host's --max-queue-size)")
        ring_cls = VirtQueuePacked if has(self.features, VIRTIO_F_RING_PACKED) else VirtQueue
        try:
            for i, (cb, num) in enumerate(zip(callbacks, sizes)):
                desc, avail, used = ring_cls.alloc_rings(self.ram, num) if at is None else at[i]
                ring = _Ring(i, num, desc, avail, used)
                self.rings.append(ring)
                ring.vq = ring_cls(self.ram.mem, i, num, desc, avail, used,
                                    event_idx=has(self.features, VIRTIO_RING_F_EVENT_IDX),
                                    indirect=has(self.features, VIRTIO_RING_F_INDIRECT_DESC),
                                    alloc=self.ram.alloc, name=f"{self.device}-q{i}")
                ring.callback = cb
                if cb is None:   # vring_create_virtqueue: no callback, no interrupts wanted
                    ring.vq.disable_cb()
                kick_from = self.rings[kick_alias[i]] if i in kick_alias else None
                call_from = self.rings[0] if shared_irq and i else None
                own = "".join(k for k, shared in (("k", kick_from), ("c", call_from), ("e", None))
                              if shared is None)
                names = [f"/{self.resource_base}-q{i}{k}" for k in own]
                if self.doorbell == "eventfd":     # nothing named to record or unlink
                    made = {k: EventFdDoorbell(name=n) for k, n in zip(own, names)}
                else:
                    ring.names = names
                    self.owner.add(sems=ring.names)    # record before creating
                    made = {k: SemDoorbell(n, create=True) for k, n in zip(own, ring.names)}
                ring.kick = kick_from.kick if kick_from is not None else made["k"]
                ring.call = call_from.call if call_from is not None else made["c"]
                ring.err = made["e"]
            self.vqs = [r.vq for r in self.rings]
            self.kicks = [0] * len(self.rings)
            self.interrupts = [0] * len(self.rings)
            self.kicks_suppressed = [0] * len(self.rings)
            self._setup_rings(bases=bases)
        except BaseException:
            self.del_vqs()
            raise
        return list(self.vqs)

    def _setup_rings(self, bases: list[int] | None) -> None:
        if not self._mem_table_sent:
            self._req("SET_MEM_TABLE", regions=self.ram.table)
            self._mem_table_sent = True
        for r in self.rings:
            i = r.index
            self._req("SET_VRING_NUM", index=i, num=r.num)
            self._req("SET_VRING_ADDR", index=i, flags=0,
                      desc_user_addr=self.ram.gpa_to_uva(r.desc),
                      avail_user_addr=self.ram.gpa_to_uva(r.avail),
                      used_user_addr=self.ram.gpa_to_uva(r.used), log_guest_addr=0)
            # a new ring starts at 0 (packed: 0 with the avail wrap counter 1 in bit 15)
            self._req("SET_VRING_BASE", index=i, num=r.vq.resume_base() if bases is None else bases[i])
            self._set_doorbell("SET_VRING_KICK", i, r.kick)
            self._set_doorbell("SET_VRING_CALL", i, r.call)
            self._set_doorbell("SET_VRING_ERR", i, r.err)
            self._req("SET_VRING_ENABLE", index=i, enable=True)
        self.log.info("rings set up: %s", ", ".join(
            f"q{r.index} num {r.num} desc {r.desc:#x} avail {r.avail:#x} used {r.used:#x}" for r in self.rings))

    def del_vqs(self) -> None:
        """Free ring memory, close and unlink the doorbells, drop them from the owner record.

        Call after reset() (the device must no longer touch the rings)."""
        rings, self.rings = self.rings, []
        self.vqs = []
        names: list[str] = []
        for r in rings:
            if r.vq is not None:
                r.vq.close()          # drop its cached views of guest RAM
            for db in (r.kick, r.call, r.err):
                if db is not None:
                    db.close()
            for n in r.names:
                unlink_sem(n)
            names.extend(r.names)
            try:
                VirtQueue.free_rings(self.ram, r.desc, r.avail, r.used)   # either layout
            except KeyError:
                pass
        if names:
            self.owner.remove(sems=names)

    def kick(self, vq) -> bool:
        """virtqueue_kick: notify the device if the ring says it wants a kick."""
        if not vq.kick_prepare():
            self.kicks_suppressed[vq.index] += 1     # for monitors: a kick the device waived
            return False
        self.notify(vq)
        return True

    def notify(self, vq) -> None:
        """virtqueue_notify: ring the queue's kick doorbell unconditionally."""
        self.rings[vq.index].kick.ring()
        self.kicks[vq.index] += 1

    # --- interrupts ------------------------------------------------------------------------------
    def start_irq_threads(self, stop_event: threading.Event, engine=None, poll=None,
                          err_thread: bool = True) -> list:
        """Interrupts: each queue with a callback gets a doorbell thread of `engine` (the guest
        kernel's; a private one if None) that runs the callback itself when the call doorbell
        rings, with the engine's lock held (vring_interrupt); `poll(qidx)` may give the PollOps
        for busy-polling a queue (shared/engine.py). One more thread watches the err doorbells.
        They exit soon after stop_event is set and join_irq_threads() is called."""
        if engine is None:
            engine = self._own_engine = Engine(f"{self.guest_name}-{self.device}")
        self._engine = engine
        threads = []
        groups: dict[int, list[_Ring]] = {}
        for r in self.rings:
            if r.callback is not None:
                groups.setdefault(id(r.call), []).append(r)
        for group in groups.values():
            first = group[0]
            handler = (partial(self._interrupt, first) if len(group) == 1
                       else partial(self._shared_interrupt, group))
            ops = None
            if poll:
                ops = next((o for o in (poll(r.index) for r in group) if o is not None), None)
            t = engine.add_doorbell(first.call, handler, poll=ops,
                                    name=f"{self.device}-irq{first.index}")
            for r in group:
                self.irq_threads[r.index] = t
            threads.append(t)
        self._irq_threads.extend(threads)
        if not err_thread:          # the caller runs check_errors() every IRQ_POLL itself
            return threads
        err = threading.Thread(target=self._err_loop, args=(stop_event,),
                               name=f"{self.guest_name}-{self.device}-err", daemon=True)
        err.start()
        self._threads.append(err)
        return threads + [err]

    def join_irq_threads(self, timeout: float = 2.0) -> None:
        irqs, self._irq_threads = self._irq_threads, []
        self.irq_threads = {}
        for t in irqs:
            self._engine.remove_doorbell(t)
        for t in irqs:
            t.join(timeout)
        threads, self._threads = self._threads, []
        for t in threads:
            t.join(timeout)
        if self._own_engine is not None:
            self._own_engine.close()
            self._own_engine = None

    def _interrupt(self, r: _Ring) -> None:
        self.interrupts[r.index] += 1
        r.callback(r.vq)       # vring_interrupt -> the driver's callback

    def _shared_interrupt(self, group: list[_Ring]) -> None:
        """vp_vring_interrupt: one vector for several queues; each queue with used buffers
        (vring_interrupt's more_used check) gets its callback, unless its driver disabled
        callbacks on it (ours: the lazily reaped tx queue; Linux would call it anyway)."""
        for r in group:
            vq = r.vq
            if vq.more_used() and vq.cb_enabled:
                self.interrupts[r.index] += 1
                r.callback(r.vq)

    def _err_loop(self, stop: threading.Event) -> None:
        while not stop.wait(IRQ_POLL):
            self.check_errors()

    def check_errors(self) -> None:
        """One look at the err doorbells (SET_VRING_ERR): a queue whose device signalled an
        error gets GET_STATUS (a blocking control round trip: call with no lock held),
        needs_reset when NEEDS_RESET is set, and the on_error hook."""
        for r in list(self.rings):
            if r.err is None or not r.err.wait(0):
                continue
            try:
                status = self.get_status()
            except (ControlError, OSError) as e:
                self.log.warning("queue %d: device error signalled; GET_STATUS failed: %s", r.index, e)
                continue
            if status & VIRTIO_CONFIG_S_NEEDS_RESET:
                self.needs_reset = True
                self.log.warning("queue %d: device reports NEEDS_RESET (status %#x)", r.index, status)
            else:
                self.log.warning("queue %d: device error signalled (status %#x)", r.index, status)
            if self.on_error is not None:
                try:
                    self.on_error(r.index, status)
                except Exception:
                    self.log.exception("on_error hook failed")

    # --- live migration (docs/DESIGN.md "Live migration") -------------------------------------
    def set_log_base(self, shm: str, size: int) -> None:
        """VHOST_SET_LOG_BASE: the device logs its writes into `size` bytes of segment `shm`
        ("" drops the log). Switching logs is how the migration reads one the device no longer
        writes (the host swaps it under the device lock)."""
        self._req("SET_LOG_BASE", shm=shm, offset=0, size=size)

    def set_logging(self, on: bool) -> None:
        """QEMU's vhost_dev_set_log: VHOST_VRING_F_LOG on every ring (the used ring logged at its
        own gpa), then VHOST_F_LOG_ALL on the running device (and the reverse order off)."""
        from shared.constants import VHOST_F_LOG_ALL, bit
        rings = [(r, 1 if on else 0) for r in self.rings]
        if not on:
            self._req("SET_FEATURES", features=self.features)
        for r, flags in rings:
            self._req("SET_VRING_ADDR", index=r.index, flags=flags,
                      desc_user_addr=self.ram.gpa_to_uva(r.desc),
                      avail_user_addr=self.ram.gpa_to_uva(r.avail),
                      used_user_addr=self.ram.gpa_to_uva(r.used), log_guest_addr=r.used if on else 0)
        if on:
            self._req("SET_FEATURES", features=self.features | bit(VHOST_F_LOG_ALL))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring; its last_avail_idx."""
        return self._req("GET_VRING_BASE", index=index)["num"]

    def restart(self, bases: list[int]) -> None:
        """Run the stopped rings again on this connection (a migration that failed after
        GET_VRING_BASE): reset, the same features, the rings from `bases`, DRIVER_OK."""
        self._negotiate(self.features, exact=True)
        self._mem_table_sent = False
        self._setup_rings(bases=bases)
        self.driver_ok()
        self.log.info("restarted; rings resume at %s", bases)

    def ring_addrs(self) -> list[tuple[int, int, int]]:
        return [(r.desc, r.avail, r.used) for r in self.rings]

    # --- reconnect ------------------------------------------------------------------------------
    def reconnect(self) -> None:
        """Replay the device state to a (new) host: HELLO reconnect, features, memory table, rings
        resuming at each ring's used.idx, DRIVER_OK (vhost-user reconnect without inflight)."""
        if not self.rings:
            raise RuntimeError("reconnect before find_vqs")
        self.connect(reconnect=True)
        self._negotiate(self.features, exact=True)
        bases = [r.vq.resume_base() for r in self.rings]     # split: used.idx; packed: + wrap
        self._setup_rings(bases=bases)
        self.driver_ok()
        self.log.info("reconnected; rings resume at used.idx %s", bases)
