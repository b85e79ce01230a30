"""shared/vsock/proto.py: two real VsockCore endpoints over a fake link, h11 style.

The guest core has CID 3, the host core CID 2. Each core's send_pkt appends to a list; the
test delivers those lists by hand (g2h / h2g / pump) and asserts the exact packets on the wire
and both sides' states after every step.
"""

import errno

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
    VIRTIO_VSOCK_TYPE_SEQPACKET,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_PORT_ANY,
)
from shared.vsock.packet import Packet, op_name
from shared.vsock.proto import SHUT_RD, SHUT_RDWR, SHUT_WR, VsockCore, VsockSock
from shared.vsock.proto import SockState as S

GUEST, HOST = 3, 2
K = 1024
BUF = 256 * K


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def wire(p: Packet):
    """A packet as the peer sees it (plus the reply flag): op, addresses, flags, credit, data."""
    return (op_name(p.op), p.src_cid, p.src_port, p.dst_cid, p.dst_port, p.flags,
            p.buf_alloc, p.fwd_cnt, bytes(p.payload), p.reply)


class Link:
    """Two cores joined by a fake link. Nothing moves until the test says so."""

    def __init__(self, **kw):
        self.clock = Clock()
        self.to_host: list[Packet] = []
        self.to_guest: list[Packet] = []
        self.guest = VsockCore(GUEST, self.to_host.append, clock=self.clock, **kw)
        self.host = VsockCore(HOST, self.to_guest.append, clock=self.clock, **kw)

    def g2h(self):
        """Deliver what the guest has sent so far; return it (as wire tuples)."""
        pkts, self.to_host[:] = list(self.to_host), []
        for p in pkts:
            self.host.recv_pkt(p)
        return [wire(p) for p in pkts]

    def h2g(self):
        pkts, self.to_guest[:] = list(self.to_guest), []
        for p in pkts:
            self.guest.recv_pkt(p)
        return [wire(p) for p in pkts]

    def pump(self, limit=10000):
        """Deliver both ways until quiet; return the log of (direction, wire)."""
        log = []
        while self.to_host or self.to_guest:
            assert len(log) < limit, "link never went quiet"
            while self.to_host:
                p = self.to_host.pop(0)
                log.append((">", wire(p)))
                self.host.recv_pkt(p)
            while self.to_guest:
                p = self.to_guest.pop(0)
                log.append(("<", wire(p)))
                self.guest.recv_pkt(p)
        return log

    def drop_all(self):
        self.to_host.clear()
        self.to_guest.clear()


def connected_pair(link: Link, port=1234, backlog=8):
    """listener on the host, client in the guest, connected and accepted."""
    lst = link.host.socket()
    link.host.bind(lst, port)
    link.host.listen(lst, backlog)
    cli = link.guest.socket()
    link.guest.connect(cli, HOST, port)
    link.pump()
    srv = link.host.accept(lst)
    assert srv is not None and cli.state == S.ESTABLISHED
    return lst, cli, srv


def tables_empty(core: VsockCore, *, keep_bound=()):
    return (not core.connected and not core.lingering
            and set(core.bound) == set(keep_bound))


# --------------------------------------------------------------------------- connect / accept

def test_connect_accept_step_by_step():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 1234)
    link.host.listen(lst, 8)
    assert lst.state == S.LISTEN and not link.host.readable(lst)

    cli = link.guest.socket()
    link.guest.connect(cli, HOST, 1234)
    assert cli.state == S.SYN_SENT and cli.local_port == 1024       # ephemeral from 1024
    assert not link.guest.writable(cli) and not link.guest.readable(cli)

    assert link.g2h() == [("REQUEST", 3, 1024, 2, 1234, 0, BUF, 0, b"", False)]
    assert lst.state == S.LISTEN and len(lst.accept_queue) == 1 and link.host.readable(lst)
    child = lst.accept_queue[0]
    assert child.state == S.ESTABLISHED
    assert (child.local_cid, child.local_port, child.remote_cid, child.remote_port) == \
        (2, 1234, 3, 1024)
    assert child.peer_buf_alloc == BUF          # credit copied from the REQUEST
    assert link.host.connected == {(1234, 3, 1024): child}
    assert cli.state == S.SYN_SENT              # RESPONSE not delivered yet

    assert link.h2g() == [("RESPONSE", 2, 1234, 3, 1024, 0, BUF, 0, b"", True)]
    assert cli.state == S.ESTABLISHED and cli.err == 0
    assert cli.peer_buf_alloc == BUF and link.guest.has_space(cli) == BUF
    assert link.guest.writable(cli) and not link.guest.readable(cli)
    assert link.guest.connected == {(1024, 2, 1234): cli}
    assert link.guest.bound == {1024: cli}

    assert link.host.accept(lst) is child
    assert child.parent is None and link.host.accept(lst) is None
    assert link.host.writable(child) and link.host.has_space(child) == BUF
    assert link.pump() == []


def test_packets_carry_owner_and_reply_flags():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 7)
    link.host.listen(lst, 1)
    cli = link.guest.socket()
    link.guest.connect(cli, HOST, 7)
    req = link.to_host[0]
    assert req.owner is cli and req.reply is False
    link.g2h()
    resp = link.to_guest[0]
    assert resp.owner is lst.accept_queue[0] and resp.reply is True
    link.h2g()
    # reset_no_sock packets belong to no socket
    link.guest.recv_pkt(Packet(2, 3, 1, 4242, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW,
                               0, 0, 0, b"x"))
    rst = link.to_host[-1]
    assert rst.owner is None and rst.reply is True


# --------------------------------------------------------------------------- data and credit

def test_rw_and_every_read_credit_update():
    link = Link()
    _, cli, srv = connected_pair(link)
    assert link.guest.send(cli, b"hello") == 5
    assert cli.tx_cnt == 5 and link.guest.has_space(cli) == BUF - 5
    assert link.g2h() == [("RW", 3, 1024, 2, 1234, 0, BUF, 0, b"hello", False)]
    assert srv.rx_bytes == 5 and link.host.has_data(srv) == 5 and link.host.readable(srv)

    assert link.host.recv(srv, 3) == b"hel"
    assert srv.fwd_cnt == 3 and srv.last_fwd_cnt == 3
    assert link.h2g() == [("CREDIT_UPDATE", 2, 1234, 3, 1024, 0, BUF, 3, b"", False)]
    assert cli.peer_fwd_cnt == 3 and link.guest.has_space(cli) == BUF - 2

    assert link.host.recv(srv, 100) == b"lo"
    assert link.h2g() == [("CREDIT_UPDATE", 2, 1234, 3, 1024, 0, BUF, 5, b"", False)]
    assert link.guest.has_space(cli) == BUF
    with pytest.raises(BlockingIOError):
        link.host.recv(srv, 1)
    assert not link.host.readable(srv)

    # the other way; the RW header advertises the server's fwd_cnt
    assert link.host.send(srv, memoryview(b"world")) == 5
    assert link.h2g() == [("RW", 2, 1234, 3, 1024, 0, BUF, 5, b"world", False)]
    assert link.guest.recv(cli, 5) == b"world"
    assert link.g2h() == [("CREDIT_UPDATE", 3, 1024, 2, 1234, 0, BUF, 5, b"", False)]


def test_recv_across_chunks_and_zero_length():
    link = Link()
    _, cli, srv = connected_pair(link)
    for chunk in (b"ab", b"cde", b"", b"fghij"):
        link.guest.send(cli, chunk)
    assert [w[8] for w in link.g2h()] == [b"ab", b"cde", b"fghij"]   # no empty RW
    assert srv.rx_bytes == 10 and len(srv.rx_queue) == 3
    assert link.host.recv(srv, 0) == b""
    assert link.host.recv(srv, 1) == b"a"
    assert link.host.recv(srv, 3) == b"bcd"
    assert link.host.recv(srv, 4) == b"efgh"
    assert link.host.recv(srv, 9) == b"ij"
    assert srv.rx_bytes == 0 and srv.fwd_cnt == 10 and srv.rx_off == 0 and not srv.rx_queue


def test_send_splits_into_64k_packets():
    link = Link(buf_size=1024 * K)
    _, cli, srv = connected_pair(link)
    data = bytes(range(256)) * 600          # 153600 bytes
    assert link.guest.send(cli, data) == len(data)
    sent = link.g2h()
    assert [len(w[8]) for w in sent] == [64 * K, 64 * K, len(data) - 128 * K]
    assert b"".join(w[8] for w in sent) == data
    assert link.host.recv(srv, 1 << 20) == data


def test_max_pkt_len_for_transports_with_small_buffers():
    link = Link(max_pkt_len=4096)
    _, cli, _ = connected_pair(link)
    assert link.guest.send(cli, b"x" * 10000) == 10000
    assert [len(w[8]) for w in link.g2h()] == [4096, 4096, 1808]


def test_credit_exhaustion_and_update():
    link = Link()
    _, cli, srv = connected_pair(link)
    assert link.host.set_buffer_size(srv, 1000) == 1000
    assert link.h2g() == [("CREDIT_UPDATE", 2, 1234, 3, 1024, 0, 1000, 0, b"", False)]
    assert link.guest.has_space(cli) == 1000

    assert link.guest.send(cli, b"a" * 1500) == 1000       # credit-limited
    assert link.guest.has_space(cli) == 0 and not link.guest.writable(cli)
    assert link.guest.send(cli, b"b") == 0                  # no packet, no CREDIT_REQUEST
    assert [(w[0], len(w[8])) for w in link.g2h()] == [("RW", 1000)]
    assert srv.rx_bytes == 1000 and srv.rx_dropped_bytes == 0

    assert link.host.recv(srv, 400) == b"a" * 400
    assert link.h2g() == [("CREDIT_UPDATE", 2, 1234, 3, 1024, 0, 1000, 400, b"", False)]
    assert link.guest.has_space(cli) == 400 and link.guest.writable(cli)
    assert link.guest.send(cli, b"c" * 500) == 400
    link.g2h()
    assert srv.rx_bytes == 1000


def test_writer_woken_by_credit():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.host.set_buffer_size(srv, 128)
    link.h2g()
    link.guest.send(cli, b"z" * 128)
    link.g2h()
    wakes = []
    cli.wake = lambda: wakes.append(link.guest.has_space(cli))
    link.host.recv(srv, 100)
    link.h2g()
    assert wakes and wakes[0] == 100


def test_credit_request_answered_with_reply_update():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.guest.send(cli, b"1234")
    link.g2h()
    link.host.recv(srv, 2)
    link.h2g()
    link.host.recv(srv, 2)          # every-read: an update would go out; drop it
    link.drop_all()
    link.host.recv_pkt(Packet(3, 2, 1024, 1234, VIRTIO_VSOCK_TYPE_STREAM,
                              VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, BUF, 0))
    assert link.h2g() == [("CREDIT_UPDATE", 2, 1234, 3, 1024, 0, BUF, 4, b"", True)]
    assert link.guest.has_space(cli) == BUF


def count_updates(log, direction="<"):
    return sum(1 for d, w in log if d == direction and w[0] == "CREDIT_UPDATE")


def fill_and_drain(link, cli, srv, total, chunk):
    """Send `total` bytes in one go (credit permitting), then read them back in `chunk`s,
    delivering after each read; return the number of CREDIT_UPDATEs the reader sent."""
    assert link.guest.send(cli, b"q" * total) == total
    link.pump()
    updates = 0
    got = 0
    while got < total:
        got += len(link.host.recv(srv, chunk))
        updates += count_updates(link.pump())
    return updates


def test_policy_every_read_counts_one_update_per_read():
    link = Link(credit_policy="every-read")
    _, cli, srv = connected_pair(link)
    assert fill_and_drain(link, cli, srv, BUF, 16 * K) == 16


def test_policy_low_space_updates_only_when_free_space_is_low():
    link = Link(credit_policy="low-space")
    _, cli, srv = connected_pair(link)
    # free = 256K - (fwd_cnt - last_fwd_cnt) drops below 64K only after 13 reads of 16K
    # (208K consumed); the next 3 reads (48K more) stay above, so exactly one update.
    assert fill_and_drain(link, cli, srv, BUF, 16 * K) == 1
    assert srv.last_fwd_cnt == 13 * 16 * K and srv.fwd_cnt == BUF
    assert cli.peer_fwd_cnt == 13 * 16 * K
    assert link.guest.has_space(cli) == 13 * 16 * K


def test_policy_low_space_with_small_buffer_updates_every_read():
    link = Link(credit_policy="low-space")
    _, cli, srv = connected_pair(link)
    link.host.set_buffer_size(srv, 32 * K)      # < 64 KiB: free space is always "low"
    link.pump()
    assert fill_and_drain(link, cli, srv, 32 * K, 4 * K) == 8


def test_policy_rcvlowat_also_updates_when_queue_runs_low():
    link = Link(credit_policy="rcvlowat")
    _, cli, srv = connected_pair(link)
    # as low-space (one update at the 13th read), plus one when the queue drains (rx 0 < 1)
    assert fill_and_drain(link, cli, srv, BUF, 16 * K) == 2
    assert cli.peer_fwd_cnt == BUF


def test_policy_half_window_updates_once_half_the_window_was_read():
    link = Link(credit_policy="half-window")
    _, cli, srv = connected_pair(link)
    # 256K window: an update after the 8th read of 16K (128K read since the last one) and the
    # 16th; low-space alone sends one, after the 13th.
    assert fill_and_drain(link, cli, srv, BUF, 16 * K) == 2
    assert srv.last_fwd_cnt == BUF and cli.peer_fwd_cnt == BUF


def test_policy_half_window_keeps_a_bulk_sender_in_credit_low_space_does_not():
    """A reader that keeps up (reads each 64 KiB packet as it arrives): under half-window the
    sender's credit never falls below half the window; under low-space it runs down to one
    packet before the update, and the bulk stream stalls once per window while it travels."""
    lowest = {}
    for policy in ("half-window", "low-space"):
        link = Link(credit_policy=policy)
        _, cli, srv = connected_pair(link)
        low = BUF
        for _ in range(4 * BUF // (64 * K)):
            assert link.guest.send(cli, b"q" * (64 * K)) == 64 * K
            link.pump()
            low = min(low, link.guest.has_space(cli))
            assert len(link.host.recv(srv, 64 * K)) == 64 * K
            link.pump()
        lowest[policy] = low
    assert lowest == {"half-window": BUF // 2, "low-space": 0}


def test_bad_policy_rejected():
    with pytest.raises(ValueError):
        VsockCore(3, print, credit_policy="sometimes")


START = 2**32 - 100


def test_u32_wraparound_of_tx_cnt_and_fwd_cnt():
    link = Link()
    _, cli, srv = connected_pair(link)
    # Both sides agree that 2^32 - 100 bytes have already gone by.
    cli.tx_cnt = cli.peer_fwd_cnt = START
    srv.fwd_cnt = srv.last_fwd_cnt = START
    assert link.guest.has_space(cli) == BUF

    assert link.guest.send(cli, b"w" * 300) == 300
    assert cli.tx_cnt == 200                                  # wrapped
    assert link.guest.has_space(cli) == BUF - 300             # (200 - (2^32-100)) mod 2^32
    link.g2h()
    assert link.host.recv(srv, 300) == b"w" * 300
    assert srv.fwd_cnt == 200
    assert link.h2g() == [("CREDIT_UPDATE", 2, 1234, 3, 1024, 0, BUF, 200, b"", False)]
    assert cli.peer_fwd_cnt == 200 and link.guest.has_space(cli) == BUF


def test_u32_wraparound_low_space_policy():
    link = Link(credit_policy="low-space")
    _, cli, srv = connected_pair(link)
    cli.tx_cnt = cli.peer_fwd_cnt = START
    srv.fwd_cnt = srv.last_fwd_cnt = START
    assert fill_and_drain(link, cli, srv, BUF, 16 * K) == 1
    assert srv.fwd_cnt == (START + BUF) & 0xFFFFFFFF
    assert cli.peer_fwd_cnt == (START + 13 * 16 * K) & 0xFFFFFFFF


def test_has_space_arithmetic():
    sk = VsockSock(tx_cnt=5, peer_fwd_cnt=2**32 - 10, peer_buf_alloc=100)
    core = VsockCore(HOST, lambda p: None)
    assert core.has_space(sk) == 85                    # 15 bytes in flight across the wrap
    sk.peer_buf_alloc = 10                             # peer shrank below what is in flight
    assert core.has_space(sk) == 0


def test_peer_window_is_clamped_to_our_own_buffer():
    """Issue 8 item 8: a peer advertising 4 GiB gets at most our buf_alloc in flight
    (virtio_transport_has_space in current Linux takes the min of both buffers), in the modern
    credit policies."""
    sk = VsockSock(peer_buf_alloc=0xFFFFFFFF, buf_alloc=BUF)
    core = VsockCore(HOST, lambda p: None, credit_policy="low-space")
    assert core.has_space(sk) == BUF
    sk.tx_cnt = BUF - 100
    assert core.has_space(sk) == 100
    link = Link(credit_policy="low-space")
    _, cli, srv = connected_pair(link)
    cli.buf_alloc = 0xFFFFFFFF                          # a hostile guest advertises 4 GiB
    link.guest.send(cli, b"!")
    link.g2h()
    assert srv.peer_buf_alloc == 0xFFFFFFFF
    assert link.host.send(srv, b"z" * (4 * BUF)) == BUF   # only our own buffer's worth
    assert link.host.has_space(srv) == 0


def test_drop_beyond_buf_alloc():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.host.set_buffer_size(srv, 200)
    link.drop_all()

    def rw(n):
        # a peer ignoring credit
        return Packet(3, 2, 1024, 1234, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 0,
                      BUF, 0, b"d" * n)
    link.host.recv_pkt(rw(150))
    link.host.recv_pkt(rw(100))            # 150 + 100 > 200: dropped whole
    link.host.recv_pkt(rw(50))             # exactly 200: kept
    assert srv.rx_bytes == 200 and srv.rx_dropped_bytes == 100
    assert link.host.stats["rx_dropped_bytes"] == 100
    assert link.to_guest == []             # dropping is silent
    assert link.host.recv(srv, 1000) == b"d" * 200


def test_received_memoryview_payload_is_copied():
    link = Link()
    _, cli, srv = connected_pair(link)
    buf = bytearray(b"guest-ram")
    link.host.recv_pkt(Packet(3, 2, 1024, 1234, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW,
                              0, BUF, 0, memoryview(buf)))
    buf[:] = b"XXXXXXXXX"                  # the transport reuses its rx buffer
    assert link.host.recv(srv, 100) == b"guest-ram"


def test_every_outgoing_packet_is_stamped():
    link = Link(credit_policy="low-space")
    _, cli, srv = connected_pair(link)
    link.guest.send(cli, b"x" * 1000)
    link.g2h()
    link.host.recv(srv, 1000)              # low-space: no update (free space is large)
    assert link.to_guest == [] and srv.fwd_cnt == 1000 and srv.last_fwd_cnt == 0
    link.host.send(srv, b"y")              # the RW advertises fwd_cnt = 1000
    assert link.h2g() == [("RW", 2, 1234, 3, 1024, 0, BUF, 1000, b"y", False)]
    assert srv.last_fwd_cnt == 1000 and cli.peer_fwd_cnt == 1000


def test_set_buffer_size_clamps_and_advertises_only_when_connected():
    link = Link()
    sk = link.guest.socket()
    assert link.guest.set_buffer_size(sk, 1) == 128
    assert link.guest.set_buffer_size(sk, 10 << 20) == BUF
    assert link.to_host == []                               # not connected: nothing sent
    core = VsockCore(3, print, buf_size_max=1 << 20)
    assert core.set_buffer_size(core.socket(), 10 << 20) == 1 << 20


def test_set_rcvlowat_sends_update_when_peer_is_behind():
    link = Link(credit_policy="low-space")
    _, cli, srv = connected_pair(link)
    link.guest.send(cli, b"r" * 100)
    link.g2h()
    link.host.set_rcvlowat(srv, 50)        # 100 queued >= 50: nothing to do
    assert link.to_guest == []
    link.host.recv(srv, 60)                # low-space: no update
    assert link.to_guest == []
    link.host.set_rcvlowat(srv, 50)        # 40 queued < 50 and fwd_cnt moved: update
    assert link.h2g() == [("CREDIT_UPDATE", 2, 1234, 3, 1024, 0, BUF, 60, b"", False)]
    link.host.set_rcvlowat(srv, 50)        # peer is current: nothing
    assert link.to_guest == []


# --------------------------------------------------------------------------- shutdown / close

def test_shutdown_send_direction():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.guest.send(cli, b"last words")
    link.guest.shutdown(cli, SHUT_WR)
    assert cli.shutdown == 2
    assert link.g2h()[1] == ("SHUTDOWN", 3, 1024, 2, 1234, 2, BUF, 0, b"", False)
    assert srv.peer_shutdown == 2 and srv.state == S.ESTABLISHED
    with pytest.raises(OSError) as e:
        link.guest.send(cli, b"more")
    assert e.value.errno == errno.EPIPE
    assert link.guest.writable(cli)         # a send would fail at once: poll says so
    # the server drains, then sees EOF; it can still write back
    assert link.host.recv(srv, 100) == b"last words"
    assert link.host.recv(srv, 100) == b""
    assert link.host.readable(srv)
    assert link.host.send(srv, b"reply") == 5
    link.pump()
    assert link.guest.recv(cli, 10) == b"reply"
    assert cli.state == srv.state == S.ESTABLISHED


def test_shutdown_rcv_direction():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.host.shutdown(srv, SHUT_RD)
    assert link.h2g() == [("SHUTDOWN", 2, 1234, 3, 1024, 1, BUF, 0, b"", False)]
    assert cli.peer_shutdown == 1
    with pytest.raises(OSError) as e:
        link.guest.send(cli, b"x")
    assert e.value.errno == errno.EPIPE
    assert link.host.recv(srv, 10) == b""           # our own SHUT_RD reads as EOF
    assert link.host.send(srv, b"ok") == 2           # the other direction still works
    link.pump()
    assert link.guest.recv(cli, 10) == b"ok"


def test_shutdown_bits_are_sticky_and_rdwr_without_data_resets():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.guest.shutdown(cli, SHUT_RD)
    link.g2h()
    link.host.recv_pkt(Packet(3, 2, 1024, 1234, VIRTIO_VSOCK_TYPE_STREAM,
                              VIRTIO_VSOCK_OP_SHUTDOWN, 0, BUF, 0))   # bits clear: no reset
    assert srv.peer_shutdown == 1
    link.guest.shutdown(cli, SHUT_WR)
    assert cli.shutdown == 3
    assert link.g2h() == [("SHUTDOWN", 3, 1024, 2, 1234, 2, BUF, 0, b"", False)]
    # peer shut both ways and nothing left to read: RST (not a reply) and close
    assert link.h2g() == [("RST", 2, 1234, 3, 1024, 0, BUF, 0, b"", False)]
    assert srv.state == S.CLOSING and srv.done and srv.peer_shutdown == 3
    assert cli.state == S.CLOSING and cli.done
    assert link.host.recv(srv, 1) == b"" and link.guest.recv(cli, 1) == b""


def test_shutdown_both_with_unread_data_waits_for_release():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.guest.send(cli, b"unread")
    link.guest.shutdown(cli, SHUT_RDWR)
    link.g2h()
    assert link.to_guest == [] and srv.state == S.ESTABLISHED and srv.peer_shutdown == 3
    assert link.host.recv(srv, 100) == b"unread"
    link.h2g()                                      # the credit update
    assert link.host.recv(srv, 100) == b""
    link.host.release(srv)                          # peer already shut both: RST at once
    assert link.h2g() == [("RST", 2, 1234, 3, 1024, 0, BUF, 6, b"", False)]
    assert srv not in link.host.connected.values() and not link.host.lingering
    assert cli.state == S.CLOSING


def test_clean_close_from_client():
    link = Link()
    lst, cli, srv = connected_pair(link)
    link.guest.release(cli)
    assert cli.released and cli.shutdown == 3 and cli.state == S.ESTABLISHED
    assert link.guest.lingering == {cli} and cli.close_deadline == 1008.0
    assert link.g2h() == [("SHUTDOWN", 3, 1024, 2, 1234, 3, BUF, 0, b"", False)]
    assert link.h2g() == [("RST", 2, 1234, 3, 1024, 0, BUF, 0, b"", False)]
    assert tables_empty(link.guest) and cli.close_deadline is None
    assert srv.state == S.CLOSING and link.host.recv(srv, 5) == b""
    # Linux's virtio_transport_close answers a peer that shut both ways with an RST even
    # now; the guest has forgotten the socket and never answers an RST.
    link.host.release(srv)
    assert link.h2g() == [("RST", 2, 1234, 3, 1024, 0, BUF, 0, b"", False)]
    assert link.to_host == []
    assert tables_empty(link.host, keep_bound=[1234])
    assert link.guest.tick(2000.0) == 0


def test_close_timeout_sends_rst():
    link = Link(close_timeout=3.0)
    _, cli, srv = connected_pair(link)
    link.host.send(srv, b"never read")
    link.h2g()
    link.host.release(srv)
    assert link.h2g() == [("SHUTDOWN", 2, 1234, 3, 1024, 3, BUF, 0, b"", False)]
    # the guest has unread data, so it does not reset: the host lingers
    assert link.to_host == [] and cli.peer_shutdown == 3 and cli.state == S.ESTABLISHED
    assert link.host.next_deadline() == 1003.0
    assert link.host.tick(1002.9) == 0 and link.to_guest == []
    link.clock.t = 1003.0
    assert link.host.tick() == 1
    assert link.h2g() == [("RST", 2, 1234, 3, 1024, 0, BUF, 0, b"", False)]
    assert tables_empty(link.host, keep_bound=[1234]) and link.host.next_deadline() is None
    assert cli.state == S.CLOSING
    assert link.guest.recv(cli, 100) == b"never read"
    assert link.guest.recv(cli, 100) == b""
    assert link.host.tick(5000.0) == 0


def test_default_close_timeout_is_8s():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.guest.send(cli, b"x")
    link.g2h()
    link.guest.release(cli)
    link.pump()                    # host has unread data: no RST back
    assert cli.close_deadline == 1008.0
    assert link.guest.tick(1007.99) == 0
    assert link.guest.tick(1008.0) == 1
    assert [w[0] for w in link.g2h()] == ["RST"]


def test_lingering_socket_drops_data_and_peer_shutdown_ends_it():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.host.send(srv, b"queued")
    link.h2g()
    link.guest.release(cli)                 # purges the unread bytes
    assert cli.rx_bytes == 0
    link.g2h()                              # SHUTDOWN(3); host had nothing unread: RST...
    link.drop_all()                         # ...lost on the way
    link.guest.recv_pkt(Packet(2, 3, 1234, 1024, 1, VIRTIO_VSOCK_OP_RW, 0, BUF, 0, b"late"))
    assert cli.rx_dropped_bytes == 4
    link.guest.recv_pkt(Packet(2, 3, 1234, 1024, 1, VIRTIO_VSOCK_OP_SHUTDOWN, 3, BUF, 0))
    assert link.to_host[-1].op == VIRTIO_VSOCK_OP_RST
    assert tables_empty(link.guest)


def test_release_of_connecting_and_unconnected_sockets():
    link = Link()
    a = link.guest.socket()
    link.guest.bind(a, 5000)
    link.guest.release(a)
    assert link.to_host == [] and link.guest.bound == {}
    b = link.guest.socket()
    link.guest.connect(b, HOST, 99)
    link.to_host.clear()
    link.guest.release(b)
    assert link.to_host == [] and tables_empty(link.guest) and b.state == S.CLOSE
    link.guest.release(b)                       # twice is harmless
    with pytest.raises(OSError) as e:
        link.guest.send(b, b"x")
    assert e.value.errno == errno.EBADF


def test_listener_release_resets_unaccepted_children():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 80)
    link.host.listen(lst, 4)
    clients = [link.guest.socket() for _ in range(2)]
    for c in clients:
        link.guest.connect(c, HOST, 80)
    link.pump()
    assert len(lst.accept_queue) == 2
    link.host.release(lst)
    assert link.h2g() == [("RST", 2, 80, 3, 1024, 0, BUF, 0, b"", False),
                          ("RST", 2, 80, 3, 1025, 0, BUF, 0, b"", False)]
    assert tables_empty(link.host)
    assert all(c.state == S.CLOSING and c.done for c in clients)


# --------------------------------------------------------------------------- resets / errors

def test_rst_to_unbound_port_refuses_connect():
    link = Link()
    cli = link.guest.socket()
    errs = []
    cli.wake = lambda: errs.append(cli.err)
    link.guest.connect(cli, HOST, 4444)
    link.g2h()
    assert link.h2g() == [("RST", 2, 4444, 3, 1024, 0, 0, 0, b"", True)]
    assert cli.state == S.CLOSE and cli.err == errno.ECONNREFUSED
    assert errs == [errno.ECONNREFUSED]
    assert link.guest.readable(cli) and link.guest.writable(cli)
    for op in (lambda: link.guest.send(cli, b"x"), lambda: link.guest.recv(cli, 1)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.ECONNREFUSED
    assert link.guest.connected == {} and link.guest.bound == {1024: cli}
    assert link.host.stats["rx_no_sock"] == 1 and link.host.stats["resets_sent"] == 1


def test_no_rst_in_reply_to_rst():
    link = Link()
    link.host.recv_pkt(Packet(3, 2, 1, 2, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RST,
                              0, 0, 0))
    assert link.to_guest == [] and link.host.stats["resets_sent"] == 0
    assert link.host.stats["rx"]["RST"] == 1


def test_wrong_type_gets_rst_with_its_type():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 1234)
    link.host.listen(lst, 1)
    link.host.recv_pkt(Packet(3, 2, 1030, 1234, VIRTIO_VSOCK_TYPE_SEQPACKET,
                              VIRTIO_VSOCK_OP_REQUEST, 0, BUF, 0))
    assert [(wire(p), p.type) for p in link.to_guest] == \
        [(("RST", 2, 1234, 3, 1030, 0, 0, 0, b"", True), VIRTIO_VSOCK_TYPE_SEQPACKET)]
    assert not lst.accept_queue and link.host.stats["rx_bad_type"] == 1


def test_wrong_dst_cid_is_no_socket():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 1234)
    link.host.listen(lst, 1)
    link.host.recv_pkt(Packet(3, 99, 1030, 1234, 1, VIRTIO_VSOCK_OP_REQUEST, 0, BUF, 0))
    assert [wire(p) for p in link.to_guest] == [("RST", 99, 1234, 3, 1030, 0, 0, 0, b"", True)]
    assert not lst.accept_queue


def test_listener_answers_non_request_with_rst():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 1234)
    link.host.listen(lst, 1)
    link.host.recv_pkt(Packet(3, 2, 1030, 1234, 1, VIRTIO_VSOCK_OP_RW, 0, BUF, 0, b"hi"))
    assert [wire(p) for p in link.to_guest] == [("RST", 2, 1234, 3, 1030, 0, 0, 0, b"", True)]
    assert lst.state == S.LISTEN and not lst.accept_queue


def test_bound_only_socket_answers_with_rst():
    link = Link()
    sk = link.host.socket()
    link.host.bind(sk, 1234)
    link.host.recv_pkt(Packet(3, 2, 1030, 1234, 1, VIRTIO_VSOCK_OP_REQUEST, 0, BUF, 0))
    assert [wire(p) for p in link.to_guest] == [("RST", 2, 1234, 3, 1030, 0, 0, 0, b"", True)]
    assert sk.state == S.CLOSE


def test_backlog_full():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 1234)
    link.host.listen(lst, 1)         # sk_acceptq_is_full: more than backlog waiting
    cs = [link.guest.socket() for _ in range(3)]
    for c in cs:
        link.guest.connect(c, HOST, 1234)
    log = link.pump()
    assert [w[0] for d, w in log if d == "<"] == ["RESPONSE", "RESPONSE", "RST"]
    assert [c.state for c in cs] == [S.ESTABLISHED, S.ESTABLISHED, S.CLOSE]
    assert cs[2].err == errno.ECONNREFUSED and len(lst.accept_queue) == 2
    link.host.accept(lst)
    link.guest.connect(cs[2], HOST, 1234)      # room again: a retry succeeds
    link.pump()
    assert cs[2].state == S.ESTABLISHED and len(lst.accept_queue) == 2


def test_syn_sent_rules():
    link = Link()
    cli = link.guest.socket()
    link.guest.connect(cli, HOST, 1234)
    link.to_host.clear()
    # INVALID is ignored
    link.guest.recv_pkt(Packet(2, 3, 1234, 1024, 1, VIRTIO_VSOCK_OP_INVALID, 0, BUF, 0))
    assert cli.state == S.SYN_SENT and link.to_host == []
    # anything else: EPROTO and RST (a reply)
    link.guest.recv_pkt(Packet(2, 3, 1234, 1024, 1, VIRTIO_VSOCK_OP_RW, 0, BUF, 0, b"?"))
    assert cli.state == S.CLOSE and cli.err == errno.EPROTO
    assert link.g2h() == [("RST", 3, 1024, 2, 1234, 0, BUF, 0, b"", True)]
    assert link.guest.connected == {}
    # a RESPONSE from a peer we did not connect to is not ours
    c2 = link.guest.socket()
    link.guest.connect(c2, HOST, 1234)
    link.to_host.clear()
    link.guest.recv_pkt(Packet(2, 3, 999, c2.local_port, 1, VIRTIO_VSOCK_OP_RESPONSE, 0,
                               BUF, 0))
    assert c2.state == S.SYN_SENT
    assert link.g2h() == [("RST", 3, c2.local_port, 2, 999, 0, 0, 0, b"", True)]


def test_established_ignores_out_of_state_ops():
    link = Link()
    _, cli, srv = connected_pair(link)
    for op in (VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_INVALID, 42):
        link.host.recv_pkt(Packet(3, 2, 1024, 1234, 1, op, 0, BUF, 0))
    assert link.to_guest == [] and srv.state == S.ESTABLISHED
    assert link.host.stats["rx_ignored"] == 4


def test_peer_rst_closes_established():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.host.send(srv, b"tail")
    link.h2g()
    link.guest.recv_pkt(Packet(2, 3, 1234, 1024, 1, VIRTIO_VSOCK_OP_RST, 0, BUF, 0))
    assert cli.state == S.CLOSING and cli.done and cli.peer_shutdown == 3
    with pytest.raises(OSError) as e:
        link.guest.send(cli, b"x")
    assert e.value.errno == errno.EPIPE
    assert link.guest.recv(cli, 10) == b"tail" and link.guest.recv(cli, 10) == b""
    assert link.to_host == []          # no credit update from a closed socket
    # CLOSING ignores everything but RST
    link.guest.recv_pkt(Packet(2, 3, 1234, 1024, 1, VIRTIO_VSOCK_OP_RW, 0, BUF, 0, b"zz"))
    assert cli.rx_bytes == 0 and link.to_host == []


def test_transport_reset():
    link = Link()
    lst = link.guest.socket()                     # a guest listener survives
    link.guest.bind(lst, 500)
    link.guest.listen(lst, 4)
    hl = link.host.socket()
    link.host.bind(hl, 1234)
    link.host.listen(hl, 4)
    a = link.guest.socket()
    link.guest.connect(a, HOST, 1234)
    link.pump()
    b = link.guest.socket()
    link.guest.connect(b, HOST, 1234)             # still connecting
    link.drop_all()
    wakes = []
    a.wake = lambda: wakes.append("a")
    b.wake = lambda: wakes.append("b")
    assert link.guest.reset_connected() == 2
    assert sorted(wakes) == ["a", "b"]
    for sk in (a, b):
        assert sk.state == S.CLOSE and sk.err == errno.ECONNRESET
        with pytest.raises(OSError) as e:
            link.guest.send(sk, b"x")
        assert e.value.errno == errno.ECONNRESET
    assert link.guest.connected == {} and lst.state == S.LISTEN and 500 in link.guest.bound
    assert link.to_host == []                     # a reset sends nothing

    link.guest.set_local_cid(7)                   # the device gave us a new CID
    link.host.recv_pkt(Packet(7, 2, 40000, 1234, 1, VIRTIO_VSOCK_OP_REQUEST, 0, BUF, 0))
    link.h2g()                                    # RESPONSE to cid 7 (ignored by cid 7 ...)
    c = link.guest.socket()
    link.guest.connect(c, HOST, 1234)
    assert link.to_host[0].src_cid == 7
    link.pump()
    assert c.state == S.ESTABLISHED and c.local_cid == 7
    # packets for the old CID find nothing
    link.guest.recv_pkt(Packet(2, 3, 1, 500, 1, VIRTIO_VSOCK_OP_REQUEST, 0, BUF, 0))
    assert not lst.accept_queue


def test_unbound_request_hook():
    made = []

    def hook(pkt):
        if pkt.dst_port == 666:
            return None
        if pkt.dst_port == 667:
            raise ConnectionRefusedError("unix socket not there")
        sk = link.host.socket()
        sk.data = f"unix:{pkt.dst_port}"
        made.append(sk)
        return sk

    link = Link()
    link.host.unbound_request = hook
    c = link.guest.socket()
    link.guest.connect(c, HOST, 52)
    link.g2h()
    assert link.h2g() == [("RESPONSE", 2, 52, 3, 1024, 0, BUF, 0, b"", True)]
    sk, = made
    assert sk.state == S.ESTABLISHED and sk.data == "unix:52"
    assert (sk.local_port, sk.remote_cid, sk.remote_port) == (52, 3, 1024)
    assert link.host.connected == {(52, 3, 1024): sk} and link.host.bound == {}
    assert c.state == S.ESTABLISHED
    link.guest.send(c, b"via bridge")
    link.g2h()
    assert link.host.recv(sk, 100) == b"via bridge"
    for port in (666, 667):
        c2 = link.guest.socket()
        link.guest.connect(c2, HOST, port)
        link.pump()
        assert c2.state == S.CLOSE and c2.err == errno.ECONNREFUSED
    # only REQUESTs reach the hook
    link.host.recv_pkt(Packet(3, 2, 9, 53, 1, VIRTIO_VSOCK_OP_RW, 0, BUF, 0, b"x"))
    assert len(made) == 1 and link.to_guest[-1].op == VIRTIO_VSOCK_OP_RST


# --------------------------------------------------------------------------- socket layer

def test_bind_rules_and_ephemeral_ports():
    core = VsockCore(3, print)
    a, b, c, d = (core.socket() for _ in range(4))
    core.bind(a, 1025)
    core.bind(b, VMADDR_PORT_ANY)
    core.bind(c, VMADDR_PORT_ANY)
    assert (b.local_port, c.local_port) == (1024, 1026)      # 1025 skipped
    with pytest.raises(OSError) as e:
        core.bind(d, 1025)
    assert e.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as e:
        core.bind(a, 2000)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        core.bind(d, 2**32)
    assert e.value.errno == errno.EINVAL
    core.release(b)
    core.bind(d, VMADDR_PORT_ANY)
    assert d.local_port == 1027                  # rolling counter, as af_vsock
    assert set(core.bound) == {1025, 1026, 1027}


def test_ephemeral_port_counter_wraps():
    core = VsockCore(3, print)
    core._next_port = VMADDR_PORT_ANY - 1
    a, b = core.socket(), core.socket()
    core.bind(a, VMADDR_PORT_ANY)
    core.bind(b, VMADDR_PORT_ANY)
    assert (a.local_port, b.local_port) == (VMADDR_PORT_ANY - 1, 1024)


def test_socket_layer_errors():
    link = Link()
    g = link.guest
    sk = g.socket()
    for call, code in ((lambda: g.send(sk, b"x"), errno.ENOTCONN),
                       (lambda: g.recv(sk, 1), errno.ENOTCONN),
                       (lambda: g.listen(sk, 1), errno.EINVAL),           # not bound
                       (lambda: g.accept(sk), errno.EINVAL),
                       (lambda: g.shutdown(sk, SHUT_WR), errno.ENOTCONN),
                       (lambda: g.recv(sk, -1), errno.EINVAL)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == code
    g.bind(sk, 10)
    g.listen(sk, 1)
    with pytest.raises(OSError) as e:
        g.connect(sk, HOST, 1)
    assert e.value.errno == errno.EINVAL
    c = g.socket()
    with pytest.raises(OSError) as e:
        g.connect(c, 0xFFFFFFFF, 1)
    assert e.value.errno == errno.EINVAL
    g.connect(c, HOST, 1)
    with pytest.raises(OSError) as e:
        g.connect(c, HOST, 1)
    assert e.value.errno == errno.EALREADY
    with pytest.raises(OSError) as e:
        g.shutdown(c, 7)
    assert e.value.errno == errno.EINVAL
    _, cli, _ = connected_pair(link, port=77)
    with pytest.raises(OSError) as e:
        g.connect(cli, HOST, 77)
    assert e.value.errno == errno.EISCONN
    with pytest.raises(BlockingIOError):
        g.recv(cli, 1)


def test_connect_timeout_then_late_response_and_retry():
    link = Link()
    cli = link.guest.socket()
    link.guest.connect(cli, HOST, 1234)
    port = cli.local_port
    lost_request = link.to_host.pop()
    assert link.guest.connect_timeout(cli) is True
    assert cli.state == S.CLOSE and cli.err == errno.ETIMEDOUT
    assert link.guest.connect_timeout(cli) is False
    assert link.guest.connected == {} and link.guest.bound == {port: cli}
    # a late RESPONSE finds a bound, unconnected socket: RST
    link.guest.recv_pkt(Packet(2, 3, 1234, port, 1, VIRTIO_VSOCK_OP_RESPONSE, 0, BUF, 0))
    assert link.g2h() == [("RST", 3, port, 2, 1234, 0, 0, 0, b"", True)]
    # retry on the same socket, same port, now with a listener
    lst = link.host.socket()
    link.host.bind(lst, 1234)
    link.host.listen(lst, 1)
    link.guest.connect(cli, HOST, 1234)
    assert cli.err == 0 and cli.local_port == port
    assert wire(link.to_host[0]) == wire(lost_request)
    link.pump()
    assert cli.state == S.ESTABLISHED


def test_wake_on_every_kind_of_change():
    link = Link()
    lst = link.host.socket()
    link.host.bind(lst, 1234)
    link.host.listen(lst, 4)
    seen = []
    lst.wake = lambda: seen.append(("lst", link.host.readable(lst)))
    cli = link.guest.socket()
    cli.wake = lambda: seen.append(("cli", cli.state.name))
    link.guest.connect(cli, HOST, 1234)
    link.pump()
    assert ("lst", True) in seen and ("cli", "ESTABLISHED") in seen
    srv = link.host.accept(lst)
    seen.clear()
    srv.wake = lambda: seen.append(("srv", link.host.has_data(srv)))
    link.guest.send(cli, b"abc")
    link.g2h()
    assert ("srv", 3) in seen
    seen.clear()
    link.guest.shutdown(cli, SHUT_WR)
    link.g2h()
    assert seen and link.host.readable(srv)


def test_loopback_on_one_core():
    out = []
    core = VsockCore(GUEST, out.append)
    lst = core.socket()
    core.bind(lst, 9)
    core.listen(lst, 1)
    cli = core.socket()
    core.connect(cli, GUEST, 9)
    while out:
        core.recv_pkt(out.pop(0))
    srv = core.accept(lst)
    assert cli.state == srv.state == S.ESTABLISHED
    assert set(core.connected) == {(cli.local_port, GUEST, 9), (9, GUEST, cli.local_port)}
    core.send(cli, b"ping")
    while out:
        core.recv_pkt(out.pop(0))
    assert core.recv(srv, 10) == b"ping"


def test_stats_count_packets_by_op():
    link = Link()
    _, cli, srv = connected_pair(link)
    link.guest.send(cli, b"abc")
    link.pump()
    link.host.recv(srv, 3)
    link.pump()
    g, h = link.guest.stats, link.host.stats
    assert g["tx"] == {"REQUEST": 1, "RW": 1}
    assert h["rx"] == {"REQUEST": 1, "RW": 1}
    assert h["tx"] == {"RESPONSE": 1, "CREDIT_UPDATE": 1}
    assert g["rx"] == {"RESPONSE": 1, "CREDIT_UPDATE": 1}
    assert g["tx_bytes"] == 3 and h["rx_bytes"] == 3
    assert srv.rx_total == 3 and cli.tx_total == 3


def test_low_space_speaks_up_before_a_smaller_peer_window_runs_out():
    """A sender that caps its in-flight bytes at its own (smaller) buffer, as current Linux
    does, must get a CREDIT_UPDATE before that smaller window is used up, however large our
    own buffer is (a Linux guest with 256 KiB against a 1 MiB host stalled without it)."""
    core = VsockCore(2, lambda p: sent.append(p), credit_policy="low-space", buf_size=1 << 20)
    sent: list = []
    lst = core.socket()
    core.bind(lst, 5000)
    core.listen(lst, 1)
    core.recv_pkt(Packet(3, 2, 1024, 5000, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_REQUEST, 0,
                         256 * 1024, 0))
    sk = core.accept(lst)
    sent.clear()
    for i in range(4):                                  # the peer's whole 256 KiB window
        core.recv_pkt(Packet(3, 2, 1024, 5000, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 0,
                             256 * 1024, 0, b"x" * 65536))
    got = 0
    while got < 256 * 1024:
        got += len(core.recv(sk, 65536))
    updates = [p for p in sent if p.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE]
    assert updates and updates[-1].fwd_cnt >= 192 * 1024


def test_seeds_credit_arithmetic_has_no_clamp_the_modern_policies_do():
    """Issue 17 item 11: every-read is the seeds' virtio_transport_get_credit
    (peer_buf_alloc - (tx_cnt - peer_fwd_cnt)); the modern policies clamp the peer's window to
    our own buffer, as Linux 6.1's virtio_transport_has_space does."""
    from shared.vsock.proto import VsockSock
    for policy, want in (("every-read", (4 << 20) - 1000), ("low-space", (256 << 10) - 1000),
                         ("rcvlowat", (256 << 10) - 1000), ("half-window", (256 << 10) - 1000)):
        core = VsockCore(3, lambda p: None, credit_policy=policy, buf_size=256 << 10)
        sk = VsockSock(buf_alloc=256 << 10, peer_buf_alloc=4 << 20, tx_cnt=1000, peer_fwd_cnt=0)
        assert core.has_space(sk) == want, policy


def test_seeds_mode_brings_the_seeds_transport():
    """every-read: a buffer per packet, no autocork, nothing lent (the seeds' transport); the
    modern policies: fixed pools and autocork."""
    from guest.vm import transport_mode
    assert transport_mode("every-read") == {"pool": False, "coalesce": False}
    assert transport_mode("low-space") == {"pool": True, "coalesce": True}
    assert transport_mode("half-window") == {"pool": True, "coalesce": True}


def test_rx_burst_moderates_only_bulk_streams_within_the_peers_credit():
    """VsockCore.rx_burst (interrupt moderation): 1 unless the peer sends bulk packets (at least
    BULK_PKT bytes: full ones, or a bridge's partial socket reads); then as many packets as the
    credit the peer can still have allows, less one, at most BURST_MAX; the seeds' mode never
    moderates."""
    from shared.vsock.proto import BULK_PKT, BURST_MAX
    core = VsockCore(2, lambda p: None, credit_policy="low-space", buf_size=4 << 20)
    sk = VsockSock(buf_alloc=4 << 20)
    full = core.max_pkt_len
    sk.rx_last = 100                                    # small packets: wake at each one
    assert core.rx_burst(sk) == 1
    sk.rx_last = BULK_PKT - 1                           # a request/response of 16 KiB - 1
    assert core.rx_burst(sk) == 1
    sk.rx_last = BULK_PKT                               # a bridge's partial read of a bulk stream
    assert core.rx_burst(sk) == BURST_MAX
    sk.rx_last = full
    assert core.rx_burst(sk) == BURST_MAX               # a whole window of credit left
    sk.rx_total, sk.last_fwd_cnt = (4 << 20) - 3 * full, 0   # the peer can send 3 more packets
    assert core.rx_burst(sk) == 2
    sk.rx_total = 4 << 20                               # no credit left: never wait for more than one
    assert core.rx_burst(sk) == 1
    seeds = VsockCore(2, lambda p: None, credit_policy="every-read")
    sk.rx_total = 0
    assert seeds.rx_burst(sk) == 1
