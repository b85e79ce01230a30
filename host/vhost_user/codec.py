"""The vhost-user wire format: bytes + fds in, the session's typed requests out; results to reply
bytes. Pure code.

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

`PAYLOADS` says, per request, which layout its payload has, which `Request` fields it fills and
which fds come with it; `REPLIES`, which reply carries what. `decode_message(data, fds)` turns one
whole message and the fds that came with its header into the session's `Request` (host/session.py),
which owns them from then on; a malformed message raises `VhostUserError` (its fds closed, the
connection closed). `VhostUserCodec(session)` hands each to the one Session and answers: the op's
own reply, else REPLY_ACK when negotiated and asked for; any error closes.
"""
from __future__ import annotations

import logging
import struct

from host.session import PROTOCOL_F_REPLY_ACK, Region, Request, Result, Session, close_fds
from shared.doorbell import EventFdDoorbell

from host import guest_memory

log = logging.getLogger(__name__)

HEADER = struct.Struct("<III")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
VERSION, VERSION_MASK, F_REPLY, F_NEED_REPLY = 0x1, 0x3, 0x4, 0x8
MAX_REGIONS = 8                      # VHOST_MEMORY_BASELINE_NREGIONS
MAX_CONFIG = 256                     # VHOST_USER_MAX_CONFIG_SIZE
MAX_PAYLOAD = MEM_HEADER.size + MAX_REGIONS * MEM_REGION.size   # the largest message we accept
VRING_IDX_MASK = 0xFF                # SET_VRING_KICK/CALL/ERR: bits 0-7 the index
VRING_NOFD = 1 << 8                  # bit 8: no fd (polling / remove)

# Front-end message types, codes 1.. (vhost-user.rst "Front-end message types")
REQUESTS = dict(enumerate((
    "GET_FEATURES SET_FEATURES SET_OWNER RESET_OWNER SET_MEM_TABLE SET_LOG_BASE SET_LOG_FD "
    "SET_VRING_NUM SET_VRING_ADDR SET_VRING_BASE GET_VRING_BASE SET_VRING_KICK SET_VRING_CALL "
    "SET_VRING_ERR GET_PROTOCOL_FEATURES SET_PROTOCOL_FEATURES GET_QUEUE_NUM SET_VRING_ENABLE "
    "SEND_RARP NET_SET_MTU SET_BACKEND_REQ_FD IOTLB_MSG SET_VRING_ENDIAN GET_CONFIG SET_CONFIG "
    "CREATE_CRYPTO_SESSION CLOSE_CRYPTO_SESSION POSTCOPY_ADVISE POSTCOPY_LISTEN POSTCOPY_END "
    "GET_INFLIGHT_FD SET_INFLIGHT_FD GPU_SET_SOCKET RESET_DEVICE VRING_KICK GET_MAX_MEM_SLOTS "
    "ADD_MEM_REG REM_MEM_REG SET_STATUS GET_STATUS").split(), 1))
CODES = {v: k for k, v in REQUESTS.items()}

# payload layouts: (struct, the Request / result fields it holds, in wire order)
U64 = (struct.Struct("<Q"), ("value",))
STATE = (struct.Struct("<II"), ("index", "num"))
ADDR = (struct.Struct("<IIQQQQ"), ("index", "flags", "desc", "used", "avail", "log"))
CONFIG = (struct.Struct("<III"), ("offset", "size", "flags"))
LOG = (struct.Struct("<QQ"), ("size", "offset"))
MEM = (MEM_HEADER, ("regions",))
# the fds a request carries: none, exactly one, one unless bit 8 of its u64, one per region
NO_FD, ONE_FD, VRING_FD, REGION_FDS = range(4)

# op -> (payload layout, fds). Ops not here carry neither (a size 0 payload; extra bytes ignored).
PAYLOADS = {
    **dict.fromkeys(("SET_FEATURES", "SET_PROTOCOL_FEATURES", "SET_STATUS", "SEND_RARP",
                     "NET_SET_MTU"), (U64, NO_FD)),
    **dict.fromkeys(("SET_LOG_FD", "SET_BACKEND_REQ_FD"), (U64, ONE_FD)),
    **dict.fromkeys(("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"), (U64, VRING_FD)),
    **dict.fromkeys(("SET_VRING_NUM", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_ENABLE",
                     "SET_VRING_ENDIAN"), (STATE, NO_FD)),
    "SET_VRING_ADDR": (ADDR, NO_FD),
    "SET_MEM_TABLE": (MEM, REGION_FDS),
    "GET_CONFIG": (CONFIG, NO_FD),
    "SET_CONFIG": (CONFIG, NO_FD),
    "SET_LOG_BASE": (LOG, ONE_FD),
}
# op -> the reply's layout and the result fields it carries (GET_CONFIG: + the data). Other ops
# answer only with REPLY_ACK; SET_LOG_BASE is answered (u64 0) whatever REPLY_ACK says (QEMU waits).
REPLIES = {"GET_FEATURES": (U64[0], ("features",)), "GET_PROTOCOL_FEATURES": (U64[0], ("features",)),
           "GET_QUEUE_NUM": (U64[0], ("num",)), "GET_VRING_BASE": STATE, "GET_CONFIG": CONFIG,
           "SET_LOG_BASE": (U64[0], ("ok",))}


class VhostUserError(Exception):
    """A malformed vhost-user message: log it and close the connection."""


def decode(code: int, flags: int, payload: bytes, fds: tuple[int, ...] = ()) -> Request:
    """One message's fields -> Request. Raises VhostUserError; the caller owns `fds` on error."""
    op = REQUESTS.get(code)
    if op is None:
        raise VhostUserError(f"unknown request {code}")
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(f"{op}: version {flags & VERSION_MASK} is not 1 (flags {flags:#x})")
    if flags & F_REPLY:
        raise VhostUserError(f"{op}: a front-end message with the REPLY flag")
    (st, names), want = PAYLOADS.get(op, ((None, ()), NO_FD))
    if want == NO_FD and fds:
        raise VhostUserError(f"{op} carries {len(fds)} fd(s) it should not")
    if st is not None and len(payload) < st.size:
        raise VhostUserError(f"{op}: payload of {len(payload)} bytes, expected {st.size}")
    kw = dict(zip(names, st.unpack_from(payload))) if st is not None else {}
    n = 1 if want == ONE_FD else 0
    if want == VRING_FD:
        v = kw["value"]
        if v & ~(VRING_IDX_MASK | VRING_NOFD):
            raise VhostUserError(f"{op}: reserved bits set in {v:#x}")
        if v & VRING_NOFD and fds:
            raise VhostUserError(f"{op}: 'no fd' bit set but {len(fds)} fd(s) sent")
        n = 0 if v & VRING_NOFD else 1
        kw.update(index=v & VRING_IDX_MASK, doorbell=fds[0] if n and fds else None)
    elif op == "SET_MEM_TABLE":
        n = kw["regions"]
        if not 1 <= n <= MAX_REGIONS:
            raise VhostUserError(f"SET_MEM_TABLE: {n} regions (1..{MAX_REGIONS})")
        if len(payload) < MEM_HEADER.size + n * MEM_REGION.size:
            raise VhostUserError(f"{op}: payload of {len(payload)} bytes, expected "
                                 f"{MEM_HEADER.size + n * MEM_REGION.size}")
        if len(fds) != n:
            raise VhostUserError(f"SET_MEM_TABLE: {n} regions but {len(fds)} fds")
        kw["regions"] = tuple(Region(*MEM_REGION.unpack_from(payload, MEM_HEADER.size + k * MEM_REGION.size),
                                     source=fd) for k, fd in enumerate(fds))
    elif st is CONFIG[0]:
        if kw["size"] > MAX_CONFIG:
            raise VhostUserError(f"{op}: size {kw['size']} exceeds {MAX_CONFIG}")
        if len(payload) < st.size + kw["size"]:
            raise VhostUserError(f"{op}: payload of {len(payload)} bytes, expected {st.size + kw['size']}")
    if want in (ONE_FD, VRING_FD) and len(fds) != n:
        raise VhostUserError(f"{op}: expected one fd, got {len(fds)}")
    if op == "SET_LOG_BASE":
        kw["source"] = fds[0]
    return Request(op, need_reply=bool(flags & F_NEED_REPLY), fds=tuple(fds), **kw)


def decode_message(data: bytes, fds=()) -> Request:
    """One whole message as the runner reads it (host/vhost_user/runner.py read_message: the
    header, then its payload; its fds came with the header) -> Request. On VhostUserError the
    fds are closed."""
    try:
        if len(data) < HEADER.size:
            raise VhostUserError(f"a message of {len(data)} bytes has no header")
        code, flags, size = HEADER.unpack_from(data)
        if size > MAX_PAYLOAD:
            raise VhostUserError(f"{REQUESTS.get(code, code)}: payload size {size} exceeds {MAX_PAYLOAD}")
        if len(data) != HEADER.size + size:
            raise VhostUserError(f"{REQUESTS.get(code, code)}: {len(data) - HEADER.size} payload bytes, "
                                 f"the header says {size}")
        return decode(code, flags, bytes(data[HEADER.size:]), tuple(fds))
    except VhostUserError:
        close_fds(fds)
        raise


def reply(op: str, payload: bytes) -> bytes:
    return HEADER.pack(CODES[op], VERSION | F_REPLY, len(payload)) + payload


def encode_result(req: Request, res: Result, ack: bool) -> list[bytes]:
    """The reply bytes for one request's result: its own reply, or REPLY_ACK (u64 0 on success,
    non-zero on failure) when negotiated and asked for, or nothing."""
    if res.error is None and res.fields is not None and req.op in REPLIES:
        (st, names), data = REPLIES[req.op], res.fields.get("data", b"")
        values = {"ok": 0, "offset": req.offset, "size": len(data), "flags": req.flags, **res.fields}
        return [reply(req.op, st.pack(*(values[n] for n in names)) + data)]
    return [reply(req.op, U64[0].pack(res.error is not None))] if req.need_reply and ack else []


# --- the frontend's side of the same layouts (tests play QEMU with them) -----------------------------
def encode_request(op: str, payload: bytes = b"", need_reply: bool = False) -> bytes:
    return HEADER.pack(CODES[op], VERSION | (F_NEED_REPLY if need_reply else 0), len(payload)) + payload


def mem_table_payload(regions) -> bytes:
    return MEM_HEADER.pack(len(regions), 0) + b"".join(
        MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions)


def parse_reply(data: bytes) -> tuple[str, int, bytes]:
    code, flags, size = HEADER.unpack_from(data)
    if not flags & F_REPLY:
        raise VhostUserError("not a reply")
    return REQUESTS.get(code, str(code)), flags, bytes(data[HEADER.size:HEADER.size + size])


def vhost_user_session(device, *, attach_memory=guest_memory.attach_memory, open_doorbell=EventFdDoorbell,
                       attach_log=guest_memory.attach_log, name: str = "vhost-user") -> "VhostUserCodec":
    """A Session for a vhost-user connection (status derived from the rings) behind its codec;
    by default memory and log come from fds (host/guest_memory.py) and doorbells are eventfds."""
    return VhostUserCodec(Session(device=device, derived_status=True, attach_memory=attach_memory,
                                  open_doorbell=open_doorbell, attach_log=attach_log, name=name))


class VhostUserCodec:
    """One vhost-user connection's messages <-> its Session (derived_status: no F_STATUS)."""

    def __init__(self, session: Session):
        self.session = session

    @property
    def device(self):
        return self.session.device

    def feed(self, data: bytes, fds=()) -> Result:
        """One message's bytes and fds (the runner reads a message at a time) -> Result."""
        try:
            req = decode_message(data, fds)
        except VhostUserError as e:
            log.warning("%s: malformed message: %s; closing the connection", self.session.name, e)
            return Result(close=True)
        res = self.handle(req)
        if res.close:
            log.warning("%s: %s refused: %s; closing the connection", self.session.name, req.op,
                        self.session.error)
        return res

    def handle(self, req: Request) -> Result:
        """Never raises. Takes ownership of req's fds."""
        log.debug("%s: <- %r", self.session.name, req)
        if self.session.closed:
            req.close_fds()
            return Result(close=True)
        res = self.session.handle(req)                 # derived_status: any refusal closes
        res.replies = encode_result(req, res, bool(self.session.protocol_features & (1 << PROTOCOL_F_REPLY_ACK)))
        for r in res.replies:
            log.debug("%s: -> %s reply %s", self.session.name, req.op, r[HEADER.size:].hex())
        return res

    def close_fds(self) -> None:
        """Nothing waits: every message's fds go with its request."""

    def close(self) -> None:
        """The connection is gone: Session.close."""
        self.session.close()
