"""The guest socket API and services, with real threads: the guest Kernel's worker runs the
transport's work, a host thread pumps a fake vhost-vsock (tests/test_guest_transport.py's
FakeHost: real VhostVirtqueues + a VsockCore at CID 2) over bytearray guest RAM."""
from __future__ import annotations

import errno
import threading
import time
from types import SimpleNamespace

import pytest

from guest.kernel import Kernel
from guest.ram import GuestRAM
from guest.vsock.services import (CHARGEN_CYCLE, Service, chargen_line, parse_service,
                                  run_user_function, start_services)
from guest.vsock.socket import SHUT_WR, GuestVsock
from guest.vsock.transport import VirtioVsockTransport
from shared.constants import VMADDR_CID_ANY
from shared.vsock.proto import SockState
from tests.test_guest_transport import GUEST_CID, HOST_CID, FakeHost, FakeVdev

TIMEOUT = 5.0


class HostRunner:
    """Pumps the fake host on its own thread; host-side socket calls go through `call`."""

    def __init__(self, host: FakeHost):
        self.host = host
        self.core = host.core
        self._ev = threading.Event()
        self._stop = threading.Event()
        host.vdev.on_kick = lambda q: self._ev.set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-host")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._ev.wait(0.005)
            self._ev.clear()
            self.host.pump()

    def call(self, fn, *args):
        with self.host.lock:
            r = fn(*args)
        self._ev.set()
        return r

    def wait_until(self, pred, timeout: float = TIMEOUT):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.host.lock:
                r = pred()
            if r:
                return r
            time.sleep(0.001)
        raise AssertionError("host condition never became true")

    def listen(self, port: int):
        def go():
            sk = self.core.socket()
            self.core.bind(sk, port)
            self.core.listen(sk, 16)
            return sk
        return self.call(go)

    def accept(self, lst):
        return self.wait_until(lambda: self.core.accept(lst))

    def connect(self, port: int):
        sk = self.call(lambda: self._connect(port))
        self.wait_until(lambda: sk.state != SockState.SYN_SENT)
        assert sk.state == SockState.ESTABLISHED, sk
        return sk

    def _connect(self, port):
        sk = self.core.socket()
        self.core.connect(sk, GUEST_CID, port)
        return sk

    def sendall(self, sk, data: bytes, timeout: float = TIMEOUT) -> None:
        off = 0
        end = time.monotonic() + timeout
        while off < len(data):
            assert time.monotonic() < end, "host send stalled"
            n = self.call(self.core.send, sk, data[off:])
            off += n
            if not n:
                time.sleep(0.001)

    def recv_exact(self, sk, n: int, timeout: float = TIMEOUT) -> bytes:
        buf = bytearray()
        end = time.monotonic() + timeout
        while len(buf) < n:
            assert time.monotonic() < end, f"host got {len(buf)} of {n} bytes"
            try:
                chunk = self.call(self.core.recv, sk, n - len(buf))
            except BlockingIOError:
                time.sleep(0.001)
                continue
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def stop(self) -> None:
        self._stop.set()
        self._ev.set()
        self._thread.join(2)


def wait_blocked(sock, timeout: float = 10.0) -> None:
    """Wait until a thread is blocked on the socket's wait queue (its Condition has a waiter):
    synchronise on the state itself instead of sleeping and hoping."""
    end = time.monotonic() + timeout
    while not sock.waiting:
        assert time.monotonic() < end, "no thread blocked on the socket"
        time.sleep(0.001)


@pytest.fixture
def g():
    size = 8 << 20
    ram = GuestRAM("unused", size, buf=bytearray(size))
    kernel = Kernel("test-guest")
    kernel.start()
    vdev = FakeVdev(ram)
    t = VirtioVsockTransport(kernel, vdev, ram)
    t.probe()
    host = FakeHost(vdev)
    runner = HostRunner(host)
    vs = GuestVsock(t)
    env = SimpleNamespace(ram=ram, kernel=kernel, vdev=vdev, t=t, host=runner, vs=vs)
    try:
        yield env
    finally:
        runner.stop()
        t.remove()
        kernel.stop()
        assert kernel.work_errors == 0
        assert ram.alloc.in_use == 0


def connected(g, port=1234):
    lst = g.host.listen(port)
    s = g.vs.socket()
    s.settimeout(TIMEOUT)
    s.connect((HOST_CID, port))
    return s, g.host.accept(lst)


# --- connect / accept / data -------------------------------------------------------------------
def test_blocking_connect_and_bulk_data_both_ways(g):
    s, hsk = connected(g)
    assert s.getpeername() == (HOST_CID, 1234)
    assert s.getsockname()[0] == GUEST_CID and s.local_cid == g.vs.local_cid == GUEST_CID
    up = bytes(range(251)) * 2400                 # ~600 KB: more than the 256 KiB credit
    sender = threading.Thread(target=s.sendall, args=(up,))
    sender.start()
    assert g.host.recv_exact(hsk, len(up)) == up
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    down = bytes(reversed(up))[:300_000]
    hs = threading.Thread(target=g.host.sendall, args=(hsk, down))
    hs.start()
    got = bytearray()
    while len(got) < len(down):
        chunk = s.recv(65536)
        assert chunk
        got += chunk
    hs.join(TIMEOUT)
    assert bytes(got) == down
    buf = bytearray(10)
    g.host.call(g.host.core.send, hsk, b"0123456789")
    assert s.recv_into(buf, 4) == 4 and bytes(buf[:4]) == b"0123"
    s.close()


def test_blocking_accept(g):
    server = g.vs.create_server(5000)
    server.settimeout(TIMEOUT)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=server.accept()))
    t.start()
    wait_blocked(server)                               # accept is now waiting
    hsk = g.host.connect(5000)
    t.join(TIMEOUT)
    conn, addr = result["r"]
    assert addr == (HOST_CID, hsk.local_port)
    g.host.call(g.host.core.send, hsk, b"hello guest")
    conn.settimeout(TIMEOUT)
    assert conn.recv(100) == b"hello guest"
    conn.sendall(b"hello host")
    assert g.host.recv_exact(hsk, 10) == b"hello host"
    conn.close()
    server.close()


def test_connect_refused(g):
    s = g.vs.socket()
    with pytest.raises(ConnectionRefusedError) as ei:
        s.connect((HOST_CID, 999))
    assert ei.value.errno == errno.ECONNREFUSED
    assert s.connect_ex((HOST_CID, 999)) == errno.ECONNREFUSED
    s.close()


def test_connect_timeout_uses_socket_timeout_or_connect_timeout(g):
    g.host.host.tx_paused = True                     # the REQUEST is never answered
    s = g.vs.socket()
    s.settimeout(0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        s.connect((HOST_CID, 1))
    assert ei.value.errno == errno.ETIMEDOUT and 0.15 < time.monotonic() - t0 < 2
    assert s.state == SockState.CLOSE
    s2 = g.vs.socket()
    s2.connect_timeout = 0.2                          # no socket timeout: connect_timeout rules
    t0 = time.monotonic()
    assert s2.connect_ex((HOST_CID, 1)) == errno.ETIMEDOUT
    assert 0.15 < time.monotonic() - t0 < 2
    s.close()
    s2.close()


# --- non-blocking and timeouts -----------------------------------------------------------------
def test_nonblocking_connect_recv_send_accept(g):
    lst = g.host.listen(1234)
    s = g.vs.socket()
    s.setblocking(False)
    assert not s.getblocking() and s.gettimeout() == 0.0
    with pytest.raises(BlockingIOError) as ei:
        s.connect((HOST_CID, 1234))
    assert ei.value.errno == errno.EINPROGRESS
    g.host.wait_until(lambda: s.state == SockState.ESTABLISHED)
    assert s.connect_ex((HOST_CID, 1234)) == errno.EISCONN
    hsk = g.host.accept(lst)
    with pytest.raises(BlockingIOError) as ei:
        s.recv(10)
    assert ei.value.errno == errno.EAGAIN
    # shrink the host's receive buffer: the guest gets 128 bytes of credit
    g.host.call(g.host.core.set_buffer_size, hsk, 128)
    g.host.wait_until(lambda: s._sk.peer_buf_alloc == 128)
    assert s.send(b"x" * 1000) == 128
    with pytest.raises(BlockingIOError) as ei:
        s.send(b"x" * 1000)
    assert ei.value.errno == errno.EAGAIN
    server = g.vs.create_server(6000)
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    s.close()


def test_nonblocking_connect_refused_is_reported_later(g):
    s = g.vs.socket()
    s.setblocking(False)
    assert s.connect_ex((HOST_CID, 4444)) == errno.EINPROGRESS
    g.host.wait_until(lambda: s.state == SockState.CLOSE)
    assert s.connect_ex((HOST_CID, 4444)) == errno.ECONNREFUSED
    s.close()


def test_recv_and_send_timeouts(g):
    s, hsk = connected(g)
    s.settimeout(0.1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        s.recv(10)
    assert ei.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 >= 0.09
    g.host.call(g.host.core.set_buffer_size, hsk, 128)
    g.host.wait_until(lambda: s._sk.peer_buf_alloc == 128)
    with pytest.raises(TimeoutError):
        s.sendall(b"y" * 1000)                       # the host never reads
    s.close()


# --- errnos ------------------------------------------------------------------------------------
def test_errnos(g):
    vs = g.vs
    s = vs.socket()
    with pytest.raises(OSError) as ei:
        s.bind((77, 1000))
    assert ei.value.errno == errno.EADDRNOTAVAIL
    with pytest.raises(OSError) as ei:
        s.bind(("x", 1))
    assert ei.value.errno == errno.EINVAL
    s.bind((VMADDR_CID_ANY, 1000))
    s2 = vs.socket()
    with pytest.raises(OSError) as ei:
        s2.bind((GUEST_CID, 1000))
    assert ei.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as ei:
        s2.listen()                                   # not bound
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        s2.send(b"x")
    assert ei.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as ei:
        s2.getpeername()
    assert ei.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as ei:
        s2.fileno()
    assert ei.value.errno == errno.EOPNOTSUPP
    s.listen(4)
    with pytest.raises(OSError) as ei:
        s.recv(1)
    assert ei.value.errno == errno.ENOTCONN
    s.close()
    s2.close()
    with pytest.raises(OSError) as ei:
        s2.recv(1)
    assert ei.value.errno == errno.EBADF
    c, hsk = connected(g)
    with pytest.raises(OSError) as ei:
        c.connect((HOST_CID, 1234))
    assert ei.value.errno == errno.EISCONN
    c.shutdown(SHUT_WR)
    with pytest.raises(BrokenPipeError) as ei:
        c.send(b"late")
    assert ei.value.errno == errno.EPIPE
    g.host.wait_until(lambda: hsk.peer_shutdown)      # the host saw SHUTDOWN(SEND)
    c.close()


def test_peer_close_is_eof_and_close_completes(g):
    s, hsk = connected(g)
    g.host.call(g.host.core.send, hsk, b"last words")
    g.host.call(g.host.core.release, hsk)            # SHUTDOWN(both)
    assert s.recv(100) == b"last words"
    assert s.recv(100) == b""
    s.close()                                          # peer shut both ways: RST at once
    g.host.wait_until(lambda: hsk not in g.host.core.lingering)
    with g.kernel.lock:
        assert not g.t.core.connected and not g.t.core.lingering


def test_transport_reset_wakes_blocked_recv(g):
    s, hsk = connected(g)
    s.settimeout(TIMEOUT)
    err = {}

    def reader():
        try:
            s.recv(10)
        except OSError as e:
            err["e"] = e
    t = threading.Thread(target=reader)
    t.start()
    wait_blocked(s)                                   # the reader is now blocked in recv
    g.host.call(g.host.host.send_event, 0)
    t.join(TIMEOUT)
    assert isinstance(err.get("e"), ConnectionResetError)
    s.close()


def test_close_from_another_thread_wakes_blocked_recv(g):
    s, hsk = connected(g)
    err = {}

    def reader():
        try:
            s.recv(10)
        except OSError as e:
            err["e"] = e
    t = threading.Thread(target=reader)
    t.start()
    wait_blocked(s)                                   # the reader is now blocked in recv
    s.close()
    t.join(TIMEOUT)
    assert err["e"].errno == errno.EBADF


def test_close_timeout_fires_on_kernel_timer(g):
    s, hsk = connected(g)
    with g.kernel.lock:
        g.t.core.close_timeout = 0.1
    g.host.host.tx_paused = True                      # the host never answers our SHUTDOWN
    s.close()
    with g.kernel.lock:
        assert s._sk in g.t.core.lingering
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        with g.kernel.lock:
            if not g.t.core.lingering:
                break
        time.sleep(0.01)
    with g.kernel.lock:
        assert not g.t.core.lingering and g.t.core.stats["resets_sent"] >= 1


def test_context_manager_closes(g):
    with g.vs.socket() as s:
        s.bind((VMADDR_CID_ANY, 2222))
    assert s.closed
    with g.vs.socket() as s2:
        s2.bind((VMADDR_CID_ANY, 2222))               # the port is free again


# --- services ----------------------------------------------------------------------------------
def test_parse_service():
    assert parse_service("echo=1234").port == 1234
    assert parse_service(" chargen ").port == 19
    assert parse_service("discard").port == 9
    for bad, what in [("", "empty"), ("ftp=21", "unknown service"), ("echo=", "no port"),
                      ("echo=abc", "not a decimal"), ("echo=-1", "not a decimal"),
                      ("echo=4294967295", "out of range")]:
        with pytest.raises(ValueError, match=what):
            parse_service(bad)


def test_echo_service_round_trip(g):
    svc = Service(g.vs, "echo=7000")
    try:
        hsk = g.host.connect(7000)
        msg = bytes(range(256)) * 100
        g.host.sendall(hsk, msg)
        assert g.host.recv_exact(hsk, len(msg)) == msg
        g.host.call(g.host.core.release, hsk)
    finally:
        svc.stop()
    assert svc.connections == 1


def test_discard_service(g):
    svc = Service(g.vs, "discard=7001")
    try:
        hsk = g.host.connect(7001)
        g.host.sendall(hsk, b"z" * 50_000)
        g.host.wait_until(lambda: hsk.peer_fwd_cnt == 50_000)   # the guest consumed it all
        with pytest.raises(BlockingIOError):
            g.host.call(g.host.core.recv, hsk, 10)            # and sent nothing back
        g.host.call(g.host.core.release, hsk)
    finally:
        svc.stop()


def test_chargen_pattern_and_service(g):
    line0 = chargen_line(0)
    assert len(line0) == 74 and line0.startswith(b' !"#$%') and line0.endswith(b"fg\r\n")
    assert chargen_line(1)[:3] == b'!"#' and chargen_line(95) == line0
    assert chargen_line(94)[:2] == b"~ "
    assert len(CHARGEN_CYCLE) == 95 * 74
    svc, = start_services(g.vs, ["chargen=7002"])
    try:
        hsk = g.host.connect(7002)
        n = len(CHARGEN_CYCLE) + 1000
        got = g.host.recv_exact(hsk, n)
        assert got == (CHARGEN_CYCLE * 2)[:n]
        g.host.call(g.host.core.release, hsk)
    finally:
        svc.stop()


def test_run_user_function(g):
    ok = run_user_function("builtins:repr", g.vs)
    ok.join(TIMEOUT)
    assert ok.error is None and "GuestVsock" in ok.result
    for spec, exc in [("json:dumps", TypeError), ("no_such_module_xyz:f", ImportError),
                      ("json:nope", AttributeError), ("missing-colon", ValueError)]:
        t = run_user_function(spec, g.vs)
        t.join(TIMEOUT)
        assert isinstance(t.error, exc), (spec, t.error)


def test_sink_and_source_services_in_the_guest(g):
    from guest.vsock.services import source_pattern
    sink, source = start_services(g.vs, ["sink=7003", "source=7004"])
    try:
        hsk = g.host.connect(7003)
        g.host.sendall(hsk, b"q" * 123_457)
        g.host.call(g.host.core.shutdown, hsk, SHUT_WR)
        assert g.host.recv_exact(hsk, 20) == b"123457\n"      # then EOF
        g.host.call(g.host.core.release, hsk)
        hsk = g.host.connect(7004)
        g.host.sendall(hsk, b"300000 65536\n")
        assert g.host.recv_exact(hsk, 300_001) == source_pattern(300_000)
        g.host.call(g.host.core.release, hsk)
    finally:
        sink.stop()
        source.stop()
