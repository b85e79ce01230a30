"""One vhost-user connection, backend side: typed requests in, reply bytes out. Pure code.

Drives the same VhostDevice (host/device.py, e.g. VhostVsock) the msgpack ControlSession drives,
but with vhost-user's state machine, which has no virtio status byte (no F_STATUS offered):

    - the device status is derived: SET_FEATURES sets ACKNOWLEDGE|DRIVER|FEATURES_OK; the device
      runs (DRIVER_OK, start()) while at least one ring is *started*, and stops when none is;
    - a ring is started when it has num, addresses, a memory table, a kick fd and is enabled
      (with VHOST_USER_F_PROTOCOL_FEATURES negotiated rings start disabled and SET_VRING_ENABLE
      enables them; without it the kick fd enables the ring: vhost-user.rst "Ring states").
      The frontend's "enabled" is kept here; the device's `vq.enabled` is true only while the
      ring is started, so a ring enabled before it is configured (QEMU's vhost-user-net sends
      SET_VRING_ENABLE bursts before SET_FEATURES) is never touched when the device starts;
    - GET_VRING_BASE stops the ring and returns its last_avail_idx ("Starting and stopping rings");
    - SET_VRING_CALL/ERR may replace fds at any time (QEMU does so while the rings run); the kick
      fd too (the runner re-registers it). A kick that arrives before the ring is started is
      drained and dropped, and every ring is polled once when it starts (`Outcome.started`), so
      buffers posted before the start are not missed.
    - with REPLY_ACK negotiated, a request with NEED_REPLY gets u64 0 (ok) or 1 (failed).
    - dirty logging (a device that offers VHOST_F_LOG_ALL, net): PROTOCOL_F_LOG_SHMFD is offered,
      SET_LOG_BASE maps the log from its fd (u64 mmap_size, u64 mmap_offset) and is answered
      (QEMU waits for it), SET_FEATURES may toggle LOG_ALL on running rings and SET_VRING_ADDR
      their VHOST_VRING_F_LOG with the same addresses (QEMU's vhost_dev_set_log); an unusable
      log (fd, size, not covering the memory table, LOG_ALL without one) is refused as EFAULT.

Any error (ProtocolError from the shared rules, or a refused request) is logged on one line, acked
with failure when the frontend asked, and closes the connection (`close` True): the runner then
calls close(), which resets the device and leaves it ready for the next frontend.

`attach_memory(regions, fds)` and `open_doorbell(fd)` are injected, so tests run this on anonymous
memfds and eventfds in one process.
"""
from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from host.control_session import check_memory_table, log_pages_needed, ring_gpas
from shared.constants import (VHOST_F_LOG_ALL, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, bit)
from shared.errors import GuestMemoryError, ProtocolError
from shared.ring_layout import check_num

from . import codec
from .codec import Request

log = logging.getLogger(__name__)

PROTOCOL_FEATURES = (1 << codec.PROTOCOL_F_REPLY_ACK) | (1 << codec.PROTOCOL_F_CONFIG) \
    | (1 << codec.PROTOCOL_F_RESET_DEVICE)
F_PROTOCOL = 1 << codec.VHOST_USER_F_PROTOCOL_FEATURES
SETUP_STATUS = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
VRING_F_LOG = 1
LOG_ALL = bit(VHOST_F_LOG_ALL)
F_LOG_SHMFD = 1 << codec.PROTOCOL_F_LOG_SHMFD


def _err(code: str, message: str) -> ProtocolError:
    return ProtocolError(message, code)


@dataclass
class RingState:
    num: bool = False
    addr: bool = False
    enabled: bool = False      # the frontend's SET_VRING_ENABLE (or its kick fd without PROTOCOL_FEATURES)
    started: bool = False      # running: the device's vq.enabled mirrors this


@dataclass
class Outcome:
    replies: list[bytes] = field(default_factory=list)
    close: bool = False
    started: list[int] = field(default_factory=list)     # rings that just started: poll them once


class VhostUserSession:
    def __init__(self, device, *, attach_memory: Callable[[Any, Any], Any],
                 open_doorbell: Callable[[int], Any], name: str = "vhost-user"):
        self.device = device
        self.attach_memory = attach_memory
        self.open_doorbell = open_doorbell
        self.name = name
        self.owner = False
        self.protocol_features = 0
        self.protocol_acked = False     # VHOST_USER_F_PROTOCOL_FEATURES negotiated
        # LOG_SHMFD only where the log can be used: a device that logs (VhostNet)
        self.logs = bool(device.features & LOG_ALL) and hasattr(device, "set_log_base")
        self.protocol_offer = PROTOCOL_FEATURES | (F_LOG_SHMFD if self.logs else 0)
        self.rings = [RingState() for _ in range(device.num_queues)]
        self.requests = 0
        self.error: ProtocolError | None = None
        self.closed = False

    # --- one message ---------------------------------------------------------------------------
    def handle(self, req: Request) -> Outcome:
        """Never raises. Takes ownership of req's fds."""
        out = Outcome()
        self.requests += 1
        log.debug("%s: <- %s%s %s", self.name, req.op, " (NEED_REPLY)" if req.need_reply else "",
                  _describe(req))
        if self.closed:
            req.close_fds()
            out.close = True
            return out
        try:
            handler = getattr(self, "_op_" + req.op.lower(), None)
            if handler is None:
                raise _err("EOPNOTSUPP", f"{req.op} is not supported")
            with self.device.lock:
                reply = handler(req, out)
            if reply is not None:
                out.replies.append(reply)
            elif req.need_reply and self._reply_ack:
                out.replies.append(codec.reply_ack(req, True))
        except ProtocolError as e:
            req.close_fds()
            self._fail(req, e, out)
        except Exception as e:  # a device bug: report it, close, keep the backend alive
            req.close_fds()
            log.exception("%s: internal error handling %s", self.name, req.op)
            self._fail(req, _err("EIO", f"internal error: {type(e).__name__}: {e}"), out)
        for r in out.replies:
            log.debug("%s: -> %s reply %s", self.name, req.op, r[codec.HEADER.size:].hex())
        return out

    @property
    def _reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << codec.PROTOCOL_F_REPLY_ACK))

    def _fail(self, req: Request, e: ProtocolError, out: Outcome) -> None:
        self.error = e
        self.closed = True
        log.warning("%s: %s refused: %s: %s (closing the connection)", self.name, req.op, e.code, e)
        if req.need_reply and self._reply_ack:
            out.replies.append(codec.reply_ack(req, False))
        out.close = True

    def close(self) -> None:
        """The connection is gone: stop and reset the device, release memory and fds."""
        self.closed = True
        with self.device.lock:
            self.device.reset()
        self.rings = [RingState() for _ in range(self.device.num_queues)]
        log.info("%s: frontend disconnected; device reset, ready for the next one", self.name)

    # --- features and ownership ------------------------------------------------------------------
    def _op_get_features(self, req, out):
        return codec.reply_u64(req, self.device.features | F_PROTOCOL)

    def _op_set_features(self, req, out):
        dev = self.device
        f = req.u64
        if f & ~(dev.features | F_PROTOCOL):
            raise _err("EOPNOTSUPP", f"features {f & ~(dev.features | F_PROTOCOL):#x} were not offered")
        dev_f = f & ~F_PROTOCOL
        if dev_f & LOG_ALL and getattr(dev, "dirty_log", None) is None:
            # vhost_net_set_features: -EFAULT (no SET_LOG_BASE, or LOG_SHMFD not negotiated)
            raise _err("EFAULT", f"features {dev_f:#x}: VHOST_F_LOG_ALL without a usable log")
        if not dev.features_ok(dev_f):
            raise _err("EINVAL", f"features {dev_f:#x} refused (VERSION_1 is required)")
        if dev.running and (dev_f ^ dev.acked_features) & ~LOG_ALL:
            raise _err("EBUSY", "SET_FEATURES changes the features of running rings (only "
                                "VHOST_F_LOG_ALL may change)")
        try:
            dev.set_features(dev_f)
        except OSError as e:
            raise _err("EFAULT", f"SET_FEATURES: {e.strerror or e}") from None
        dev.status |= SETUP_STATUS
        self.protocol_acked = bool(f & F_PROTOCOL)
        log.info("%s: SET_FEATURES %#x", self.name, f)

    def _op_get_protocol_features(self, req, out):
        return codec.reply_u64(req, self.protocol_offer)

    def _op_set_protocol_features(self, req, out):
        if req.u64 & ~self.protocol_offer:
            raise _err("EOPNOTSUPP", f"protocol features {req.u64 & ~self.protocol_offer:#x} were not offered")
        self.protocol_features = req.u64
        log.info("%s: SET_PROTOCOL_FEATURES %#x", self.name, req.u64)

    def _op_set_log_base(self, req, out):
        """VHOST_USER_SET_LOG_BASE (LOG_SHMFD): map [mmap_offset, +mmap_size) of the fd as the
        dirty bitmap; answered (QEMU reads a reply). Unusable: EFAULT, the connection closes."""
        dev = self.device
        fd = req.fd                      # closed by handle() if we refuse, here once mapped
        if not self.logs or not self.protocol_features & F_LOG_SHMFD:
            raise _err("EOPNOTSUPP", "SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD")
        if req.size == 0:
            raise _err("EFAULT", "SET_LOG_BASE: an empty log")
        if dev.mem is not None and req.size < log_pages_needed(dev.mem.regions):
            raise _err("EFAULT", f"SET_LOG_BASE: {req.size} bytes do not cover the memory table "
                                 f"({log_pages_needed(dev.mem.regions)} needed)")
        try:
            end = req.offset + req.size
            have = os.fstat(fd).st_size
            if have < end:
                raise ValueError(f"the fd holds {have} bytes, the log ends at {end}")
            m = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise _err("EFAULT", f"SET_LOG_BASE: cannot map the log: {e}") from None
        os.close(fd)                     # the mapping keeps the memory
        view = memoryview(m)
        bitmap = view[req.offset:req.offset + req.size]
        view.release()
        try:
            dev.set_log_base(bitmap, m)
        except OSError as e:
            bitmap.release()
            m.close()
            raise _err("EFAULT", f"SET_LOG_BASE: {e.strerror or e}") from None
        log.info("%s: SET_LOG_BASE %d bytes at offset %#x", self.name, req.size, req.offset)
        return codec.reply_u64(req, 0)

    def _op_set_owner(self, req, out):
        self.owner = True       # vhost-user allows it again after a reconnect; nothing to check

    def _op_reset_owner(self, req, out):
        self._reset()

    def _op_reset_device(self, req, out):
        self._reset()

    def _reset(self):
        self.device.reset()
        self.rings = [RingState() for _ in range(self.device.num_queues)]
        log.info("%s: device reset", self.name)

    def _op_get_queue_num(self, req, out):
        return codec.reply_u64(req, self.device.num_queues)

    # --- config space ----------------------------------------------------------------------------
    def _op_get_config(self, req, out):
        cfg = bytes(self.device.config_bytes())
        if req.offset + req.size > len(cfg):
            raise _err("EINVAL", f"GET_CONFIG [{req.offset}, +{req.size}) is outside the "
                                 f"{len(cfg)}-byte config space")
        return codec.reply_config(req, cfg[req.offset:req.offset + req.size])

    def _op_set_config(self, req, out):
        raise _err("EPERM", "SET_CONFIG: the config space is read-only")

    # --- memory ----------------------------------------------------------------------------------
    def _op_set_mem_table(self, req, out):
        dev = self.device
        check_memory_table([r.__dict__ for r in req.regions])
        try:
            mem = self.attach_memory(req.regions, req.fds)   # closes the fds
        except Exception as e:
            raise _err("EFAULT", f"cannot map the memory table: {type(e).__name__}: {e}") from None
        dev.set_mem(mem)
        log.info("%s: SET_MEM_TABLE %s", self.name, ", ".join(
            f"[gpa {r.guest_phys_addr:#x}, +{r.memory_size:#x}) uva {r.userspace_addr:#x} "
            f"fd@{r.mmap_offset:#x}" for r in req.regions))

    # --- vrings ----------------------------------------------------------------------------------
    def _ring(self, req, *, stopped: bool = True):
        i = req.index
        if i >= self.device.num_queues:
            raise _err("ENOBUFS", f"{req.op}: queue index {i} out of range (device has "
                                  f"{self.device.num_queues})")
        if stopped and self.rings[i].started:
            raise _err("EBUSY", f"{req.op}: queue {i} is running (stop it with GET_VRING_BASE)")
        return self.device.vqs[i]

    def _op_set_vring_num(self, req, out):
        vq = self._ring(req)
        try:
            check_num(req.num)                       # spec 2.7: power of 2
        except ValueError as e:
            raise _err("EINVAL", f"SET_VRING_NUM: {e}") from None
        if req.num > self.device.max_queue_size:
            raise _err("EINVAL", f"SET_VRING_NUM: {req.num} exceeds the maximum {self.device.max_queue_size}")
        vq.num = req.num
        self.rings[vq.index].num = True
        self.rings[vq.index].addr = False

    def _op_set_vring_addr(self, req, out):
        dev = self.device
        if req.addr_flags & ~VRING_F_LOG:
            raise _err("EINVAL", f"SET_VRING_ADDR: unknown flags {req.addr_flags:#x}")
        if req.addr_flags & VRING_F_LOG and not self.logs:
            raise _err("EOPNOTSUPP", "SET_VRING_ADDR: dirty logging is not supported")
        i = req.index
        if (self.logs and i is not None and i < dev.num_queues and self.rings[i].started
                and dev.mem is not None):
            # vhost_dev_set_log: the same addresses, only VHOST_VRING_F_LOG changes, ring running
            vq = dev.vqs[i]
            if ring_gpas(dev.mem, vq.num, req.desc, req.avail, req.used) == (vq.desc, vq.avail, vq.used):
                dev.log_addr[i] = req.log if req.addr_flags & VRING_F_LOG else None
                log.info("%s: queue %d used-ring logging %s", self.name, i,
                         f"at {req.log:#x}" if req.addr_flags & VRING_F_LOG else "off")
                return
        vq = self._ring(req)
        if self.device.mem is None:
            raise _err("EPROTO", "SET_VRING_ADDR before SET_MEM_TABLE")
        if not self.rings[vq.index].num:
            raise _err("EPROTO", "SET_VRING_ADDR before SET_VRING_NUM")
        vq.desc, vq.avail, vq.used = ring_gpas(self.device.mem, vq.num, req.desc, req.avail, req.used)
        if self.logs:
            dev.log_addr[vq.index] = req.log if req.addr_flags & VRING_F_LOG else None
        self.rings[vq.index].addr = True

    def _op_set_vring_base(self, req, out):
        vq = self._ring(req)
        vq.last_avail_idx = req.num
        vq.last_used_idx = req.num

    def _op_get_vring_base(self, req, out):
        vq = self._ring(req, stopped=False)
        self._stop_ring(vq.index)
        self.device.set_doorbell("kick", vq.index, None)   # the ring is stopped; kick fd dropped
        log.info("%s: queue %d stopped at base %d", self.name, vq.index, vq.last_avail_idx)
        return codec.reply_state(req, vq.index, vq.last_avail_idx)

    def _op_set_vring_kick(self, req, out):
        vq = self._ring(req, stopped=False)
        self._set_fd(req, "kick")
        if not self.protocol_acked and req.fd is not None:
            self.rings[vq.index].enabled = True     # no PROTOCOL_FEATURES: the kick enables
        self._try_start(vq.index, out)

    def _op_set_vring_call(self, req, out):
        self._ring(req, stopped=False)
        self._set_fd(req, "call")

    def _op_set_vring_err(self, req, out):
        self._ring(req, stopped=False)
        self._set_fd(req, "err")

    def _set_fd(self, req, kind: str) -> None:
        db = None
        if req.fd is not None:
            try:
                db = self.open_doorbell(req.fd)
            except Exception as e:
                raise _err("EBADF", f"{req.op}: fd is not usable: {e}") from None
        elif kind == "kick":
            # bit 8 "no fd": the backend would have to poll; we don't, so the ring cannot run
            self._stop_ring(req.index)
        self.device.set_doorbell(kind, req.index, db)

    def _op_set_vring_enable(self, req, out):
        vq = self._ring(req, stopped=False)
        if req.num > 1:
            raise _err("EINVAL", f"SET_VRING_ENABLE {req.num} (0 or 1)")
        self.rings[vq.index].enabled = bool(req.num)
        if req.num:
            self._try_start(vq.index, out)
        else:
            self._stop_ring(vq.index)

    # --- starting and stopping rings -------------------------------------------------------------
    def _try_start(self, i: int, out: Outcome) -> None:
        dev, ring, vq = self.device, self.rings[i], self.device.vqs[i]
        if ring.started or not ring.enabled or dev.kicks[i] is None:
            return
        if dev.mem is None or not ring.num or not ring.addr:
            return                                   # kicked/enabled before configured: wait
        if not dev.status & VIRTIO_CONFIG_S_FEATURES_OK:
            return
        if not vq.access_ok(dev.mem):                # ring rule 13, vhost_vq_access_ok
            raise _err("EFAULT", f"queue {i}: ring memory is not accessible")
        try:
            vq.last_used_idx = vq.used_idx(dev.mem)  # vhost_vq_init_access
        except GuestMemoryError as e:
            raise _err("EFAULT", f"queue {i}: {e}") from None
        ring.started = True
        vq.enabled = True
        out.started.append(i)
        if not dev.running:
            dev.status |= VIRTIO_CONFIG_S_DRIVER_OK
            dev.start()
        log.info("%s: queue %d started (num %d, base %d)", self.name, i, vq.num, vq.last_avail_idx)

    def _stop_ring(self, i: int) -> None:
        ring = self.rings[i]
        if not ring.started:
            return
        ring.started = False
        self.device.vqs[i].enabled = False
        self.device.vqs[i].unmap()
        if not any(r.started for r in self.rings):
            self.device.stop()
            self.device.status &= ~VIRTIO_CONFIG_S_DRIVER_OK
        log.info("%s: queue %d stopped", self.name, i)

    def ring_started(self, i: int) -> bool:
        return self.rings[i].started


def _describe(req: Request) -> str:
    if req.regions:
        return " ".join(f"gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} uva={r.userspace_addr:#x} "
                        f"off={r.mmap_offset:#x}" for r in req.regions) + f" fds={len(req.fds)}"
    if req.op == "SET_VRING_ADDR":
        return (f"index={req.index} flags={req.addr_flags:#x} desc={req.desc:#x} used={req.used:#x} "
                f"avail={req.avail:#x}")
    if req.index is not None and req.num is not None:
        return f"index={req.index} num={req.num}"
    if req.op in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
        return f"index={req.index} fd={'none' if req.fd is None else 'yes'}"
    if req.op in ("GET_CONFIG", "SET_CONFIG"):
        return f"offset={req.offset} size={req.size}"
    if req.u64 is not None:
        return f"{req.u64:#x}"
    return ""
