"""--doorbell eventfd on host and guest: eventfds over the control socket (SCM_RIGHTS), the device
process waits on its one selector (no doorbell threads), data flows as with semaphores."""
from __future__ import annotations

import json
import os
import time

import pytest

from tools.bench.cluster import threads

from .procs import Cluster
from .test_vsock_e2e import echo_listener, wait_lines


@pytest.fixture
def cluster(shm_guard):
    c = Cluster(shm_guard)
    yield c
    c.close()


def device_pid(run_dir, timeout=10.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in (run_dir / "stats").glob("device-*.json"):
            return json.loads(p.read_text())["pid"]
        time.sleep(0.05)
    raise AssertionError("no device process stats")


@pytest.mark.parametrize("doorbell, most", [("eventfd", 2), ("sem", None)])
def test_data_flows_and_the_device_process_threads(cluster, tmp_path, doorbell, most):
    cluster.host("--doorbell", doorbell)
    srv = echo_listener(cluster.run_dir / "vsock-3.sock_7000")
    out = tmp_path / "app.out"
    env = dict(VE_APP_OUT=str(out), VE_APP_PORT="7000", VE_APP_BYTES=str(256 << 10), VE_APP_CONNS="2")
    os.environ.update(env)
    try:
        g = cluster.guest(3, "--doorbell", doorbell, "--run", "tests.guest_apps:sha_client")
        lines = wait_lines(out, 2, 120)
        pid = device_pid(cluster.run_dir)
        n = threads(pid)
    finally:
        for k in env:
            os.environ.pop(k, None)
        srv.close()
    assert len(lines) == 2 and all(r.get("sent") == r.get("got") for r in lines), lines
    owners = [json.loads(p.read_text()) for p in (cluster.run_dir / "owners").glob(f"{g.pid}-*.json")]
    sems = [n for o in owners for n in o.get("sems", [])]
    if most is not None:
        assert n <= most, f"the device process runs {n} threads"
        assert sems == []                 # nothing named: eventfds only
    else:
        assert n > 2 and sems             # a kick thread per semaphore doorbell


def test_a_host_that_takes_semaphores_only_refuses_eventfds_in_one_line(cluster):
    cluster.host("--doorbell", "sem")
    g = cluster.guest(3, "--doorbell", "eventfd", wait=False)
    assert g.p.wait(30) == 1
    assert "EOPNOTSUPP" in g.text() and "--doorbell" in g.text() and "Traceback" not in g.text()


def test_a_guest_with_eventfds_reconnects_to_a_new_host_and_moves_data(cluster, tmp_path):
    """reconnect() sends every ring's eventfds again, to a device process that never saw them."""
    import signal
    host = cluster.host("--doorbell", "eventfd")
    g = cluster.guest(3, "--doorbell", "eventfd", "--service", "echo=5000")
    host.signal(signal.SIGKILL)
    host.p.wait(10)
    assert g.wait_log("lost the host", 10)
    cluster.host("--doorbell", "eventfd")
    assert g.wait_log("reconnected to the host", 20), g.text()
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(cluster.run_dir / "vsock-3.sock"))
    s.sendall(b"CONNECT 5000\n" + b"x" * 70000)
    got = b""
    while got.count(b"x") < 70000:
        chunk = s.recv(65536)
        assert chunk, got[:80]
        got += chunk
    s.close()
    assert got.startswith(b"OK ") and got.endswith(b"x" * 70000)
