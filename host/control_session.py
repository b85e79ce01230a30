"""One control connection, backend side: validated requests in, replies out, the legal order kept.

Theory of operation
-------------------
`ControlSession` is pure: it never touches a socket. The runner feeds it bytes (`feed`) or decoded
messages (`handle`) and sends back what it returns; when `close` is True it sends the reply and
closes the connection, then calls `session.close()` to release the device. Attaching the memory
table and opening doorbells are injected (`attach_memory(regions) -> GuestMemory`,
`open_doorbell(spec) -> Doorbell`), so tests run it on bytearrays and LocalDoorbells.

The legal order (docs/PROTOCOL.md section 4), enforced here:

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
    - DRIVER_OK needs every enabled ring to pass access_ok and to have kick and call doorbells.

Every error is answered with an error reply and close=True: the connection ends and the device is
reset (vhost-user closes the socket on a malformed message; so do we on any error), except the
refusals of the ioctl-like net ops (SET_BACKEND, SET_LOG_BASE, and SET_FEATURES / SET_VRING_ADDR
toggling dirty logging on a running device): those answer the ioctl's errno with `"fatal": false`
and the device goes on as it was (vhost_net_set_backend, VHOST_SET_LOG_BASE). handle() never
raises. Every step is logged at INFO.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable

from shared.constants import (VHOST_F_LOG_ALL, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
                              VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, bit)
from shared.control import (MAX_CONFIG, PROTOCOL_VERSION, Decoder, encode, error_reply,
                            reply, request_seq, validate_request)
from shared.doorbell import open_doorbell as _open_sem_doorbell
from shared.errors import GuestMemoryError, ProtocolError
from shared.memory import GuestMemory, MemoryRegion
from shared.resources import attach_shm, close_shm
from shared.ring_layout import avail_size, check_num, desc_table_size, used_size

log = logging.getLogger(__name__)

# The driver's bits in the order it must set them (spec 3.1.1 device initialization)
STATUS_ORDER = (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER_OK)
DRIVER_STATUS_BITS = sum(STATUS_ORDER) | VIRTIO_CONFIG_S_FAILED
QUERIES = frozenset({"GET_FEATURES", "GET_STATUS", "GET_QUEUE_NUM", "GET_STATS", "GET_CONFIG"})
VRING_SETUP = frozenset({"SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_KICK",
                         "SET_VRING_CALL", "SET_VRING_ERR"})
VRING_F_LOG = 1                # vhost_vring_addr.flags bit 0: log used-ring writes (VHOST_VRING_F_LOG)
LOG_ALL = bit(VHOST_F_LOG_ALL)


def _err(code: str, message: str) -> ProtocolError:
    return ProtocolError(message, code)


def _soft(code: str, message: str) -> ProtocolError:
    """An ioctl-like refusal: answered with `fatal: false`, the connection and device go on."""
    e = ProtocolError(message, code)
    e.fatal = False  # type: ignore[attr-defined]
    return e


def _errno_code(e: OSError, default: str = "EINVAL") -> str:
    return errno.errorcode.get(e.errno, default) if e.errno else default


def log_pages_needed(regions) -> int:
    """Bytes of dirty bitmap that cover every guest-physical page of a memory table (log_access_ok:
    one bit per 4 KiB page)."""
    end = max((r.guest_phys_addr + r.memory_size for r in regions), default=0)
    return -(-end // 0x1000 // 8) if end else 0


def check_log_covers(dev, nbytes: int) -> None:
    """vhost_log_access_ok: the log must cover the memory table (EFAULT)."""
    mem = dev.mem
    if mem is None:
        return
    need = log_pages_needed(mem.regions)
    if nbytes < need:
        raise _soft("EFAULT", f"SET_LOG_BASE: a log of {nbytes} bytes does not cover the memory "
                              f"table ({need} bytes needed)")


def check_memory_table(regions: list[dict]) -> None:
    """SET_MEM_TABLE rules shared by both transports: no empty, wrapping or overlapping region."""
    for r in regions:
        if r["memory_size"] == 0:
            raise _err("EINVAL", "memory region of size 0")
        for base in ("guest_phys_addr", "userspace_addr"):
            if r[base] + r["memory_size"] > 1 << 64:
                raise _err("EINVAL", f"memory region {base} {r[base]:#x} + size wraps")
    for key in ("guest_phys_addr", "userspace_addr"):
        s = sorted(regions, key=lambda r: r[key])
        for a, b in zip(s, s[1:]):
            if a[key] + a["memory_size"] > b[key]:
                raise _err("EINVAL", f"memory regions overlap at {key} {b[key]:#x}")


def ring_gpas(mem: GuestMemory, num: int, desc: int, avail: int, used: int) -> tuple[int, int, int]:
    """SET_VRING_ADDR: the frontend's ring addresses -> guest-physical (desc, avail, used)."""
    gpas = []
    # vhost_vring_set_addr: alignment of each part (virtio 1.x 2.7: 16 / 2 / 4)
    for part, uva, size, align in (("desc", desc, desc_table_size(num), 16),
                                   ("avail", avail, avail_size(num), 2),
                                   ("used", used, used_size(num), 4)):
        if uva & (align - 1):
            raise _err("EINVAL", f"SET_VRING_ADDR: {part} address {uva:#x} is not {align}-byte aligned")
        try:
            gpas.append(mem.uva_to_gpa(uva, size))   # vhost-user qva_to_va
        except GuestMemoryError as e:
            raise _err("EFAULT", f"SET_VRING_ADDR: {part} ring: {e}") from None
    return gpas[0], gpas[1], gpas[2]


class ControlSession:
    def __init__(self, device_factory: Callable[[dict], Any], *,
                 attach_memory: Callable[[list[dict]], GuestMemory],
                 open_doorbell: Callable[[dict], Any] = _open_sem_doorbell,
                 hello_check: Callable[[dict], None] | None = None,
                 validate_hello: Callable[[dict], None] | None = None,
                 attach_log: Callable[[str, int, int], tuple] | None = None,
                 name: str = "control"):
        self.device_factory = device_factory
        self.attach_memory = attach_memory
        self.open_doorbell = open_doorbell
        self.attach_log = attach_log or attach_shm_log
        self.hello_check = hello_check or validate_hello
        self.name = name
        self.device = None
        self.hello: dict | None = None
        self.owner = False
        self.closed = False
        self.decoder = Decoder()
        self.requests = 0
        self.error: ProtocolError | None = None
        # per queue: which setup messages the frontend has sent (SET_VRING_ADDR needs num)
        self._num_set: list[bool] = []
        self._addr_set: list[bool] = []

    # --- byte-level convenience ------------------------------------------------------------------
    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """Feed bytes from the connection: (encoded replies to send, close the connection)."""
        out: list[bytes] = []
        if self.closed:
            return out, True
        try:
            for msg in self.decoder.iter_feed(data):
                rep, close = self.handle(msg)
                out.append(encode(rep))
                if close:
                    return out, True
        except ProtocolError as e:
            seq = getattr(e, "seq", None)
            out.append(encode(self._fail(seq, e)))
            return out, True
        return out, False

    # --- one message ---------------------------------------------------------------------------
    def handle(self, msg: Any) -> tuple[dict, bool]:
        """Handle one decoded request: (reply, close). Never raises."""
        seq = request_seq(msg)
        if self.closed:
            return error_reply(seq, "EPROTO", "session is closed after an earlier error"), True
        try:
            msg = validate_request(msg)
            op = msg["op"]
            self.requests += 1
            if self.device is None:
                return self._hello(msg), False
            if op == "HELLO":
                raise _err("EPROTO", "HELLO may only be sent once, first")
            if not self.owner and op not in QUERIES and op != "SET_OWNER":
                raise _err("EPERM", f"{op} before SET_OWNER")
            handler = getattr(self, "_op_" + op.lower())
            with self.device.lock:
                fields = handler(msg)
            return reply(seq, **(fields or {})), False
        except ProtocolError as e:
            if getattr(e, "fatal", True) is False:
                log.info("%s: %s refused: %s: %s (the device goes on)", self.name,
                         msg.get("op") if isinstance(msg, dict) else "?", e.code, e)
                return {**error_reply(seq, e.code, str(e)), "fatal": False}, False
            return self._fail(seq, e), True
        except Exception as e:  # a device bug: report it, close, keep the worker alive
            log.exception("%s: internal error handling %r", self.name, msg.get("op") if isinstance(msg, dict) else msg)
            return self._fail(seq, _err("EIO", f"internal error: {type(e).__name__}: {e}")), True

    def _fail(self, seq, e: ProtocolError) -> dict:
        self.closed = True
        self.error = e
        log.info("%s: error %s: %s (closing)", self.name, e.code, e)
        return error_reply(seq, e.code, str(e))

    def close(self) -> None:
        """The connection is gone: stop the device and release memory and doorbells."""
        self.closed = True
        dev, self.device = self.device, None
        if dev is not None:
            with dev.lock:
                dev.close()
            log.info("%s: closed", self.name)

    # --- HELLO ---------------------------------------------------------------------------------
    def _hello(self, msg: dict) -> dict:
        if msg["op"] != "HELLO":
            raise _err("EPROTO", f"{msg['op']} before HELLO (HELLO must be first)")
        if msg["version"] != PROTOCOL_VERSION:
            raise _err("EPROTONOSUPPORT",
                       f"protocol version {msg['version']} not supported (this host speaks {PROTOCOL_VERSION})")
        if self.hello_check is not None:
            self.hello_check(msg)
        dev = self.device_factory(msg)
        if dev is None:
            raise _err("ENODEV", f"no {msg['device']} device for {msg['guest']!r}")
        dev.reconnect = msg["reconnect"]
        dev.hello = msg
        self.device = dev
        self.hello = msg
        self.name = f"{msg['guest']}/{msg['device']}"
        self._num_set = [False] * dev.num_queues
        self._addr_set = [False] * dev.num_queues
        log.info("%s: HELLO v%d%s: %s device id %d, %d queues, offering features %#x", self.name,
                 msg["version"], " (reconnect)" if msg["reconnect"] else "", dev.device_type,
                 dev.device_id, dev.num_queues, dev.features)
        return reply(msg["seq"], version=PROTOCOL_VERSION, device_id=dev.device_id,
                     num_queues=dev.num_queues, max_queue_size=dev.max_queue_size,
                     config_size=len(dev.config_bytes()))

    # --- ownership -----------------------------------------------------------------------------
    def _op_set_owner(self, msg: dict) -> None:
        if self.owner:
            raise _err("EBUSY", "SET_OWNER sent twice (vhost_dev_set_owner: -EBUSY)")
        self.owner = True
        log.info("%s: SET_OWNER", self.name)

    def _op_reset_owner(self, msg: dict) -> None:
        # vhost_net_reset_owner also stops the backends (vhost_net_stop): a device that has them
        # detaches and closes them here; then the device forgets everything as on status 0.
        reset_owner = getattr(self.device, "reset_owner", None)
        if callable(reset_owner):
            closer = getattr(self.device, "_close_backend", None)
            for b in reset_owner():
                if closer is not None:
                    closer(b)
        self._reset_device()
        self.owner = False
        log.info("%s: RESET_OWNER: device reset, ownership dropped", self.name)

    def _reset_device(self) -> None:
        self.device.reset()
        self._num_set = [False] * self.device.num_queues
        self._addr_set = [False] * self.device.num_queues

    def _op_set_backend(self, msg: dict) -> None:
        """VHOST_NET_SET_BACKEND (owner only, like every setup message): swap a queue's backend."""
        setter = getattr(self.device, "set_backend_spec", None)
        if setter is None:
            raise _err("EOPNOTSUPP", f"a {self.device.device_type} device has no backends")
        try:
            setter(msg["index"], msg["backend"])
        except OSError as e:           # the ioctl's errno (ENOBUFS, EFAULT, or the open's)
            raise _soft(_errno_code(e), e.strerror or str(e)) from None
        except ValueError as e:        # a spec that cannot be opened
            raise _soft("EINVAL", str(e)) from None
        log.info("%s: SET_BACKEND queue %d -> %r", self.name, msg["index"], msg["backend"] or "(detached)")

    # --- queries -------------------------------------------------------------------------------
    def _op_get_features(self, msg: dict) -> dict:
        return {"features": self.device.features}

    def _op_get_status(self, msg: dict) -> dict:
        return {"status": self.device.status}

    def _op_get_queue_num(self, msg: dict) -> dict:
        return {"num": self.device.num_queues}

    def _op_get_stats(self, msg: dict) -> dict:
        return {"stats": self.device.get_stats()}

    def _op_get_config(self, msg: dict) -> dict:
        cfg = bytes(self.device.config_bytes())
        off, size = msg["offset"], msg["size"]
        if size > MAX_CONFIG or off + size > len(cfg):
            raise _err("EINVAL", f"GET_CONFIG [{off}, +{size}) is outside the {len(cfg)}-byte config space")
        return {"data": cfg[off:off + size]}

    # --- status and features -------------------------------------------------------------------
    def _op_set_status(self, msg: dict) -> dict:
        dev = self.device
        new = msg["status"]
        if new == 0:
            self._reset_device()
            log.info("%s: SET_STATUS 0: device reset, memory and doorbells released", self.name)
            return {"status": dev.status}
        new &= ~VIRTIO_CONFIG_S_NEEDS_RESET          # a device-owned bit: the driver's copy is ignored
        if new & ~DRIVER_STATUS_BITS:
            raise _err("EINVAL", f"status {msg['status']:#x} has bits the driver may not set")
        old = dev.status & DRIVER_STATUS_BITS
        if old & ~new:
            raise _err("EPROTO", f"status {new:#x} clears bits of {old:#x} (only 0 resets)")
        added = new & ~old
        if old & VIRTIO_CONFIG_S_FAILED and added:
            raise _err("EPROTO", "status after FAILED: only 0 (reset) is allowed")
        failed, added = added & VIRTIO_CONFIG_S_FAILED, added & ~VIRTIO_CONFIG_S_FAILED
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
                self._check_driver_ok()
                dev.status |= b
                dev.start()
                log.info("%s: DRIVER_OK, enabled queues %s", self.name,
                         [vq.index for vq in dev.vqs if vq.enabled])
                continue
            dev.status |= b
        if failed:                                   # spec 2.1.1: the driver gave up on the device
            dev.stop()
            dev.status |= VIRTIO_CONFIG_S_FAILED
            log.info("%s: driver set FAILED", self.name)
        log.info("%s: status %#x", self.name, dev.status)
        return {"status": dev.status}

    def _check_driver_ok(self) -> None:
        # (No NEEDS_RESET check: NEEDS_RESET is set only by vq_err, which runs only on a started
        # device, i.e. after DRIVER_OK was added; DRIVER_OK is cleared only by status 0, which
        # clears NEEDS_RESET too. So DRIVER_OK is never added while NEEDS_RESET is set; issue 21.)
        dev = self.device
        for vq in dev.vqs:
            if not vq.enabled:
                continue
            i = vq.index
            if dev.mem is None or not self._num_set[i] or not self._addr_set[i]:
                raise _err("EINVAL", f"DRIVER_OK: queue {i} is enabled but not set up (num, addr, memory table)")
            if not vq.access_ok(dev.mem):            # ring rule 13, vhost_vq_access_ok
                raise _err("EFAULT", f"DRIVER_OK: queue {i} ring memory is not accessible")
            if dev.kicks[i] is None or dev.calls[i] is None:
                raise _err("EINVAL", f"DRIVER_OK: queue {i} has no kick or call doorbell")
        for vq in dev.vqs:                           # vhost_vq_init_access: resume from used.idx
            if vq.enabled:
                vq.last_used_idx = vq.used_idx(dev.mem)

    def _op_set_features(self, msg: dict) -> dict:
        dev = self.device
        f = msg["features"]
        toggle = (dev.status & VIRTIO_CONFIG_S_FEATURES_OK and not dev.status & VIRTIO_CONFIG_S_FAILED
                  and not (f ^ dev.acked_features) & ~LOG_ALL)
        if not toggle and (not dev.status & VIRTIO_CONFIG_S_DRIVER or dev.status & VIRTIO_CONFIG_S_FEATURES_OK):
            raise _err("EPROTO", "SET_FEATURES needs status DRIVER set and FEATURES_OK clear (after it, "
                                 "only VHOST_F_LOG_ALL may change)")
        if f & ~dev.features:                        # vhost SET_FEATURES: -EOPNOTSUPP
            raise _err("EOPNOTSUPP", f"features {f & ~dev.features:#x} were not offered (offer {dev.features:#x})")
        try:
            dev.set_features(f)                      # vhost_net_set_features: LOG_ALL, no log: EFAULT
        except OSError as e:
            raise _soft(_errno_code(e), e.strerror or str(e)) from None
        log.info("%s: SET_FEATURES %#x%s", self.name, f, " (dirty logging toggled)" if toggle else "")
        return None

    def _op_set_log_base(self, msg: dict) -> None:
        """VHOST_SET_LOG_BASE: the dirty bitmap, `size` bytes at `offset` of shared memory segment
        `shm` ("" drops it). Unusable (missing, not ours, too small for the memory table): EFAULT."""
        dev = self.device
        setter = getattr(dev, "set_log_base", None)
        if setter is None or not dev.features & LOG_ALL:
            raise _soft("EOPNOTSUPP", f"a {dev.device_type} device does no dirty logging")
        if not msg["shm"]:
            if dev.acked_features & LOG_ALL:
                raise _soft("EBUSY", "SET_LOG_BASE: cannot drop the log while VHOST_F_LOG_ALL is acked")
            setter(None)
            log.info("%s: SET_LOG_BASE: log dropped", self.name)
            return
        if msg["size"] == 0:
            raise _soft("EFAULT", "SET_LOG_BASE: an empty log")
        check_log_covers(dev, msg["size"])
        try:
            bitmap, owner = self.attach_log(msg["shm"], msg["offset"], msg["size"])
        except (OSError, ValueError) as e:
            raise _soft("EFAULT", f"SET_LOG_BASE: cannot map {msg['shm']!r}: {e}") from None
        try:
            setter(bitmap, owner)
        except OSError as e:
            bitmap.release()
            owner.close()
            raise _soft(_errno_code(e, "EFAULT"), e.strerror or str(e)) from None
        log.info("%s: SET_LOG_BASE %s@%#x, %d bytes", self.name, msg["shm"], msg["offset"], msg["size"])

    # --- memory table --------------------------------------------------------------------------
    def _require_setup_phase(self, op: str) -> None:
        st = self.device.status
        if not st & VIRTIO_CONFIG_S_FEATURES_OK:
            raise _err("EPROTO", f"{op} before FEATURES_OK")
        if st & VIRTIO_CONFIG_S_DRIVER_OK:
            raise _err("EBUSY", f"{op} after DRIVER_OK")

    def _op_set_mem_table(self, msg: dict) -> None:
        self._require_setup_phase("SET_MEM_TABLE")
        dev = self.device
        if any(vq.enabled for vq in dev.vqs):
            raise _err("EBUSY", "SET_MEM_TABLE while a ring is enabled")
        regions = msg["regions"]
        check_memory_table(regions)
        try:
            mem = self.attach_memory(regions)
        except ProtocolError:
            raise
        except Exception as e:
            raise _err("EFAULT", f"cannot attach the memory table: {type(e).__name__}: {e}") from None
        dev.set_mem(mem)
        # for monitors (GET_STATS "mem_table"): where the guest RAM is, to attach read-only
        dev.mem_table = [{k: r[k] for k in ("guest_phys_addr", "memory_size", "mmap_offset", "shm")}
                         for r in regions]
        self._addr_set = [False] * dev.num_queues   # ring addresses are translated via the table
        log.info("%s: SET_MEM_TABLE %s", self.name, ", ".join(
            f"[{r['guest_phys_addr']:#x}, +{r['memory_size']:#x}) from {r['shm']}@{r['mmap_offset']:#x}"
            for r in regions))

    # --- vrings --------------------------------------------------------------------------------
    def _vq(self, msg: dict, *, setup: bool = True):
        dev = self.device
        i = msg["index"]
        if i >= dev.num_queues:                     # vhost_vring_ioctl: idx >= nvqs -> -ENOBUFS
            raise _err("ENOBUFS", f"{msg['op']}: queue index {i} out of range (device has {dev.num_queues})")
        vq = dev.vqs[i]
        if setup:
            self._require_setup_phase(msg["op"])
            if vq.enabled:
                raise _err("EBUSY", f"{msg['op']}: queue {i} is enabled")
        return vq

    def _op_set_vring_num(self, msg: dict) -> None:
        vq = self._vq(msg)
        num = msg["num"]
        try:
            check_num(num)                          # spec 2.7: power of 2
        except ValueError as e:
            raise _err("EINVAL", f"SET_VRING_NUM: {e}") from None
        if num > self.device.max_queue_size:
            raise _err("EINVAL", f"SET_VRING_NUM: {num} exceeds the maximum {self.device.max_queue_size}")
        vq.num = num
        self._num_set[vq.index] = True
        self._addr_set[vq.index] = False            # sizes changed: addresses must be resent
        log.info("%s: queue %d num %d", self.name, vq.index, num)

    def _op_set_vring_addr(self, msg: dict) -> None:
        dev = self.device
        if self._log_toggle(msg):
            return
        vq = self._vq(msg)
        i = vq.index
        if msg["flags"] & VRING_F_LOG and not (dev.features & LOG_ALL and hasattr(dev, "log_addr")):
            raise _err("EOPNOTSUPP", "SET_VRING_ADDR: dirty logging (VHOST_VRING_F_LOG) is not supported")
        if msg["flags"] & ~VRING_F_LOG:
            raise _err("EINVAL", f"SET_VRING_ADDR: unknown flags {msg['flags']:#x}")
        if dev.mem is None:
            raise _err("EPROTO", "SET_VRING_ADDR before SET_MEM_TABLE")
        if not self._num_set[i]:
            raise _err("EPROTO", "SET_VRING_ADDR before SET_VRING_NUM")
        vq.desc, vq.avail, vq.used = ring_gpas(dev.mem, vq.num, msg["desc_user_addr"],
                                               msg["avail_user_addr"], msg["used_user_addr"])
        if hasattr(dev, "log_addr"):
            dev.log_addr[i] = msg["log_guest_addr"] if msg["flags"] & VRING_F_LOG else None
        self._addr_set[i] = True
        log.info("%s: queue %d rings desc %#x avail %#x used %#x", self.name, i,
                 vq.desc, vq.avail, vq.used)

    def _log_toggle(self, msg: dict) -> bool:
        """SET_VRING_ADDR of a ring already set up, with the same addresses: only the log flag
        changes (QEMU's vhost_dev_set_log at migration start / end), allowed while the ring
        runs. Returns True when handled."""
        dev = self.device
        i = msg["index"]
        if (i >= dev.num_queues or not hasattr(dev, "log_addr") or not dev.features & LOG_ALL
                or dev.mem is None or not self._addr_set[i] or msg["flags"] & ~VRING_F_LOG):
            return False
        vq = dev.vqs[i]
        try:
            same = ring_gpas(dev.mem, vq.num, msg["desc_user_addr"], msg["avail_user_addr"],
                             msg["used_user_addr"]) == (vq.desc, vq.avail, vq.used)
        except ProtocolError:
            return False
        if not same:
            return False
        dev.log_addr[i] = msg["log_guest_addr"] if msg["flags"] & VRING_F_LOG else None
        log.info("%s: queue %d used-ring logging %s", self.name, i,
                 f"at {msg['log_guest_addr']:#x}" if msg["flags"] & VRING_F_LOG else "off")
        return True

    def _op_set_vring_base(self, msg: dict) -> None:
        vq = self._vq(msg)
        vq.last_avail_idx = msg["num"]
        vq.last_used_idx = msg["num"]
        log.info("%s: queue %d base %d", self.name, vq.index, msg["num"])

    def _op_get_vring_base(self, msg: dict) -> dict:
        vq = self._vq(msg, setup=False)
        vq.enabled = False                          # vhost-user: GET_VRING_BASE stops the ring
        log.info("%s: queue %d stopped at base %d", self.name, vq.index, vq.last_avail_idx)
        return {"index": vq.index, "num": vq.last_avail_idx}

    def _set_doorbell(self, msg: dict, kind: str) -> None:
        vq = self._vq(msg)
        spec = msg["doorbell"]
        db = None
        if spec is not None:
            try:
                db = self.open_doorbell(spec)
            except ProtocolError:
                raise
            except Exception as e:
                raise _err("EBADF", f"{msg['op']}: cannot open doorbell {spec.get('name')!r}: {e}") from None
        self.device.set_doorbell(kind, vq.index, db)
        log.info("%s: queue %d %s doorbell %s", self.name, vq.index, kind,
                 spec["name"] if spec else "removed")

    def _op_set_vring_kick(self, msg: dict) -> None:
        self._set_doorbell(msg, "kick")

    def _op_set_vring_call(self, msg: dict) -> None:
        self._set_doorbell(msg, "call")

    def _op_set_vring_err(self, msg: dict) -> None:
        self._set_doorbell(msg, "err")

    def _op_set_vring_enable(self, msg: dict) -> None:
        vq = self._vq(msg, setup=False)
        if msg["enable"]:
            self._require_setup_phase("SET_VRING_ENABLE")
        elif not self.device.status & VIRTIO_CONFIG_S_FEATURES_OK:
            raise _err("EPROTO", "SET_VRING_ENABLE before FEATURES_OK")
        vq.enabled = msg["enable"]
        log.info("%s: queue %d %s", self.name, vq.index, "enabled" if vq.enabled else "disabled")


# --- the runner's memory attacher ----------------------------------------------------------------
class ShmGuestMemory(GuestMemory):
    """A GuestMemory over attached shared-memory segments; release() also closes them."""

    def __init__(self, regions: list[MemoryRegion], shms: list, needed: dict | None = None):
        super().__init__(regions)
        self._shms = shms
        self._needed = needed or {}        # segment name -> bytes the memory table maps of it

    def mem_ok(self) -> str | None:
        """The segment's current size (fstat of its fd) must still cover what we mapped: a guest
        that ftruncate()s its RAM smaller would otherwise SIGBUS us on the next access."""
        for shm in self._shms:
            need = self._needed.get(shm.name, 0)
            try:
                size = os.fstat(shm._fd).st_size
            except (OSError, AttributeError, TypeError) as e:
                return f"guest memory {shm.name} cannot be checked: {e}"
            if size < need:
                return (f"guest memory {shm.name} shrank to {size:#x} bytes; the memory table "
                        f"maps {need:#x}")
        return None

    def release(self) -> None:
        super().release()
        shms, self._shms = self._shms, []
        for shm in shms:
            close_shm(shm)


def attach_shm_log(name: str, offset: int, size: int) -> tuple[memoryview, Any]:
    """attach_log for real guests: `size` bytes at `offset` of our segment `name`, writable.
    Returns (bitmap view, the segment to close with it); ValueError / OSError when unusable."""
    shm = attach_shm(name)
    if offset + size > shm.size:
        close_shm(shm)
        raise ValueError(f"[{offset:#x}, +{size:#x}) is beyond the segment ({shm.size:#x} bytes)")
    base = memoryview(shm.buf)
    view = base[offset:offset + size]
    base.release()
    return view, shm


def attach_shm_memory(regions: list[dict]) -> ShmGuestMemory:
    """attach_memory for real guests: map each region from its named segment at mmap_offset."""
    shms: dict[str, Any] = {}
    views: list[memoryview] = []
    out: list[MemoryRegion] = []
    try:
        for r in regions:
            shm = shms.get(r["shm"])
            if shm is None:
                shm = shms[r["shm"]] = attach_shm(r["shm"])
            off, size = r["mmap_offset"], r["memory_size"]
            if off + size > shm.size:
                raise ValueError(f"region [{off:#x}, +{size:#x}) is beyond segment {r['shm']} ({shm.size:#x} bytes)")
            base = memoryview(shm.buf)
            views.append(base)
            out.append(MemoryRegion(r["guest_phys_addr"], size, base[off:off + size], r["userspace_addr"]))
        for v in views:
            v.release()
        needed: dict[str, int] = {}
        for r in regions:
            name = shms[r["shm"]].name
            needed[name] = max(needed.get(name, 0), r["mmap_offset"] + r["memory_size"])
        return ShmGuestMemory(out, list(shms.values()), needed)
    except Exception:
        for region in out:
            region.release()
        for v in views:
            v.release()
        for shm in shms.values():
            close_shm(shm)
        raise
