"""The bridge's Unix -> guest fast path: VhostVsock.fill_rw (host/vsock/device.py) reads a source
straight into the guest's next rx buffer, and VsockCore.rw_room / rw_filled (shared/vsock/proto.py)
keep the credit. The guest's rx chains are hostile: the same rules as send_rw and do_send_pkt.
"""
from __future__ import annotations

import errno
import os

import pytest

from shared.constants import VIRTIO_VSOCK_OP_RW, VSOCK_VQ_RX
from shared.vsock.packet import HDR, HDR_SIZE
from shared.vsock.proto import SHUT_WR, SockState

from tests.test_host_vsock import GUEST_CID, make


def host_sock(dev, peer_buf_alloc=256 * 1024):
    """An ESTABLISHED host socket to guest port 7000, as the bridge's would be."""
    sk = dev.core.socket()
    sk.local_port, sk.remote_cid, sk.remote_port = 1 << 30, GUEST_CID, 7000
    sk.state = SockState.ESTABLISHED
    sk.peer_buf_alloc = peer_buf_alloc
    return sk


class Source:
    """A Unix socket's stand-in: readinto(buffers) copies the next bytes into the buffers."""

    def __init__(self, data: bytes = b"", raise_=None):
        self.data, self.raise_, self.calls = data, raise_, 0

    def __call__(self, bufs) -> int:
        self.calls += 1
        if self.raise_ is not None:
            raise self.raise_
        n = 0
        for b in bufs:
            k = min(b.nbytes, len(self.data))
            b[:k] = self.data[:k]
            self.data = self.data[k:]
            n += k
        return n


def post(g, ins, outs=()):
    """One rx chain of guest buffers: [(gpa, len)] device-writable `ins`, readable `outs`."""
    assert g.vqs[VSOCK_VQ_RX].add_sgs(list(outs), list(ins), ("raw", ins))


def used(g):
    out = []
    while (r := g.vqs[VSOCK_VQ_RX].get_buf()) is not None:
        out.append(r)
    return out


@pytest.mark.parametrize("layout", ["one", "two"])
def test_fill_rw_reads_the_source_into_the_guest_buffer_with_a_true_header(layout):
    dev, g, _ = make(rx_layout=layout, rx_buf=65536)
    g.post_rx(2, kick=False)
    sk = host_sock(dev)
    data = os.urandom(100_000)
    src = Source(data)
    n = dev.fill_rw(sk, src, dev.core.rw_room(sk))
    assert n == 65536
    dev.core.rw_filled(sk, n)
    n2 = dev.fill_rw(sk, src, dev.core.rw_room(sk))
    assert n2 == 100_000 - 65536
    dev.core.rw_filled(sk, n2)
    pkts = g.recv_rx()
    assert [p.len for p in pkts] == [65536, 100_000 - 65536]
    assert b"".join(p.payload for p in pkts) == data
    p = pkts[0]
    assert (p.op, p.src_port, p.dst_port, p.buf_alloc) == (VIRTIO_VSOCK_OP_RW, 1 << 30, 7000, sk.buf_alloc)
    assert sk.tx_cnt == sk.tx_total == 100_000 and dev.stats["rx_bytes"] == 100_000
    assert dev.core.stats["tx"]["RW"] == 2


def test_fill_rw_never_reads_more_than_asked_or_than_the_buffer_holds():
    dev, g, _ = make()
    sk = host_sock(dev)
    a, b, c = g.alloc.alloc(20), g.alloc.alloc(30), g.alloc.alloc(1000)
    post(g, [(a, 20), (b, 30), (c, 1000)])       # header split over two buffers
    src = Source(b"x" * 5000)
    assert dev.fill_rw(sk, src, 700) == 700      # the limit (the credit) binds
    post(g, [(a, 20), (b, 30), (c, 100)])
    assert dev.fill_rw(sk, src, 5000) == 106     # the chain's room binds: 50 + 100 - 44
    (r1, l1), (r2, l2) = used(g)
    assert (l1, l2) == (HDR_SIZE + 700, HDR_SIZE + 106)
    hdr = HDR.unpack(g.mem.read(a, 20) + g.mem.read(b, 24))
    assert hdr[4] == 106
    assert g.mem.read(b + 24, 6) + g.mem.read(c, 100) == b"x" * 106
    assert len(src.data) == 5000 - 806
    assert not dev.broken


@pytest.mark.parametrize("what", ["out buffer", "header only", "too small"])
def test_fill_rw_hostile_rx_chain_needs_reset_and_reads_nothing(what):
    dev, g, _ = make()
    sk = host_sock(dev)
    x, y = g.alloc.alloc(HDR_SIZE), g.alloc.alloc(4096)
    if what == "out buffer":
        post(g, [(y, 4096)], outs=[(x, HDR_SIZE)])
    elif what == "header only":
        post(g, [(x, HDR_SIZE)])
    else:
        post(g, [(x, 10)])
    src = Source(b"y" * 100)
    assert dev.fill_rw(sk, src, 100) is None
    assert src.calls == 0 and src.data == b"y" * 100     # not one byte taken from the source
    assert dev.broken and dev.stats["errors"] == 1
    assert not used(g)
    assert dev.fill_rw(sk, src, 100) is None and src.calls == 0   # broken: nothing more


def test_fill_rw_gives_the_buffer_back_on_eof_and_errors():
    dev, g, _ = make()
    g.post_rx(1, kick=False)
    sk = host_sock(dev)
    with pytest.raises(BlockingIOError):
        dev.fill_rw(sk, Source(raise_=BlockingIOError(errno.EAGAIN, "x")), 100)
    with pytest.raises(ConnectionResetError):
        dev.fill_rw(sk, Source(raise_=ConnectionResetError()), 100)
    assert dev.fill_rw(sk, Source(b""), 100) == 0              # EOF
    assert not used(g) and not dev.broken
    assert dev.fill_rw(sk, Source(b"abc"), 100) == 3           # the same buffer, still posted
    assert [ln for _, ln in used(g)] == [HDR_SIZE + 3]


def test_fill_rw_declines_when_a_packet_waits_or_no_buffer():
    dev, g, _ = make()
    sk = host_sock(dev)
    src = Source(b"z" * 10)
    assert dev.fill_rw(sk, src, 10) is None                    # no rx buffer posted
    dev.core.send(sk, b"queued first")                         # waits on send_pkt_list
    assert dev.send_pkt_list
    g.post_rx(1, kick=False)
    assert dev.fill_rw(sk, src, 10) is None                    # must not overtake it
    assert src.calls == 0


def test_rw_room_is_the_credit_and_zero_when_send_would_fail():
    dev, _, _ = make(credit_policy="low-space")
    core = dev.core
    sk = host_sock(dev, peer_buf_alloc=100_000)
    assert core.rw_room(sk) == 65536                           # one packet at most
    core.rw_filled(sk, 65536)
    assert core.rw_room(sk) == 100_000 - 65536 == core.has_space(sk)
    core.rw_filled(sk, core.rw_room(sk))
    assert core.rw_room(sk) == 0
    sk2 = host_sock(dev)
    sk2.remote_port = 7001
    core.shutdown(sk2, SHUT_WR)
    assert core.rw_room(sk2) == 0                              # send() would say EPIPE
    sk3 = host_sock(dev)
    sk3.err = errno.ECONNRESET
    assert core.rw_room(sk3) == 0
