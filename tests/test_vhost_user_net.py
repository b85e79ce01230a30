"""vhost-user-net in one process: the device-neutral runner (VhostUserBackend + NetKind) on a
thread, a frontend here with guest RAM in a memfd, the guest's virtio-net driver core on the
rings, eventfds for kicks and calls. Covers QEMU's order (SET_VRING_ENABLE before SET_FEATURES and
before the rings exist), the 12-byte header, the backend attached at the start and detached (kept
open) at the disconnect, and the next frontend served by the same backend. Plus the CLI pairing.
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guest.net.driver import VirtioNet
from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from host.__main__ import build_parser, vhost_user_net_pairs
from host.daemon import HostOptions
from host.net.backends.loopback import Loopback, Sink
from host.vhost_user import codec
from host.session import Region as MemRegion
from host.devices import NetKind
from host.vhost_user.runner import VhostUserBackend
from tests.waiting import wait_until
from shared.constants import VIRTIO_F_VERSION_1, bit
from shared.net.hdr import VIRTIO_NET_F_MRG_RXBUF
from shared.stats import read_all
from tests.procs import ROOT

RAM = 1 << 22
NUM = 256
MAC = bytes.fromhex("525400ee0001")
F_PROTOCOL = 1 << 30


def u64(v):
    return struct.pack("<Q", v)


def state(i, n):
    return struct.pack("<II", i, n)


class Frontend:
    """What QEMU does for -netdev vhost-user, with the guest driver in this process."""

    def __init__(self, path: Path, features: int = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)):
        self.fd = os.memfd_create("ve-vunet-test-ram")
        os.ftruncate(self.fd, RAM)
        self.map = mmap.mmap(self.fd, RAM)
        self.ram = GuestRAM("vunet-test", RAM, buf=self.map)
        self.vqs = []
        for i in (0, 1):
            d, a, u = VirtQueue.alloc_rings(self.ram, NUM)
            self.vqs.append(VirtQueue(self.ram.mem, i, NUM, d, a, u))
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in (0, 1)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in (0, 1)]
        self.features = features
        self.drv = VirtioNet(self.ram.mem, self.ram.alloc, self.vqs[0], self.vqs[1], features, MAC,
                             kick=lambda vq: os.eventfd_write(self.kicks[vq.index], 1))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))

    def call(self, op: str, payload: bytes = b"", fds=(), need_reply: bool = False) -> bytes | None:
        socket.send_fds(self.sock, [codec.encode_request(op, payload, need_reply)], list(fds))
        if not (need_reply or op.startswith("GET_")):
            return None
        head = self._recv(12)
        size = struct.unpack_from("<III", head)[2]
        name, _flags, body = codec.parse_reply(head + self._recv(size))
        assert name == op
        return body

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            b = self.sock.recv(n - len(buf))
            assert b, "the backend closed the connection"
            buf += b
        return buf

    def setup(self) -> int:
        """QEMU 7.2's order for vhost-user-net (real-peers.md)."""
        offered = struct.unpack("<Q", self.call("GET_FEATURES"))[0]
        pf = struct.unpack("<Q", self.call("GET_PROTOCOL_FEATURES"))[0]
        self.call("SET_PROTOCOL_FEATURES", u64(pf & 0x208))            # REPLY_ACK | CONFIG
        self.call("SET_OWNER")
        for q in (0, 1):                       # enabled before anything is configured
            self.call("SET_VRING_ENABLE", state(q, 1))
            self.call("SET_VRING_CALL", u64(q), [os.dup(self.calls[q])])
        self.call("SET_FEATURES", u64(self.features | F_PROTOCOL))
        regions = [MemRegion(r["guest_phys_addr"], r["memory_size"], r["userspace_addr"], r["mmap_offset"])
                   for r in self.ram.table]
        ack = self.call("SET_MEM_TABLE", codec.mem_table_payload(regions),
                        [os.dup(self.fd) for _ in regions], need_reply=True)
        assert ack == u64(0)
        for q, vq in enumerate(self.vqs):
            self.call("SET_VRING_NUM", state(q, NUM))
            self.call("SET_VRING_BASE", state(q, 0))
            uva = self.ram.gpa_to_uva
            self.call("SET_VRING_ADDR", struct.pack("<IIQQQQ", q, 0, uva(vq.desc), uva(vq.used),
                                                    uva(vq.avail), 0))
            self.call("SET_VRING_KICK", u64(q), [os.dup(self.kicks[q])])
        for q in (0, 1):
            self.call("SET_VRING_ENABLE", state(q, 1), need_reply=True)
        return offered

    def receive(self, n: int, timeout: float = 10.0) -> list[bytes]:
        got: list[bytes] = []
        end = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < end:
            got += self.drv.receive()
            self.drv.refill_and_kick()
            if len(got) < n:
                time.sleep(0.002)
        return got

    def stop(self) -> list[int]:
        bases = []
        for q in (0, 1):
            self.call("SET_VRING_ENABLE", state(q, 0))
            bases.append(struct.unpack("<II", self.call("GET_VRING_BASE", state(q, 0)))[1])
        return bases

    def close(self) -> None:
        self.sock.close()
        for fd in self.kicks + self.calls:
            os.close(fd)
        for vq in self.vqs:
            vq.close()
        self.ram.close()
        self.map.close()
        os.close(self.fd)


def frame(i: int, size: int = 100) -> bytes:
    return bytes.fromhex("ffffffffffff525400ee0001") + b"\x88\xb5" + i.to_bytes(4, "big") + bytes(size - 18)


@pytest.fixture
def served(tmp_path):
    """A net backend served on a thread, as one backend process runs it."""
    made = {}

    def start(backend):
        opts = HostOptions(run_dir=tmp_path / "run", stats_interval=0.05)
        opts.run_dir.mkdir(mode=0o700)
        kind = NetKind("loopback", opts, MAC, "vhost-user")
        kind.open = lambda: setattr(kind, "backend", backend)       # this test's backend object
        b = VhostUserBackend(tmp_path / "n.sock", kind, opts)
        b.bind()
        t = threading.Thread(target=b.run, daemon=True)
        t.start()
        made.update(backend=b, thread=t, opts=opts)
        return b
    yield start
    if made:
        made["backend"].worker.stop()
        made["thread"].join(5)
        assert not made["thread"].is_alive()
        assert not (tmp_path / "n.sock").exists()


def test_frames_loop_through_the_backend_and_the_next_frontend_is_served(served, tmp_path):
    lo = Loopback(capacity=512)
    b = served(lo)
    fe = Frontend(tmp_path / "n.sock")
    try:
        offered = fe.setup()
        # LOG_ALL is offered: usable through PROTOCOL_F_LOG_SHMFD (SET_LOG_BASE with an fd)
        assert offered & bit(VIRTIO_NET_F_MRG_RXBUF) and offered & (1 << 26)
        assert fe.drv.hdr_len == 12
        fe.drv.refill_and_kick()
        for i in range(50):
            assert fe.drv.start_xmit(frame(i))
        got = fe.receive(50)
        assert [int.from_bytes(f[14:18], "big") for f in got] == list(range(50))
        assert all(f == frame(i) for i, f in enumerate(got))
        dev = b.device
        assert dev.backends == [lo, lo] and dev.vhost_hlen == 12 and dev.sock_hlen == 0
        assert dev.stats["tx_frames"] == 50 and dev.stats["rx_frames"] == 50
        deadline = time.monotonic() + 5                         # a stats snapshot after the frames
        while not [d for d in read_all(tmp_path / "run") if d.get("role") == "device"
                   and d["stats"].get("tx_packets") == 50]:
            assert time.monotonic() < deadline, "no stats snapshot with the 50 frames"
            time.sleep(0.01)
        (st,) = [d for d in read_all(tmp_path / "run") if d.get("role") == "device"]
        assert st["device"] == "net" and st["stats"]["tx_packets"] == 50 and st["connections"] == 1
        from tools.monitor.model import split_net               # the monitor's net view finds it
        assert split_net(read_all(tmp_path / "run"))["vhost-user:n.sock"]["stats"]["rx_packets"] == 50
        tx_base = fe.stop()[1]
        assert tx_base == 50 and dev.backends == [None, None]           # detached at the stop
    finally:
        fe.close()
    # the backend stays open for the next frontend (QEMU rebooted)
    deadline = time.monotonic() + 5
    while (b.conn is not None or b.device is not None) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.device is None and b.kind.backend is lo
    fe = Frontend(tmp_path / "n.sock")
    try:
        fe.setup()
        fe.drv.refill_and_kick()
        assert fe.drv.start_xmit(frame(7))
        assert fe.receive(1) == [frame(7)]
        assert b.connections == 2
        dev2 = b.device
    finally:
        fe.close()                   # gone without GET_VRING_BASE (QEMU killed)
    deadline = time.monotonic() + 5
    while b.device is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.device is None and dev2.backends == [None, None] and not dev2.running
    fe = Frontend(tmp_path / "n.sock")
    try:
        fe.setup()
        fe.drv.refill_and_kick()
        assert fe.drv.start_xmit(frame(8))
        assert fe.receive(1) == [frame(8)] and b.connections == 3
    finally:
        fe.close()


def test_frames_wait_for_rx_buffers_without_spinning(served, tmp_path):
    """A frame with no rx buffer posted waits (the backend's fd is not watched meanwhile) and goes
    in once the driver posts buffers and kicks."""
    sink = Sink()
    b = served(sink)
    fe = Frontend(tmp_path / "n.sock")
    try:
        fe.setup()
        sink.inbox.extend(frame(i) for i in range(3))
        b.worker.queue_work(b.device.backend_readable)
        wait_until(lambda: b.device.rx_pending is not None, what="frame waiting for an rx buffer")
        assert b.device.stats["rx_frames"] == 0
        fe.drv.refill_and_kick()
        assert fe.receive(3) == [frame(i) for i in range(3)]
        # a frame from a kernel socket: an fd backend, watched again once rx_pending cleared
        assert fe.drv.start_xmit(frame(9))
        deadline = time.monotonic() + 5
        while not sink.queue and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(sink.queue) == [frame(9)]
    finally:
        fe.close()


def udp_backend():
    """A UDP backend on a free local port and the peer socket it sends to: (backend, peer, port)."""
    from host.net.backends.sockets import UdpPair
    from tools.launch import free_udp_port
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    lp = free_udp_port()
    return UdpPair(lp, peer.getsockname()[1]), peer, lp


def test_fd_backend_rx_waits_then_resumes(served, tmp_path):
    """A UDP backend (a real fd): frames that find no rx buffers stop POLLIN until the rx kick."""
    udp, peer, lp = udp_backend()
    b = served(udp)
    fe = Frontend(tmp_path / "n.sock")
    try:
        fe.setup()
        for i in range(5):
            peer.sendto(frame(i), ("127.0.0.1", lp))
        dev = b.device
        wait_until(lambda: dev.rx_pending is not None, what="frame waiting for an rx buffer")
        calls = []
        real = dev.handle_rx
        dev.handle_rx = lambda: (calls.append(1), real())[1]
        time.sleep(0.2)              # the thing under test: how often rx runs in this window
        assert len(calls) < 5, len(calls)                                # not spinning on POLLIN
        assert b.kind.glue.watched[id(udp)] == 0
        fe.drv.refill_and_kick()
        assert fe.receive(5) == [frame(i) for i in range(5)]
        assert fe.drv.start_xmit(frame(42))
        peer.settimeout(5)
        assert peer.recv(2048) == frame(42)
    finally:
        fe.close()
        peer.close()


def test_broken_device_does_not_spin_on_a_readable_backend(served, tmp_path):
    """A device stopped by a guest error (NEEDS_RESET) takes no frames: its backend's POLLIN is
    not watched (it would be readable forever), until the next frontend."""
    from shared.errors import VringError
    udp, peer, lp = udp_backend()
    b = served(udp)
    fe = Frontend(tmp_path / "n.sock")
    try:
        fe.setup()
        fe.drv.refill_and_kick()
        dev = b.device
        b.worker.queue_work(lambda: dev.vq_err(dev.vqs[1], VringError(14, "a test's ring error")))
        deadline = time.monotonic() + 5
        while not dev.broken and time.monotonic() < deadline:
            time.sleep(0.01)
        calls = []
        real = dev.handle_rx
        dev.handle_rx = lambda: (calls.append(1), real())[1]
        for i in range(3):
            peer.sendto(frame(i), ("127.0.0.1", lp))
        time.sleep(0.3)              # the thing under test: how often rx runs in this window
        assert dev.broken and len(calls) < 5, len(calls)
        assert b.kind.glue.watched[id(udp)] == 0
    finally:
        fe.close()
        peer.close()


# --- the command line ---------------------------------------------------------------------------
def parse(*argv):
    p = build_parser()
    a = p.parse_args(list(argv))
    return vhost_user_net_pairs(p, a.vhost_user_net, a.net_backend, [])


def test_cli_pairs():
    assert parse("--vhost-user-net", "/a", "--net-backend", "loopback") == [(Path("/a"), "loopback")]
    assert parse("--vhost-user-net", "/a", "--vhost-user-net", "/b", "--net-backend", "tap:t0,vnet_hdr=on",
                 "--net-backend", "udp:1:2") == [(Path("/a"), "tap:t0,vnet_hdr=on"), (Path("/b"), "udp:1:2")]


@pytest.mark.parametrize("argv,needle,code", [
    (["--vhost-user-net", "/a"], "no --net-backend", 2),
    (["--net-backend", "loopback"], "has no --vhost-user-net", 2),
    (["--vhost-user-net", "/a", "--net-backend", "nope"], "unknown net backend", 2),
    (["--vhost-user-net", "/a", "--vhost-user-net", "/b", "--net-backend", "udp:5:6",
      "--net-backend", "udp:5:7"], "given twice", 2),
    (["--vhost-user-net", "/a", "--net-backend", "loopback", "--vhost-user", "/a", "--cid", "3"],
     "given twice", 2),
    (["--vhost-user-net", "SOCK", "--net-backend", "tap:ve-no-such0"], "no interface", 1),
])
def test_cli_errors_are_one_line(tmp_path, argv, needle, code):
    argv = [str(tmp_path / "s.sock") if a == "SOCK" else a for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "host", "--run-dir", str(tmp_path / "run"), *argv],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert p.returncode == code and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "s.sock").exists()


def test_one_ring_started_the_other_unconfigured_is_left_alone():
    """QEMU enables both rings before configuring them; when rx starts, the backend is attached
    and the tx work it queues must not touch the unconfigured tx ring (ring rule 13 otherwise)."""
    from host.net.device import VhostNet
    from host.vhost_user.codec import vhost_user_session

    dev = VhostNet(MAC)
    s = vhost_user_session(dev)

    def req(op, payload=b"", fds=()):
        return s.handle(codec.decode_message(codec.encode_request(op, payload), list(fds)))
    fd = os.memfd_create("ve-vunet-test-ram")
    os.ftruncate(fd, 1 << 20)
    try:
        req("SET_PROTOCOL_FEATURES", u64(0x8))
        for q in (0, 1):
            req("SET_VRING_ENABLE", state(q, 1))
        req("SET_FEATURES", u64(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | F_PROTOCOL))
        req("SET_MEM_TABLE", codec.mem_table_payload([MemRegion(0, 1 << 20, 0x7F0000000000, 0)]), [os.dup(fd)])
        req("SET_VRING_NUM", state(0, 64))
        req("SET_VRING_ADDR", struct.pack("<IIQQQQ", 0, 0, 0x7F0000001000, 0x7F0000003000, 0x7F0000002000, 0))
        out = req("SET_VRING_KICK", u64(0), [os.eventfd(0)])
        assert out.started == [0] and dev.running and not out.close
        lo = Loopback()
        dev.set_backend(0, lo)
        dev.set_backend(1, lo)                       # what NetKind.sync does at the start
        dev.run_local_work()
        assert not dev.broken and dev.stats["errors"] == 0
        assert dev.vqs[0].enabled and not dev.vqs[1].enabled
    finally:
        s.close()
        os.close(fd)


def test_malformed_message_closes_the_connection_backend_serves_on(served, tmp_path, caplog):
    lo = Loopback()
    b = served(lo)
    fe = Frontend(tmp_path / "n.sock")
    try:
        fe.setup()
        fe.sock.sendall(struct.pack("<III", 5, 1, 8) + bytes(8))        # SET_MEM_TABLE, no regions
        assert fe.sock.recv(1) == b""
    finally:
        fe.close()
    fe = Frontend(tmp_path / "n.sock")
    try:
        fe.setup()
        fe.drv.refill_and_kick()
        assert fe.drv.start_xmit(frame(3))
        assert fe.receive(1) == [frame(3)]
        assert b.kind.backend is lo and b.connections == 2
    finally:
        fe.close()


@pytest.mark.multiprocess
def test_several_sockets_in_one_host_process(tmp_path):
    """Two vhost-user-net sockets and a vhost-user-vsock one, one host command, a process each:
    each serves its own device (frames through loopback on both nets); SIGTERM stops them all."""
    from tests.procs import Proc
    a, b, v = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "v.sock"
    host = Proc(["-m", "host", "--vhost-user-net", str(a), "--vhost-user-net", str(b),
                 "--net-backend", "loopback", "--net-backend", "loopback",
                 "--vhost-user", str(v), "--cid", "3", "--run-dir", str(tmp_path / "run")],
                tmp_path / "host.log")
    try:
        for path in (a, b, v):
            assert host.wait_log(f"listening on {path}", 20), host.text()
        for k, path in enumerate((a, b)):
            fe = Frontend(path)
            try:
                fe.setup()
                fe.drv.refill_and_kick()
                assert fe.drv.start_xmit(frame(k))
                assert fe.receive(1) == [frame(k)]
                mac = fe.call("GET_CONFIG", struct.pack("<III", 0, 6, 0) + bytes(6))[12:]
                assert mac == bytes.fromhex("525400ee00") + bytes([k + 1])
            finally:
                fe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(v))
        socket.send_fds(s, [codec.encode_request("GET_CONFIG", struct.pack("<III", 0, 8, 0) + bytes(8))], [])
        assert s.recv(64)[-8:] == u64(3)
        s.close()
    finally:
        assert host.stop() == 0
    assert not a.exists() and not b.exists() and not v.exists()
    assert "Traceback" not in host.text()
