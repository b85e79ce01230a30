"""The real guest transport and the real VhostVsock as a pair in one process (tests/pair.py):
bytes cross both rings intact in both directions under credit, and the stream's end and a reset
reach the other side, with no fakes in between."""
from __future__ import annotations

import hashlib

from shared.constants import VIRTIO_VSOCK_SHUTDOWN_SEND

from .pair import VsockPair


def _move(p, src_core, src, dst_core, dst, src_batch, dst_batch, total: int, chunk: int) -> bytes:
    """Send `total` pseudo-random bytes from src to dst, pumping the pair; returns what arrived."""
    data = hashlib.shake_256(b"pair").digest(total)
    sent, got = 0, bytearray()
    out = memoryview(bytearray(65536))
    for _ in range(100_000):
        while sent < total:                  # as much as the credit allows, then pump
            with p.lock, src_batch:
                n = src_core.send(src, memoryview(data)[sent:sent + chunk])
            if not n:
                break
            sent += n
        p.pump()
        while dst.rx_bytes:
            with p.lock, dst_batch:
                n = dst_core.recv_into(dst, out)
            got += out[:n]
        p.pump()
        if len(got) == total or src.state.name != "ESTABLISHED":
            break
    assert len(got) == total and bytes(got) == data
    return bytes(got)


def test_guest_to_host_bytes_arrive_intact_under_credit():
    # a small host buffer: the guest must stop at the credit and resume on CREDIT_UPDATEs
    p = VsockPair(buf_size=64 << 10)
    try:
        gsk, hsk = p.connect()
        _move(p, p.t.core, gsk, p.dev.core, hsk, p.t.batch, p.dev.batch, 1 << 20, 48 << 10)
        assert hsk.fwd_cnt == 1 << 20 and gsk.peer_fwd_cnt == 1 << 20    # credit came back
        assert p.dev.stats["errors"] == 0 and not p.dev.broken
    finally:
        p.close()


def test_host_to_guest_bytes_arrive_intact_across_rx_buffers():
    p = VsockPair(rx_buf_size=4096)          # every 48 KiB write spans many guest rx buffers
    try:
        gsk, hsk = p.connect()
        _move(p, p.dev.core, hsk, p.t.core, gsk, p.dev.batch, p.t.batch, 1 << 20, 48 << 10)
        assert gsk.fwd_cnt == 1 << 20 and p.dev.stats["errors"] == 0
    finally:
        p.close()


def test_shutdown_and_release_reach_the_other_side():
    p = VsockPair()
    try:
        gsk, hsk = p.connect()
        with p.lock:
            p.t.core.shutdown(gsk, VIRTIO_VSOCK_SHUTDOWN_SEND)
        p.pump()
        assert hsk.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND          # the host reads EOF
        with p.lock:
            p.dev.core.release(hsk)
        p.pump()
        assert gsk.state.name in ("CLOSING", "CLOSE")                  # the guest saw the reset
    finally:
        p.close()
