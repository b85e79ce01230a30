"""The two processes: CLI errors, lifecycle, SIGKILL of either side, nothing left in /dev/shm."""
import json
import signal
import subprocess
import sys
import time

import pytest

from shared.resources import ours_in_dev_shm, run_tag

from .procs import ROOT, Cluster, _env

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def cluster(shm_guard):
    c = Cluster(shm_guard)
    yield c
    c.close()


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


@pytest.mark.parametrize("args,needle", [
    (["-m", "guest", "--cid", "2"], "reserved"),
    (["-m", "guest", "--cid", "x"], "not a number"),
    (["-m", "guest", "--cid", "3", "--mem", "12Q"], "not a size"),
    (["-m", "guest", "--cid", "3", "--service", "ftp=21"], "service"),
    (["-m", "guest", "--cid", "3", "--queue-size", "100"], "power of 2"),
    (["-m", "host", "--max-queue-size", "3"], "power of 2"),
    (["-m", "host", "--bogus"], "unrecognized"),
])
def test_bad_flags_one_line_error(args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert needle in r.stderr


def test_help_documents_every_flag():
    for mod, flags in [("host", ["--run-dir", "--pcap", "--credit-policy", "--dialect", "--log-level"]),
                       ("guest", ["--run-dir", "--cid", "--mem", "--service", "--run", "--pcap", "--queue-size"])]:
        r = run_cli("-m", mod, "--help")
        assert r.returncode == 0
        for f in flags:
            assert f in r.stdout


def test_unreachable_host_is_one_line_error(shm_guard):
    r = run_cli("-m", "guest", "--run-dir", str(shm_guard), "--cid", "3", "--mem", "8M")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "no host" in r.stderr
    assert not [n for n in ours_in_dev_shm() if run_tag(shm_guard) in n]


def test_second_host_on_same_run_dir_refused(cluster):
    cluster.host()
    r = run_cli("-m", "host", "--run-dir", str(cluster.run_dir))
    assert r.returncode == 1 and "already serving" in r.stderr and "Traceback" not in r.stderr


def test_duplicate_and_reserved_cids_refused(cluster):
    cluster.host()
    cluster.guest(3)
    dup = cluster.guest(3, wait=False)
    assert dup.p.wait(30) == 1
    assert "already in use" in dup.text() and "Traceback" not in dup.text()


def test_guest_boots_negotiates_and_shuts_down_clean(cluster):
    host = cluster.host()
    g = cluster.guest(3)
    assert host.wait_log("DRIVER_OK", 10) or host.wait_log("started", 10)
    assert "features" in g.text()
    assert g.stop() == 0
    assert host.wait_log("closed its control connection", 10)
    assert not [n for n in ours_in_dev_shm() if run_tag(cluster.run_dir) in n]


def test_sigkill_guest_host_releases_and_serves_others(cluster):
    host = cluster.host()
    a = cluster.guest(3)
    b = cluster.guest(4)
    rec = cluster.run_dir / "owners"
    [a_rec] = [p for p in rec.glob(f"{a.pid}-*.json")]
    a_names = json.loads(a_rec.read_text())
    a_names = {*a_names["shm"], *("sem." + n.lstrip("/") for n in a_names["sems"])}
    assert a_names and a_names <= set(ours_in_dev_shm())
    a.signal(signal.SIGKILL)
    a.p.wait(10)
    # the device process of guest-3 ends (control EOF) and the host reaps what guest-3 left
    assert host.wait_log("(vsock of guest 'guest-3') ended", 10), host.text()
    end = time.monotonic() + 10
    while time.monotonic() < end and (a_names & set(ours_in_dev_shm()) or a_rec.exists()):
        time.sleep(0.05)
    assert not a_names & set(ours_in_dev_shm()) and not a_rec.exists()
    assert host.p.poll() is None
    c = cluster.guest(5)                       # still serving new guests
    assert b.p.poll() is None and c.p.poll() is None
    cluster.guest(3)                           # and the dead guest's CID is free again


def test_sigkill_host_guest_reconnects(cluster):
    host = cluster.host()
    g = cluster.guest(3)
    host.signal(signal.SIGKILL)
    host.p.wait(10)
    assert g.wait_log("lost the host", 10)
    cluster.host()
    assert g.wait_log("reconnected to the host", 20), g.text()


def test_hostile_control_clients_do_not_disturb_guests(cluster):
    import socket as so

    import msgpack
    cluster.host()
    g = cluster.guest(3)
    for payload in [b"\xc1\xc1garbage", msgpack.packb({"op": "SET_OWNER", "seq": 1}),
                    msgpack.packb([1, 2, 3]), msgpack.packb({"op": "HELLO", "seq": 1, "version": 1,
                                                             "device": "vsock", "guest": "x",
                                                             "reconnect": False, "params": {"cid": 2}})]:
        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(cluster.run_dir / "control.sock"))
        s.sendall(payload)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        rep = msgpack.unpackb(data)
        assert rep["ok"] is False and rep["error"] and rep["message"]
    assert g.p.poll() is None
    cluster.guest(4)                           # the host still serves new guests
