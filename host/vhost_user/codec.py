"""The vhost-user wire format: bytes + fds in, typed requests out; replies to bytes. Pure code.

Layouts from QEMU docs/interop/vhost-user.rst ("Message Specification"), checked against
libvhost-user.h and rust-vmm vhost's message.rs:

    header        u32 request | u32 flags | u32 size          (little-endian, 12 bytes)
                  flags: bits 0-1 version (0x1), bit 2 REPLY (0x4), bit 3 NEED_REPLY (0x8)
    u64           one u64 (features, fd-carrying vring index + bit 8 "no fd", ...)
    vring state   u32 index | u32 num
    vring addr    u32 index | u32 flags | u64 descriptor | u64 used | u64 available | u64 log
    memory        u32 nregions | u32 padding | nregions x (u64 guest_phys_addr | u64 memory_size
                  | u64 userspace_addr | u64 mmap_offset), at most 8 regions, one fd each
    config        u32 offset | u32 size | u32 flags | u8 payload[size]
    log           u64 mmap_size | u64 mmap_offset

`VhostUserCodec(session)` turns each wire `Request` into the session's typed request
(host/session.py, the one session both transports share) and its result into reply bytes:
REPLY_ACK when negotiated and asked for, the op's own reply otherwise; any error closes.

`Decoder.feed(data, fds)` buffers bytes and fds (fds arrive with the first byte of the message
they belong to: SCM_RIGHTS on the recvmsg that read the header) and yields `Request`s; a
malformed message raises `VhostUserError` (the runner logs it and closes the connection). Fds
handed to a request belong to it; the decoder closes any it cannot hand out.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from host import session as typed
from host.session import Outcome, Session
from shared.doorbell import EventFdDoorbell

from .memfd import map_log_fd, map_regions

log = logging.getLogger(__name__)

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")
LOG = struct.Struct("<QQ")

VERSION = 0x1
VERSION_MASK = 0x3
F_REPLY = 0x4
F_NEED_REPLY = 0x8
MAX_REGIONS = 8                      # VHOST_MEMORY_BASELINE_NREGIONS
MAX_CONFIG = 256                     # VHOST_USER_MAX_CONFIG_SIZE
MAX_PAYLOAD = MEM_HEADER.size + MAX_REGIONS * MEM_REGION.size   # the largest message we accept
MAX_FDS = MAX_REGIONS
VRING_IDX_MASK = 0xFF                # SET_VRING_KICK/CALL/ERR: bits 0-7 the index
VRING_NOFD = 1 << 8                  # bit 8: no fd (polling / remove)

# Front-end message types (vhost-user.rst "Front-end message types")
REQUESTS = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
    6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR",
    10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL",
    14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES",
    17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
    21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN", 24: "GET_CONFIG",
    25: "SET_CONFIG", 26: "CREATE_CRYPTO_SESSION", 27: "CLOSE_CRYPTO_SESSION",
    28: "POSTCOPY_ADVISE", 29: "POSTCOPY_LISTEN", 30: "POSTCOPY_END", 31: "GET_INFLIGHT_FD",
    32: "SET_INFLIGHT_FD", 33: "GPU_SET_SOCKET", 34: "RESET_DEVICE", 35: "VRING_KICK",
    36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG", 39: "SET_STATUS",
    40: "GET_STATUS",
}
CODES = {v: k for k, v in REQUESTS.items()}

# Protocol feature bits (vhost-user.rst "Protocol features")
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = typed.PROTOCOL_F_LOG_SHMFD        # what the session offers: host/session.py
PROTOCOL_F_REPLY_ACK = typed.PROTOCOL_F_REPLY_ACK
PROTOCOL_F_CONFIG = typed.PROTOCOL_F_CONFIG
PROTOCOL_F_RESET_DEVICE = typed.PROTOCOL_F_RESET_DEVICE
PROTOCOL_F_STATUS = 16
VHOST_USER_F_PROTOCOL_FEATURES = 30   # a virtio feature bit: GET/SET_PROTOCOL_FEATURES exist


class VhostUserError(Exception):
    """A malformed vhost-user message: log it and close the connection."""


@dataclass(frozen=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class Request:
    """One decoded front-end message. Exactly the fields its payload type has are set."""
    op: str
    code: int
    flags: int
    need_reply: bool
    u64: int | None = None                       # u64 payloads
    index: int | None = None                     # vring state/addr/fd index
    num: int | None = None                       # vring state num (SET_VRING_NUM/BASE/ENABLE)
    addr_flags: int = 0
    desc: int = 0
    used: int = 0
    avail: int = 0
    log: int = 0
    regions: tuple[MemRegion, ...] = ()
    offset: int = 0                              # config
    size: int = 0
    config_flags: int = 0
    data: bytes = b""
    fds: tuple[int, ...] = field(default=(), compare=False)
    fd: int | None = field(default=None, compare=False)   # the vring fd (None: bit 8 / none sent)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


# Which payload each request carries. None: no payload (size 0 expected, extra bytes ignored).
_U64_OPS = {"SET_FEATURES", "SET_PROTOCOL_FEATURES", "SET_VRING_KICK", "SET_VRING_CALL",
            "SET_VRING_ERR", "SET_LOG_FD", "SET_STATUS", "SET_BACKEND_REQ_FD", "SEND_RARP",
            "NET_SET_MTU"}
_STATE_OPS = {"SET_VRING_NUM", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_ENABLE",
              "SET_VRING_ENDIAN"}
_FD_OPS = {"SET_VRING_KICK": 1, "SET_VRING_CALL": 1, "SET_VRING_ERR": 1, "SET_MEM_TABLE": None,
           "SET_LOG_BASE": 1, "SET_LOG_FD": 1, "SET_BACKEND_REQ_FD": 1}


def decode(code: int, flags: int, payload: bytes, fds: tuple[int, ...] = ()) -> Request:
    """One message's fields -> Request. Raises VhostUserError; the caller owns `fds` on error."""
    op = REQUESTS.get(code)
    if op is None:
        raise VhostUserError(f"unknown request {code}")
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(f"{op}: version {flags & VERSION_MASK} is not 1 (flags {flags:#x})")
    if flags & F_REPLY:
        raise VhostUserError(f"{op}: a front-end message with the REPLY flag")
    need = bool(flags & F_NEED_REPLY)
    want = _FD_OPS.get(op, 0)
    if want == 0 and fds:
        raise VhostUserError(f"{op} carries {len(fds)} fd(s) it should not")
    base = dict(op=op, code=code, flags=flags, need_reply=need, fds=tuple(fds))

    def need_size(n: int) -> None:
        if len(payload) < n:
            raise VhostUserError(f"{op}: payload of {len(payload)} bytes, expected {n}")

    if op in _U64_OPS:
        need_size(U64.size)
        (v,) = U64.unpack_from(payload)
        if op in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
            if v & ~(VRING_IDX_MASK | VRING_NOFD):
                raise VhostUserError(f"{op}: reserved bits set in {v:#x}")
            nofd = bool(v & VRING_NOFD)
            if nofd and fds:
                raise VhostUserError(f"{op}: 'no fd' bit set but {len(fds)} fd(s) sent")
            if not nofd and len(fds) != 1:
                raise VhostUserError(f"{op}: expected one fd, got {len(fds)}")
            return Request(**base, u64=v, index=v & VRING_IDX_MASK, fd=None if nofd else fds[0])
        if want == 1 and len(fds) != 1:
            raise VhostUserError(f"{op}: expected one fd, got {len(fds)}")
        return Request(**base, u64=v, fd=fds[0] if fds else None)
    if op in _STATE_OPS:
        need_size(VRING_STATE.size)
        i, n = VRING_STATE.unpack_from(payload)
        return Request(**base, index=i, num=n)
    if op == "SET_VRING_ADDR":
        need_size(VRING_ADDR.size)
        i, fl, d, u, a, lg = VRING_ADDR.unpack_from(payload)
        return Request(**base, index=i, addr_flags=fl, desc=d, used=u, avail=a, log=lg)
    if op == "SET_MEM_TABLE":
        need_size(MEM_HEADER.size)
        n, _pad = MEM_HEADER.unpack_from(payload)
        if not 1 <= n <= MAX_REGIONS:
            raise VhostUserError(f"SET_MEM_TABLE: {n} regions (1..{MAX_REGIONS})")
        need_size(MEM_HEADER.size + n * MEM_REGION.size)
        if len(fds) != n:
            raise VhostUserError(f"SET_MEM_TABLE: {n} regions but {len(fds)} fds")
        regions = tuple(MemRegion(*MEM_REGION.unpack_from(payload, MEM_HEADER.size + k * MEM_REGION.size))
                        for k in range(n))
        return Request(**base, regions=regions)
    if op in ("GET_CONFIG", "SET_CONFIG"):
        need_size(CONFIG_HEADER.size)
        off, size, cf = CONFIG_HEADER.unpack_from(payload)
        if size > MAX_CONFIG:
            raise VhostUserError(f"{op}: size {size} exceeds {MAX_CONFIG}")
        need_size(CONFIG_HEADER.size + size)
        return Request(**base, offset=off, size=size, config_flags=cf,
                       data=bytes(payload[CONFIG_HEADER.size:CONFIG_HEADER.size + size]))
    if op == "SET_LOG_BASE":
        need_size(LOG.size)
        if len(fds) != 1:
            raise VhostUserError(f"SET_LOG_BASE: expected one fd, got {len(fds)}")
        size, off = LOG.unpack_from(payload)
        return Request(**base, size=size, offset=off, fd=fds[0])
    return Request(**base)          # no payload (GET_FEATURES, SET_OWNER, ...) or one we refuse later


class Decoder:
    """Stream decoder: bytes and fds in the order recvmsg returned them.

    Fds arrive with the first byte of the sendmsg that carried them (SCM_RIGHTS on a stream
    socket), so each batch is tagged with the stream offset of the data it came with and is
    given to the message that holds that byte.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0                                   # stream offset of buf[0]
        self.marks: list[tuple[int, list[int]]] = []   # (stream offset, fds)

    def feed(self, data: bytes, fds=()) -> list[Request]:
        if fds:
            self.marks.append((self.pos + len(self.buf), list(fds)))
        self.buf += data
        out: list[Request] = []
        try:
            while len(self.buf) >= HEADER.size:
                code, flags, size = HEADER.unpack_from(self.buf)
                if size > MAX_PAYLOAD:
                    raise VhostUserError(f"{REQUESTS.get(code, code)}: payload size {size} "
                                         f"exceeds {MAX_PAYLOAD}")
                end = HEADER.size + size
                if len(self.buf) < end:
                    break
                payload = bytes(self.buf[HEADER.size:end])
                del self.buf[:end]
                self.pos += end
                mine: list[int] = []
                while self.marks and self.marks[0][0] < self.pos:
                    mine += self.marks.pop(0)[1]
                try:
                    out.append(decode(code, flags, payload, tuple(mine)))
                except VhostUserError:
                    for fd in mine:
                        _close(fd)
                    raise
        except VhostUserError:
            for r in out:
                r.close_fds()
            self.close()
            raise
        return out

    def close(self) -> None:
        for _, fds in self.marks:
            for fd in fds:
                _close(fd)
        self.marks = []


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# --- replies ---------------------------------------------------------------------------------------
def _reply(code: int, payload: bytes) -> bytes:
    return HEADER.pack(code, VERSION | F_REPLY, len(payload)) + payload


def reply_u64(req: Request, value: int) -> bytes:
    return _reply(req.code, U64.pack(value & 0xFFFFFFFFFFFFFFFF))


def reply_state(req: Request, index: int, num: int) -> bytes:
    return _reply(req.code, VRING_STATE.pack(index, num))


def reply_config(req: Request, data: bytes) -> bytes:
    return _reply(req.code, CONFIG_HEADER.pack(req.offset, len(data), req.config_flags) + data)


def reply_ack(req: Request, ok: bool) -> bytes:
    """REPLY_ACK: u64 0 on success, non-zero on failure (vhost-user.rst "REPLY_ACK")."""
    return reply_u64(req, 0 if ok else 1)


# --- encoding front-end messages (tests and the tools' probes) ----------------------------------------
def encode_request(op: str, payload: bytes = b"", need_reply: bool = False) -> bytes:
    return HEADER.pack(CODES[op], VERSION | (F_NEED_REPLY if need_reply else 0), len(payload)) + payload


def mem_table_payload(regions: list[MemRegion]) -> bytes:
    return MEM_HEADER.pack(len(regions), 0) + b"".join(
        MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions)


def parse_reply(data: bytes) -> tuple[str, int, bytes]:
    code, flags, size = HEADER.unpack_from(data)
    if not flags & F_REPLY:
        raise VhostUserError("not a reply")
    return REQUESTS.get(code, str(code)), flags, bytes(data[HEADER.size:HEADER.size + size])


# --- the session's typed requests and results ---------------------------------------------------------
_STATE = ("SET_VRING_NUM", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_ENABLE")


def to_request(req: Request) -> typed.Request:
    """A decoded vhost-user message -> the session's Request (fds go with it)."""
    op = req.op
    if op in _STATE:
        return typed.Request(op, index=req.index, num=req.num, fds=req.fds)
    if op in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
        return typed.Request(op, index=req.index, doorbell=req.fd, fds=req.fds)
    if op == "SET_VRING_ADDR":
        return typed.Request(op, index=req.index, flags=req.addr_flags, desc=req.desc,
                             avail=req.avail, used=req.used, log=req.log)
    if op == "SET_MEM_TABLE":
        return typed.Request(op, regions=tuple(
            typed.Region(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
            for r, fd in zip(req.regions, req.fds)), fds=req.fds)
    if op in ("GET_CONFIG", "SET_CONFIG"):
        return typed.Request(op, offset=req.offset, size=req.size)
    if op == "SET_LOG_BASE":
        return typed.Request(op, source=req.fd, offset=req.offset, size=req.size, fds=req.fds)
    return typed.Request(op, value=req.u64, fds=req.fds)


def encode_result(req: Request, res: typed.Result, ack: bool) -> list[bytes]:
    if res.error is not None:
        return [reply_ack(req, False)] if req.need_reply and ack else []
    f = res.fields
    if f is not None:
        if req.op in ("GET_FEATURES", "GET_PROTOCOL_FEATURES"):
            return [reply_u64(req, f["features"])]
        if req.op == "GET_QUEUE_NUM":
            return [reply_u64(req, f["num"])]
        if req.op == "GET_VRING_BASE":
            return [reply_state(req, f["index"], f["num"])]
        if req.op == "GET_CONFIG":
            return [reply_config(req, f["data"])]
        if req.op == "SET_LOG_BASE":            # answered whatever REPLY_ACK says (QEMU waits)
            return [reply_u64(req, 0)]
    return [reply_ack(req, True)] if req.need_reply and ack else []


def vhost_user_session(device, *, attach_memory=None, open_doorbell=None, attach_log=None,
                       name: str = "vhost-user") -> "VhostUserCodec":
    """A Session for a vhost-user connection (status derived from the rings) behind its codec;
    by default memory and log come from fds (memfd.py) and doorbells are eventfds."""
    return VhostUserCodec(Session(device=device, derived_status=True,
                                  attach_memory=attach_memory or map_regions,
                                  open_doorbell=open_doorbell or EventFdDoorbell,
                                  attach_log=attach_log or map_log_fd, name=name))


class VhostUserCodec:
    """One vhost-user connection's messages <-> its Session (derived_status: no F_STATUS)."""

    def __init__(self, session: Session):
        self.session = session
        self.decoder = Decoder()

    def feed(self, data: bytes, fds=()) -> Outcome:
        """One message's bytes and fds (the runner reads a message at a time) -> Outcome."""
        out = Outcome()
        try:
            reqs = self.decoder.feed(data, fds)
        except VhostUserError as e:
            log.warning("%s: malformed message: %s; closing the connection", self.session.name, e)
            out.close = True
            return out
        for req in reqs:
            o = self.handle(req)
            out.replies += o.replies
            out.started += o.started
            if o.close:
                log.warning("%s: %s refused: %s; closing the connection", self.session.name,
                            req.op, self.session.error)
                out.close = True
                break
        return out

    def close_fds(self) -> None:
        """fds received and not handed to a request."""
        self.decoder.close()

    def close(self) -> None:
        """The connection is gone: fds not handed out, then Session.close."""
        self.close_fds()
        self.session.close()

    @property
    def device(self):
        return self.session.device

    def handle(self, req: Request) -> Outcome:
        """Never raises. Takes ownership of req's fds."""
        log.debug("%s: <- %r", self.session.name, req)
        if self.session.closed:
            req.close_fds()
            return Outcome(close=True)
        res = self.session.handle(to_request(req))     # derived_status: any refusal closes
        out = Outcome(encode_result(req, res, self.session.reply_ack), res.close, res.started)
        for r in out.replies:
            log.debug("%s: -> %s reply %s", self.session.name, req.op, r[HEADER.size:].hex())
        return out

