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
