"""The native codec: msgpack maps (shared/control.py, docs/PROTOCOL.md) <-> the session's typed
requests and results, and how a native device reaches the guest's memory and log (named
shared-memory segments).

    codec = native_session(device_factory)     # NativeCodec(Session(...)) for real guests
    replies, close = codec.feed(data)          # bytes in, encoded replies out
    reply, close = codec.handle(msg)           # one decoded map in, one reply map out

Errors carry the request's seq when it can be read (nil otherwise); a refusal the session marks
not fatal is answered with `"fatal": false` (PROTOCOL.md section 7).

Doorbells are named POSIX semaphores ("posix_sem"), or eventfds ("eventfd", --doorbell eventfd):
then the request carries the fd by SCM_RIGHTS on the sendmsg that sends it. fds are taken in the
order they arrive, one per eventfd doorbell in request order (the kernel delivers an fd with the
bytes of its own sendmsg, never after them); at most MAX_PENDING_FDS wait at a time.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any

from shared.doorbell import EventFdDoorbell, open_doorbell
from shared.control import Decoder, encode, error_reply, reply, request_seq, validate_request
from shared.errors import ProtocolError
from shared.memory import GuestMemory, MemoryRegion
from shared.resources import attach_shm, close_shm

from host.session import Outcome, Region, Request, Result, Session

MAX_PENDING_FDS = 8
# native field name -> Request field (fields not named here keep their name)
_FIELDS = {"features": "value", "status": "value", "desc_user_addr": "desc",
           "avail_user_addr": "avail", "used_user_addr": "used", "log_guest_addr": "log",
           "backend": "source", "shm": "source"}


def shm_region(r: dict) -> Region:
    """One SET_MEM_TABLE region map (or a GuestRAM table entry) -> Region."""
    return Region(r["guest_phys_addr"], r["memory_size"], r["userspace_addr"], r["mmap_offset"], r["shm"])


def to_request(msg: dict) -> Request:
    """A validated native request (shared.control.SCHEMA) -> Request."""
    op = msg["op"]
    if op == "HELLO":
        return Request(op, hello=msg)
    kw: dict[str, Any] = {}
    for k, v in msg.items():
        if k in ("op", "seq"):
            continue
        if k == "regions":
            v = tuple(map(shm_region, v))
        elif k == "enable":
            k, v = "num", int(v)
        kw[_FIELDS.get(k, k)] = v
    return Request(op, **kw)


def open_native_doorbell(handle, kinds=("posix_sem", "eventfd")):
    """open_doorbell for native sessions: a posix_sem spec, or (eventfd spec, its fd)."""
    spec = handle if isinstance(handle, dict) else handle[0]
    if spec["kind"] not in kinds:
        raise ProtocolError(f"doorbell kind {spec['kind']!r} is not enabled on this host "
                            f"(its --doorbell allows {', '.join(kinds)})", "EOPNOTSUPP")
    if isinstance(handle, dict):
        return open_doorbell(spec)
    return EventFdDoorbell(handle[1], name=spec["name"])


def encode_result(seq: int | None, res: Result) -> dict:
    if res.error is not None:
        rep = error_reply(seq, res.error.code, str(res.error))
        return rep if res.fatal else {**rep, "fatal": False}
    return reply(seq, **(res.fields or {}))


class NativeCodec:
    """One native connection's bytes <-> its Session."""

    def __init__(self, session: Session, decoder: Decoder | None = None):
        self.session = session
        self.decoder = decoder or Decoder()
        self.fds: list[int] = []          # fds received, not yet taken by an eventfd doorbell
        self.started: list[int] = []      # rings the last request started

    @property
    def device(self):
        return self.session.device

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        """The connection is gone (Session.close)."""
        self.close_fds()
        self.session.close()

    def handle(self, msg: Any) -> tuple[dict, bool]:
        """One decoded request -> (reply, close). Never raises."""
        seq = request_seq(msg)
        if self.session.closed:
            return error_reply(seq, "EPROTO", "session is closed after an earlier error"), True
        try:
            req = to_request(validate_request(msg))
            if isinstance(req.doorbell, dict) and req.doorbell["kind"] == "eventfd":
                if not self.fds:
                    raise ProtocolError(f"{req.op}: an eventfd doorbell without its fd (SCM_RIGHTS)", "EBADF")
                fd = self.fds.pop(0)
                req.doorbell, req.fds = (req.doorbell, fd), (fd,)
        except ProtocolError as e:
            res = self.session.fail(e)
        else:
            res = self.session.handle(req)
        self.started = res.started
        return encode_result(seq, res), res.close

    def feed(self, data: bytes, fds=()) -> Outcome:
        """Bytes (and the fds that came with them) from the connection -> Outcome."""
        out = Outcome()
        self.fds += fds
        if self.session.closed:
            out.close = True
            self.close_fds()
            return out
        try:
            if len(self.fds) > MAX_PENDING_FDS:
                raise ProtocolError(f"{len(self.fds)} fds sent and not taken by a request", "E2BIG")
            for msg in self.decoder.iter_feed(data):
                rep, out.close = self.handle(msg)
                out.replies.append(encode(rep))
                out.started += self.started
                if out.close:
                    break
        except ProtocolError as e:
            out.replies.append(encode(encode_result(getattr(e, "seq", None), self.session.fail(e))))
            out.close = True
        return out


def native_session(device_factory, *, attach_memory=None, open_doorbell=None,
                   attach_log=None, decoder: Decoder | None = None, doorbells=None, **kw) -> NativeCodec:
    """A Session for a native connection (the device made on HELLO) behind its codec;
    `doorbells`: the doorbell kinds allowed (default both)."""
    opener = open_doorbell or (partial(open_native_doorbell, kinds=tuple(doorbells))
                               if doorbells else open_native_doorbell)
    return NativeCodec(Session(device_factory=device_factory,
                               attach_memory=attach_memory or attach_shm_memory,
                               open_doorbell=opener, attach_log=attach_log or attach_shm_log,
                               **kw), decoder)


# --- the memory, log and doorbells of a native guest: named shared memory ------------------------
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
    """attach_log for native guests: `size` bytes at `offset` of our segment `name`, writable.
    Returns (bitmap view, the segment to close with it); ValueError / OSError when unusable."""
    shm = attach_shm(name)
    if offset + size > shm.size:
        close_shm(shm)
        raise ValueError(f"[{offset:#x}, +{size:#x}) is beyond the segment ({shm.size:#x} bytes)")
    base = memoryview(shm.buf)
    view = base[offset:offset + size]
    base.release()
    return view, shm


def attach_shm_memory(regions) -> ShmGuestMemory:
    """attach_memory for native guests: map each Region from its named segment (source) at
    mmap_offset."""
    shms: dict[str, Any] = {}
    views: list[memoryview] = []
    out: list[MemoryRegion] = []
    try:
        for r in regions:
            shm = shms.get(r.source)
            if shm is None:
                shm = shms[r.source] = attach_shm(r.source)
            off, size = r.mmap_offset, r.memory_size
            if off + size > shm.size:
                raise ValueError(f"region [{off:#x}, +{size:#x}) is beyond segment {r.source} ({shm.size:#x} bytes)")
            base = memoryview(shm.buf)
            views.append(base)
            out.append(MemoryRegion(r.guest_phys_addr, size, base[off:off + size], r.userspace_addr))
        for v in views:
            v.release()
        needed: dict[str, int] = {}
        for r in regions:
            name = shms[r.source].name
            needed[name] = max(needed.get(name, 0), r.mmap_offset + r.memory_size)
        return ShmGuestMemory(out, list(shms.values()), needed)
    except Exception:
        for region in out:
            region.release()
        for v in views:
            v.release()
        for shm in shms.values():
            close_shm(shm)
        raise
