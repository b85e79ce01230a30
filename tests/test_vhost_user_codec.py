"""vhost-user wire codec, byte by byte (layouts: QEMU docs/interop/vhost-user.rst)."""
from __future__ import annotations

import os
import struct
from dataclasses import replace

import pytest

from host.vhost_user import codec
from host.vhost_user.codec import VhostUserError, decode, decode_message
from host.session import Region as MemRegion, Result
from shared.errors import ProtocolError


def hdr(code: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", code, flags, size)


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_request_codes_match_the_spec():
    assert codec.CODES["GET_FEATURES"] == 1
    assert codec.CODES["SET_MEM_TABLE"] == 5
    assert codec.CODES["SET_VRING_ADDR"] == 9
    assert codec.CODES["GET_VRING_BASE"] == 11
    assert codec.CODES["SET_VRING_KICK"] == 12 and codec.CODES["SET_VRING_CALL"] == 13
    assert codec.CODES["GET_PROTOCOL_FEATURES"] == 15 and codec.CODES["SET_PROTOCOL_FEATURES"] == 16
    assert codec.CODES["SET_VRING_ENABLE"] == 18
    assert codec.CODES["GET_CONFIG"] == 24 and codec.CODES["SET_CONFIG"] == 25
    assert codec.CODES["GET_STATUS"] == 40


def test_header_u64_and_need_reply():
    wire = hdr(2, 0x9, 8) + struct.pack("<Q", 0x1_7000_0000)
    assert wire == bytes.fromhex("02000000" "09000000" "08000000" "0000007001000000")
    r = decode_message(wire)
    assert (r.op, r.value, r.need_reply) == ("SET_FEATURES", 0x170000000, True)


def test_no_payload_message():
    r = decode_message(bytes.fromhex("01000000 01000000 00000000"))
    assert r.op == "GET_FEATURES" and not r.need_reply and r.value is None


def test_vring_state_and_enable():
    r = decode_message(hdr(8, 1, 8) + bytes.fromhex("01000000 80000000"))
    assert (r.op, r.index, r.num) == ("SET_VRING_NUM", 1, 128)
    r = decode_message(hdr(18, 1, 8) + struct.pack("<II", 0, 1))
    assert (r.op, r.index, r.num) == ("SET_VRING_ENABLE", 0, 1)


def test_vring_addr_order_is_desc_used_avail_log():
    payload = struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert len(payload) == 40
    r = decode_message(hdr(9, 1, 40) + payload)
    assert (r.index, r.desc, r.used, r.avail, r.log) == (1, 0x1000, 0x3000, 0x2000, 0)


def test_mem_table_two_regions_with_fds():
    fds = eventfds(2)
    regions = [MemRegion(0, 0xa0000, 0x7f0000000000, 0), MemRegion(0xc0000, 0xff40000, 0x7f00000c0000, 0xc0000)]
    payload = codec.mem_table_payload(regions)
    assert len(payload) == 8 + 2 * 32
    assert payload[:8] == bytes.fromhex("02000000 00000000")
    assert payload[8 + 32:8 + 64] == struct.pack("<QQQQ", 0xc0000, 0xff40000, 0x7f00000c0000, 0xc0000)
    r = decode_message(codec.encode_request("SET_MEM_TABLE", payload, need_reply=True), fds)
    assert r.regions == tuple(replace(g, source=fd) for g, fd in zip(regions, fds))   # each with its fd
    assert r.fds == tuple(fds) and r.need_reply
    r.close_fds()


def test_mem_table_rules():
    one = codec.mem_table_payload([MemRegion(0, 4096, 0, 0)])
    with pytest.raises(VhostUserError, match="1 regions but 0 fds"):
        decode(5, 1, one, ())
    nine = struct.pack("<II", 9, 0) + bytes(9 * 32)
    with pytest.raises(VhostUserError):
        decode_message(hdr(5, 1, len(nine)) + nine)        # larger than any legal message
    with pytest.raises(VhostUserError, match="0 regions"):
        decode(5, 1, struct.pack("<II", 0, 0), ())


def test_vring_fd_messages():
    (fd,) = eventfds(1)
    r = decode_message(hdr(12, 1, 8) + struct.pack("<Q", 1), [fd])
    assert (r.op, r.index, r.doorbell) == ("SET_VRING_KICK", 1, fd)
    r.close_fds()
    r = decode_message(hdr(13, 1, 8) + struct.pack("<Q", 0x100))   # bit 8: no fd
    assert (r.op, r.index, r.doorbell) == ("SET_VRING_CALL", 0, None)
    with pytest.raises(VhostUserError, match="expected one fd"):
        decode_message(hdr(13, 1, 8) + struct.pack("<Q", 0))
    with pytest.raises(VhostUserError, match="reserved bits"):
        decode(13, 1, struct.pack("<Q", 0x200), ())


def test_config_request_and_reply():
    payload = struct.pack("<III", 0, 8, 0) + bytes(8)
    r = decode_message(hdr(24, 1, len(payload)) + payload)
    assert (r.op, r.offset, r.size) == ("GET_CONFIG", 0, 8)
    (rep,) = codec.encode_result(r, Result(fields={"data": struct.pack("<Q", 3)}), ack=False)
    assert rep == bytes.fromhex("18000000 05000000 14000000" "00000000 08000000 00000000" "0300000000000000")


def test_replies():
    r = decode_message(hdr(1, 1, 0))
    assert codec.encode_result(r, Result(fields={"features": 0x140000000}), ack=False) == [ bytes.fromhex("01000000 05000000 08000000 0000004001000000")]
    r = decode_message(hdr(11, 1, 8) + struct.pack("<II", 1, 0))
    assert codec.encode_result(r, Result(fields={"index": 1, "num": 6}), ack=False) == [
        bytes.fromhex("0b000000 05000000 08000000 01000000 06000000")]
    r = decode_message(hdr(3, 9, 0))                  # SET_OWNER with NEED_REPLY
    assert r.need_reply
    assert codec.encode_result(r, Result(), ack=True) == [bytes.fromhex("03000000 05000000 08000000 0000000000000000")]
    assert codec.encode_result(r, Result(error=ProtocolError("no", "EINVAL")), ack=True) == [
        bytes.fromhex("03000000 05000000 08000000 0100000000000000")]
    assert codec.encode_result(r, Result(), ack=False) == []          # REPLY_ACK not negotiated


def test_one_whole_message_at_a_time():
    """The runner reads one message (header, then its payload) with the fds of its header:
    bytes that are not exactly one message are refused, and the fds closed."""
    a = hdr(3, 1, 0)
    b = hdr(8, 1, 8) + struct.pack("<II", 0, 256)
    assert [decode_message(m).op for m in (a, b)] == ["SET_OWNER", "SET_VRING_NUM"]
    for wire in (a + b, b[:-1], a[:5]):
        with pytest.raises(VhostUserError):
            decode_message(wire)
    fds = eventfds(1)
    with pytest.raises(VhostUserError, match="payload bytes"):
        decode_message(hdr(12, 1, 8) + struct.pack("<Q", 0) + b, fds)     # a kick and more
    assert not is_open(fds[0])


@pytest.mark.parametrize("wire,needle", [
    (hdr(99, 1, 0), "unknown request 99"),
    (hdr(1, 2, 0), "version 2"),
    (hdr(1, 5, 0), "REPLY flag"),
    (hdr(2, 1, 4) + bytes(4), "expected 8"),
    (hdr(24, 1, 12) + struct.pack("<III", 0, 300, 0), "exceeds 256"),
])
def test_malformed(wire, needle):
    with pytest.raises(VhostUserError, match=needle):
        decode_message(wire)


def test_fds_of_a_malformed_message_are_closed():
    fds = eventfds(2)
    with pytest.raises(VhostUserError, match="should not"):
        decode_message(hdr(2, 1, 8) + bytes(8), fds)
    assert not any(is_open(fd) for fd in fds)


def test_net_messages_decode_for_a_future_vhost_net():
    """Wire level only (the vhost-net device is not here yet): the u64 payloads of net's messages."""
    mac = bytes.fromhex("525400123456")
    r = decode_message(hdr(19, 1, 8) + mac + bytes(2))          # SEND_RARP: MAC in the low bytes
    assert r.op == "SEND_RARP" and r.value.to_bytes(8, "little")[:6] == mac
    r = decode_message(hdr(20, 9, 8) + struct.pack("<Q", 1500))
    assert (r.op, r.value, r.need_reply) == ("NET_SET_MTU", 1500, True)
    r = decode_message(hdr(17, 1, 0))
    assert r.op == "GET_QUEUE_NUM"
