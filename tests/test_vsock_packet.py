"""shared/vsock/packet.py: the 44-byte virtio_vsock_hdr, byte for byte (uapi linux/virtio_vsock.h)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.constants import (
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_TYPE_STREAM,
)
from shared.vsock.packet import (
    HDR,
    OFF_BUF_ALLOC,
    OFF_DST_CID,
    OFF_DST_PORT,
    OFF_FLAGS,
    OFF_FWD_CNT,
    OFF_LEN,
    OFF_OP,
    OFF_SRC_CID,
    OFF_SRC_PORT,
    OFF_TYPE,
    Packet,
    op_name,
    peek_len,
    reply_to,
)


def sample(payload=b"abc"):
    return Packet(src_cid=0x0102030405060708, dst_cid=2, src_port=0x11223344,
                  dst_port=0x55667788, type=VIRTIO_VSOCK_TYPE_STREAM, op=VIRTIO_VSOCK_OP_RW,
                  flags=0xA0B0C0D0, buf_alloc=0x40000, fwd_cnt=0xFFFFFFFE, payload=payload)


def test_header_is_44_bytes_with_spec_format():
    assert HDR.size == 44
    assert HDR.format == "<QQIIIHHIII"


def test_pack_hdr_exact_bytes():
    h = sample().pack_hdr()
    assert h == bytes.fromhex(
        "0807060504030201"      # src_cid
        "0200000000000000"      # dst_cid
        "44332211"              # src_port
        "88776655"              # dst_port
        "03000000"              # len = len(payload)
        "0100"                  # type STREAM
        "0500"                  # op RW
        "d0c0b0a0"              # flags
        "00000400"              # buf_alloc
        "feffffff")             # fwd_cnt


def test_field_offsets_match_the_spec_table():
    h = sample().pack_hdr()
    u64 = lambda off: int.from_bytes(h[off:off + 8], "little")   # noqa: E731
    u32 = lambda off: int.from_bytes(h[off:off + 4], "little")   # noqa: E731
    u16 = lambda off: int.from_bytes(h[off:off + 2], "little")   # noqa: E731
    assert (OFF_SRC_CID, OFF_DST_CID, OFF_SRC_PORT, OFF_DST_PORT, OFF_LEN) == (0, 8, 16, 20, 24)
    assert (OFF_TYPE, OFF_OP, OFF_FLAGS, OFF_BUF_ALLOC, OFF_FWD_CNT) == (28, 30, 32, 36, 40)
    assert u64(OFF_SRC_CID) == 0x0102030405060708
    assert u64(OFF_DST_CID) == 2
    assert u32(OFF_SRC_PORT) == 0x11223344
    assert u32(OFF_DST_PORT) == 0x55667788
    assert u32(OFF_LEN) == 3
    assert u16(OFF_TYPE) == 1
    assert u16(OFF_OP) == 5
    assert u32(OFF_FLAGS) == 0xA0B0C0D0
    assert u32(OFF_BUF_ALLOC) == 0x40000
    assert u32(OFF_FWD_CNT) == 0xFFFFFFFE


def test_len_is_derived_from_payload():
    p = sample(b"")
    assert p.len == 0
    p.payload = b"x" * 70000
    assert p.len == 70000
    assert int.from_bytes(p.pack_hdr()[24:28], "little") == 70000


def test_round_trip_and_trailing_bytes_ignored():
    p = sample(b"hello")
    q = Packet.unpack(p.pack_hdr() + b"TRAILING", b"hello")
    assert q == p
    assert Packet.from_bytes(p.pack() + b"\x00" * 100) == p      # buffer larger than packet
    assert Packet.from_bytes(memoryview(bytearray(p.pack()))) == p


def test_unpack_copies_the_header_out():
    buf = bytearray(sample(b"").pack_hdr())
    q = Packet.unpack(buf)
    buf[:] = b"\xff" * 44            # a hostile writer changes the buffer afterwards
    assert q.src_cid == 0x0102030405060708 and q.op == VIRTIO_VSOCK_OP_RW


def test_short_header_and_malformed_are_different_errors():
    h = sample().pack_hdr()
    for n in (0, 1, 43):
        with pytest.raises(ValueError, match="short vsock header"):
            Packet.unpack(h[:n])
        with pytest.raises(ValueError, match="short vsock header"):
            peek_len(h[:n])
    with pytest.raises(ValueError, match="malformed"):
        Packet.unpack(h, b"ab")          # header says 3
    with pytest.raises(ValueError, match="malformed"):
        Packet.from_bytes(h + b"ab")


def test_pack_rejects_overflowing_fields():
    p = sample()
    p.src_port = 1 << 32
    with pytest.raises(struct.error):
        p.pack_hdr()


def test_reply_to_swaps_addresses():
    p = sample(b"data")
    r = reply_to(p, VIRTIO_VSOCK_OP_RST)
    assert (r.src_cid, r.dst_cid, r.src_port, r.dst_port) == (2, 0x0102030405060708,
                                                              0x55667788, 0x11223344)
    assert (r.type, r.op, r.flags, r.buf_alloc, r.fwd_cnt, r.payload) == (1, 3, 0, 0, 0, b"")
    assert r.reply is True and r.owner is None
    r2 = reply_to(p, VIRTIO_VSOCK_OP_SHUTDOWN, flags=3, buf_alloc=9, fwd_cnt=7, reply=False,
                  owner="sk")
    assert (r2.op, r2.flags, r2.buf_alloc, r2.fwd_cnt, r2.reply, r2.owner) == (4, 3, 9, 7,
                                                                            False, "sk")


def test_reply_and_owner_are_not_on_the_wire():
    a = sample()
    b = sample()
    b.reply, b.owner = True, object()
    assert a.pack_hdr() == b.pack_hdr()


def test_op_names():
    assert op_name(VIRTIO_VSOCK_OP_RW) == "RW"
    assert op_name(99) == "OP_99"
    assert "RW 72623859790382856:287454020->2:1432778632" in repr(sample())


u32 = st.integers(0, 2**32 - 1)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), u32, u32, st.integers(0, 65535),
       st.integers(0, 65535), u32, u32, u32, st.binary(max_size=64))
def test_round_trip_property(sc, dc, sp, dp, ty, op, fl, ba, fc, payload):
    p = Packet(sc, dc, sp, dp, ty, op, fl, ba, fc, payload)
    raw = p.pack()
    assert len(raw) == 44 + len(payload)
    assert peek_len(raw) == len(payload)
    assert Packet.from_bytes(raw) == p
