"""virtio-vsock end to end across real processes (Firecracker-style): a host daemon, guests with
services, host programs through the hybrid Unix-socket bridge, guest programs to host listeners."""
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from host.vsock.api import VsockHost
from shared.vsock.pcap import PcapReader

from .procs import Cluster

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def cluster(shm_guard):
    c = Cluster(shm_guard)
    yield c
    c.close()


def echo_sha(run_dir, cid, port, nbytes, results, i):
    try:
        s = VsockHost(run_dir).connect(cid, port, timeout=20)
        s.settimeout(60)
        data = os.urandom(nbytes)
        t = threading.Thread(target=s.sendall, args=(data,))
        t.start()
        h, got = hashlib.sha256(), 0
        while got < nbytes:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        t.join()
        s.close()
        results[i] = (hashlib.sha256(data).hexdigest(), h.hexdigest(), got)
    except Exception as e:  # reported by the assertion below
        results[i] = e


def wait_lines(path, n, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def echo_listener(path):
    """A host program listening on <run-dir>/vsock-<cid>.sock_<P> that echoes every connection."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(64)

    def serve(c):
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return srv


def test_50_parallel_host_initiated_connections_echo_1mib(cluster):
    cluster.host()
    cluster.guest(3, "--service", "echo=5000", "--mem", "32M")
    n, size = 50, 1 << 20
    results = [None] * n
    threads = [threading.Thread(target=echo_sha, args=(cluster.run_dir, 3, 5000, size, results, i))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    for r in results:
        assert isinstance(r, tuple), r
        sent, got, nbytes = r
        assert nbytes == size and sent == got


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_socat_reaches_guest_echo(cluster):
    cluster.host()
    cluster.guest(3, "--service", "echo=5000")
    r = subprocess.run(["socat", "-t", "2", "-", f"UNIX-CONNECT:{cluster.run_dir}/vsock-3.sock"],
                       input=b"CONNECT 5000\nhello from socat\n", capture_output=True, timeout=30)
    assert r.stdout == b"OK 1073741824\nhello from socat\n"


def test_guest_initiated_to_host_listener_and_refused(cluster, tmp_path):
    cluster.host()
    srv = echo_listener(cluster.run_dir / "vsock-3.sock_7000")
    out = tmp_path / "app.out"
    os.environ.update(VE_APP_OUT=str(out), VE_APP_PORT="7000", VE_APP_BYTES=str(1 << 20), VE_APP_CONNS="8")
    try:
        cluster.guest(3, "--run", "tests.guest_apps:sha_client")
        lines = wait_lines(out, 8, 120)
    finally:
        for k in ("VE_APP_OUT", "VE_APP_PORT", "VE_APP_BYTES", "VE_APP_CONNS"):
            os.environ.pop(k, None)
        srv.close()
    assert len(lines) == 8
    for r in lines:
        assert "errno" not in r, r
        assert r["sent"] == r["got"] and r["bytes"] == 1 << 20

    out2 = tmp_path / "refused.out"
    os.environ.update(VE_APP_OUT=str(out2), VE_APP_PORT="7001")
    try:
        cluster.guest(4, "--run", "tests.guest_apps:refused_client")
        (r,) = wait_lines(out2, 1, 60)
    finally:
        os.environ.pop("VE_APP_OUT")
        os.environ.pop("VE_APP_PORT")
    assert r["errnos"] == [errno.ECONNREFUSED, errno.ECONNREFUSED]


def test_connect_to_unbound_guest_port_is_refused(cluster):
    cluster.host()
    cluster.guest(3)
    with pytest.raises(ConnectionRefusedError):
        VsockHost(cluster.run_dir).connect(3, 4444, timeout=10)


def test_close_while_data_in_flight(cluster):
    cluster.host()
    g = cluster.guest(3, "--service", "discard=9", "--service", "echo=7")
    vh = VsockHost(cluster.run_dir)
    for _ in range(5):
        s = vh.connect(3, 9, timeout=10)
        s.sendall(os.urandom(512 * 1024)[: 300 * 1024])
        s.close()                      # while the guest is still draining it
    s = vh.connect(3, 7, timeout=10)   # the guest is fine afterwards
    s.sendall(b"still alive")
    assert s.recv(100) == b"still alive"
    s.close()
    assert g.p.poll() is None


def test_host_restart_resets_connections_keeps_listeners(cluster, tmp_path):
    host = cluster.host()
    srv = echo_listener(cluster.run_dir / "vsock-3.sock_7100")
    out = tmp_path / "hold.out"
    os.environ.update(VE_APP_OUT=str(out), VE_APP_PORT="7100")
    try:
        g = cluster.guest(3, "--service", "echo=5000", "--run", "tests.guest_apps:hold_conn")
    finally:
        os.environ.pop("VE_APP_OUT")
        os.environ.pop("VE_APP_PORT")
    assert wait_lines(out, 1, 30)[0] == {"state": "connected"}
    host_conn = VsockHost(cluster.run_dir).connect(3, 5000, timeout=10)
    host.signal(signal.SIGKILL)
    host.p.wait(10)
    cluster.host()
    assert g.wait_log("reconnected to the host", 30), g.text()
    lines = wait_lines(out, 2, 30)
    assert lines[1] == {"state": "error", "errno": errno.ECONNRESET}
    assert host_conn.recv(10) == b""               # the old host-side connection died with its host
    s = VsockHost(cluster.run_dir).connect(3, 5000, timeout=10)   # the listener survived
    s.sendall(b"after restart")
    assert s.recv(100) == b"after restart"
    s.close()
    srv.close()


def test_capture_read_back_packet_by_packet(cluster, tmp_path):
    cap = tmp_path / "host.pcap"
    cluster.host("--pcap", str(cap))
    cluster.guest(3, "--service", "echo=5000")
    s = VsockHost(cluster.run_dir).connect(3, 5000, timeout=10)
    s.sendall(b"ping")
    assert s.recv(10) == b"ping"
    s.close()
    end = time.monotonic() + 20                    # until both RW records are in the capture
    while True:
        recs = list(PcapReader(cap))
        if len([r for r in recs if r[2].op == 5]) >= 2 or time.monotonic() > end:
            break
        time.sleep(0.02)
    ops = [r[2].op for r in recs]
    assert ops[0] == 1 and 2 in ops                # REQUEST, RESPONSE
    payloads = [r[2].payload for r in recs if r[2].op == 5]
    assert payloads == [b"ping", b"ping"]          # RW each way
    for _ts, mon, pkt in recs:
        assert mon.transport == 2 and mon.len == 44
        assert {pkt.src_cid, pkt.dst_cid} == {2, 3}


def test_guest_capture_is_written_as_packets_go_and_survives_sigkill(cluster, tmp_path):
    """Issue 8 item 6: the guest's --pcap has its header at open and each packet as it goes."""
    cap = tmp_path / "guest.pcap"
    cluster.host()
    g = cluster.guest(3, "--service", "echo=5000", "--pcap", str(cap))
    assert cap.stat().st_size == 24                # the header, before any packet
    s = VsockHost(cluster.run_dir).connect(3, 5000, timeout=10)
    s.sendall(b"ping")
    assert s.recv(10) == b"ping"
    end = time.monotonic() + 20                    # the guest writes its tx record after sending
    while len([r for r in PcapReader(cap) if r[2].op == 5]) < 2 and time.monotonic() < end:
        time.sleep(0.02)
    g.signal(signal.SIGKILL)
    g.p.wait(10)
    s.close()
    recs = list(PcapReader(cap))                   # whole records only, readable after SIGKILL
    assert [r[2].payload for r in recs if r[2].op == 5] == [b"ping", b"ping"]
    assert recs[0][2].op == 1                      # the host's REQUEST, as the guest received it
