"""End to end: `python -m tools.monitor --once --json` against a live host and guest whose queues move."""
import json
import subprocess
import sys
import time

import pytest

from host.vsock.api import VsockHost
from tests.procs import ROOT, Cluster, _env

pytestmark = pytest.mark.multiprocess


def monitor_json(run_dir, *extra) -> dict:
    r = subprocess.run([sys.executable, "-m", "tools.monitor", "--run-dir", str(run_dir), "--once", "--json",
                        "--interval", "0.6", *extra], capture_output=True, text=True, timeout=60,
                       env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_stats(run_dir, pred, timeout=15.0) -> dict:
    end = time.monotonic() + timeout
    data = monitor_json(run_dir)
    while not pred(data) and time.monotonic() < end:
        time.sleep(0.3)
        data = monitor_json(run_dir)
    return data


def test_once_json_against_a_live_pair(shm_guard):
    c = Cluster(shm_guard)
    try:
        c.host()
        c.guest(3, "--name", "my-first-vm", "--service", "echo=5000")
        before = wait_stats(shm_guard, lambda d: any(q["name"] == "tx" and q["last_avail"] is not None
                                                     for q in d["queues"]))
        s = VsockHost(shm_guard).connect(3, 5000, timeout=20)
        s.settimeout(30)
        payload = b"m" * 200_000
        s.sendall(payload)
        got = 0
        while got < len(payload):
            got += len(s.recv(1 << 16))
        # the connection stays open while the monitor looks
        after = wait_stats(shm_guard, lambda d: d["conns"] and any(
            q["name"] == "rx" and q["used_idx"] != qb["used_idx"]
            for q in d["queues"] for qb in before["queues"] if qb["name"] == "rx"))
        s.close()
    finally:
        c.close()

    g = after["guests"][0]
    assert g["name"] == "my-first-vm" and g["link"] == "connected" and g["status"] == "DRIVER_OK"
    qb = {q["name"]: q for q in before["queues"]}
    qa = {q["name"]: q for q in after["queues"]}
    # queue figures moved: the guest sent on tx and received the echo on rx
    assert qa["tx"]["avail_idx"] != qb["tx"]["avail_idx"] and qa["tx"]["last_avail"] != qb["tx"]["last_avail"]
    assert qa["rx"]["used_idx"] != qb["rx"]["used_idx"]
    assert qa["rx"]["size"] == 128 and qa["rx"]["event_idx"] is True and qa["rx"]["used_event"] is not None
    conn = after["conns"][0]
    assert conn["guest_end"] == "3:5000" and conn["host_end"].startswith("2:")
    assert conn["bytes_tx"] >= 200_000 and conn["bytes_rx"] >= 200_000   # echo: both ways
    rings = after["rings"][0]
    assert rings["error"] == "" and [r["num"] for r in rings["queues"]] == [128, 128, 8]
    for r in rings["queues"]:
        assert not r["problems"] and len(r["desc"]) == r["num"]
    assert set(rings["queues"][0]["desc"]) <= set(".ADU")


def test_a_hostile_guests_broken_ring_is_shown(shm_guard):
    c = Cluster(shm_guard)
    try:
        c.host()
        c.guest(5, "--name", "hostile", "--run", "tests.monitor_apps:break_tx_ring")
        data = wait_stats(shm_guard, lambda d: d["guests"] and d["guests"][0]["errors"])
        r = subprocess.run([sys.executable, "-m", "tools.monitor", "--run-dir", str(shm_guard), "--once",
                            "--view", "ring", "--guest", "5", "--width", "100", "--interval", "0.6"],
                           capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
    finally:
        c.close()
    g = data["guests"][0]
    assert g["status"] == "NEEDS_RESET" and g["errors"] == 1 and g["last_rule"] == 5
    tx = [q for q in data["queues"] if q["name"] == "tx"][0]
    assert tx["errors"] == 1 and tx["broken"] and tx["rule"] == 5
    ring = data["rings"][0]["queues"][1]
    assert "!!" in ring["desc"] and any("loops back" in p for p in ring["problems"])
    assert r.returncode == 0, r.stderr
    assert "NEEDS_RESET" in r.stdout and "loops back" in r.stdout and "ring rule 5" in r.stdout
