"""vsockmon packet capture: classic pcap files with LINKTYPE_VSOCK (271) frames.

Theory of operation
-------------------
Linux's vsockmon tap (drivers/net/vsockmon.c, fed by virtio_transport_deliver_tap_pkt) hands
each virtio-vsock packet to a capture socket as one frame (uapi linux/vsockmon.h, virtio_transport_build_skb):

    af_vsockmon_hdr (32 B, '<QQIIHHH2x')   src_cid dst_cid src_port dst_port op transport len
    virtio_vsock_hdr (44 B, raw LE)        the packet header as on the ring
    payload (hdr.len bytes)

where `op` is the coarse AF_VSOCK_OP_* class of the virtio op and `transport` is 2 (virtio)
with `len` = 44, the size of the transport header that follows. libpcap calls the link type
LINKTYPE_VSOCK = 271 (DLT_VSOCK), so Wireshark dissects these files as they are.

The file is classic pcap: a 24-byte global header (magic 0xa1b2c3d4, version 2.4, thiszone
0, sigfigs 0, snaplen, linktype), then per frame a 16-byte record header (ts_sec, ts_usec,
incl_len, orig_len) and incl_len bytes. Frames longer than snaplen (65535 + 76) are cut.

`PcapWriter` is thread-safe (the guest's rx and tx paths both capture); `PcapReader` checks
every header and raises ValueError on a file that is not a well-formed vsock capture.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from shared.constants import (
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
)
from shared.vsock.packet import HDR, Packet

# pcap global header: magic, version_major, version_minor, thiszone, sigfigs, snaplen, linktype
PCAP_HDR = struct.Struct("<IHHiIII")
assert PCAP_HDR.size == 24
# pcap record header: ts_sec, ts_usec, incl_len, orig_len
PCAP_REC = struct.Struct("<IIII")
assert PCAP_REC.size == 16
# struct af_vsockmon_hdr (uapi linux/vsockmon.h)
MON_HDR = struct.Struct("<QQIIHHH2x")
assert MON_HDR.size == 32

PCAP_MAGIC = 0xA1B2C3D4          # microsecond timestamps
PCAP_MAGIC_NS = 0xA1B23C4D       # nanosecond timestamps (read only)
PCAP_VERSION = (2, 4)
LINKTYPE_VSOCK = 271
FRAME_OVERHEAD = MON_HDR.size + HDR.size        # 76
SNAPLEN = 65535 + FRAME_OVERHEAD
MAX_RECORD = 256 * 1024          # reader's sanity bound on incl_len

AF_VSOCK_OP_UNKNOWN = 0
AF_VSOCK_OP_CONNECT = 1
AF_VSOCK_OP_DISCONNECT = 2
AF_VSOCK_OP_CONTROL = 3
AF_VSOCK_OP_PAYLOAD = 4

AF_VSOCK_TRANSPORT_UNKNOWN = 0
AF_VSOCK_TRANSPORT_NO_INFO = 1
AF_VSOCK_TRANSPORT_VIRTIO = 2

# virtio_transport_build_skb: virtio op -> vsockmon op class
MON_OP = {
    VIRTIO_VSOCK_OP_REQUEST: AF_VSOCK_OP_CONNECT,
    VIRTIO_VSOCK_OP_RESPONSE: AF_VSOCK_OP_CONNECT,
    VIRTIO_VSOCK_OP_RST: AF_VSOCK_OP_DISCONNECT,
    VIRTIO_VSOCK_OP_SHUTDOWN: AF_VSOCK_OP_DISCONNECT,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE: AF_VSOCK_OP_CONTROL,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST: AF_VSOCK_OP_CONTROL,
    VIRTIO_VSOCK_OP_RW: AF_VSOCK_OP_PAYLOAD,
}


@dataclass(frozen=True, slots=True)
class MonHdr:
    """struct af_vsockmon_hdr."""
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    transport: int
    len: int


def mon_frame(pkt: Packet) -> bytes:
    """The captured frame for one packet: af_vsockmon_hdr + virtio_vsock_hdr + payload."""
    mon = MON_HDR.pack(pkt.src_cid, pkt.dst_cid, pkt.src_port, pkt.dst_port,
                       MON_OP.get(pkt.op, AF_VSOCK_OP_UNKNOWN), AF_VSOCK_TRANSPORT_VIRTIO,
                       HDR.size)
    return mon + pkt.pack_hdr() + bytes(pkt.payload)


class PcapWriter:
    """Writes a LINKTYPE_VSOCK pcap. `dest` is a path (opened and owned) or a binary file."""

    def __init__(self, dest: str | os.PathLike | BinaryIO, *, snaplen: int = SNAPLEN,
                 append: bool = False):
        """append=True (paths only): several processes (one per device) add to one capture.
        The file header is written once, atomically, by whoever creates the file; an existing
        file must already be a vsock capture with this snaplen (else ValueError). Each record
        is then a single O_APPEND write, so records from different processes do not mix."""
        self.snaplen = snaplen
        self.count = 0
        self._lock = threading.Lock()
        header = PCAP_HDR.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, snaplen, LINKTYPE_VSOCK)
        if append:
            if not isinstance(dest, (str, os.PathLike)):
                raise TypeError("append=True needs a path")
            self._f = self._open_append(os.fspath(dest), header)
            self._owned = True
            return
        if isinstance(dest, (str, os.PathLike)):
            # unbuffered: the header now and each record as one os.write, so the capture is
            # readable while we run and complete up to the last packet after a SIGKILL
            self._f: BinaryIO = open(dest, "wb", buffering=0)
            self._owned = True
        else:
            self._f = dest
            self._owned = False
        self._f.write(header)

    @staticmethod
    def _open_append(path: str, header: bytes) -> BinaryIO:
        # Create-with-header atomically: write a private file, then link() it into place
        # (fails if someone else already created the capture).
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as t:
            t.write(header)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        f = open(path, "ab", buffering=0)        # unbuffered: one os.write per record
        with open(path, "rb") as r:
            existing = r.read(PCAP_HDR.size)
        if existing == b"":
            f.write(header)                       # an empty file someone else created
        elif existing != header:
            f.close()
            raise ValueError(f"{path}: not a LINKTYPE_VSOCK capture with snaplen "
                             f"{PCAP_HDR.unpack(existing)[5] if len(existing) == 24 else '?'}"
                             f"; refusing to append")
        return f

    def write(self, pkt: Packet, ts: float | None = None) -> None:
        """Append one frame; ts in seconds since the epoch (default: now)."""
        if ts is None:
            ts = time.time()
        frame = mon_frame(pkt)
        incl = min(len(frame), self.snaplen)
        sec = int(ts)
        usec = int(round((ts - sec) * 1_000_000))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        rec = PCAP_REC.pack(sec, usec, incl, len(frame))
        with self._lock:
            if self._f is None:
                raise ValueError("write to a closed PcapWriter")
            self._f.write(rec + frame[:incl])
            self.count += 1

    def flush(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.flush()

    def close(self) -> None:
        """Flush; close the file if this writer opened it. Safe to call twice."""
        with self._lock:
            f, self._f = self._f, None
            if f is None:
                return
            f.flush()
            if self._owned:
                f.close()

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PcapReader:
    """Reads a LINKTYPE_VSOCK pcap; iterating yields (ts, MonHdr, Packet).

    A frame cut by the snaplen yields a Packet whose payload is the captured part only.
    """

    def __init__(self, src: str | os.PathLike | BinaryIO):
        if isinstance(src, (str, os.PathLike)):
            self._f: BinaryIO = open(src, "rb")
            self._owned = True
        else:
            self._f = src
            self._owned = False
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> None:
        raw = self._f.read(PCAP_HDR.size)
        if len(raw) < PCAP_HDR.size:
            raise ValueError(f"short pcap header: {len(raw)} bytes, need {PCAP_HDR.size}")
        magic_le = int.from_bytes(raw[:4], "little")
        if magic_le in (PCAP_MAGIC, PCAP_MAGIC_NS):
            self._endian = "<"
            magic = magic_le
        else:
            magic = int.from_bytes(raw[:4], "big")
            if magic not in (PCAP_MAGIC, PCAP_MAGIC_NS):
                raise ValueError(f"not a pcap file: magic {raw[:4].hex()}")
            self._endian = ">"
        self._ts_div = 1_000_000_000 if magic == PCAP_MAGIC_NS else 1_000_000
        self._rec = struct.Struct(self._endian + "IIII")
        (_, vmaj, vmin, _, _, self.snaplen, self.linktype) = struct.unpack(
            self._endian + "IHHiIII", raw)
        if (vmaj, vmin) != PCAP_VERSION:
            raise ValueError(f"unsupported pcap version {vmaj}.{vmin}")
        if self.linktype != LINKTYPE_VSOCK:
            raise ValueError(f"pcap linktype {self.linktype}, not LINKTYPE_VSOCK "
                             f"({LINKTYPE_VSOCK})")

    def __iter__(self) -> Iterator[tuple[float, MonHdr, Packet]]:
        while True:
            raw = self._f.read(self._rec.size)
            if not raw:
                return
            if len(raw) < self._rec.size:
                raise ValueError(f"truncated pcap record header: {len(raw)} bytes")
            sec, frac, incl, orig = self._rec.unpack(raw)
            if incl > MAX_RECORD or incl > orig:
                raise ValueError(f"bad pcap record: incl_len {incl}, orig_len {orig}")
            frame = self._f.read(incl)
            if len(frame) < incl:
                raise ValueError(f"truncated pcap record: {len(frame)} of {incl} bytes")
            yield sec + frac / self._ts_div, *self._parse_frame(frame, incl < orig)

    @staticmethod
    def _parse_frame(frame: bytes, cut: bool) -> tuple[MonHdr, Packet]:
        if len(frame) < FRAME_OVERHEAD:
            raise ValueError(f"short vsockmon frame: {len(frame)} bytes, need "
                             f"{FRAME_OVERHEAD}")
        mon = MonHdr(*MON_HDR.unpack_from(frame, 0))
        if mon.transport != AF_VSOCK_TRANSPORT_VIRTIO or mon.len != HDR.size:
            raise ValueError(f"vsockmon frame: transport {mon.transport} with header length "
                             f"{mon.len}, expected virtio ({AF_VSOCK_TRANSPORT_VIRTIO}) "
                             f"with {HDR.size}")
        hdr = frame[MON_HDR.size:FRAME_OVERHEAD]
        payload = frame[FRAME_OVERHEAD:]
        if cut:
            (src_cid, dst_cid, src_port, dst_port, _len, type_, op, flags, buf_alloc,
             fwd_cnt) = HDR.unpack(hdr)
            pkt = Packet(src_cid, dst_cid, src_port, dst_port, type_, op, flags, buf_alloc,
                         fwd_cnt, payload)
        else:
            pkt = Packet.unpack(hdr, payload)     # ValueError if hdr.len disagrees
        return mon, pkt

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None and self._owned:
            f.close()

    def __enter__(self) -> "PcapReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_pcap(src: str | os.PathLike | BinaryIO) -> list[tuple[float, MonHdr, Packet]]:
    """Every frame of a capture file."""
    with PcapReader(src) as r:
        return list(r)
