"""Ports of Linux tools/testing/vsock/vsock_test.c stream cases (its test_cases[]) that apply
to a stream-only core, run on two VsockCore endpoints over the fake link of test_vsock_proto.

The C tests run a client and a server process synchronised by a TCP control channel
(control_writeln / control_expectln); here the test is both, and the control channel is just
the order of the steps. "Blocking" calls are loops that pump the link until they can finish.

One deliberate difference: Linux reports a reset connect as ECONNRESET; this core reports
ECONNREFUSED (the project's choice, see shared/vsock/proto.py).
"""

import errno

import pytest

from shared.vsock.proto import SHUT_RD, SHUT_WR, VsockCore, VsockSock
from shared.vsock.proto import SockState as S
from tests.test_vsock_proto import HOST, Link

PORT = 1234
K = 1024


def listen(link: Link, port=PORT, backlog=128) -> VsockSock:
    sk = link.host.socket()
    link.host.bind(sk, port)
    link.host.listen(sk, backlog)
    return sk


def connect(link: Link, port=PORT) -> VsockSock:
    """vsock_stream_connect: connect and wait for the outcome."""
    sk = link.guest.socket()
    link.guest.connect(sk, HOST, port)
    link.pump()
    return sk


def accept(link: Link, lst: VsockSock) -> VsockSock:
    link.pump()
    sk = link.host.accept(lst)
    assert sk is not None, "accept would block forever"
    return sk


def send_all(link: Link, core: VsockCore, sk: VsockSock, data: bytes, max_rounds=1000) -> int:
    """A blocking send: send what credit allows, let the peer run, repeat. Returns the bytes
    sent (less than len(data) means it would block forever)."""
    off = 0
    for _ in range(max_rounds):
        off += core.send(sk, data[off:])
        link.pump()
        if off == len(data) or not core.writable(sk):
            break
    return off


def wait_remote_close(link: Link, core: VsockCore, sk: VsockSock):
    """vsock_wait_remote_close: poll until POLLRDHUP (the peer shut its sending side)."""
    link.pump()
    assert sk.peer_shutdown & 2 or sk.done, "the peer never closed"


def expect_errno(code, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, (errno.errorcode.get(e.value.errno), errno.errorcode[code])


# 1. SOCK_STREAM connection reset ------------------------------------------------------------

def test_connection_reset():
    link = Link()
    sk = connect(link)                       # nobody listens on PORT
    assert sk.state == S.CLOSE and sk.err == errno.ECONNREFUSED
    assert link.host.stats["resets_sent"] == 1
    link.guest.release(sk)
    assert not link.guest.bound and not link.guest.connected


# 2. SOCK_STREAM bind only --------------------------------------------------------------------

def test_bind_only():
    link = Link()
    srv = link.host.socket()
    link.host.bind(srv, PORT)                # bound, never listening
    sk = connect(link)
    assert sk.state == S.CLOSE and sk.err == errno.ECONNREFUSED
    assert srv.state == S.CLOSE and link.host.bound == {PORT: srv}


# 3. SOCK_STREAM client close -----------------------------------------------------------------

def test_client_close():
    link = Link()
    lst = listen(link)
    cli = connect(link)
    srv = accept(link, lst)
    assert link.guest.send(cli, b"\x01") == 1
    link.guest.release(cli)                  # client: send_byte; close; "CLOSED"
    wait_remote_close(link, link.host, srv)
    expect_errno(errno.EPIPE, link.host.send, srv, b"\x02")
    assert link.host.recv(srv, 1) == b"\x01"
    assert link.host.recv(srv, 1) == b""
    link.host.release(srv)
    link.pump()
    assert not link.guest.connected and not link.guest.lingering and not link.guest.bound
    assert not link.host.connected and not link.host.lingering


# 4. SOCK_STREAM server close -----------------------------------------------------------------

def test_server_close():
    link = Link()
    lst = listen(link)
    cli = connect(link)
    srv = accept(link, lst)
    assert link.host.send(srv, b"\x01") == 1
    link.host.release(srv)
    wait_remote_close(link, link.guest, cli)
    expect_errno(errno.EPIPE, link.guest.send, cli, b"\x02")
    assert link.guest.recv(cli, 1) == b"\x01"
    assert link.guest.recv(cli, 1) == b""
    link.guest.release(cli)
    link.pump()
    assert not link.guest.connected and not link.guest.lingering and not link.guest.bound
    assert not link.host.connected and not link.host.lingering


# 5. SOCK_STREAM multiple connections ---------------------------------------------------------

def test_multiple_connections():
    nfds = 100                                # MULTICONN_NFDS
    link = Link()
    lst = listen(link, backlog=nfds)
    clients = [connect(link) for _ in range(nfds)]
    servers = [accept(link, lst) for _ in range(nfds)]
    assert len({c.local_port for c in clients}) == nfds
    for i, c in enumerate(clients):
        assert link.guest.send(c, bytes([i])) == 1
    link.pump()
    # accept order is connect order: each server socket is its client's peer
    for i, (c, s) in enumerate(zip(clients, servers)):
        assert (s.remote_port, c.remote_port) == (c.local_port, PORT)
        assert link.host.recv(s, 1) == bytes([i])
        assert link.host.send(s, bytes([i])) == 1
    link.pump()
    for i, c in enumerate(clients):
        assert link.guest.recv(c, 1) == bytes([i])
    for c, s in zip(clients, servers):
        link.guest.release(c)
        link.host.release(s)
    link.pump()
    assert not link.guest.connected and not link.host.connected
    assert not link.guest.lingering and not link.host.lingering


# 15. SOCK_STREAM virtio skb merge ------------------------------------------------------------

def test_small_packets_read_as_one_stream():
    link = Link()
    lst = listen(link)
    cli = connect(link)
    srv = accept(link, lst)
    link.guest.send(cli, b"HELLO")
    link.guest.send(cli, b"WORLD")
    link.pump()
    assert link.host.has_data(srv) == 10
    assert link.host.recv(srv, 64) == b"HELLOWORLD"


# 17. SOCK_STREAM SHUT_WR ---------------------------------------------------------------------

def test_shut_wr():
    link = Link()
    lst = listen(link)
    cli = connect(link)
    srv = accept(link, lst)
    link.guest.shutdown(cli, SHUT_WR)
    expect_errno(errno.EPIPE, link.guest.send, cli, b"\x01")
    link.pump()                               # "CLIENTDONE"
    assert srv.peer_shutdown == 2 and link.host.recv(srv, 1) == b""
    link.host.release(srv)
    link.pump()
    link.guest.release(cli)
    link.pump()
    assert not link.guest.connected and not link.host.connected


# 18. SOCK_STREAM SHUT_RD ---------------------------------------------------------------------

def test_shut_rd():
    link = Link()
    lst = listen(link)
    cli = connect(link)
    srv = accept(link, lst)
    link.host.shutdown(srv, SHUT_RD)
    link.pump()                               # "SHUTRDDONE"
    expect_errno(errno.EPIPE, link.guest.send, cli, b"\x01")
    link.host.release(srv)                    # "CLIENTDONE"
    link.pump()
    link.guest.release(cli)
    link.pump()
    assert not link.guest.connected and not link.host.connected


# 22. SOCK_STREAM double bind connect ---------------------------------------------------------

def test_double_bind_connect():
    link = Link()
    lst = listen(link)
    for _ in range(2):
        cli = link.guest.socket()
        link.guest.bind(cli, PORT + 1)        # vsock_bind_connect(peer_port, peer_port + 1)
        link.guest.connect(cli, HOST, PORT)
        link.pump()
        srv = accept(link, lst)
        link.guest.release(cli)
        wait_remote_close(link, link.host, srv)   # the server's RST frees the port
        assert PORT + 1 not in link.guest.bound
        link.host.release(srv)
        link.pump()


def test_double_bind_before_close_completes_is_eaddrinuse():
    link = Link()
    lst = listen(link)
    cli = link.guest.socket()
    link.guest.bind(cli, PORT + 1)
    link.guest.connect(cli, HOST, PORT)
    link.pump()
    accept(link, lst)
    link.guest.release(cli)                   # lingering: the port is still taken
    again = link.guest.socket()
    expect_errno(errno.EADDRINUSE, link.guest.bind, again, PORT + 1)
    link.pump()                               # SHUTDOWN -> RST: close completes
    link.guest.bind(again, PORT + 1)


# 23/24. SOCK_STREAM virtio credit update + SO_RCVLOWAT / + low rx_bytes ---------------------

BUF_SIZE = 128 * K                            # RCVLOWAT_CREDIT_UPD_BUF_SIZE
MAX_PKT = 64 * K                              # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE


def credit_update_case(policy: str, low_rx_bytes_test: bool) -> bool:
    """test_stream_credit_update_test. Returns whether the server got all BUF_SIZE+1 bytes
    (False = the client is stuck with its last byte: no CREDIT_UPDATE ever came)."""
    link = Link(credit_policy=policy)
    lst = listen(link)
    cli = connect(link)
    srv = accept(link, lst)
    link.host.set_buffer_size(srv, BUF_SIZE)
    if low_rx_bytes_test:
        # enables a credit update once fewer than SO_RCVLOWAT bytes are queued
        link.host.set_rcvlowat(srv, 1 + MAX_PKT)
    link.host.send(srv, b"\x00")              # the dummy byte: our new buf_alloc is known
    link.pump()
    assert link.guest.recv(cli, 1) == b"\x00"
    link.pump()
    data = bytes(i % 251 for i in range(BUF_SIZE + 1))
    sent = send_all(link, link.guest, cli, data)
    assert sent == BUF_SIZE                   # the last byte waits for credit
    assert link.host.has_data(srv) == BUF_SIZE    # "wait until 128KB in the rx queue"
    got = link.host.recv(srv, MAX_PKT)
    if not low_rx_bytes_test:
        link.host.set_rcvlowat(srv, MAX_PKT + 1)  # updating SO_RCVLOWAT sends the update
    link.pump()
    sent += send_all(link, link.guest, cli, data[sent:])
    # poll(POLLIN) with SO_RCVLOWAT = 64K+1 returns once the last byte is in
    if link.host.has_data(srv) < MAX_PKT + 1:
        assert sent == BUF_SIZE
        return False
    got += link.host.recv(srv, MAX_PKT + 1)
    assert got == data
    return True


@pytest.mark.parametrize("policy", ["every-read", "low-space", "rcvlowat", "half-window"])
def test_credit_update_on_set_rcvlowat(policy):
    assert credit_update_case(policy, low_rx_bytes_test=False)


@pytest.mark.parametrize("policy,completes", [("every-read", True), ("rcvlowat", True),
                                               ("half-window", True), ("low-space", False)])
def test_credit_update_low_rx_bytes(policy, completes):
    # The 2019 "low-space" policy alone stalls here (free space is exactly 64 KiB, not
    # below): the bug this vsock_test case was written for, fixed by the rx_bytes rule.
    assert credit_update_case(policy, low_rx_bytes_test=True) is completes


# 27. SOCK_STREAM leak accept queue -----------------------------------------------------------

def test_accept_queue_not_leaked():
    link = Link()
    for _ in range(10):
        lst = listen(link)
        cli = connect(link)                   # accepted by nobody
        assert len(lst.accept_queue) == 1 and cli.state == S.ESTABLISHED
        link.host.release(lst)
        link.pump()
        assert cli.state == S.CLOSING and cli.done
        link.guest.release(cli)
        link.pump()
        assert not link.host.connected and not link.host.bound and not link.host.lingering
        assert not link.guest.connected and not link.guest.bound and not link.guest.lingering


# 31. SOCK_STREAM retry failed connect() ------------------------------------------------------

def test_retry_failed_connect():
    link = Link()
    cli = connect(link)
    assert cli.state == S.CLOSE and cli.err == errno.ECONNREFUSED
    lst = listen(link)                        # "LISTEN" / "LISTENING"
    link.guest.connect(cli, HOST, PORT)       # the same socket, again
    link.pump()
    assert cli.state == S.ESTABLISHED and cli.err == 0
    srv = accept(link, lst)
    link.guest.send(cli, b"\x01")
    link.pump()
    assert link.host.recv(srv, 1) == b"\x01"
