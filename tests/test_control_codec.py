"""The control-plane codec: framing by msgpack, schema per op, errors with codes (shared/control.py)."""
import msgpack
import pytest

from shared import control
from shared.control import (MAX_REGIONS, PROTOCOL_VERSION, SCHEMA, Decoder, encode, error_reply,
                            reply, validate_reply, validate_request)
from shared.errors import ProtocolError

HELLO = {"op": "HELLO", "seq": 1, "version": PROTOCOL_VERSION, "device": "vsock", "guest": "g1",
         "reconnect": False, "params": {"cid": 3}}
REGION = {"guest_phys_addr": 0x4000_0000, "memory_size": 1 << 20, "userspace_addr": 0x7F00_0000_0000,
          "mmap_offset": 0, "shm": "ve-x"}

# One valid example of every op, so every schema row is exercised.
EXAMPLES = {
    "HELLO": HELLO,
    "GET_FEATURES": {}, "SET_FEATURES": {"features": (1 << 32) | (1 << 29)},
    "SET_OWNER": {}, "RESET_OWNER": {},
    "SET_MEM_TABLE": {"regions": [REGION]},
    "SET_VRING_NUM": {"index": 0, "num": 256},
    "SET_VRING_ADDR": {"index": 1, "flags": 0, "desc_user_addr": 0x7F00_0000_1000,
                       "avail_user_addr": 0x7F00_0000_2000, "used_user_addr": 0x7F00_0000_3000,
                       "log_guest_addr": 0},
    "SET_VRING_BASE": {"index": 0, "num": 65535}, "GET_VRING_BASE": {"index": 2},
    "SET_VRING_KICK": {"index": 0, "doorbell": {"kind": "posix_sem", "name": "/ve-a-q0k"}},
    "SET_VRING_CALL": {"index": 0, "doorbell": None},
    "SET_VRING_ERR": {"index": 0, "doorbell": {"kind": "posix_sem", "name": "/ve-a-q0e"}},
    "SET_VRING_ENABLE": {"index": 0, "enable": True},
    "GET_CONFIG": {"offset": 0, "size": 8}, "SET_STATUS": {"status": 0x0F},
    "GET_STATUS": {}, "GET_QUEUE_NUM": {}, "GET_STATS": {},
    "SET_BACKEND": {"index": 1, "backend": "loopback"},
    "SET_LOG_BASE": {"shm": "ve-a-log", "offset": 0, "size": 4096},
}


def req(op, seq=7, **fields):
    """A valid request of `op` with some fields replaced (or added)."""
    return {**EXAMPLES[op], "op": op, "seq": seq, **fields}


def test_every_op_has_an_example_and_round_trips():
    assert set(EXAMPLES) == set(SCHEMA)
    stream = b"".join(encode(req(op, seq=i)) for i, op in enumerate(SCHEMA))
    msgs = Decoder().feed(stream)
    assert [m["op"] for m in msgs] == list(SCHEMA)
    assert [m["seq"] for m in msgs] == list(range(len(SCHEMA)))
    assert msgs[list(SCHEMA).index("SET_MEM_TABLE")]["regions"] == [REGION]


def test_encode_uses_bin_type_for_bytes():
    raw = encode(reply(3, data=b"\x01\x02"))
    assert b"\xc4\x02\x01\x02" in raw          # bin 8, not str
    assert msgpack.unpackb(raw, raw=False)["data"] == b"\x01\x02"


def test_partial_reads_byte_by_byte():
    stream = encode(req("HELLO", seq=1)) + encode(req("SET_MEM_TABLE", seq=2)) + encode(req("GET_STATS", seq=3))
    d = Decoder()
    got = []
    for i in range(len(stream)):
        got += d.feed(stream[i:i + 1])
        # nothing is returned before its last byte arrives
        assert len(got) == sum(1 for end in _ends(stream) if end <= i + 1)
    assert [m["seq"] for m in got] == [1, 2, 3]
    assert d.pending() == 0


def _ends(stream):
    u = msgpack.Unpacker(raw=False)
    u.feed(stream)
    ends = []
    for _ in u:
        ends.append(u.tell())
    return ends


def test_several_messages_in_one_chunk_and_a_split_tail():
    a, b = encode(req("GET_FEATURES", seq=1)), encode(req("GET_STATUS", seq=2))
    d = Decoder()
    assert [m["seq"] for m in d.feed(a + b + a[:3])] == [1, 2]
    assert d.pending() == 3
    assert [m["seq"] for m in d.feed(a[3:])] == [1]
    assert d.pending() == 0


def test_many_small_messages_in_one_big_chunk_are_not_e2big():
    one = encode(req("GET_STATUS"))
    n = (2 * control.MAX_MESSAGE) // len(one)
    assert len(Decoder().feed(one * n)) == n


@pytest.mark.parametrize("garbage", [b"\xc1", b"\xc1\x00\x00", b"\x93\x01\x02\x03", b"\x05",
                                     b"\xa3abc", b"\xc0"])
def test_garbage_and_non_map_are_eproto(garbage):
    with pytest.raises(ProtocolError) as ei:
        Decoder().feed(garbage)
    assert ei.value.code == "EPROTO"


def test_non_string_keys_are_eproto():
    with pytest.raises(ProtocolError) as ei:
        Decoder().feed(msgpack.packb({1: 2}))
    assert ei.value.code == "EPROTO"


def test_oversized_message_is_e2big_even_when_fed_in_pieces():
    big = encode(req("GET_STATUS", pad=b"x" * 5000))
    d = Decoder(max_size=4096)
    with pytest.raises(ProtocolError) as ei:
        for i in range(0, len(big), 100):
            d.feed(big[i:i + 100])
    assert ei.value.code == "E2BIG"
    # a message just under the limit passes
    ok = encode(req("SET_FEATURES", features=1))
    assert Decoder(max_size=4096).feed(ok)[0]["features"] == 1


def test_decoder_refuses_input_after_an_error():
    d = Decoder()
    with pytest.raises(ProtocolError):
        d.feed(b"\xc1")
    with pytest.raises(ProtocolError) as ei:
        d.feed(encode(req("GET_STATUS")))
    assert "earlier error" in str(ei.value)


def test_good_messages_before_a_bad_one_are_kept():
    with pytest.raises(ProtocolError) as ei:
        Decoder().feed(encode(req("GET_STATUS", seq=1)) + encode(req("GET_QUEUE_NUM", seq=2)) + b"\xc1")
    assert [m["seq"] for m in ei.value.messages] == [1, 2]


def test_unknown_op():
    with pytest.raises(ProtocolError) as ei:
        Decoder().feed(encode({"op": "SET_LOG_FD", "seq": 4}))
    assert ei.value.code == "EOPNOTSUPP" and "SET_LOG_FD" in str(ei.value)
    assert ei.value.seq == 4


@pytest.mark.parametrize("msg, needle", [
    ({"seq": 1}, "no string 'op'"),
    ({"op": 5, "seq": 1}, "no string 'op'"),
    ({"op": "GET_STATUS"}, "missing field 'seq'"),
    ({"op": "GET_STATUS", "seq": -1}, "'seq'"),
    ({"op": "GET_STATUS", "seq": "1"}, "'seq'"),
])
def test_op_and_seq_are_required(msg, needle):
    with pytest.raises(ProtocolError) as ei:
        validate_request(msg)
    assert needle in str(ei.value) and ei.value.code in ("EPROTO", "EINVAL")


@pytest.mark.parametrize("op", sorted(op for op, f in SCHEMA.items() if f))
def test_missing_field_is_einval(op):
    msg = req(op)
    field = next(iter(SCHEMA[op]))
    del msg[field]
    with pytest.raises(ProtocolError) as ei:
        Decoder().feed(encode(msg))
    assert ei.value.code == "EINVAL" and f"missing field {field!r}" in str(ei.value)
    assert ei.value.seq == msg["seq"]


@pytest.mark.parametrize("op", sorted(SCHEMA))
def test_extra_field_is_einval(op):
    with pytest.raises(ProtocolError) as ei:
        validate_request(req(op, bogus=1))
    assert ei.value.code == "EINVAL" and "'bogus'" in str(ei.value)


@pytest.mark.parametrize("op, field, value", [
    ("SET_FEATURES", "features", True),            # bool is not an int on the wire
    ("SET_FEATURES", "features", -1),
    ("SET_FEATURES", "features", 1 << 64),
    ("SET_FEATURES", "features", 1.0),
    ("SET_VRING_NUM", "num", "256"),
    ("SET_VRING_NUM", "index", 1 << 32),
    ("SET_VRING_BASE", "num", 65536),              # a ring index is 16 bits
    ("SET_STATUS", "status", 256),
    ("SET_VRING_ENABLE", "enable", 1),
    ("HELLO", "guest", b"g1"),
    ("HELLO", "guest", "x" * 300),
    ("HELLO", "params", [1]),
    ("HELLO", "reconnect", None),
    ("SET_MEM_TABLE", "regions", {}),
    ("SET_MEM_TABLE", "regions", [{**REGION, "shm": 5}]),
    ("SET_MEM_TABLE", "regions", [{k: v for k, v in REGION.items() if k != "mmap_offset"}]),
    ("SET_MEM_TABLE", "regions", [{**REGION, "flags": 0}]),
    ("SET_MEM_TABLE", "regions", []),
    ("SET_VRING_KICK", "doorbell", "/ve-a-q0k"),
    ("SET_VRING_KICK", "doorbell", {"kind": "posix_sem"}),
    ("SET_VRING_KICK", "doorbell", {"kind": "posix_sem", "name": "/x", "fd": 3}),
])
def test_mistyped_fields_are_einval(op, field, value):
    with pytest.raises(ProtocolError) as ei:
        validate_request(req(op, **{field: value}))
    assert ei.value.code == "EINVAL", ei.value
    assert field in str(ei.value) or "field" in str(ei.value)


def test_too_many_regions_is_e2big():
    with pytest.raises(ProtocolError) as ei:
        validate_request(req("SET_MEM_TABLE", regions=[REGION] * (MAX_REGIONS + 1)))
    assert ei.value.code == "E2BIG"
    validate_request(req("SET_MEM_TABLE", regions=[REGION] * MAX_REGIONS))


def test_unknown_device_and_doorbell_kind():
    with pytest.raises(ProtocolError) as ei:
        validate_request(req("HELLO", device="blk"))
    assert ei.value.code == "ENODEV"
    with pytest.raises(ProtocolError) as ei:
        validate_request(req("SET_VRING_CALL", doorbell={"kind": "vfio_irq", "name": "x"}))
    assert ei.value.code == "EOPNOTSUPP"


def test_trailing_partial_data_stays_pending():
    d = Decoder()
    msg = encode(req("GET_STATUS"))
    assert len(d.feed(msg + b"\x82")) == 1       # a map header whose body has not come yet
    assert d.pending() == 1
    assert d.feed(b"") == []


def test_replies():
    assert reply(5, status=3) == {"op": "REPLY", "seq": 5, "ok": True, "status": 3}
    e = error_reply(6, "EINVAL", "bad")
    assert e == {"op": "REPLY", "seq": 6, "ok": False, "error": "EINVAL", "message": "bad"}
    d = Decoder(kind="reply")
    assert d.feed(encode(e) + encode(reply(None))) == [e, reply(None)]
    for bad in ({"op": "GET_STATUS", "seq": 1}, {"op": "REPLY", "seq": 1},
                {"op": "REPLY", "seq": 1, "ok": False}, {"op": "REPLY", "seq": "1", "ok": True}):
        with pytest.raises(ProtocolError):
            validate_reply(bad)
