"""The one control session, backend side: typed requests in, typed replies out, the legal order kept.

Theory of operation
-------------------
Two codecs turn a connection's bytes into the same `Request`s and the session's `Result`s back
into bytes: host/native.py (msgpack maps, docs/PROTOCOL.md) and host/vhost_user/codec.py (the
vhost-user wire format, QEMU's vhost-user.rst). `Session` is pure: it never touches a socket.
Attaching the memory table, opening doorbells and mapping the dirty log are injected
(`attach_memory(regions) -> GuestMemory`, `open_doorbell(handle) -> Doorbell`,
`attach_log(source, offset, size) -> (bitmap, owner)`), so tests run it on bytearrays.

The two transports differ in one thing the session must know, `derived_status`:

native (derived_status False): the driver writes the virtio status byte (docs/PROTOCOL.md 4)

    session   := HELLO owner*
    owner     := query* SET_OWNER (query | setup)* [RESET_OWNER]
    query     := GET_FEATURES | GET_STATUS | GET_QUEUE_NUM | GET_STATS | GET_CONFIG
    setup     := SET_STATUS | SET_FEATURES | SET_MEM_TABLE | vring | GET_VRING_BASE

    - status bits are only added, in the order ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK
      (FAILED may be added at any time; 0 resets the device and releases what it held);
    - SET_FEATURES needs DRIVER set and FEATURES_OK clear; bits outside the offer are EOPNOTSUPP;
      FEATURES_OK is refused by leaving the bit clear when the device rejects the features;
    - SET_MEM_TABLE and SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR need FEATURES_OK, no DRIVER_OK,
      and (vrings) the ring not enabled; SET_VRING_ADDR needs the memory table and the ring's num;
    - DRIVER_OK needs every enabled ring to pass access_ok and to have kick and call doorbells;
      it starts them all.

vhost-user (derived_status True; no VHOST_USER_PROTOCOL_F_STATUS offered)

    - the status is derived: SET_FEATURES sets ACKNOWLEDGE|DRIVER|FEATURES_OK; the device runs
      (DRIVER_OK, start()) while at least one ring is started, and stops when none is;
    - a ring starts when it has num, addresses, a memory table, a kick doorbell and is enabled
      (with VHOST_USER_F_PROTOCOL_FEATURES rings start disabled and SET_VRING_ENABLE enables them;
      without it the kick enables the ring: vhost-user.rst "Ring states"). A ring enabled before
      it is configured (QEMU's vhost-user-net) waits; `Result.started` names rings that just
      started, so the runner polls them once for buffers posted before the start;
    - GET_VRING_BASE stops the ring, drops its kick and returns last_avail_idx;
    - SET_VRING_CALL/ERR/KICK may replace doorbells at any time; SET_MEM_TABLE too;
    - GET/SET_PROTOCOL_FEATURES (REPLY_ACK, CONFIG, RESET_DEVICE; LOG_SHMFD where the device logs).

In both, the device's `vq.enabled` is true only while the ring is started (the frontend's
"enabled" is kept in `RingState`), and the same rules check the memory table (`check_memory_table`),
the ring addresses (`ring_gpas`), the ring sizes and the dirty log.

Errors: every refusal is a ProtocolError with an errno name. It ends the session (`Result.close`;
the runner sends the reply, closes the connection and then calls `close()`), except the refusals
of the ioctl-like native net ops (SET_BACKEND, SET_LOG_BASE, and SET_FEATURES / SET_VRING_ADDR
toggling dirty logging on a running device): those are `fatal: false` and the device goes on
(vhost_net_set_backend, VHOST_SET_LOG_BASE). vhost-user closes on any error. handle() never
raises. Every step is logged at INFO.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from shared.constants import (VHOST_F_LOG_ALL, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
                              VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, bit)
from shared.control import MAX_CONFIG, PROTOCOL_VERSION
from shared.errors import GuestMemoryError, ProtocolError
from shared.memory import GuestMemory
from shared.ring_layout import avail_size, check_num, desc_table_size, used_size

log = logging.getLogger(__name__)

# The driver's bits in the order it must set them (spec 3.1.1 device initialization)
STATUS_ORDER = (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER_OK)
DRIVER_STATUS_BITS = sum(STATUS_ORDER) | VIRTIO_CONFIG_S_FAILED
SETUP_STATUS = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
QUERIES = frozenset({"GET_FEATURES", "GET_STATUS", "GET_QUEUE_NUM", "GET_STATS", "GET_CONFIG"})
VRING_F_LOG = 1                # vhost_vring_addr.flags bit 0: log used-ring writes (VHOST_VRING_F_LOG)
LOG_ALL = bit(VHOST_F_LOG_ALL)

# vhost-user only (vhost-user.rst "Protocol features"; the bits live here, the wire in the codec)
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES: a virtio feature bit of the transport
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_RESET_DEVICE = 13
PROTOCOL_FEATURES = (1 << PROTOCOL_F_REPLY_ACK) | (1 << PROTOCOL_F_CONFIG) | (1 << PROTOCOL_F_RESET_DEVICE)


# --- the typed requests both codecs produce -------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """One memory-table region; `source` is where its bytes are: a shm name (native) or an fd."""
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    source: Any = None


@dataclass
class Request:
    """One control request, whatever the wire. Exactly the fields its op uses are set."""
    op: str
    index: int | None = None       # vring requests, SET_BACKEND
    num: int | None = None         # SET_VRING_NUM / BASE: the number; SET_VRING_ENABLE: 0 or 1
    value: int | None = None       # SET_FEATURES, SET_PROTOCOL_FEATURES, SET_STATUS, other u64s
    flags: int = 0                 # SET_VRING_ADDR: VHOST_VRING_F_LOG; GET/SET_CONFIG: its flags
    desc: int = 0
    avail: int = 0
    used: int = 0
    log: int = 0                   # SET_VRING_ADDR: log_guest_addr
    regions: tuple = ()            # SET_MEM_TABLE: Regions
    doorbell: Any = None           # SET_VRING_KICK/CALL/ERR: what open_doorbell opens; None removes
    offset: int = 0                # GET_CONFIG, SET_LOG_BASE
    size: int = 0
    source: Any = None             # SET_LOG_BASE: shm name or fd ("" drops the log); SET_BACKEND: spec
    hello: dict | None = None      # HELLO (native): the whole message
    need_reply: bool = False       # vhost-user: NEED_REPLY
    fds: tuple = ()                # fds this request owns: closed when it is refused

    def close_fds(self) -> None:
        close_fds(self.fds)


@dataclass
class Result:
    """What the session answers: reply fields (None: nothing but an ack) or an error; and what a
    codec hands its connection: the encoded `replies`, `close` after them, rings just `started`
    (the runner polls them once)."""
    fields: dict | None = None
    error: ProtocolError | None = None
    fatal: bool = True             # with an error: does the session end?
    close: bool = False            # send the reply, then close the connection
    started: list = field(default_factory=list)
    replies: list = field(default_factory=list)


@dataclass
class RingState:
    num: bool = False
    addr: bool = False
    enabled: bool = False      # the frontend's SET_VRING_ENABLE (or its kick without PROTOCOL_FEATURES)
    started: bool = False      # running: the device's vq.enabled mirrors this


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _err(code: str, message: str, fatal: bool = True) -> ProtocolError:
    """A refusal; `fatal=False`: an ioctl-like one, answered `fatal: false` (the device goes on)."""
    e = ProtocolError(message, code)
    e.fatal = fatal  # type: ignore[attr-defined]
    return e


def _os_err(e: OSError, default: str = "EINVAL") -> ProtocolError:
    """A device's OSError as a soft refusal with its errno name."""
    return _err(errno.errorcode.get(e.errno, default) if e.errno else default, e.strerror or str(e), False)


# --- rules both transports need --------------------------------------------------------------------
def log_pages_needed(regions) -> int:
    """Bytes of dirty bitmap that cover every guest-physical page of a memory table (log_access_ok:
    one bit per 4 KiB page)."""
    end = max((r.guest_phys_addr + r.memory_size for r in regions), default=0)
    return -(-end // 0x1000 // 8) if end else 0


def check_memory_table(regions) -> None:
    """SET_MEM_TABLE: no empty, wrapping or overlapping region (vhost_set_memory, vhost-user)."""
    for r in regions:
        if r.memory_size == 0:
            raise _err("EINVAL", "memory region of size 0")
        for base in ("guest_phys_addr", "userspace_addr"):
            if getattr(r, base) + r.memory_size > 1 << 64:
                raise _err("EINVAL", f"memory region {base} {getattr(r, base):#x} + size wraps")
    for key in ("guest_phys_addr", "userspace_addr"):
        s = sorted(regions, key=lambda r: getattr(r, key))
        for a, b in zip(s, s[1:]):
            if getattr(a, key) + a.memory_size > getattr(b, key):
                raise _err("EINVAL", f"memory regions overlap at {key} {getattr(b, key):#x}")


def ring_gpas(mem: GuestMemory, num: int, desc: int, avail: int, used: int,
              parts=None) -> tuple[int, int, int]:
    """SET_VRING_ADDR: the frontend's ring addresses -> guest-physical (desc, avail, used).
    `parts`: the ring's ((size, align) x 3) when not the split ring's (a packed ring: the
    descriptor ring and the driver and device areas, 16 / 4 / 4)."""
    gpas = []
    # vhost_vring_set_addr: alignment of each part (virtio 1.x 2.7: 16 / 2 / 4)
    if parts is None:
        parts = ((desc_table_size(num), 16), (avail_size(num), 2), (used_size(num), 4))
    for part, uva, (size, align) in zip(("desc", "avail", "used"), (desc, avail, used), parts):
        if uva & (align - 1):
            raise _err("EINVAL", f"SET_VRING_ADDR: {part} address {uva:#x} is not {align}-byte aligned")
        try:
            gpas.append(mem.uva_to_gpa(uva, size))   # vhost-user qva_to_va
        except GuestMemoryError as e:
            raise _err("EFAULT", f"SET_VRING_ADDR: {part} ring: {e}") from None
    return gpas[0], gpas[1], gpas[2]


def _parts(vq):
    """The ring's part sizes and alignments (None: the split ring's)."""
    parts = getattr(vq, "parts", None)
    return parts(vq.num) if callable(parts) else None


class Session:
    """One connection's control session for any device kind (see the module docstring)."""

    def __init__(self, *, attach_memory: Callable[[tuple], GuestMemory],
                 open_doorbell: Callable[[Any], Any],
                 attach_log: Callable[[Any, int, int], tuple] | None = None,
                 device=None, device_factory: Callable[[dict], Any] | None = None,
                 derived_status: bool = False, name: str = "control"):
        self.attach_memory, self.open_doorbell, self.attach_log = attach_memory, open_doorbell, attach_log
        self.device_factory = device_factory
        self.derived_status = derived_status
        self.name = name
        self.owner = self.closed = False
        self.error: ProtocolError | None = None
        self.protocol_features = 0
        self.protocol_acked = False     # VHOST_USER_F_PROTOCOL_FEATURES negotiated
        self.device = None
        self.rings: list[RingState] = []
        if device is not None:
            self._adopt(device)

    def _adopt(self, dev) -> None:
        self.device = dev
        self._reset_rings()
        # dirty logging only where the device can do it (VhostNet)
        self.logs = bool(dev.features & LOG_ALL) and hasattr(dev, "set_log_base")
        self.protocol_offer = PROTOCOL_FEATURES | ((1 << PROTOCOL_F_LOG_SHMFD) if self.logs else 0)

    def _reset_rings(self) -> None:
        self.rings = [RingState() for _ in range(self.device.num_queues)]

    # --- one request -----------------------------------------------------------------------------
    def handle(self, req: Request) -> Result:
        """Handle one request. Never raises; takes ownership of req's fds."""
        try:
            if self.closed:
                raise _err("EPROTO", "session is closed after an earlier error")
            if self.device is None:
                return Result(self._hello(req))
            if req.op == "HELLO":
                raise _err("EPROTO", "HELLO may only be sent once, first")
            handler = HANDLERS.get(req.op)
            if handler is None or req.op in (NATIVE_ONLY if self.derived_status else VHOST_USER_ONLY):
                raise _err("EOPNOTSUPP", f"{req.op} is not supported")
            if not self.derived_status and not self.owner and req.op not in QUERIES \
                    and req.op != "SET_OWNER":
                raise _err("EPERM", f"{req.op} before SET_OWNER")
            result = Result()
            with self.device.lock:
                result.fields = handler(self, req, result)
            return result
        except ProtocolError as e:
            req.close_fds()
            if getattr(e, "fatal", True) is False and not self.derived_status:
                log.info("%s: %s refused: %s: %s (the device goes on)", self.name, req.op, e.code, e)
                return Result(error=e, fatal=False)
            return self.fail(e, req.op)
        except Exception as e:  # a device bug: report it, close, keep the process alive
            req.close_fds()
            log.exception("%s: internal error handling %s", self.name, req.op)
            return self.fail(_err("EIO", f"internal error: {type(e).__name__}: {e}"), req.op)

    def fail(self, e: ProtocolError, op: str = "a request") -> Result:
        """A refusal, or a request a codec could not decode: the session ends with this error."""
        if not self.closed:
            self.closed, self.error = True, e
            log.info("%s: %s refused: %s: %s (closing)", self.name, op, e.code, e)
        return Result(error=e, close=True)

    def close(self) -> None:
        """The connection is gone: stop the device and release memory and doorbells."""
        self.closed = True
        dev = self.device
        if dev is not None:
            with dev.lock:
                dev.close()
            self._reset_rings()
            log.info("%s: closed", self.name)

    def ring_started(self, i: int) -> bool:
        return i < len(self.rings) and self.rings[i].started

    # --- HELLO (native) ----------------------------------------------------------------------------
    def _hello(self, req: Request) -> dict:
        if req.op != "HELLO":
            raise _err("EPROTO", f"{req.op} before HELLO (HELLO must be first)")
        msg = req.hello
        if msg["version"] != PROTOCOL_VERSION:
            raise _err("EPROTONOSUPPORT",
                       f"protocol version {msg['version']} not supported (this host speaks {PROTOCOL_VERSION})")
        dev = self.device_factory(msg) if self.device_factory else None
        if dev is None:
            raise _err("ENODEV", f"no {msg['device']} device for {msg['guest']!r}")
        dev.reconnect = msg["reconnect"]
        dev.hello = msg
        self._adopt(dev)
        self.name = f"{msg['guest']}/{msg['device']}"
        log.info("%s: HELLO v%d%s: %s device id %d, %d queues, offering features %#x", self.name,
                 msg["version"], " (reconnect)" if msg["reconnect"] else "", dev.device_type,
                 dev.device_id, dev.num_queues, dev.features)
        return {"version": PROTOCOL_VERSION, "device_id": dev.device_id, "num_queues": dev.num_queues,
                "max_queue_size": dev.max_queue_size, "config_size": len(dev.config_bytes())}

    # --- ownership and reset -----------------------------------------------------------------------
    def _set_owner(self, req, out) -> None:
        if self.owner:
            raise _err("EBUSY", "SET_OWNER sent twice (vhost_dev_set_owner: -EBUSY)")
        self.owner = True
        log.info("%s: SET_OWNER", self.name)

    def _reset_owner(self, req, out) -> None:
        # vhost_net_reset_owner also stops the backends (vhost_net_stop): a device that has them
        # detaches and closes them here; then the device forgets everything as on status 0.
        dev = self.device
        if not self.derived_status and hasattr(dev, "reset_owner"):
            for b in dev.reset_owner():
                dev.close_backend(b)
        dev.reset()
        self._reset_rings()
        self.owner = False
        log.info("%s: %s: device reset, ownership dropped", self.name, req.op)

    def _set_backend(self, req, out) -> None:
        """VHOST_NET_SET_BACKEND (owner only, like every setup message): swap a queue's backend."""
        if not hasattr(self.device, "set_backend_spec"):
            raise _err("EOPNOTSUPP", f"a {self.device.device_type} device has no backends")
        try:
            self.device.set_backend_spec(req.index, req.source)
        except OSError as e:           # the ioctl's errno (ENOBUFS, EFAULT, or the open's)
            raise _os_err(e) from None
        except ValueError as e:        # a spec that cannot be opened
            raise _err("EINVAL", str(e), False) from None
        log.info("%s: SET_BACKEND queue %d -> %r", self.name, req.index, req.source or "(detached)")

    # --- queries (the simple ones are lambdas in HANDLERS) -----------------------------------------
    def _get_config(self, req, out) -> dict:
        cfg = bytes(self.device.config_bytes())
        off, size = req.offset, req.size
        if size > MAX_CONFIG or off + size > len(cfg):
            raise _err("EINVAL", f"GET_CONFIG [{off}, +{size}) is outside the {len(cfg)}-byte config space")
        return {"data": cfg[off:off + size]}

    def _set_config(self, req, out) -> None:
        raise _err("EPERM", "SET_CONFIG: the config space is read-only")

    def _set_protocol_features(self, req, out) -> None:
        if req.value & ~self.protocol_offer:
            raise _err("EOPNOTSUPP", f"protocol features {req.value & ~self.protocol_offer:#x} were not offered")
        self.protocol_features = req.value
        log.info("%s: SET_PROTOCOL_FEATURES %#x", self.name, req.value)

    # --- status (native) ---------------------------------------------------------------------------
    def _set_status(self, req, out) -> dict:
        dev = self.device
        new = req.value
        if new == 0:
            dev.reset()
            self._reset_rings()
            log.info("%s: SET_STATUS 0: device reset, memory and doorbells released", self.name)
            return {"status": dev.status}
        new &= ~VIRTIO_CONFIG_S_NEEDS_RESET          # a device-owned bit: the driver's copy is ignored
        if new & ~DRIVER_STATUS_BITS:
            raise _err("EINVAL", f"status {req.value:#x} has bits the driver may not set")
        old = dev.status & DRIVER_STATUS_BITS
        if old & ~new:
            raise _err("EPROTO", f"status {new:#x} clears bits of {old:#x} (only 0 resets)")
        added = new & ~old
        if old & VIRTIO_CONFIG_S_FAILED and added:
            raise _err("EPROTO", "status after FAILED: only 0 (reset) is allowed")
        for b in STATUS_ORDER:                       # spec 3.1.1: steps in order
            if not added & b:
                continue
            missing = [x for x in STATUS_ORDER[:STATUS_ORDER.index(b)] if not new & x]
            if missing:
                raise _err("EPROTO", f"status bit {b:#x} set before {missing[0]:#x}")
            if b == VIRTIO_CONFIG_S_FEATURES_OK:
                if not dev.features_ok(dev.acked_features):
                    # spec 3.1.1 step 6: the device refuses by leaving FEATURES_OK clear
                    log.info("%s: FEATURES_OK refused for features %#x", self.name, dev.acked_features)
                    return {"status": dev.status}
                log.info("%s: FEATURES_OK, negotiated %#x", self.name, dev.acked_features)
            elif b == VIRTIO_CONFIG_S_DRIVER_OK:
                self._driver_ok(out)
            dev.status |= b
        if added & VIRTIO_CONFIG_S_FAILED:           # spec 2.1.1: the driver gave up on the device
            dev.stop()
            dev.status |= VIRTIO_CONFIG_S_FAILED
            log.info("%s: driver set FAILED", self.name)
        log.info("%s: status %#x", self.name, dev.status)
        return {"status": dev.status}

    def _driver_ok(self, out: Result) -> None:
        # (No NEEDS_RESET check: NEEDS_RESET is set only by vq_err, which runs only on a started
        # device, i.e. after DRIVER_OK was added; DRIVER_OK is cleared only by status 0, which
        # clears NEEDS_RESET too. So DRIVER_OK is never added while NEEDS_RESET is set; issue 21.)
        dev = self.device
        enabled = [i for i, r in enumerate(self.rings) if r.enabled]
        for i in enabled:
            if not self._set_up(i):
                raise _err("EINVAL", f"DRIVER_OK: queue {i} is enabled but not set up (num, addr, memory table)")
            if dev.kicks[i] is None or dev.calls[i] is None:
                raise _err("EINVAL", f"DRIVER_OK: queue {i} has no kick or call doorbell")
        self._start(enabled, out)
        log.info("%s: DRIVER_OK, enabled queues %s", self.name, enabled)

    # --- features ----------------------------------------------------------------------------------
    def _set_features(self, req, out) -> None:
        dev = self.device
        f = req.value
        transport = F_PROTOCOL_FEATURES if self.derived_status else 0
        if f & ~(dev.features | transport):          # vhost SET_FEATURES: -EOPNOTSUPP
            raise _err("EOPNOTSUPP", f"features {f & ~(dev.features | transport):#x} were not offered "
                                     f"(offer {dev.features | transport:#x})")
        dev_f = f & ~transport
        toggle = not (dev_f ^ dev.acked_features) & ~LOG_ALL
        if self.derived_status:
            if dev_f & LOG_ALL and getattr(dev, "dirty_log", None) is None:
                # vhost_net_set_features: -EFAULT (no SET_LOG_BASE, or LOG_SHMFD not negotiated)
                raise _err("EFAULT", f"features {dev_f:#x}: VHOST_F_LOG_ALL without a usable log")
            if not dev.features_ok(dev_f):
                raise _err("EINVAL", f"features {dev_f:#x} refused (VERSION_1 is required)")
            if dev.running and not toggle:
                raise _err("EBUSY", "SET_FEATURES changes the features of running rings (only "
                                    "VHOST_F_LOG_ALL may change)")
        else:
            toggle = toggle and dev.status & VIRTIO_CONFIG_S_FEATURES_OK \
                and not dev.status & VIRTIO_CONFIG_S_FAILED
            if not toggle and (not dev.status & VIRTIO_CONFIG_S_DRIVER
                               or dev.status & VIRTIO_CONFIG_S_FEATURES_OK):
                raise _err("EPROTO", "SET_FEATURES needs status DRIVER set and FEATURES_OK clear "
                                     "(after it, only VHOST_F_LOG_ALL may change)")
        try:
            dev.set_features(dev_f)                  # vhost_net_set_features: LOG_ALL, no log: EFAULT
        except OSError as e:
            raise _os_err(e) from None
        if self.derived_status:
            dev.status |= SETUP_STATUS
            self.protocol_acked = bool(f & F_PROTOCOL_FEATURES)
        log.info("%s: SET_FEATURES %#x%s", self.name, f, " (dirty logging toggled)" if toggle else "")

    def _set_log_base(self, req, out) -> dict:
        """VHOST_SET_LOG_BASE: the dirty bitmap, `size` bytes at `offset` of `source` (a shm name,
        "" drops it; over vhost-user an fd, with LOG_SHMFD). Unusable (missing, not ours, too small
        for the memory table): EFAULT."""
        dev = self.device
        if not self.logs or (self.derived_status
                             and not self.protocol_features & (1 << PROTOCOL_F_LOG_SHMFD)):
            raise _err("EOPNOTSUPP", f"a {dev.device_type} device does no dirty logging here", False)
        if req.source == "":
            if dev.acked_features & LOG_ALL:
                raise _err("EBUSY", "SET_LOG_BASE: cannot drop the log while VHOST_F_LOG_ALL is acked", False)
            dev.set_log_base(None)
            log.info("%s: SET_LOG_BASE: log dropped", self.name)
            return {}
        need = log_pages_needed(dev.mem.regions) if dev.mem is not None else 0
        if req.size == 0 or req.size < need:
            raise _err("EFAULT", f"SET_LOG_BASE: a log of {req.size} bytes does not cover the memory "
                                 f"table ({need} bytes needed)", False)
        req.fds = ()                                 # attach_log owns an fd source now
        try:
            bitmap, owner = self.attach_log(req.source, req.offset, req.size)
        except (OSError, ValueError, OverflowError) as e:
            raise _err("EFAULT", f"SET_LOG_BASE: cannot map the log: {e}", False) from None
        try:
            dev.set_log_base(bitmap, owner)
        except OSError as e:
            bitmap.release()
            owner.close()
            raise _os_err(e, "EFAULT") from None
        log.info("%s: SET_LOG_BASE %d bytes at offset %#x", self.name, req.size, req.offset)
        return {}

    # --- memory table ------------------------------------------------------------------------------
    def _require_setup_phase(self, op: str) -> None:
        st = self.device.status
        if self.derived_status:
            return                                   # vhost-user: no status to order against
        if not st & VIRTIO_CONFIG_S_FEATURES_OK:
            raise _err("EPROTO", f"{op} before FEATURES_OK")
        if st & VIRTIO_CONFIG_S_DRIVER_OK:
            raise _err("EBUSY", f"{op} after DRIVER_OK")

    def _set_mem_table(self, req, out) -> None:
        self._require_setup_phase("SET_MEM_TABLE")
        if not self.derived_status and any(r.enabled for r in self.rings):
            raise _err("EBUSY", "SET_MEM_TABLE while a ring is enabled")
        check_memory_table(req.regions)
        req.fds = ()                                 # attach_memory owns fd sources now
        try:
            mem = self.attach_memory(req.regions)
        except ProtocolError:
            raise
        except Exception as e:
            raise _err("EFAULT", f"cannot attach the memory table: {type(e).__name__}: {e}") from None
        self.device.set_mem(mem)
        if all(isinstance(r.source, str) for r in req.regions):
            # for monitors (GET_STATS "mem_table"): where the guest RAM is, to attach read-only
            self.device.mem_table = [{"guest_phys_addr": r.guest_phys_addr, "memory_size": r.memory_size,
                                      "mmap_offset": r.mmap_offset, "shm": r.source} for r in req.regions]
        if not self.derived_status:
            for r in self.rings:                     # ring addresses are translated via the table
                r.addr = False
        log.info("%s: SET_MEM_TABLE %s", self.name, ", ".join(
            f"[gpa {r.guest_phys_addr:#x}, +{r.memory_size:#x}) uva {r.userspace_addr:#x} from "
            f"{r.source if isinstance(r.source, str) else 'fd'}@{r.mmap_offset:#x}" for r in req.regions))

    # --- vrings ------------------------------------------------------------------------------------
    def _vq(self, req, *, setup: bool = True):
        """The request's queue; with `setup`, one that may be configured now (not running)."""
        dev = self.device
        i = req.index
        if i >= dev.num_queues:                      # vhost_vring_ioctl: idx >= nvqs -> -ENOBUFS
            raise _err("ENOBUFS", f"{req.op}: queue index {i} out of range (device has {dev.num_queues})")
        if setup:
            self._require_setup_phase(req.op)
            if self.rings[i].started or (not self.derived_status and self.rings[i].enabled):
                raise _err("EBUSY", f"{req.op}: queue {i} is {'running' if self.derived_status else 'enabled'}")
        return dev.vqs[i]

    def _set_vring_num(self, req, out) -> None:
        vq = self._vq(req)
        try:
            check_num(req.num)                       # spec 2.7: power of 2
        except ValueError as e:
            raise _err("EINVAL", f"SET_VRING_NUM: {e}") from None
        if req.num > self.device.max_queue_size:
            raise _err("EINVAL", f"SET_VRING_NUM: {req.num} exceeds the maximum {self.device.max_queue_size}")
        vq.num = req.num
        self.rings[vq.index].num = True
        self.rings[vq.index].addr = False            # sizes changed: addresses must be resent
        log.info("%s: queue %d num %d", self.name, vq.index, req.num)

    def _set_vring_addr(self, req, out) -> None:
        dev = self.device
        if req.flags & ~VRING_F_LOG:
            raise _err("EINVAL", f"SET_VRING_ADDR: unknown flags {req.flags:#x}")
        if req.flags & VRING_F_LOG and not self.logs:
            raise _err("EOPNOTSUPP", "SET_VRING_ADDR: dirty logging (VHOST_VRING_F_LOG) is not supported")
        i = req.index
        logged = req.log if req.flags & VRING_F_LOG else None
        if self.logs and i < dev.num_queues and dev.mem is not None and self.rings[i].addr:
            # the same addresses again: only the log flag changes (QEMU's vhost_dev_set_log at
            # migration start / end), allowed while the ring runs
            vq = dev.vqs[i]
            try:
                same = ring_gpas(dev.mem, vq.num, req.desc, req.avail, req.used,
                                 _parts(vq)) == (vq.desc, vq.avail, vq.used)
            except ProtocolError:
                same = False
            if same:
                dev.log_addr[i] = logged
                log.info("%s: queue %d used-ring logging %s", self.name, i,
                         "off" if logged is None else f"at {logged:#x}")
                return
        vq = self._vq(req)
        if dev.mem is None:
            raise _err("EPROTO", "SET_VRING_ADDR before SET_MEM_TABLE")
        if not self.rings[i].num:
            raise _err("EPROTO", "SET_VRING_ADDR before SET_VRING_NUM")
        vq.desc, vq.avail, vq.used = ring_gpas(dev.mem, vq.num, req.desc, req.avail, req.used,
                                                   _parts(vq))
        if self.logs:
            dev.log_addr[i] = logged
        self.rings[i].addr = True
        log.info("%s: queue %d rings desc %#x avail %#x used %#x", self.name, i, vq.desc, vq.avail, vq.used)

    def _set_vring_base(self, req, out) -> None:
        vq = self._vq(req)
        vq.last_avail_idx = vq.last_used_idx = req.num
        log.info("%s: queue %d base %d", self.name, vq.index, req.num)

    def _get_vring_base(self, req, out) -> dict:
        vq = self._vq(req, setup=False)
        self._stop_ring(vq.index)                    # vhost-user: GET_VRING_BASE stops the ring
        self.rings[vq.index].enabled = False
        if self.derived_status:
            self.device.set_doorbell("kick", vq.index, None)   # the ring is stopped; kick fd dropped
        vring_base = getattr(vq, "vring_base", None)    # packed: both positions and wrap counters
        base = vring_base() if callable(vring_base) else vq.last_avail_idx
        log.info("%s: queue %d stopped at base %#x", self.name, vq.index, base)
        return {"index": vq.index, "num": base}

    def _set_doorbell(self, req, out, kind: str) -> None:
        """SET_VRING_KICK/CALL/ERR. vhost-user may replace doorbells of running rings (QEMU does);
        native sets them up before DRIVER_OK."""
        vq = self._vq(req, setup=not self.derived_status)
        db = None
        if req.doorbell is not None:
            try:
                db = self.open_doorbell(req.doorbell)
                req.fds = ()                         # the doorbell owns an fd handle now
            except ProtocolError:
                raise
            except Exception as e:
                raise _err("EBADF", f"{req.op}: cannot open doorbell {_name(req.doorbell)}: {e}") from None
        elif kind == "kick" and self.derived_status:
            # bit 8 "no fd": the backend would have to poll; we don't, so the ring cannot run
            self._stop_ring(vq.index)
        self.device.set_doorbell(kind, vq.index, db)
        log.info("%s: queue %d %s doorbell %s", self.name, vq.index, kind,
                 _name(req.doorbell) if req.doorbell is not None else "removed")
        if kind == "kick" and self.derived_status:
            if not self.protocol_acked and req.doorbell is not None:
                self.rings[vq.index].enabled = True  # no PROTOCOL_FEATURES: the kick enables
            self._try_start(vq.index, out)

    def _set_vring_enable(self, req, out) -> None:
        vq = self._vq(req, setup=False)
        if req.num > 1:
            raise _err("EINVAL", f"SET_VRING_ENABLE {req.num} (0 or 1)")
        if not self.derived_status:
            if req.num:
                self._require_setup_phase("SET_VRING_ENABLE")
            elif not self.device.status & VIRTIO_CONFIG_S_FEATURES_OK:
                raise _err("EPROTO", "SET_VRING_ENABLE before FEATURES_OK")
        self.rings[vq.index].enabled = bool(req.num)
        if not req.num:
            self._stop_ring(vq.index)
        elif self.derived_status:
            self._try_start(vq.index, out)
        log.info("%s: queue %d %s", self.name, vq.index, "enabled" if req.num else "disabled")

    # --- starting and stopping rings ---------------------------------------------------------------
    def _set_up(self, i: int) -> bool:
        return self.device.mem is not None and self.rings[i].num and self.rings[i].addr

    def _try_start(self, i: int, out: Result) -> None:
        """vhost-user: start ring i once it is enabled and fully configured (else it waits)."""
        ring = self.rings[i]
        if not ring.started and ring.enabled and self.device.kicks[i] is not None and self._set_up(i) \
                and self.device.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self._start([i], out)

    def _start(self, rings: list, out: Result) -> None:
        """Start `rings`, and the device (DRIVER_OK, start()) if it is not running."""
        dev = self.device
        for i in rings:
            if not dev.vqs[i].access_ok(dev.mem):    # ring rule 13, vhost_vq_access_ok
                raise _err("EFAULT", f"queue {i}: ring memory is not accessible")
        for i in rings:
            vq = dev.vqs[i]
            try:
                vq.last_used_idx = vq.used_idx(dev.mem)   # vhost_vq_init_access: resume from used.idx
            except GuestMemoryError as e:
                raise _err("EFAULT", f"queue {i}: {e}") from None
            self.rings[i].started = vq.enabled = True
            out.started.append(i)
            log.info("%s: queue %d started (num %d, base %d)", self.name, i, vq.num, vq.last_avail_idx)
        if not dev.running:
            dev.status |= VIRTIO_CONFIG_S_DRIVER_OK
            dev.start()

    def _stop_ring(self, i: int) -> None:
        ring, vq = self.rings[i], self.device.vqs[i]
        if not ring.started:
            return
        ring.started = vq.enabled = False
        if callable(getattr(vq, "unmap", None)):
            vq.unmap()
        if self.derived_status and not any(r.started for r in self.rings):
            self.device.stop()
            self.device.status &= ~VIRTIO_CONFIG_S_DRIVER_OK
        log.info("%s: queue %d stopped", self.name, i)


def _name(handle: Any) -> str:
    if isinstance(handle, dict):
        return repr(handle.get("name"))
    return f"fd {handle}" if isinstance(handle, int) else repr(handle)


# op -> handler(session, request, result) -> reply fields or None. A reader greps here.
HANDLERS: dict[str, Callable[[Session, Request, Result], dict | None]] = {
    "SET_OWNER": Session._set_owner,
    "RESET_OWNER": Session._reset_owner,
    "RESET_DEVICE": Session._reset_owner,
    "SET_BACKEND": Session._set_backend,
    "GET_FEATURES": lambda s, req, out: {
        "features": s.device.features | (F_PROTOCOL_FEATURES if s.derived_status else 0)},
    "SET_FEATURES": Session._set_features,
    "GET_PROTOCOL_FEATURES": lambda s, req, out: {"features": s.protocol_offer},
    "SET_PROTOCOL_FEATURES": Session._set_protocol_features,
    "GET_STATUS": lambda s, req, out: {"status": s.device.status},
    "SET_STATUS": Session._set_status,
    "GET_QUEUE_NUM": lambda s, req, out: {"num": s.device.num_queues},
    "GET_STATS": lambda s, req, out: {"stats": s.device.get_stats()},
    "GET_CONFIG": Session._get_config,
    "SET_CONFIG": Session._set_config,
    "SET_LOG_BASE": Session._set_log_base,
    "SET_MEM_TABLE": Session._set_mem_table,
    "SET_VRING_NUM": Session._set_vring_num,
    "SET_VRING_ADDR": Session._set_vring_addr,
    "SET_VRING_BASE": Session._set_vring_base,
    "GET_VRING_BASE": Session._get_vring_base,
    "SET_VRING_KICK": lambda s, req, out: s._set_doorbell(req, out, "kick"),
    "SET_VRING_CALL": lambda s, req, out: s._set_doorbell(req, out, "call"),
    "SET_VRING_ERR": lambda s, req, out: s._set_doorbell(req, out, "err"),
    "SET_VRING_ENABLE": Session._set_vring_enable,
}
# ops one transport has and the other does not (vhost-user offers no F_STATUS)
NATIVE_ONLY = frozenset({"HELLO", "GET_STATUS", "SET_STATUS", "GET_STATS", "SET_BACKEND"})
VHOST_USER_ONLY = frozenset({"GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "RESET_DEVICE", "SET_CONFIG"})
