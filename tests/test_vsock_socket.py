"""The shared socket layer (shared/vsock/socket.py) and services (shared/vsock/services.py) over a
fake family: two VsockCores (CID 3 and CID 2) wired to each other in one process by a `Link`
whose thread carries packets both ways under the one lock, as a transport's worker would."""
from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections import deque

import pytest

from shared.vsock import services as svc
from shared.vsock.proto import SockState, VsockCore
from shared.vsock.socket import SHUT_WR, VsockFamily, reset_core

TIMEOUT = 5.0
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


class Link:
    """The wire between two cores: packets queue here and a thread delivers them (lock held)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.q: deque = deque()
        self.ev = threading.Event()
        self.paused = False
        self.sizes: list[tuple[int, int]] = []     # (source CID, RW payload size) carried
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="link")
        self.thread.start()

    def sender(self, family):
        def send_pkt(pkt):
            # A payload may view the sender's buffer only during this call (the core's
            # contract): a wire keeps its own copy, as a transport copies into guest RAM.
            if type(pkt.payload) is not bytes:
                pkt.payload = bytes(pkt.payload)
            self.q.append((family, pkt))
            self.ev.set()
            return pkt.len
        return send_pkt

    def _run(self):
        while not self.stop.is_set():
            self.ev.wait(0.01)
            self.ev.clear()
            with self.lock:
                if self.paused:
                    continue
                while self.q:
                    src, pkt = self.q.popleft()
                    if pkt.len:
                        self.sizes.append((pkt.src_cid, pkt.len))
                    dst = src.peer
                    if dst.up and dst.current_core is not None:
                        dst.current_core.recv_pkt(pkt)

    def close(self):
        self.stop.set()
        self.ev.set()
        self.thread.join(TIMEOUT)


class FakeFamily(VsockFamily):
    """The family interface over one core of a Link; `replace_core` is a device reset."""

    what = "fake vsock link"

    def __init__(self, link: Link, cid: int):
        self.link = link
        self.lock = link.lock
        self.cid = cid
        self.peer = None
        self._up = True
        self._core = self._new_core()
        self.timers: list[threading.Timer] = []

    def _new_core(self):
        return VsockCore(self.cid, self.link.sender(self), credit_policy="low-space")

    current_core = property(lambda self: self._core)
    up = property(lambda self: self._up)
    local_cid = property(lambda self: self.cid)

    def call_later(self, delay, fn):
        def locked():
            with self.lock:
                fn()
        t = threading.Timer(delay, locked)
        t.daemon = True
        t.start()
        self.timers.append(t)
        return t

    def cancel_pkt(self, sk):
        with self.lock:
            keep = [(f, p) for f, p in self.link.q if p.owner is not sk]
            n = len(self.link.q) - len(keep)
            self.link.q = deque(keep)
            return n

    def replace_core(self):
        with self.lock:
            old, self._core = self._core, self._new_core()
            reset_core(old)


@pytest.fixture
def pair():
    link = Link()
    g, h = FakeFamily(link, 3), FakeFamily(link, 2)
    g.peer, h.peer = h, g
    yield g, h, link
    link.close()
    for f in (g, h):
        for t in f.timers:
            t.cancel()


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


def recv_all(s, limit=1 << 30) -> bytes:
    out = bytearray()
    while len(out) < limit:
        d = s.recv(1 << 16)
        if not d:
            break
        out += d
    return bytes(out)


# --- the socket API ------------------------------------------------------------------------------
def test_connect_accept_and_bulk_both_ways_with_recv_into(pair):
    g, h, _ = pair
    srv = h.create_server(5000)
    srv.settimeout(TIMEOUT)
    t, box = in_thread(srv.accept)
    c = g.create_connection((2, 5000), timeout=TIMEOUT)
    t.join(TIMEOUT)
    conn, peer = box["r"]
    assert peer == c.getsockname() and peer[0] == 3
    assert c.getpeername() == (2, 5000) and conn.getsockname() == (2, 5000)
    assert c.local_cid == 3 and conn.local_cid == 2
    conn.settimeout(TIMEOUT)
    data = os.urandom(1 << 20)               # 1 MiB: four times the 256 KiB credit
    st, _ = in_thread(c.sendall, data)
    buf = bytearray(1 << 16)
    h_ = hashlib.sha256()
    got = 0
    while got < len(data):
        n = conn.recv_into(buf)
        assert n
        h_.update(memoryview(buf)[:n])
        got += n
    st.join(TIMEOUT)
    assert h_.digest() == hashlib.sha256(data).digest()
    conn.sendall(b"0123456789")
    mv = memoryview(bytearray(10))
    c.settimeout(TIMEOUT)
    assert c.recv_into(mv, 4) == 4 and bytes(mv[:4]) == b"0123"
    with pytest.raises(ValueError):
        c.recv_into(bytearray(2), 5)
    assert c.recv(100) == b"456789"
    c.close()
    conn.close()
    srv.close()


def test_eof_after_peer_shutdown_and_close(pair):
    g, h, _ = pair
    srv = h.create_server(5001)
    c = g.create_connection((2, 5001), timeout=TIMEOUT)
    srv.settimeout(TIMEOUT)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)
    c.sendall(b"last words")
    c.shutdown(SHUT_WR)
    assert recv_all(conn) == b"last words"
    conn.sendall(b"reply")
    conn.close()
    c.settimeout(TIMEOUT)
    assert recv_all(c) == b"reply"
    c.close()


def test_refused_timeouts_and_nonblocking(pair):
    g, h, link = pair
    s = g.socket()
    assert s.connect_ex((2, 999)) == errno.ECONNREFUSED
    s.close()
    srv = h.create_server(5002)
    srv.setblocking(False)
    with pytest.raises(BlockingIOError):
        srv.accept()
    srv.settimeout(0.05)
    with pytest.raises(TimeoutError):
        srv.accept()
    c = g.create_connection((2, 5002), timeout=TIMEOUT)
    c.settimeout(0.05)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        c.recv(1)
    assert ei.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 >= 0.04
    c.setblocking(False)
    assert not c.getblocking()
    with pytest.raises(BlockingIOError):
        c.recv(1)
    c.close()
    srv.close()
    # a connect nobody answers: ETIMEDOUT, and its REQUEST never leaves (cancel_pkt)
    link.paused = True
    s = g.socket()
    s.settimeout(0.1)
    with pytest.raises(TimeoutError):
        s.connect((2, 5003))
    assert s.state == SockState.CLOSE
    with g.lock:
        assert not [p for _, p in link.q if p.owner is s._sk]
    s.close()


def test_device_reset_fails_sockets_cleanly(pair):
    g, h, _ = pair
    srv = h.create_server(5004)
    srv.settimeout(TIMEOUT)
    c = g.create_connection((2, 5004), timeout=TIMEOUT)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)
    srv2 = h.create_server(5005)
    srv2.settimeout(TIMEOUT)
    tr, rbox = in_thread(conn.recv, 10)
    ta, abox = in_thread(srv2.accept)
    end = time.monotonic() + TIMEOUT          # both are blocked in their calls
    while not (conn.waiting and srv2.waiting):
        assert time.monotonic() < end, "the calls never blocked"
        time.sleep(0.001)
    h.replace_core()                          # the host side's device was reset
    tr.join(TIMEOUT)
    ta.join(TIMEOUT)
    assert isinstance(rbox.get("e"), ConnectionResetError), rbox
    assert abox["e"].errno == errno.ENODEV, abox
    for call in (lambda: srv.listen(1), lambda: srv2.accept(), lambda: conn.send(b"x")):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno in (errno.ENODEV, errno.ECONNRESET)
    for s in (srv, srv2, conn):
        s.close()                             # closing a stale socket is quiet
    # the new core serves again: listen on the same port, connect from the guest
    srv3 = h.create_server(5004)
    srv3.settimeout(TIMEOUT)
    c2 = g.create_connection((2, 5004), timeout=TIMEOUT)
    conn2, _ = srv3.accept()
    c2.sendall(b"again")
    conn2.settimeout(TIMEOUT)
    assert conn2.recv(10) == b"again"
    h._up = False
    with pytest.raises(OSError) as ei:
        h.socket()
    assert ei.value.errno == errno.ENODEV
    for s in (c, c2, conn2, srv3):
        s.close()


# --- services ------------------------------------------------------------------------------------
def test_parse_service_new_kinds():
    assert svc.parse_service("sink=5").name == "sink"
    assert svc.parse_service("source=6").port == 6
    with pytest.raises(ValueError, match="no well-known port"):
        svc.parse_service("sink")
    assert svc.parse_source_request(b"100 7") == (100, 7)
    for bad in (b"", b"100", b"100 0", b"-1 4", b"1 2 3", b"x 4", b"\xff 1", b"1 99999999999"):
        assert svc.parse_source_request(bad) is None, bad
    assert svc.source_pattern(10, 5) == (svc.CHARGEN_CYCLE * 2)[5:15]
    assert len(svc.source_pattern(3 * len(svc.CHARGEN_CYCLE) + 7)) == 3 * len(svc.CHARGEN_CYCLE) + 7


def test_sink_counts_bytes_until_eof(pair):
    g, h, _ = pair
    s = svc.Service(h, "sink=6000")
    try:
        c = g.create_connection((2, 6000), timeout=TIMEOUT)
        n = 700_001
        c.sendall(os.urandom(n))
        c.shutdown(SHUT_WR)
        assert recv_all(c) == b"%d\n" % n
        c.close()
    finally:
        s.stop()


@pytest.mark.parametrize("n,ws", [(0, 1), (1000, 1), (300_000, 4096), (1 << 20, 65536),
                                  (200_003, 100_000)])
def test_source_sends_n_pattern_bytes_in_writes(pair, n, ws):
    g, h, link = pair
    s = svc.Service(h, "source=6001")
    try:
        c = g.create_connection((2, 6001), timeout=TIMEOUT)
        c.sendall(b"%d %d\n" % (n, ws))
        got = recv_all(c)
        assert len(got) == n
        assert hashlib.sha256(got).digest() == hashlib.sha256(svc.source_pattern(n)).digest()
        c.close()
    finally:
        s.stop()
    if n:
        assert max(n for cid, n in link.sizes if cid == 2) <= ws


@pytest.mark.parametrize("line", [b"hello\n", b"10\n", b"10 0\n", b"x" * 80, b"5 5"])
def test_source_malformed_request_closes_without_sending(pair, line):
    g, h, _ = pair
    s = svc.Service(h, "source=6002")
    try:
        c = g.create_connection((2, 6002), timeout=TIMEOUT)
        c.sendall(line)
        if not line.endswith(b"\n") and len(line) < svc.SOURCE_LINE_MAX:
            c.shutdown(SHUT_WR)               # EOF before the newline
        assert recv_all(c) == b""
        c.close()
    finally:
        s.stop()


def test_echo_reads_in_64k_chunks_and_services_work_from_either_side(pair):
    g, h, link = pair
    s_host = svc.Service(h, "echo=7000")
    s_guest = svc.Service(g, "echo=7000")
    try:
        for fam, cid in ((g, 2), (h, 3)):
            c = fam.create_connection((cid, 7000), timeout=TIMEOUT)
            data = os.urandom(500_000)
            t, _ = in_thread(c.sendall, data)
            got = bytearray()
            while len(got) < len(data):
                d = c.recv(1 << 16)
                assert d
                got += d
            t.join(TIMEOUT)
            assert got == data
            c.close()
        assert svc.RECV_SIZE == 65536
        assert max(n for _, n in link.sizes) > 4096    # echoed in large pieces, not 4 KiB reads
    finally:
        s_host.stop()
        s_guest.stop()


def test_check_function():
    assert svc.check_function("json:dumps") is None
    assert "must look like" in svc.check_function("json")
    assert "cannot import" in svc.check_function("no_such_mod_xyz:f")
    assert "has no function" in svc.check_function("json:nope")
    assert "not callable" in svc.check_function("json.decoder:NaN")
