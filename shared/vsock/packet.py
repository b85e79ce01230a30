"""The virtio-vsock packet: a 44-byte `struct virtio_vsock_hdr` and its payload.

Theory of operation
-------------------
Every vsock packet on the rx/tx virtqueues starts with the packed little-endian header
(virtio spec §Socket Device "Device Operation", uapi linux/virtio_vsock.h):

    off size field      notes
      0    8 src_cid    upper 32 bits reserved
      8    8 dst_cid
     16    4 src_port
     20    4 dst_port
     24    4 len        payload bytes that follow (RW only)
     28    2 type       1 STREAM, 2 SEQPACKET
     30    2 op         REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST
     32    4 flags      SHUTDOWN bits (RCV=1, SEND=2)
     36    4 buf_alloc  sender's receive buffer for this socket
     40    4 fwd_cnt    sender's free-running count of bytes consumed

`Packet` is the in-memory form (the 2016-17 `struct virtio_vsock_pkt`): the header fields, the
payload, and two pieces of local bookkeeping that never go on the wire: `reply` (the packet
answers one received from the peer; the transports count those as `queued_replies`) and
`owner` (the socket that queued it, so a transport can `cancel_pkt` a closing socket's
packets). The header's `len` is always `len(payload)`: it is derived, never stored.

Parsing (`Packet.unpack`) copies the header out of whatever buffer it came from before any
field is looked at, so a hostile writer cannot change it underneath the caller. A buffer too
short to hold a header is a different error from a header whose `len` disagrees with the
payload handed in.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from shared.constants import (
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_INVALID,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_MAX_PKT_BUF_SIZE,
)

# struct virtio_vsock_hdr: src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
assert HDR.size == 44, HDR.size
HDR_SIZE = HDR.size

# Field offsets, for code that patches one field in place (e.g. a device stamping len).
OFF_SRC_CID, OFF_DST_CID, OFF_SRC_PORT, OFF_DST_PORT, OFF_LEN = 0, 8, 16, 20, 24
OFF_TYPE, OFF_OP, OFF_FLAGS, OFF_BUF_ALLOC, OFF_FWD_CNT = 28, 30, 32, 36, 40

OP_NAMES = {
    VIRTIO_VSOCK_OP_INVALID: "INVALID",
    VIRTIO_VSOCK_OP_REQUEST: "REQUEST",
    VIRTIO_VSOCK_OP_RESPONSE: "RESPONSE",
    VIRTIO_VSOCK_OP_RST: "RST",
    VIRTIO_VSOCK_OP_SHUTDOWN: "SHUTDOWN",
    VIRTIO_VSOCK_OP_RW: "RW",
    VIRTIO_VSOCK_OP_CREDIT_UPDATE: "CREDIT_UPDATE",
    VIRTIO_VSOCK_OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}


def op_name(op: int) -> str:
    """The op's kernel name, or 'OP_<n>' for a value outside the spec."""
    return OP_NAMES.get(op, f"OP_{op}")


@dataclass(slots=True)
class Packet:
    """One vsock packet (header fields + payload). `len` is derived from the payload."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    payload: bytes = b""
    reply: bool = False        # answers a received packet (counted in queued_replies)
    owner: object = None       # the socket that queued it (for cancel_pkt); not on the wire

    @property
    def len(self) -> int:
        return len(self.payload)

    def pack_hdr(self) -> bytes:
        """The 44 header bytes, with len = len(payload). struct.error if a field overflows."""
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port,
                        len(self.payload), self.type, self.op, self.flags,
                        self.buf_alloc, self.fwd_cnt)

    def pack(self) -> bytes:
        """Header and payload as one bytes object (loopback, capture, tests)."""
        return self.pack_hdr() + bytes(self.payload)

    @classmethod
    def unpack(cls, hdr: bytes | bytearray | memoryview, payload: bytes = b"") -> "Packet":
        """Parse a header (its first 44 bytes; the rest is ignored) and attach `payload`.

        ValueError("short vsock header ...") when fewer than 44 bytes are given;
        ValueError("malformed vsock header ...") when hdr.len disagrees with len(payload).
        The caller decides how much payload to read from hdr.len: use `peek_len` first.
        """
        if len(hdr) < HDR_SIZE:
            raise ValueError(f"short vsock header: {len(hdr)} bytes, need {HDR_SIZE}")
        # unpack_from copies the fields out: nothing below reads the source buffer again.
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack_from(hdr, 0)
        if length != len(payload):
            raise ValueError(f"malformed vsock header: len {length} but {len(payload)} "
                             f"payload bytes")
        return cls(src_cid, dst_cid, src_port, dst_port, type_, op, flags, buf_alloc, fwd_cnt,
                   payload)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Packet":
        """Parse header + payload from one buffer; the payload is hdr.len bytes after it.

        Trailing bytes beyond hdr.len are ignored (a buffer may be larger than the packet);
        a payload shorter than hdr.len is malformed.
        """
        length = peek_len(data)
        if len(data) - HDR_SIZE < length:
            raise ValueError(f"malformed vsock packet: len {length} but only "
                             f"{len(data) - HDR_SIZE} payload bytes")
        return cls.unpack(data, bytes(data[HDR_SIZE:HDR_SIZE + length]))

    def __repr__(self) -> str:
        r = " reply" if self.reply else ""
        return (f"Packet({op_name(self.op)} {self.src_cid}:{self.src_port}->"
                f"{self.dst_cid}:{self.dst_port} type={self.type} flags={self.flags} "
                f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt} len={len(self.payload)}{r})")


def cork(tail: Packet, sk, payload, buf_alloc: int, fwd_cnt: int) -> bool:
    """Autocork, for a transport's queue of packets not yet on the ring: an RW payload of
    socket `sk` joins `tail` when that is the socket's own queued RW packet (its payload our
    bytearray) and the two fit one packet; the packet then carries the newest credit fields
    (virtio_transport_inc_tx_pkt advertises the current buf_alloc and fwd_cnt). False: queue a
    packet of its own."""
    if (tail.owner is not sk or tail.op != VIRTIO_VSOCK_OP_RW
            or type(tail.payload) is not bytearray
            or len(tail.payload) + len(payload) > VIRTIO_VSOCK_MAX_PKT_BUF_SIZE):
        return False
    tail.payload += payload
    tail.buf_alloc, tail.fwd_cnt = buf_alloc, fwd_cnt
    return True


def cancel_queued(queue, sk, cancellable) -> tuple:
    """virtio_transport_cancel_pkt / vhost_transport_cancel_pkt, written once for both
    transports: split a queue of packets not yet on the ring into what stays and what socket
    `sk` loses. `cancellable(entry, sk)` is the entry's Packet when it may go (the device keeps
    a packet already partly written into rx buffers), else None. Returns (kept entries as a
    deque, packets removed, replies among them)."""
    keep = deque()
    removed = replies = 0
    for entry in queue:
        pkt = cancellable(entry, sk)
        if pkt is None:
            keep.append(entry)
        else:
            removed += 1
            replies += bool(pkt.reply)
    return keep, removed, replies


def replies_resume(before: int, after: int, num: int) -> bool:
    """Did giving back queued replies (before -> after) bring the count under the ring size
    that stopped the other queue (virtio_transport_more_replies, vhost_vsock_more_replies)?"""
    return before >= num > after


def peek_len(hdr: bytes | bytearray | memoryview) -> int:
    """The header's len field (how much payload follows). ValueError if the header is short."""
    if len(hdr) < HDR_SIZE:
        raise ValueError(f"short vsock header: {len(hdr)} bytes, need {HDR_SIZE}")
    return int.from_bytes(hdr[OFF_LEN:OFF_LEN + 4], "little")


def reply_to(pkt: Packet, op: int, *, flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0,
             payload: bytes = b"", owner: object = None, reply: bool = True) -> Packet:
    """A packet answering `pkt`: src and dst swapped, same type, reply=True by default."""
    return Packet(pkt.dst_cid, pkt.src_cid, pkt.dst_port, pkt.src_port, pkt.type, op, flags,
                  buf_alloc, fwd_cnt, payload, reply, owner)
