"""Control-plane messages and their codec (a vhost-user analogue: msgpack maps on a Unix socket).

Theory of operation
-------------------
Every message is one msgpack map with str keys. msgpack frames itself, so a connection needs no
length prefix: each side keeps ONE `Decoder` (one `msgpack.Unpacker`) for the life of the
connection and feeds it whatever `recv()` returned; a message split over many reads, or many
messages in one read, come out the same. `max_size` bounds the unconsumed buffer, hence the size of
one message (msgpack raises BufferFull, reported as E2BIG).

Requests carry `op` (a vhost-user request name) and `seq` (the frontend's u64 counter); the
fields of each op are fixed by `SCHEMA`: a field missing, extra or of the wrong type is EINVAL, an
unknown op is EOPNOTSUPP, anything that is not a msgpack map is EPROTO. Replies are
`{"op": "REPLY", "seq": <the request's seq>, "ok": True, ...}` or
`{"op": "REPLY", "seq", "ok": False, "error": CODE, "message": str}`.

The codec is pure: bytes in, dicts out, `ProtocolError(message, code)` for anything bad. After a
ProtocolError the decoder refuses further input (the peer closes the connection; framing cannot be
trusted once it is lost). docs/PROTOCOL.md is the normative description.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20          # bytes of one message (Decoder max_size default)
MAX_REGIONS = 8                # SET_MEM_TABLE: vhost-user's VHOST_MEMORY_BASELINE_NREGIONS
MAX_CONFIG = 256               # GET_CONFIG size: VhostUserConfig.region[256]
MAX_STR = 255                  # any str field
DEVICE_TYPES = ("vsock", "net")
DOORBELL_KINDS = ("posix_sem", "eventfd")   # eventfd: the fd rides on the request (SCM_RIGHTS)
_FEED_PIECE = 4096             # feed the Unpacker in pieces so a burst of small messages is not E2BIG


class ControlError(Exception):
    """The peer answered a request with an error reply (or broke the protocol)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --- field types ----------------------------------------------------------------------------------
# A field type is a checker: value -> None, raising ProtocolError(EINVAL) with a message naming
# the field. Kept as data so SCHEMA below reads as the table of the protocol.

def _fail(field: str, what: str, value: Any) -> None:
    raise ProtocolError(f"field {field!r} must be {what}, got {_describe(value)}", "EINVAL")


def _describe(value: Any) -> str:
    r = repr(value)
    return f"{type(value).__name__} {r[:40]}{'...' if len(r) > 40 else ''}"


def _uint(bits: int) -> Callable[[str, Any], None]:
    top = 1 << bits

    def check(field: str, v: Any) -> None:
        # bool is an int in Python; on the wire it is a different type and is refused
        if type(v) is not int or not 0 <= v < top:
            _fail(field, f"an unsigned {bits}-bit integer", v)
    check.__name__ = f"u{bits}"
    return check


U8, U16, U32, U64 = _uint(8), _uint(16), _uint(32), _uint(64)


def STR(field: str, v: Any) -> None:
    if type(v) is not str or len(v) > MAX_STR:
        _fail(field, f"a string of at most {MAX_STR} characters", v)


def BOOL(field: str, v: Any) -> None:
    if type(v) is not bool:
        _fail(field, "a boolean", v)


def MAP(field: str, v: Any) -> None:
    if type(v) is not dict or not all(type(k) is str for k in v):
        _fail(field, "a map with string keys", v)


def BIN(field: str, v: Any) -> None:
    if type(v) is not bytes:
        _fail(field, "binary data", v)


def _exact_map(field: str, v: Any, fields: dict[str, Callable]) -> None:
    if type(v) is not dict:
        _fail(field, "a map", v)
    _check_fields(v, fields, where=f"{field}: ")


def DEVICE(field: str, v: Any) -> None:
    STR(field, v)
    if v not in DEVICE_TYPES:
        raise ProtocolError(f"no such device type {v!r} (known: {', '.join(DEVICE_TYPES)})", "ENODEV")


REGION_FIELDS = {"guest_phys_addr": U64, "memory_size": U64, "userspace_addr": U64,
                 "mmap_offset": U64, "shm": STR}


def REGIONS(field: str, v: Any) -> None:
    if type(v) is not list:
        _fail(field, "a list of memory regions", v)
    if not 1 <= len(v) <= MAX_REGIONS:
        raise ProtocolError(f"a memory table holds 1..{MAX_REGIONS} regions, got {len(v)}",
                            "E2BIG" if len(v) > MAX_REGIONS else "EINVAL")
    for i, r in enumerate(v):
        _exact_map(f"{field}[{i}]", r, REGION_FIELDS)


DOORBELL_FIELDS = {"kind": STR, "name": STR}


def DOORBELL(field: str, v: Any) -> None:
    if v is None:
        return
    _exact_map(field, v, DOORBELL_FIELDS)
    if v["kind"] not in DOORBELL_KINDS:
        raise ProtocolError(f"doorbell kind {v['kind']!r} is not supported", "EOPNOTSUPP")


def _check_fields(msg: dict, fields: dict[str, Callable], where: str = "") -> None:
    for name, check in fields.items():
        if name not in msg:
            raise ProtocolError(f"{where}missing field {name!r}", "EINVAL")
        check(name, msg[name])
    extra = [k for k in msg if k not in fields]
    if extra:
        raise ProtocolError(f"{where}unexpected field(s) {', '.join(map(repr, map(str, extra)))}", "EINVAL")


# --- the protocol table: op -> {field: type} (beyond "op" and "seq") ------------------------------
_VRING_FILE = {"index": U32, "doorbell": DOORBELL}
SCHEMA: dict[str, dict[str, Callable]] = {
    "HELLO": {"version": U32, "device": DEVICE, "guest": STR, "reconnect": BOOL, "params": MAP},
    "GET_FEATURES": {},
    "SET_FEATURES": {"features": U64},
    "SET_OWNER": {},
    "RESET_OWNER": {},
    "SET_MEM_TABLE": {"regions": REGIONS},
    "SET_VRING_NUM": {"index": U32, "num": U32},
    "SET_VRING_ADDR": {"index": U32, "flags": U32, "desc_user_addr": U64, "avail_user_addr": U64,
                       "used_user_addr": U64, "log_guest_addr": U64},
    "SET_VRING_BASE": {"index": U32, "num": U16},
    "GET_VRING_BASE": {"index": U32},
    "SET_VRING_KICK": _VRING_FILE,
    "SET_VRING_CALL": _VRING_FILE,
    "SET_VRING_ERR": _VRING_FILE,
    "SET_VRING_ENABLE": {"index": U32, "enable": BOOL},
    "GET_CONFIG": {"offset": U32, "size": U32},
    "SET_STATUS": {"status": U8},
    "GET_STATUS": {},
    "GET_QUEUE_NUM": {},
    "GET_STATS": {},
    "SET_BACKEND": {"index": U32, "backend": STR},     # VHOST_NET_SET_BACKEND; "" detaches (fd -1)
    "SET_LOG_BASE": {"shm": STR, "offset": U64, "size": U64},   # VHOST_SET_LOG_BASE; "" drops it
}
OPS = frozenset(SCHEMA)
REPLY = "REPLY"


def request_seq(msg: Any) -> int | None:
    """The seq of a (possibly invalid) request, if it can be read: errors are answered with it."""
    if type(msg) is dict:
        seq = msg.get("seq")
        if type(seq) is int and 0 <= seq < 1 << 64:
            return seq
    return None


def validate_request(msg: Any) -> dict:
    """Check one decoded request against SCHEMA; returns it, or raises ProtocolError."""
    if type(msg) is not dict:
        raise ProtocolError(f"a message must be a map, got {_describe(msg)}", "EPROTO")
    op = msg.get("op")
    if type(op) is not str:
        raise ProtocolError("message has no string 'op'", "EPROTO")
    fields = SCHEMA.get(op)
    if fields is None:
        raise ProtocolError(f"unknown op {op[:40]!r}", "EOPNOTSUPP")
    if "seq" not in msg:
        raise ProtocolError(f"{op}: missing field 'seq'", "EINVAL")
    U64("seq", msg["seq"])
    body = {k: v for k, v in msg.items() if k != "op" and k != "seq"}
    try:
        _check_fields(body, fields)
    except ProtocolError as e:
        raise ProtocolError(f"{op}: {e}", e.code) from None
    return msg


def validate_reply(msg: Any) -> dict:
    """Check one decoded reply (the frontend's side)."""
    if type(msg) is not dict:
        raise ProtocolError(f"a reply must be a map, got {_describe(msg)}", "EPROTO")
    if msg.get("op") != REPLY:
        raise ProtocolError(f"expected a REPLY, got op {str(msg.get('op'))[:40]!r}", "EPROTO")
    seq = msg.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise ProtocolError(f"reply seq must be an unsigned integer or nil, got {_describe(seq)}", "EPROTO")
    if type(msg.get("ok")) is not bool:
        raise ProtocolError("reply has no boolean 'ok'", "EPROTO")
    if not msg["ok"] and (type(msg.get("error")) is not str or type(msg.get("message")) is not str):
        raise ProtocolError("error reply needs string 'error' and 'message'", "EPROTO")
    return msg


def reply(seq: int | None, **fields) -> dict:
    return {"op": REPLY, "seq": seq, "ok": True, **fields}


def error_reply(seq: int | None, code: str, message: str) -> dict:
    return {"op": REPLY, "seq": seq, "ok": False, "error": code, "message": message}


def error_is_fatal(rep: dict) -> bool:
    """Does the backend close the connection after this error reply? Yes, unless it says
    `"fatal": false` (the ioctl-like net ops, PROTOCOL.md section 7)."""
    return rep.get("fatal", True) is not False


def encode(msg: dict) -> bytes:
    """One message on the wire (msgpack, bin type for bytes)."""
    return msgpack.packb(msg, use_bin_type=True)


class Decoder:
    """One per connection: bytes in (any split), validated messages out.

    kind: "request" (the backend's side: validate_request), "reply" (the frontend's side:
    validate_reply) or None (maps only, no schema).
    """

    def __init__(self, max_size: int = MAX_MESSAGE, kind: str | None = "request"):
        if kind not in ("request", "reply", None):
            raise ValueError(f"bad decoder kind {kind!r}")
        self.max_size = max_size
        self._validate = {"request": validate_request, "reply": validate_reply, None: None}[kind]
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_size, strict_map_key=True,
                                          use_list=True)
        self.failed: ProtocolError | None = None
        self.messages = 0
        self._fed = 0                  # bytes fed so far
        self._consumed = 0             # stream offset just after the last complete message

    def iter_feed(self, data) -> Iterator[dict]:
        """Yield every message completed by `data`; raise ProtocolError at the first bad one.

        Messages before the bad one have already been yielded (the caller answers them in order).
        """
        if self.failed is not None:
            raise ProtocolError(f"decoder closed after an earlier error: {self.failed}", "EPROTO")
        data = memoryview(data).cast("B")
        try:
            for off in range(0, len(data), _FEED_PIECE):
                piece = data[off:off + _FEED_PIECE]
                try:
                    self._unpacker.feed(piece)
                    self._fed += len(piece)
                except msgpack.BufferFull:
                    raise ProtocolError(f"message larger than {self.max_size} bytes", "E2BIG") from None
                for msg in self._next_messages():
                    yield msg
        except ProtocolError as e:
            self.failed = e
            raise

    def _next_messages(self) -> Iterator[dict]:
        while True:
            try:
                msg = next(self._unpacker)
            except StopIteration:
                return
            except ProtocolError:
                raise
            except msgpack.BufferFull:
                raise ProtocolError(f"message larger than {self.max_size} bytes", "E2BIG") from None
            except Exception as e:  # FormatError, StackError, ValueError (non-str key), ...
                detail = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__}: not msgpack"
                code = "E2BIG" if "exceeds max" in str(e) else "EPROTO"
                raise ProtocolError(f"undecodable message ({detail})", code) from None
            self.messages += 1
            self._consumed = self._unpacker.tell()
            if type(msg) is not dict:
                e = ProtocolError(f"a message must be a map, got {_describe(msg)}", "EPROTO")
                raise e
            if self._validate is not None:
                try:
                    self._validate(msg)
                except ProtocolError as e:
                    e.seq = request_seq(msg)  # type: ignore[attr-defined]
                    raise
            yield msg

    def pending(self) -> int:
        """Bytes received that are not (yet) part of a complete message."""
        return self._fed - self._consumed

    def feed(self, data) -> list[dict]:
        """All messages completed by `data`. On error the ProtocolError carries `.messages`, the
        good messages decoded before the bad one, and `.seq` when the bad one had a readable seq."""
        out: list[dict] = []
        try:
            for msg in self.iter_feed(data):
                out.append(msg)
        except ProtocolError as e:
            e.messages = out  # type: ignore[attr-defined]
            raise
        return out
