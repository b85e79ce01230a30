"""The guest transport (guest/virtio_dev.py) and ControlClient against a real ControlSession served
by a thread on a Unix socket, with real shared-memory guest RAM and POSIX-semaphore doorbells."""
import queue
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest

from guest.control_client import ControlClient, ControlError
from guest.ram import GuestRAM
from guest.virtio_dev import ProbeError, VirtioDevice
from host.guest_memory import attach_memory as attach_shm_memory
from host.native import NativeCodec, native_session, shm_region
from host.device import VhostDevice
from shared.constants import (VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK,
                              VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                              VIRTIO_VSOCK_F_STREAM, bit)
from shared.control import encode
from shared.resources import OwnerRecord, ours_in_dev_shm, resource_base
from shared.ring_layout import avail_idx_addr, used_idx_addr

RAM = 1 << 20
V1, EVENT_IDX, INDIRECT = bit(VIRTIO_F_VERSION_1), bit(VIRTIO_RING_F_EVENT_IDX), bit(VIRTIO_RING_F_INDIRECT_DESC)


class EchoDevice(VhostDevice):
    """Returns every chain it is given with length = bytes it could read."""
    device_type = "vsock"
    device_id = VIRTIO_ID_VSOCK
    num_queues = 3
    device_features = bit(VIRTIO_VSOCK_F_STREAM)

    def __init__(self, cid):
        super().__init__(f"vsock-{cid}")
        self.cid = cid

    def config_bytes(self):
        return struct.pack("<Q", self.cid)

    def handle_kick(self, qidx):
        vq = self.vqs[qidx]
        while (chain := vq.get_vq_desc(self.mem)) is not None:
            vq.add_used(self.mem, chain.head, chain.out_len)
        self.notify(vq)


class Host:
    """A ControlSession per connection, served one connection at a time by a thread."""

    def __init__(self, path):
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.listener.settimeout(0.1)
        self.sessions: list[NativeCodec] = []
        self.devices: list[EchoDevice] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def factory(self, hello):
        dev = EchoDevice(hello["params"]["cid"])
        self.devices.append(dev)
        return dev

    @property
    def device(self):
        return self.devices[-1]

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            s = native_session(self.factory)
            self.sessions.append(s)
            conn.settimeout(0.1)
            try:
                while not self.stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except socket.timeout:
                        continue
                    if not data:
                        break
                    out = s.feed(data)
                    conn.sendall(b"".join(out.replies))
                    if out.close:
                        break
            finally:
                s.close()
                conn.close()

    def kick_loop(self, qidx, dev, stop):
        """The runner's job in miniature: kick doorbell -> kick_received."""
        while not stop.is_set():
            db = dev.kicks[qidx]
            if db is None:
                time.sleep(0.01)
                continue
            if not db.wait(0.05):
                continue
            with dev.lock:
                dev.kick_received(qidx)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="ve-t", dir="/tmp"))     # AF_UNIX paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def guest(shm_guard, sockdir):
    run_dir = shm_guard
    host = Host(sockdir / "control.sock")
    owner = OwnerRecord(run_dir, "guest")
    base = resource_base(run_dir)
    ram_name = f"{base}-ram"
    owner.add(shm=[ram_name])
    ram = GuestRAM(ram_name, RAM)
    dev = VirtioDevice(ram, run_dir, host.path, "vsock", "g1", {"cid": 3}, resource_base=base, owner=owner)
    stop = threading.Event()
    yield dev, host, stop
    stop.set()
    dev.join_irq_threads()
    try:
        dev.reset()
    except (ControlError, OSError):
        pass
    dev.del_vqs()
    dev.close()
    host.close()
    ram.close()
    owner.release_all()


def test_probe_find_vqs_and_the_host_sees_the_rings(guest):
    dev, host, stop = guest
    rep = dev.connect()
    assert rep["device_id"] == VIRTIO_ID_VSOCK and dev.num_queues == 3
    feats = dev.probe(V1 | EVENT_IDX | bit(40))            # bit 40 is not offered
    assert feats == V1 | EVENT_IDX
    assert dev.get_status() == 0x0B                        # ACK | DRIVER | FEATURES_OK
    got = queue.Queue()
    vqs = dev.find_vqs([got.put, got.put, None], [64, 128, 16])
    assert [vq.num for vq in vqs] == [64, 128, 16]
    # the doorbells exist, recorded in the owner record
    names = [n for r in dev.rings for n in r.names]
    assert len(names) == 9 and set(names) <= set(dev.owner.sems)
    assert all(f"sem.{n[1:]}" in ours_in_dev_shm() for n in names)
    dev.driver_ok()
    assert dev.get_status() == 0x0F
    hdev = host.device
    assert hdev.running and hdev.acked_features == V1 | EVENT_IDX
    for r, hvq in zip(dev.rings, hdev.vqs):
        # SET_VRING_ADDR gave frontend addresses; the host translated them back to the same gpas
        assert (hvq.desc, hvq.avail, hvq.used, hvq.num) == (r.desc, r.avail, r.used, r.num)
        assert hvq.enabled and hvq.event_idx
    # the host's view of guest RAM is the same memory: a guest store is a host load
    dev.ram.mem.store16(avail_idx_addr(dev.rings[1].avail), 0)
    assert hdev.mem.load16(avail_idx_addr(dev.rings[1].avail)) == 0
    assert dev.config_get(0, 8) == struct.pack("<Q", 3)
    assert dev.get_stats()["name"] == "vsock-3"


def test_buffers_kicks_and_interrupts_end_to_end(guest):
    dev, host, stop = guest
    dev.connect()
    dev.probe(V1 | EVENT_IDX | INDIRECT)
    got = queue.Queue()
    vqs = dev.find_vqs([got.put, got.put, None], [64, 64, 16])
    dev.driver_ok()
    hdev = host.device
    kicker = threading.Thread(target=host.kick_loop, args=(1, hdev, stop), daemon=True)
    kicker.start()
    dev.start_irq_threads(stop)
    tx = vqs[1]
    bufs = [dev.ram.alloc.alloc(100) for _ in range(3)]
    for i, b in enumerate(bufs):
        dev.ram.mem.write(b, bytes([i]) * 100)
        assert tx.add_sgs([(b, 100)], [], i)
    assert dev.kick(tx) is True and dev.kicks[1] == 1
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        try:
            assert got.get(timeout=0.5) is tx              # the irq thread called tx's callback
        except queue.Empty:
            continue
        while (b := tx.get_buf()) is not None:
            seen.append(b)
    assert sorted(seen) == [(0, 100), (1, 100), (2, 100)]
    assert dev.interrupts[1] >= 1 and dev.interrupts[1] == hdev.stats["vq_interrupts"][1]
    assert hdev.stats["vq_kicks"][1] == 1
    # host used.idx as the guest sees it
    assert dev.ram.mem.load16(used_idx_addr(dev.rings[1].used)) == 3
    for b in bufs:
        dev.ram.alloc.free(b)


def test_err_doorbell_reports_needs_reset(guest):
    dev, host, stop = guest
    dev.connect()
    dev.probe(V1)
    errors = queue.Queue()
    dev.on_error = lambda q, st: errors.put((q, st))
    vqs = dev.find_vqs([None, None, None], [16, 16, 16])
    dev.driver_ok()
    dev.start_irq_threads(stop)
    hdev = host.device
    dev.ram.mem.store16(avail_idx_addr(dev.rings[0].avail), 100)   # ring rule 1
    dev.notify(vqs[0])
    with hdev.lock:
        assert hdev.kicks[0].wait(2) == 1
        hdev.kick_received(0)
    q, status = errors.get(timeout=5)
    assert q == 0 and status & VIRTIO_CONFIG_S_NEEDS_RESET and dev.needs_reset
    dev.reset()                                     # status 0 clears it on the host
    assert dev.get_status() == 0 and not hdev.broken


def test_reconnect_replays_state_and_resumes_at_used_idx(guest):
    dev, host, stop = guest
    dev.connect()
    dev.probe(V1 | EVENT_IDX)
    vqs = dev.find_vqs([None, None, None], [16, 16, 16])
    dev.driver_ok()
    old = host.device
    tx = vqs[1]
    b = dev.ram.alloc.alloc(32)
    for i in range(5):                              # 5 buffers through, one at a time
        assert tx.add_sgs([(b, 32)], [], i)
        dev.notify(tx)
        with old.lock:
            old.kick_received(1)
        assert tx.get_buf() == (i, 32)
    dev.reconnect()
    assert len(host.devices) == 2
    new = host.device
    deadline = time.monotonic() + 5
    while old.mem is not None and time.monotonic() < deadline:   # the old session saw EOF
        time.sleep(0.01)
    assert old.mem is None and new is not old and new.reconnect
    assert new.running and new.acked_features == V1 | EVENT_IDX
    assert new.vqs[1].last_avail_idx == 5 and new.vqs[1].last_used_idx == 5
    assert new.vqs[0].last_avail_idx == 0
    assert tx.add_sgs([(b, 32)], [], "again")
    dev.notify(tx)
    with new.lock:
        new.kick_received(1)
    assert tx.get_buf() == ("again", 32)
    dev.ram.alloc.free(b)


def test_probe_refused_features_and_del_vqs_cleans_up(guest):
    dev, host, stop = guest
    dev.connect()
    with pytest.raises(ProbeError) as ei:
        dev.probe(EVENT_IDX)                      # no VERSION_1: the device leaves FEATURES_OK clear
    assert ei.value.code == "ENODEV"
    assert dev.get_status() & 0x80                # the driver marked the device FAILED
    dev.probe(V1)                                  # reset and try again
    dev.find_vqs([None, None], [8, 8])
    names = [n for r in dev.rings for n in r.names]
    free_before = dev.ram.alloc.in_use
    dev.reset()
    dev.del_vqs()
    assert not set(names) & set(dev.owner.sems)
    assert not any(f"sem.{n[1:]}" in ours_in_dev_shm() for n in names)
    assert dev.ram.alloc.in_use < free_before


def test_find_vqs_checks_sizes(guest):
    dev, host, stop = guest
    dev.connect()
    dev.probe(V1)
    with pytest.raises(ValueError):
        dev.find_vqs([None], [100])
    with pytest.raises(ValueError):
        dev.find_vqs([None] * 4, [8] * 4)             # the device has 3 queues
    assert dev.rings == [] and dev.owner.sems == []


# --- ControlClient on its own -------------------------------------------------------------------
def test_client_unreachable_host(sockdir):
    with pytest.raises(ConnectionError, match="no host control socket"):
        ControlClient(sockdir / "nothing.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sockdir / "stale.sock"))
    stale.close()                                   # a socket file nobody listens on
    with pytest.raises(ConnectionError, match="refused"):
        ControlClient(sockdir / "stale.sock")


def _one_shot_server(path, answer):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        conn.recv(65536)
        answer(conn)
        conn.close()
        srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_client_error_reply_eof_and_timeout(sockdir):
    t = _one_shot_server(sockdir / "a.sock", lambda c: c.sendall(
        encode({"op": "REPLY", "seq": 1, "ok": False, "error": "EPERM", "message": "not owner"})))
    c = ControlClient(sockdir / "a.sock")
    with pytest.raises(ControlError) as ei:
        c.request("SET_STATUS", status=1)
    assert ei.value.code == "EPERM" and ei.value.message == "not owner" and c.closed
    t.join(2)
    t = _one_shot_server(sockdir / "b.sock", lambda c: None)
    c = ControlClient(sockdir / "b.sock")
    with pytest.raises(ConnectionError, match="closed"):
        c.request("GET_STATUS")
    t.join(2)
    release = threading.Event()
    t = _one_shot_server(sockdir / "c.sock", lambda c: release.wait(5))
    c = ControlClient(sockdir / "c.sock", timeout=0.2)
    with pytest.raises(TimeoutError):
        c.request("GET_STATUS")
    release.set()
    t.join(2)
    with pytest.raises(ConnectionError):
        c.request("GET_STATUS")                    # closed after the timeout


def test_client_against_a_session_reads_split_replies(sockdir):
    """Replies arriving a byte at a time are reassembled (one Decoder per connection)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sockdir / "d.sock"))
    srv.listen(1)
    s = native_session(lambda h: EchoDevice(3))

    def run():
        conn, _ = srv.accept()
        while data := conn.recv(65536):
            for r in s.feed(data).replies:
                for i in range(len(r)):
                    conn.send(r[i:i + 1])
        conn.close()
        srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    with ControlClient(sockdir / "d.sock") as c:
        rep = c.request("HELLO", version=1, device="vsock", guest="g", reconnect=False, params={})
        assert rep["num_queues"] == 3
        assert c.request("GET_CONFIG", offset=0, size=8)["data"] == struct.pack("<Q", 3)
    t.join(2)
    s.close()


def test_attach_shm_memory_checks_the_table(guest):
    dev, host, stop = guest
    table = dev.ram.table
    mem = attach_shm_memory([shm_region(r) for r in table])
    try:
        gpa = table[1]["guest_phys_addr"]
        dev.ram.mem.write(gpa + 8, b"shared")
        assert mem.read(gpa + 8, 6) == b"shared"     # same bytes through the host's mapping
        assert mem.uva_to_gpa(table[1]["userspace_addr"] + 8, 6) == gpa + 8
    finally:
        mem.release()
    with pytest.raises(ValueError, match="beyond segment"):
        attach_shm_memory([shm_region({**table[1], "mmap_offset": table[1]["mmap_offset"] + 4096})])
    with pytest.raises(ValueError, match="not one of ours"):
        attach_shm_memory([shm_region({**table[0], "shm": "other-ram"})])
