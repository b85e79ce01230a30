"""--packed on host and guest: both vsock rings are packed (VIRTIO_F_RING_PACKED acked), data
flows as with split rings, a guest that loses its host resumes on a new one at the packed ring
base (wrap counters included); without --packed on either side the rings stay split."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from shared.constants import VIRTIO_F_RING_PACKED

from .procs import Cluster
from .test_vsock_e2e import echo_listener, wait_lines


@pytest.fixture
def cluster(shm_guard):
    c = Cluster(shm_guard)
    yield c
    c.close()


def device_stats(run_dir, timeout=10.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in (run_dir / "stats").glob("device-*.json"):
            try:
                st = json.loads(p.read_text())
            except ValueError:
                continue
            st = st.get("stats", {})
            if st.get("vqs") and st.get("bytes_in"):      # written after the data moved
                return st
        time.sleep(0.05)
    raise AssertionError("no device process stats")


def _sha_run(cluster, tmp_path, guest_args):
    srv = echo_listener(cluster.run_dir / "vsock-3.sock_7000")
    out = tmp_path / "app.out"
    env = dict(VE_APP_OUT=str(out), VE_APP_PORT="7000", VE_APP_BYTES=str(300 << 10), VE_APP_CONNS="2")
    os.environ.update(env)
    try:
        cluster.guest(3, *guest_args, "--queue-size", "16", "--run", "tests.guest_apps:sha_client")
        lines = wait_lines(out, 2, 120)
        st = device_stats(cluster.run_dir)
    finally:
        for k in env:
            os.environ.pop(k, None)
        srv.close()
    assert len(lines) == 2 and all(r.get("sent") == r.get("got") for r in lines), lines
    return st


@pytest.mark.parametrize("host_packed, guest_packed", [(True, True), (True, False), (False, True)])
def test_vsock_data_flows_over_packed_rings_only_when_both_sides_ask(cluster, tmp_path, host_packed,
                                                                      guest_packed):
    cluster.host(*(["--packed"] if host_packed else []))
    st = _sha_run(cluster, tmp_path, ["--packed"] if guest_packed else [])
    text = json.dumps(st)
    packed = host_packed and guest_packed
    assert bool(st["features"] >> VIRTIO_F_RING_PACKED & 1) == packed, st
    assert [bool(q.get("packed")) for q in st["vqs"]] == [packed] * len(st["vqs"]), text[:300]
    assert st["errors"] == 0


def test_a_packed_guest_reconnects_to_a_new_host_and_moves_data(cluster):
    """The rings lapped (queue size 16, 70 KB each way) before the host dies: the new host resumes
    at the guest's packed ring base, wrap counters included."""
    host = cluster.host("--packed")
    g = cluster.guest(3, "--packed", "--queue-size", "16", "--service", "echo=5000")

    def echo(n: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(str(cluster.run_dir / "vsock-3.sock"))
        s.sendall(b"CONNECT 5000\n" + b"x" * n)
        got = b""
        while got.count(b"x") < n:
            chunk = s.recv(65536)
            assert chunk, got[:80]
            got += chunk
        s.close()
        assert got.startswith(b"OK ") and got.endswith(b"x" * n)

    for n in (70000, 30000, 50000, 20000):            # the rings stop in different laps
        echo(n)
        start = len(g.text())
        host.signal(signal.SIGKILL)
        host.p.wait(10)
        assert g.wait_log("lost the host", 10, start)
        host = cluster.host("--packed")
        assert g.wait_log("reconnected to the host", 20, start), g.text()
    echo(70000)


def test_net_guests_on_packed_rings_ping_echo_and_flood(cluster, tmp_path):
    """virtio-net with --packed: guest f floods broadcast frames (every ring laps many times, the
    receivers' rx rings with them) while b pings and UDP-echoes f; both net devices run packed
    rings and nothing breaks."""
    from shared.stats import read_all
    from .test_net_e2e import net_guest, wait_file
    cluster.host("--packed")
    fout, bout = tmp_path / "f.json", tmp_path / "b.json"
    net_guest(cluster, "f", "--packed", "--net", "segment:lan", "--ip", "169.254.10.9/24",
              "--mac", "52:54:00:00:50:09", "--net-run", "tests.net_apps:flood",
              env={"VE_APP_OUT": str(fout), "VE_APP_SECONDS": "3"})
    time.sleep(0.5)
    net_guest(cluster, "b", "--packed", "--net", "segment:lan", "--ip", "169.254.10.2/24",
              "--mac", "52:54:00:00:50:02", "--net-run", "tests.net_apps:ping_peer",
              env={"VE_APP_OUT": str(bout), "VE_APP_PEER": "169.254.10.9", "VE_APP_COUNT": "5"})
    rb, flooded = wait_file(bout), wait_file(fout)
    assert flooded and flooded[0]["flooded"] > 500, flooded
    assert rb and rb[0]["replies"] == 5 and rb[0]["udp_echo_ok"], rb
    time.sleep(0.7)
    nets = [d["stats"] for d in read_all(cluster.run_dir)
            if d.get("role") == "device" and d.get("stats", {}).get("device") == "net"]
    assert len(nets) == 2, nets
    for s in nets:
        assert s["features"] >> VIRTIO_F_RING_PACKED & 1 and all(q.get("packed") for q in s["vqs"]), s["vqs"]
        assert s["errors"] == 0 and not s["broken"], s["last_error"]
