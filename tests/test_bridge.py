"""The hybrid vsock bridge (host/vsock/bridge.py) and the host API (host/vsock/api.py), for real:
a VhostWorker thread runs a VhostVsock + bridge on Unix sockets in the test's run dir, and a fake
guest (guest/virtqueue.py rings on bytearray RAM + a VsockCore at CID 3) is pumped by a thread of
its own, kicked through LocalDoorbells that the worker polls and interrupted through another.
"""
from __future__ import annotations

import errno
import gc
import os
import socket
import stat
import threading
import time

import pytest

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

from host.vsock.api import VsockHost
from host.vsock import runner as vsock_runner
from host.vsock.bridge import HOST_PORT_FIRST, BridgeConn, parse_connect
from host.vsock.device import VhostVsock
from host.worker import VhostWorker
from shared.doorbell import LocalDoorbell
from shared.vsock.proto import SHUT_WR, SockState

from tests.test_host_vsock import GUEST_CID, FakeGuest
from tests.waiting import wait_until

TIMEOUT = 5.0


class Harness:
    """Device + bridge on a real worker thread; the guest pumped by its own thread."""

    def __init__(self, run_dir, dialect: str = "firecracker"):
        self.worker = VhostWorker("t-vsock")
        self.dev = VhostVsock(GUEST_CID)
        self.dev.worker = self.worker
        vsock_runner.attach(self.dev, self.worker, run_dir=run_dir, dialect=dialect)
        self.kicks = [LocalDoorbell() for _ in range(3)]
        self.g = FakeGuest(self.dev, kick=lambda i: self.kicks[i].ring(), start=False)
        self.glock = threading.Lock()
        for i, db in enumerate(self.kicks):
            self.worker.add_kick(db, self._kick_fn(i), name=f"kick{i}")
        self._stop = threading.Event()
        self.wthread = threading.Thread(target=self.worker.run, daemon=True)
        self.gthread = threading.Thread(target=self._guest_loop, daemon=True)
        self.wthread.start()
        self.on_worker(self.dev.start)
        with self.glock:
            self.g.post_rx()
        self.gthread.start()
        self.host = VsockHost(run_dir)
        self.bridge = self.dev.bridge
        assert self.bridge is not None

    def _kick_fn(self, i):
        def fn():
            with self.dev.lock:
                self.dev.kick_received(i)
        return fn

    def on_worker(self, fn):
        done = threading.Event()
        box = []

        def run():
            try:
                with self.dev.lock:
                    box.append(fn())
            finally:
                done.set()
        self.worker.queue_work(run)
        assert done.wait(TIMEOUT), "worker did not run the work"
        return box[0] if box else None

    def _guest_loop(self):
        while not self._stop.is_set():
            self.g.irq.wait(0.01)
            with self.glock:
                while self.g.pump():
                    pass

    def guest(self, fn):
        """Run fn(core) under the guest's lock and nudge its loop (to send what fn queued)."""
        with self.glock:
            r = fn(self.g.core)
        self.g.irq.ring()
        return r

    def close(self):
        self.host.close()
        self._stop.set()
        self.gthread.join(TIMEOUT)
        if self.wthread.is_alive():
            self.on_worker(self.dev.close)
        self.worker.stop()
        self.wthread.join(TIMEOUT)
        assert not self.wthread.is_alive() and not self.gthread.is_alive()
        assert self.worker.work_errors == 0, "a work item raised on the worker thread"


@pytest.fixture
def harness(run_dir):
    made = []

    def make(dialect="firecracker"):
        h = Harness(run_dir, dialect)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()
    assert not list(run_dir.glob("vsock-*.sock")), "bridge socket file left behind"


def guest_listen(h: Harness, port: int):
    def f(core):
        sk = core.socket()
        core.bind(sk, port)
        core.listen(sk, 8)
        return sk
    return h.guest(f)


def guest_accept(h: Harness, lst):
    return wait_until(lambda: h.guest(lambda c: c.accept(lst)), what="guest accept")


def guest_recv_exact(h: Harness, sk, n: int) -> bytes:
    buf = b""

    def step():
        nonlocal buf
        try:
            buf += h.guest(lambda c: c.recv(sk, n - len(buf)))
        except BlockingIOError:
            pass
        return len(buf) >= n
    wait_until(step, what=f"{n} bytes in the guest")
    return buf


def guest_try_recv(h: Harness, sk, n: int) -> bytes | None:
    """One non-blocking recv in the guest: None when nothing is queued yet, b"" at EOF."""
    try:
        return h.guest(lambda c: c.recv(sk, n))
    except BlockingIOError:
        return None


def guest_send_all(h: Harness, sk, data: bytes) -> None:
    off = 0

    def step():
        nonlocal off
        off += h.guest(lambda c: c.send(sk, data[off:]))
        return off >= len(data)
    wait_until(step, timeout=20, what="guest send")


def recv_exact(s: socket.socket, n: int) -> bytes:
    s.settimeout(TIMEOUT)
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        assert d, f"EOF after {len(buf)} of {n} bytes"
        buf += d
    return buf


# --- parsing ------------------------------------------------------------------------------------
def test_parse_connect_dialects():
    assert parse_connect(b"CONNECT 1234") == 1234
    assert parse_connect(b"CONNECT  52 ") == 52
    assert parse_connect(b"connect 1234") is None
    assert parse_connect(b"connect 1234", "vhost-device-vsock") == 1234
    for bad in (b"CONNECT", b"CONNECT -1", b"CONNECT 0x10", b"CONNECT 4294967295",
                b"CONNECT 99999999999", b"CONNECT 1 2", b"HELLO 1", b"CONNECT \xff1", b""):
        assert parse_connect(bad) is None, bad


# --- host -> guest --------------------------------------------------------------------------------
def test_listener_file_and_mode(harness, run_dir):
    h = harness()
    st = os.stat(run_dir / f"vsock-{GUEST_CID}.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_connect_ok_handshake_and_data_both_ways(harness):
    h = harness()
    lst = guest_listen(h, 1234)
    s, ok = h.host.open(GUEST_CID, 1234)
    assert ok == HOST_PORT_FIRST == 1073741824            # Firecracker: first host-side port
    child = guest_accept(h, lst)
    assert child.remote_cid == 2 and child.remote_port == ok
    s.sendall(b"ping from host")
    assert guest_recv_exact(h, child, 14) == b"ping from host"
    payload = os.urandom(300_000)                         # > one 64 KiB packet, > 4 KiB rx buffers
    guest_send_all(h, child, payload)
    assert recv_exact(s, len(payload)) == payload
    s2, ok2 = h.host.open(GUEST_CID, 1234)
    assert ok2 == HOST_PORT_FIRST + 1                      # round robin
    st = h.on_worker(h.dev.get_stats)
    assert st["connections"] == 2 and st["bridge"]["connections_in"] == 2
    s.close()
    s2.close()
    assert h.bridge.stats["connections_in"] == 2
    assert h.bridge.stats["bytes_to_guest"] == 14
    assert h.bridge.stats["bytes_to_host"] == len(payload)


def test_vhost_device_vsock_dialect_answers_guest_port(harness):
    h = harness("vhost-device-vsock")
    lst = guest_listen(h, 4321)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(h.bridge.path))
    s.sendall(b"connect 4321\nearly data")             # keyword case-insensitive; data may follow
    assert recv_exact(s, 8) == b"OK 4321\n"
    child = guest_accept(h, lst)
    assert guest_recv_exact(h, child, 10) == b"early data"
    s.close()


def test_connect_to_port_without_guest_listener_is_refused(harness):
    h = harness()
    with pytest.raises(ConnectionRefusedError, match="refused"):
        h.host.connect(GUEST_CID, 999)
    assert h.bridge.stats["refused_in"] == 1
    wait_until(lambda: not h.bridge.conns, what="connection forgotten")


def test_connect_to_missing_guest_is_refused_clearly(run_dir):
    with pytest.raises(ConnectionRefusedError, match="no vsock bridge for guest CID 77"):
        VsockHost(run_dir).connect(77, 1)


@pytest.mark.parametrize("line", [b"HELLO 1234\n", b"CONNECT 1234 5\n", b"connect 1234\n",
                                  b"CONNECT " + b"1" * 40, b"CONNECT x\n"])
def test_malformed_connect_line_closes(harness, line):
    h = harness()
    guest_listen(h, 1234)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(h.bridge.path))
    try:
        s.sendall(line)
    except BrokenPipeError:
        pass
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    s.close()
    assert h.bridge.stats["malformed"] == 1 and h.bridge.stats["connections_in"] == 0


def test_half_close_from_host_then_guest_closes(harness):
    h = harness()
    lst = guest_listen(h, 1234)
    s = h.host.connect(GUEST_CID, 1234)
    child = guest_accept(h, lst)
    s.sendall(b"last words")
    s.shutdown(socket.SHUT_WR)
    assert guest_recv_exact(h, child, 10) == b"last words"
    wait_until(lambda: guest_try_recv(h, child, 10) == b"", what="guest EOF")
    guest_send_all(h, child, b"reply after EOF")           # the other direction still works
    assert recv_exact(s, 15) == b"reply after EOF"
    h.guest(lambda c: c.release(child))
    s.settimeout(TIMEOUT)
    assert s.recv(10) == b""
    wait_until(lambda: not h.bridge.conns, what="bridge connection released")
    s.close()


def test_closed_connections_are_freed_without_the_cyclic_gc(harness):
    """A closed BridgeConn must not wait for a full GC: its callables refer back to it, and the
    cyclic GC counts objects, not bytes, so each one's 256 KiB read buffer piled up (a stress
    run's device process grew by 80 MiB)."""
    h = harness()
    lst = guest_listen(h, 1234)
    gc.collect()
    gc.disable()
    try:
        for i in range(4):
            s, _ = h.host.open(GUEST_CID, 1234)
            child = guest_accept(h, lst)
            s.sendall(b"x" * 5000)
            assert guest_recv_exact(h, child, 5000) == b"x" * 5000
            guest_send_all(h, child, b"y" * 3000)
            assert recv_exact(s, 3000) == b"y" * 3000
            s.close()
            h.guest(lambda c: c.release(child))
            wait_until(lambda: not h.bridge.conns, what="bridge connection released")
        wait_until(lambda: not [o for o in gc.get_objects() if type(o) is BridgeConn],
                 what="closed bridge connections freed by reference counting")
    finally:
        gc.enable()


# --- guest -> host --------------------------------------------------------------------------------
def test_guest_connects_to_host_listener(harness, run_dir):
    h = harness()
    lsock = h.host.listen(GUEST_CID, 5000)
    assert (run_dir / f"vsock-{GUEST_CID}.sock_5000").exists()
    sk = h.guest(lambda c: c.socket())
    h.guest(lambda c: c.connect(sk, 2, 5000))
    lsock.settimeout(TIMEOUT)
    conn, _ = lsock.accept()
    wait_until(lambda: sk.state == SockState.ESTABLISHED, what="guest connected")
    guest_send_all(h, sk, b"hello from the guest")
    assert recv_exact(conn, 20) == b"hello from the guest"
    conn.sendall(b"hi guest")
    assert guest_recv_exact(h, sk, 8) == b"hi guest"
    h.guest(lambda c: c.shutdown(sk, SHUT_WR))
    conn.settimeout(TIMEOUT)
    assert conn.recv(10) == b""                              # guest's SEND shutdown -> EOF
    conn.sendall(b"still open")
    assert guest_recv_exact(h, sk, 10) == b"still open"
    conn.close()                                             # host side done too: both closed
    wait_until(lambda: not h.bridge.conns, what="bridge connection released")
    assert h.bridge.stats["connections_out"] == 1
    h.host.close()
    assert not (run_dir / f"vsock-{GUEST_CID}.sock_5000").exists()


def test_guest_connect_without_host_listener_gets_rst(harness, run_dir):
    h = harness()
    sk = h.guest(lambda c: c.socket())
    h.guest(lambda c: c.connect(sk, 2, 5001))
    wait_until(lambda: sk.state == SockState.CLOSE, what="connect refused")
    assert sk.err == errno.ECONNREFUSED
    assert h.bridge.stats["refused_out"] == 1


# --- flow control ---------------------------------------------------------------------------------
def test_slow_unix_reader_holds_back_the_guest(harness):
    """Backpressure: the bridge reads from the core only as fast as the Unix side takes it, so the
    host core's receive buffer fills, the guest's credit runs out, and the guest stops sending."""
    h = harness()
    lsock = h.host.listen(GUEST_CID, 6000)
    sk = h.guest(lambda c: c.socket())
    h.guest(lambda c: c.connect(sk, 2, 6000))
    lsock.settimeout(TIMEOUT)
    conn, _ = lsock.accept()
    wait_until(lambda: sk.state == SockState.ESTABLISHED, what="guest connected")
    total = 4 << 20
    data = bytes(range(256)) * (total // 256)
    sender = threading.Thread(target=guest_send_all, args=(h, sk, data), daemon=True)
    sender.start()
    # Nobody reads the Unix socket: the guest stalls well short of the total.
    last = -1
    for _ in range(200):
        time.sleep(0.05)
        now = sk.tx_cnt
        if now == last:
            break
        last = now
    stalled_at = sk.tx_cnt
    assert 0 < stalled_at < total, stalled_at
    (c,) = list(h.bridge.conns)
    host_sk = c.sk
    assert host_sk.rx_bytes > 0                   # data waits in the host core: not read early
    assert host_sk.rx_bytes <= host_sk.buf_alloc
    assert h.bridge.stats["bytes_to_host"] < total
    assert h.guest(lambda core: core.has_space(sk)) == 0    # no credit left
    # Now read: everything arrives, intact and in order.
    assert recv_exact(conn, total) == data
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    assert h.bridge.stats["bytes_to_host"] == total
    conn.close()


def test_connect_times_out_when_the_guest_does_not_answer(harness):
    h = harness()
    h.bridge.connect_timeout = 0.3
    with h.glock:                                    # the guest is frozen: no RESPONSE, no RST
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            h.host.connect(GUEST_CID, 1234)
        assert time.monotonic() - t0 < 3
    assert h.bridge.stats["refused_in"] == 1
    wait_until(lambda: not h.bridge.conns, what="connection forgotten")


def test_device_reset_closes_bridged_connections_and_listener(harness, run_dir):
    h = harness()
    lst = guest_listen(h, 1234)
    s = h.host.connect(GUEST_CID, 1234)
    guest_accept(h, lst)
    h.on_worker(h.dev.reset)
    s.settimeout(TIMEOUT)
    assert s.recv(10) == b""
    assert not (run_dir / f"vsock-{GUEST_CID}.sock").exists()
    assert h.dev.bridge is None and not h.dev.running
    s.close()


# --- guest -> Unix from lent guest buffers ------------------------------------------------------
def lend_tx(h: Harness) -> None:
    """The guest puts each RW payload in a descriptor of its own after the 44-byte header (the
    Linux layout), so the device lends payloads of >= LEND_MIN bytes instead of copying them."""
    from tests.test_host_vsock import FakeGuest as FG, HDR_SIZE

    def xmit(pkt, **kw):
        raw = pkt.pack()
        return FG.add_tx(h.g, raw, split=HDR_SIZE if len(raw) > HDR_SIZE else None)
    h.g.xmit = xmit


def guest_connect_to_host(h: Harness, port: int):
    lsock = h.host.listen(GUEST_CID, port)
    sk = h.guest(lambda c: c.socket())
    h.guest(lambda c: c.connect(sk, 2, port))
    lsock.settimeout(TIMEOUT)
    conn, _ = lsock.accept()
    wait_until(lambda: sk.state == SockState.ESTABLISHED, what="guest connected")
    return sk, conn


def mixed_payload(total: int) -> tuple[bytes, list[int]]:
    """Random bytes and the sizes the guest writes them in: lent (>= 4 KiB) and copied pieces."""
    data = os.urandom(total)
    sizes, left, i = [], total, 0
    pattern = (65536, 100, 5000, 70000, 4096, 1, 30000)
    while left:
        n = min(left, pattern[i % len(pattern)])
        sizes.append(n)
        left -= n
        i += 1
    return data, sizes


def test_slow_unix_reader_partial_writes_keep_lent_bytes_intact_and_in_order(harness):
    """guest -> Unix writes views of the guest's lent tx buffers: a partial write must keep the
    unsent tail (and its loan) for later, every byte arrives once and in order, and every lent
    tx buffer goes back to the guest once written."""
    h = harness()
    lend_tx(h)
    sk, conn = guest_connect_to_host(h, 6100)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data, sizes = mixed_payload(3 << 20)

    def send():
        off = 0
        for n in sizes:
            guest_send_all(h, sk, data[off:off + n])
            off += n
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # Nobody reads yet: the bridge stalls on a partial write, holding a lent piece.
    (c,) = wait_until(lambda: list(h.bridge.conns), what="bridged connection")
    wait_until(lambda: any(p[1] is not None for p in list(c.to_unix)), what="a lent piece waiting")
    assert h.dev.loans > 0
    conn.settimeout(TIMEOUT)
    got = bytearray()
    while len(got) < len(data):        # a slow reader: small reads, now and then a pause
        d = conn.recv(3000)
        assert d, f"EOF after {len(got)} bytes"
        got += d
        if len(got) % 7 == 0:
            time.sleep(0.001)
    assert bytes(got) == data
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    assert h.bridge.stats["bytes_to_host"] == len(data)
    wait_until(lambda: h.dev.loans == 0 and not h.dev.tx_order, what="every lent tx buffer back")
    conn.close()


def test_closing_with_unwritten_lent_pieces_gives_the_guest_buffers_back(harness):
    """A Unix peer that goes away while lent pieces wait to be written: the connection closes
    and every lent tx buffer goes back to the guest (no view of guest RAM outlives it)."""
    h = harness()
    lend_tx(h)
    sk, conn = guest_connect_to_host(h, 6101)
    data, _ = mixed_payload(4 << 20)        # more than the Unix socket and the core buffer hold

    def send():
        off = 0
        while off < len(data):
            try:
                off += h.guest(lambda core: core.send(sk, data[off:off + 65536]))
            except OSError:                 # the bridge reset the connection: done
                return
            time.sleep(0.0005)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    (c,) = wait_until(lambda: list(h.bridge.conns), what="bridged connection")
    wait_until(lambda: any(p[1] is not None for p in list(c.to_unix)), what="a lent piece waiting")
    conn.close()
    wait_until(lambda: not h.bridge.conns, what="bridge connection closed")
    wait_until(lambda: h.dev.loans == 0 and not h.dev.tx_order, what="every lent tx buffer back")
    assert not c.to_unix
    sender.join(TIMEOUT)


# --- Unix -> guest straight into rx buffers -------------------------------------------------------
def test_host_writer_never_overruns_a_guest_that_does_not_read(harness):
    """Unix -> guest reads straight into the guest's rx buffers (device.fill_rw), never more than
    the guest's credit: a guest that does not read gets exactly its buffer's worth, nothing is
    dropped, and once it reads, every byte arrives in order."""
    h = harness()
    lst = guest_listen(h, 1234)
    # A buffer that is no multiple of what one rx buffer holds: the last packet before the
    # credit runs out must be cut to the credit, not to the buffer.
    assert h.guest(lambda c: c.set_buffer_size(lst, 10_000)) == 10_000
    s = h.host.connect(GUEST_CID, 1234)
    child = guest_accept(h, lst)
    assert child.buf_alloc == 10_000
    filled = []
    real_fill = h.dev.fill_rw
    h.dev.fill_rw = lambda *a: filled.append(real_fill(*a)) or filled[-1]
    data = os.urandom(1 << 20)
    writer = threading.Thread(target=s.sendall, args=(data,), daemon=True)
    writer.start()
    wait_until(lambda: child.rx_bytes == child.buf_alloc, what="the guest's buffer full")
    time.sleep(0.1)                                   # nothing more may come
    assert child.rx_bytes == child.buf_alloc and child.rx_dropped_bytes == 0
    assert sum(n for n in filled if n) > 0            # straight into guest RAM, mostly
    assert guest_recv_exact(h, child, len(data)) == data
    writer.join(TIMEOUT)
    assert child.rx_dropped_bytes == 0 and h.bridge.stats["bytes_to_guest"] == len(data)
    s.close()
