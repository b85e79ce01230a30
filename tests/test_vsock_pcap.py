"""shared/vsock/pcap.py: vsockmon captures (LINKTYPE_VSOCK 271), written and read back."""

import io
import struct
import threading

import pytest

from shared.constants import (
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_INVALID,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
)
from shared.vsock.packet import Packet
from shared.vsock.pcap import (
    MON_HDR,
    SNAPLEN,
    MonHdr,
    PcapReader,
    PcapWriter,
    mon_frame,
    read_pcap,
)


def pkt(op, payload=b"", flags=0):
    return Packet(3, 2, 1024, 1234, 1, op, flags, 262144, 77, payload)


def test_file_header_bytes_exactly():
    f = io.BytesIO()
    PcapWriter(f).close()
    assert f.getvalue() == bytes.fromhex(
        "d4c3b2a1"          # magic 0xa1b2c3d4, little-endian
        "0200" "0400"       # version 2.4
        "00000000"          # thiszone
        "00000000"          # sigfigs
        "4b000100"          # snaplen 65535 + 76 = 65611
        "0f010000")         # linktype 271 (LINKTYPE_VSOCK)
    assert SNAPLEN == 65611
    assert not f.closed                  # a file handed in is the caller's to close


def test_monitor_header_layout():
    assert MON_HDR.size == 32
    frame = mon_frame(pkt(VIRTIO_VSOCK_OP_RW, b"xyz"))
    assert frame[:32] == bytes.fromhex(
        "0300000000000000"   # src_cid
        "0200000000000000"   # dst_cid
        "00040000"           # src_port 1024
        "d2040000"           # dst_port 1234
        "0400"               # op PAYLOAD
        "0200"               # transport VIRTIO
        "2c00"               # len 44
        "0000")              # reserved
    assert frame[32:76] == pkt(VIRTIO_VSOCK_OP_RW, b"xyz").pack_hdr()
    assert frame[76:] == b"xyz"


@pytest.mark.parametrize("op,mon_op", [
    (VIRTIO_VSOCK_OP_REQUEST, 1), (VIRTIO_VSOCK_OP_RESPONSE, 1),
    (VIRTIO_VSOCK_OP_RST, 2), (VIRTIO_VSOCK_OP_SHUTDOWN, 2),
    (VIRTIO_VSOCK_OP_CREDIT_UPDATE, 3), (VIRTIO_VSOCK_OP_CREDIT_REQUEST, 3),
    (VIRTIO_VSOCK_OP_RW, 4), (VIRTIO_VSOCK_OP_INVALID, 0), (99, 0)])
def test_op_classes(op, mon_op):
    assert struct.unpack_from("<H", mon_frame(pkt(op)), 24)[0] == mon_op


def test_write_and_read_back_field_by_field(tmp_path):
    path = tmp_path / "cap.pcap"
    sent = [pkt(VIRTIO_VSOCK_OP_REQUEST), pkt(VIRTIO_VSOCK_OP_RW, b"hello world"),
            pkt(VIRTIO_VSOCK_OP_SHUTDOWN, flags=3)]
    with PcapWriter(path) as w:
        w.write(sent[0], ts=1700000000.25)
        w.write(sent[1], ts=1700000001.000001)
        w.write(sent[2], ts=1700000002.9999999)     # rounds up into the next second
        assert w.count == 3
    raw = path.read_bytes()
    # first record header: ts_sec, ts_usec, incl_len = orig_len = 32 + 44
    assert struct.unpack_from("<IIII", raw, 24) == (1700000000, 250000, 76, 76)
    assert len(raw) == 24 + 3 * 16 + 3 * 76 + 11

    frames = read_pcap(path)
    assert len(frames) == 3
    ts, mon, p = frames[1]
    assert ts == pytest.approx(1700000001.000001, abs=1e-6)
    assert mon == MonHdr(src_cid=3, dst_cid=2, src_port=1024, dst_port=1234, op=4,
                         transport=2, len=44)
    assert (p.src_cid, p.dst_cid, p.src_port, p.dst_port, p.type, p.op, p.flags,
            p.buf_alloc, p.fwd_cnt, p.payload) == (3, 2, 1024, 1234, 1, 5, 0, 262144, 77,
                                                   b"hello world")
    assert [f[2] for f in frames] == sent
    assert frames[0][1].op == 1 and frames[2][1].op == 2 and frames[2][2].flags == 3
    assert frames[2][0] == pytest.approx(1700000003.0)


def test_big_frame_cut_at_snaplen():
    f = io.BytesIO()
    w = PcapWriter(f)
    big = pkt(VIRTIO_VSOCK_OP_RW, bytes(65536))
    w.write(big, ts=1.0)
    w.flush()
    incl, orig = struct.unpack_from("<II", f.getvalue(), 24 + 8)
    assert (incl, orig) == (SNAPLEN, 76 + 65536)
    f.seek(0)
    (_, mon, p), = list(PcapReader(f))
    assert p.len == 65535 and mon.op == 4


def test_writer_is_thread_safe():
    f = io.BytesIO()
    w = PcapWriter(f)

    def worker(i):
        for j in range(200):
            w.write(pkt(VIRTIO_VSOCK_OP_RW, bytes([i]) * (j % 50 + 1)), ts=float(j))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    f.seek(0)
    frames = list(PcapReader(f))
    assert len(frames) == 800
    for _, _, p in frames:                       # no interleaved (torn) records
        assert len(set(p.payload)) == 1


def test_write_after_close_fails_and_close_twice_is_fine(tmp_path):
    w = PcapWriter(tmp_path / "x.pcap")
    w.close()
    w.close()
    with pytest.raises(ValueError):
        w.write(pkt(VIRTIO_VSOCK_OP_RW, b"x"))


def good_capture(*pkts):
    f = io.BytesIO()
    w = PcapWriter(f)
    for p in pkts:
        w.write(p, ts=5.0)
    return f.getvalue()


@pytest.mark.parametrize("mangle,msg", [
    (lambda b: b[:10], "short pcap header"),
    (lambda b: b"\x00\x01\x02\x03" + b[4:], "not a pcap file"),
    (lambda b: b[:4] + b"\x03\x00" + b[6:], "unsupported pcap version"),
    (lambda b: b[:20] + struct.pack("<I", 1) + b[24:], "linktype 1"),
    (lambda b: b[:30], "truncated pcap record header"),
    (lambda b: b[:-3], "truncated pcap record"),
    (lambda b: b[:32] + struct.pack("<II", 20, 20) + b[40:60], "short vsockmon frame"),
    (lambda b: b[:32] + struct.pack("<II", 10**7, 10**7) + b[40:], "bad pcap record"),
    (lambda b: b[:40 + 26] + b"\x01\x00" + b[40 + 28:], "transport 1"),
    (lambda b: b[:40 + 32 + 24] + b"\x09\x00\x00\x00" + b[40 + 32 + 28:], "malformed"),
])
def test_reader_rejects_bad_files(mangle, msg):
    data = mangle(good_capture(pkt(VIRTIO_VSOCK_OP_RW, b"abc")))
    with pytest.raises(ValueError, match=msg):
        list(PcapReader(io.BytesIO(data)))


def test_reader_accepts_big_endian_and_nanosecond_files():
    hdr = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65611, 271)
    frame = mon_frame(pkt(VIRTIO_VSOCK_OP_RST))
    rec = struct.pack(">IIII", 7, 500000, len(frame), len(frame))
    (ts, mon, p), = read_pcap(io.BytesIO(hdr + rec + frame))
    assert ts == 7.5 and mon.op == 2 and p.op == VIRTIO_VSOCK_OP_RST
    hdr = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65611, 271)
    rec = struct.pack("<IIII", 7, 250000000, len(frame), len(frame))
    (ts, _, _), = read_pcap(io.BytesIO(hdr + rec + frame))
    assert ts == 7.25


def test_empty_capture_reads_as_no_frames():
    assert read_pcap(io.BytesIO(good_capture())) == []


def test_append_mode_shares_one_file_between_writers(tmp_path):
    path = tmp_path / "shared.pcap"
    a = PcapWriter(path, append=True)          # creates the file and its header
    b = PcapWriter(path, append=True)          # finds it: no second header
    a.write(pkt(VIRTIO_VSOCK_OP_RW, b"from-a"), ts=1.0)
    b.write(pkt(VIRTIO_VSOCK_OP_RW, b"from-b"), ts=2.0)
    a.close()
    b.close()
    c = PcapWriter(path, append=True)          # reopening appends after what is there
    c.write(pkt(VIRTIO_VSOCK_OP_RST), ts=3.0)
    c.close()
    frames = read_pcap(path)
    assert [p.payload for _, _, p in frames] == [b"from-a", b"from-b", b""]
    assert path.read_bytes()[:24] == good_capture()[:24]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_append_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "other.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    with pytest.raises(ValueError, match="refusing to append"):
        PcapWriter(path, append=True)
    empty = tmp_path / "empty.pcap"
    empty.touch()
    PcapWriter(empty, append=True).close()
    assert read_pcap(empty) == []
    with pytest.raises(TypeError):
        PcapWriter(io.BytesIO(), append=True)
