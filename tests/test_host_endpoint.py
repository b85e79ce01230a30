"""The in-device host endpoint (host/vsock/endpoint.py): programs in the device process using the
guest's socket API over the device's own core. One process: a VhostVsock on a real VhostWorker
thread and a fake guest on bytearray RAM (tests/test_bridge.py's Harness), or, for single steps,
the FakeWorker of tests/test_host_vsock.py."""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading

import pytest

from host.vsock.endpoint import HostEndpoint, HostVsock
from shared.constants import VIRTIO_VSOCK_OP_REQUEST
from shared.vsock.proto import SHUT_WR, SockState
from tests.test_bridge import (TIMEOUT, Harness, guest_accept, guest_listen, guest_recv_exact,
                               guest_send_all)
from tests.test_host_vsock import GUEST_CID, make
from tests.waiting import wait_until

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def h(run_dir):
    hs = Harness(run_dir)
    yield hs
    hs.close()


def guest_connect(h, port: int):
    sk = h.guest(lambda c: c.socket())
    h.guest(lambda c: c.connect(sk, 2, port))
    wait_until(lambda: sk.state != SockState.SYN_SENT, what="guest connect")
    return sk


def guest_echo_round_trip(h, port: int, data: bytes) -> None:
    sk = guest_connect(h, port)
    assert sk.state == SockState.ESTABLISHED, sk
    t = threading.Thread(target=guest_send_all, args=(h, sk, data))
    t.start()
    assert guest_recv_exact(h, sk, len(data)) == data
    t.join(TIMEOUT)
    h.guest(lambda c: c.release(sk))


def in_thread(fn, *args):
    box = {}

    def run():
        try:
            box["r"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# --- single steps ---------------------------------------------------------------------------------
def test_family_interface_and_cancel_pkt_of_an_abandoned_connect():
    dev, g, w = make()
    vs = HostVsock(dev)
    assert vs.up and vs.local_cid == 2 and vs.guest_cid == GUEST_CID and vs.current_core is dev.core
    s = vs.socket()
    s.setblocking(False)
    with pytest.raises(BlockingIOError) as ei:
        s.connect((GUEST_CID, 1234))
    assert ei.value.errno == errno.EINPROGRESS
    assert [e[0].op for e in dev.send_pkt_list] == [VIRTIO_VSOCK_OP_REQUEST]
    assert w.timers, "the connect timeout is a worker timer"
    s.close()                                   # abandoned: the REQUEST must not go out
    assert not dev.send_pkt_list
    g.settle(w)
    assert not g.received
    dev.stop()
    assert not vs.up
    with pytest.raises(OSError) as ei:
        vs.socket()
    assert ei.value.errno == errno.ENODEV


# --- a real worker thread -------------------------------------------------------------------------
def test_host_program_connects_to_a_guest_listener(h):
    vs = HostVsock(h.dev)
    assert vs.wait_up(TIMEOUT)
    lst = guest_listen(h, 1234)
    t, box = in_thread(vs.create_connection, (GUEST_CID, 1234), TIMEOUT)
    gsk = guest_accept(h, lst)
    t.join(TIMEOUT)
    s = box["r"]
    s.settimeout(TIMEOUT)
    assert s.getpeername() == (GUEST_CID, 1234) and s.getsockname()[0] == 2
    data = os.urandom(600_000)                   # more than the guest's 256 KiB credit
    st, _ = in_thread(s.sendall, data)
    assert hashlib.sha256(guest_recv_exact(h, gsk, len(data))).digest() == \
        hashlib.sha256(data).digest()
    st.join(TIMEOUT)
    guest_send_all(h, gsk, b"from the guest")
    buf = bytearray(64)
    got = b""
    while len(got) < 14:
        n = s.recv_into(buf)
        assert n
        got += bytes(buf[:n])
    assert got == b"from the guest"
    h.guest(lambda c: c.shutdown(gsk, SHUT_WR))
    assert s.recv(10) == b""
    s.close()


def test_guest_reaches_host_service_and_the_bridge_keeps_other_ports(h, run_dir):
    ep = h.on_worker(lambda: HostEndpoint(h.dev, ["echo=5000", "sink=5002"]))
    assert [s.port for s in ep.services] == [5000, 5002]
    shadow = h.host.listen(GUEST_CID, 5000)     # a Unix listener on the service's port: not used
    other = h.host.listen(GUEST_CID, 5001)      # a Unix listener on another port: bridged
    guest_echo_round_trip(h, 5000, os.urandom(200_000))
    assert ep.services[0].connections == 1
    shadow.settimeout(0.2)
    with pytest.raises(socket.timeout):
        shadow.accept()
    sk = guest_connect(h, 5001)
    other.settimeout(TIMEOUT)
    conn, _ = other.accept()
    guest_send_all(h, sk, b"via the bridge")
    assert conn.recv(100) == b"via the bridge"
    conn.close()
    # sink: count until EOF, answer the count
    sk = guest_connect(h, 5002)
    guest_send_all(h, sk, b"x" * 100_000)
    h.guest(lambda c: c.shutdown(sk, SHUT_WR))
    assert guest_recv_exact(h, sk, 7) == b"100000\n"
    h.on_worker(ep.close)


def test_device_stop_fails_sockets_and_services_listen_again_on_start(h):
    ep = h.on_worker(lambda: HostEndpoint(h.dev, ["echo=5000"]))
    vs = HostVsock(h.dev)
    lst = guest_listen(h, 1234)
    t, box = in_thread(vs.create_connection, (GUEST_CID, 1234), TIMEOUT)
    guest_accept(h, lst)
    t.join(TIMEOUT)
    c = box["r"]
    c.settimeout(TIMEOUT)
    srv = vs.create_server(6000)
    srv.settimeout(TIMEOUT)
    tr, rbox = in_thread(c.recv, 10)
    ta, abox = in_thread(srv.accept)
    wait_until(lambda: c.waiting and srv.waiting, what="both asleep")
    old_services = list(ep.services)
    h.on_worker(h.dev.stop)                      # guest reset / reconnect
    tr.join(TIMEOUT)
    ta.join(TIMEOUT)
    assert isinstance(rbox.get("e"), ConnectionResetError), rbox
    assert abox.get("e") is not None and abox["e"].errno == errno.ENODEV, abox
    assert not vs.up and not ep.services
    with pytest.raises(OSError) as ei:
        vs.create_connection((GUEST_CID, 1234), TIMEOUT)
    assert ei.value.errno == errno.ENODEV
    for s in (c, srv):
        s.close()
    for s in old_services:                       # their threads end by themselves
        s._thread.join(TIMEOUT)
        assert not s._thread.is_alive()
    h.on_worker(h.dev.start)                     # DRIVER_OK again: the services listen again
    assert vs.wait_up(TIMEOUT) and len(ep.services) == 1
    guest_echo_round_trip(h, 5000, os.urandom(50_000))
    h.on_worker(ep.close)
