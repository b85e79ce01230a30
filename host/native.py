"""The native codec: msgpack maps (shared/control.py, docs/PROTOCOL.md) <-> the session's typed
requests and results.

    codec = native_session(device_factory)     # NativeCodec(Session(...)) for real guests
    result = codec.feed(data, fds)             # bytes in, Result with the encoded replies out
    reply, close = codec.handle(msg)           # one decoded map in, one reply map out

Errors carry the request's seq when it can be read (nil otherwise); a refusal the session marks
not fatal is answered with `"fatal": false` (PROTOCOL.md section 7). Memory and log come from
named shared-memory segments (host/guest_memory.py).

Doorbells are named POSIX semaphores ("posix_sem"), or eventfds ("eventfd", --doorbell eventfd):
then the request carries the fd by SCM_RIGHTS on the sendmsg that sends it. fds are taken in the
order they arrive, one per eventfd doorbell in request order (the kernel delivers an fd with the
bytes of its own sendmsg, never after them); at most MAX_PENDING_FDS wait at a time.
"""
from __future__ import annotations

from typing import Any

from shared.control import Decoder, encode, error_reply, reply, request_seq, validate_request
from shared.doorbell import EventFdDoorbell, open_doorbell
from shared.errors import ProtocolError

from host.guest_memory import attach_log, attach_memory
from host.session import Region, Request, Result, Session, close_fds

MAX_PENDING_FDS = 8
# native field name -> Request field (fields not named here keep their name)
_FIELDS = {"features": "value", "status": "value", "desc_user_addr": "desc",
           "avail_user_addr": "avail", "used_user_addr": "used", "log_guest_addr": "log",
           "backend": "source", "shm": "source", "enable": "num"}


def shm_region(r: dict) -> Region:
    """One SET_MEM_TABLE region map (or a GuestRAM table entry) -> Region."""
    return Region(r["guest_phys_addr"], r["memory_size"], r["userspace_addr"], r["mmap_offset"], r["shm"])


def to_request(msg: dict) -> Request:
    """A validated native request (shared.control.SCHEMA) -> Request."""
    if msg["op"] == "HELLO":
        return Request("HELLO", hello=msg)
    kw: dict[str, Any] = {_FIELDS.get(k, k): v for k, v in msg.items() if k not in ("op", "seq")}
    if "regions" in kw:
        kw["regions"] = tuple(map(shm_region, kw["regions"]))
    if msg["op"] == "SET_VRING_ENABLE":
        kw["num"] = int(kw["num"])
    return Request(msg["op"], **kw)


def open_native_doorbell(handle, kinds=("posix_sem", "eventfd")):
    """open_doorbell for native sessions: a posix_sem spec, or (eventfd spec, its fd)."""
    spec = handle if isinstance(handle, dict) else handle[0]
    if spec["kind"] not in kinds:
        raise ProtocolError(f"doorbell kind {spec['kind']!r} is not enabled on this host "
                            f"(its --doorbell allows {', '.join(kinds)})", "EOPNOTSUPP")
    return open_doorbell(spec) if isinstance(handle, dict) else EventFdDoorbell(handle[1], name=spec["name"])


def encode_result(seq: int | None, res: Result) -> dict:
    if res.error is None:
        return reply(seq, **(res.fields or {}))
    rep = error_reply(seq, res.error.code, str(res.error))
    return rep if res.fatal else {**rep, "fatal": False}


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
        close_fds(fds)

    def close(self) -> None:
        """The connection is gone (Session.close)."""
        self.close_fds()
        self.session.close()

    def handle(self, msg: Any) -> tuple[dict, bool]:
        """One decoded request -> (reply, close). Never raises."""
        if self.session.closed:
            return error_reply(request_seq(msg), "EPROTO", "session is closed after an earlier error"), True
        try:
            req = to_request(validate_request(msg))
            if isinstance(req.doorbell, dict) and req.doorbell["kind"] == "eventfd":
                if not self.fds:
                    raise ProtocolError(f"{req.op}: an eventfd doorbell without its fd (SCM_RIGHTS)", "EBADF")
                fd = self.fds.pop(0)
                req.doorbell, req.fds = (req.doorbell, fd), (fd,)
            res = self.session.handle(req)
        except ProtocolError as e:
            res = self.session.fail(e)
        self.started = res.started
        return encode_result(request_seq(msg), res), res.close

    def feed(self, data: bytes, fds=()) -> Result:
        """Bytes (and the fds that came with them) from the connection -> Result with replies."""
        out = Result()
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


def native_session(device_factory, *, attach_memory=attach_memory, open_doorbell=None,
                   attach_log=attach_log, decoder: Decoder | None = None, doorbells=None, **kw) -> NativeCodec:
    """A Session for a native connection (the device made on HELLO) behind its codec;
    `doorbells`: the doorbell kinds allowed (default both)."""
    opener = open_doorbell or (lambda h: open_native_doorbell(h, tuple(doorbells or ("posix_sem", "eventfd"))))
    return NativeCodec(Session(device_factory=device_factory, attach_memory=attach_memory,
                               open_doorbell=opener, attach_log=attach_log, **kw), decoder)
