"""virtio-net across processes: host daemon, guests with --net, the L2 segment; bad input."""
import json
import os
import subprocess
import sys
import time

import pytest

from shared.resources import ours_in_dev_shm, run_tag
from shared.stats import read_all

from .procs import ROOT, Cluster, Proc, _env
from .waiting import fresh_snapshots, wait_until

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def cluster(shm_guard):
    c = Cluster(shm_guard)
    yield c
    c.close()


def net_guest(c: Cluster, name: str, *extra: str, env: dict | None = None, wait: bool = True) -> Proc:
    if env:
        os.environ.update(env)
    try:
        p = Proc(["-m", "guest", "--run-dir", str(c.run_dir), "--name", name, "--mem", "16M", *extra],
                 c._log(name))
    finally:
        for k in env or {}:
            os.environ.pop(k, None)
    c.procs.append(p)
    if wait:
        assert p.wait_log("virtio-net:", 30) and "up" in p.text(), p.text()
    return p


def wait_file(path, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return [json.loads(x) for x in path.read_text().splitlines()]
        time.sleep(0.05)
    return []


def test_two_guests_ping_and_udp_echo_over_the_segment(cluster, tmp_path):
    cluster.host()
    net_guest(cluster, "a", "--net", "segment:lan", "--ip", "169.254.10.1/24", "--mac", "52:54:00:00:10:01")
    out = tmp_path / "b.json"
    b = net_guest(cluster, "b", "--net", "segment:lan", "--ip", "169.254.10.2/24",
                  "--mac", "52:54:00:00:10:02", "--net-run", "tests.net_apps:ping_peer",
                  env={"VE_APP_OUT": str(out), "VE_APP_PEER": "169.254.10.1", "VE_APP_COUNT": "5"})
    res = wait_file(out)
    assert res and res[0]["replies"] == 5 and res[0]["udp_echo_ok"], (res, b.text())


def test_guest_with_vsock_and_net(cluster, tmp_path):
    cluster.host()
    g = net_guest(cluster, "both", "--cid", "7", "--net", "loopback", "--ip", "169.254.11.1/24")
    assert g.wait_log("vsock device ready", 10)


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


@pytest.mark.parametrize("args,needle", [
    (["--net", "tap:"], "malformed"),
    (["--net", "udp:1"], "want udp:LPORT:RPORT"),
    (["--net", "loopback", "--mac", "01:02:03:04:05:06"], "multicast"),
    (["--net", "loopback", "--ip", "169.254.1.300/24"], "bad IPv4"),
    (["--ip", "169.254.1.3/24"], "need --net"),
])
def test_bad_net_flags_one_line_error(args, needle):
    r = run_cli("-m", "guest", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr


def test_host_refuses_missing_tap_and_duplicate_mac(cluster):
    cluster.host()
    r = run_cli("-m", "guest", "--run-dir", str(cluster.run_dir), "--mem", "8M", "--net", "tap:nosuchtap9")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]            # (INFO logging goes to stderr too)
    assert last.startswith("guest: the host refused the net device") and "no interface 'nosuchtap9'" in last
    net_guest(cluster, "a", "--net", "segment:lan", "--mac", "52:54:00:00:20:01")
    r = run_cli("-m", "guest", "--run-dir", str(cluster.run_dir), "--mem", "8M", "--net", "loopback",
                "--mac", "52:54:00:00:20:01")
    assert r.returncode == 1 and "already in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # only guest a's RAM and doorbells (1 + 2 queues x 3) once the refused guest's are gone
    wait_until(lambda: len([n for n in ours_in_dev_shm() if run_tag(cluster.run_dir) in n]) <= 7,
               what="refused guest's resources removed")


@pytest.mark.slow
def test_a_flooding_guest_starves_nobody(cluster, tmp_path):
    """Guest f floods broadcast frames onto the segment; meanwhile b pings c and UDP-echoes
    through it, and f itself answers pings (its own rx is not starved by its tx)."""
    cluster.host()
    net_guest(cluster, "c", "--net", "segment:lan", "--ip", "169.254.10.3/24", "--mac", "52:54:00:00:30:03")
    fout = tmp_path / "f.json"
    net_guest(cluster, "f", "--net", "segment:lan", "--ip", "169.254.10.9/24", "--mac", "52:54:00:00:30:09",
              "--net-run", "tests.net_apps:flood", env={"VE_APP_OUT": str(fout), "VE_APP_SECONDS": "6"})
    wait_until(lambda: any(d.get("guest") == "f" and d["stats"].get("tx_frames", 0) > 100
                           for d in read_all(cluster.run_dir) if d.get("role") == "device"),
               30, "flood under way")
    out_c, out_f = tmp_path / "bc.json", tmp_path / "bf.json"
    net_guest(cluster, "b", "--net", "segment:lan", "--ip", "169.254.10.2/24", "--mac", "52:54:00:00:30:02",
              "--net-run", "tests.net_apps:ping_peer",
              env={"VE_APP_OUT": str(out_c), "VE_APP_PEER": "169.254.10.3", "VE_APP_COUNT": "5"})
    net_guest(cluster, "d", "--net", "segment:lan", "--ip", "169.254.10.4/24", "--mac", "52:54:00:00:30:04",
              "--net-run", "tests.net_apps:ping_peer",
              env={"VE_APP_OUT": str(out_f), "VE_APP_PEER": "169.254.10.9", "VE_APP_COUNT": "5"})
    rc, rf = wait_file(out_c), wait_file(out_f)
    flooded = wait_file(fout)
    assert flooded and flooded[0]["flooded"] > 1000, flooded
    assert rc and rc[0]["replies"] == 5 and rc[0]["udp_echo_ok"], rc
    assert rf and rf[0]["replies"] == 5, rf


def test_backend_that_stops_reading_pauses_tx_and_loses_nothing(cluster, tmp_path):
    """Guest b sends 3000 unicast frames to a segment port this test owns and does not read for a
    while: the host must stop taking tx (tx polling, counted as tx_full), then deliver every frame."""
    import socket as so
    from shared.stats import read_all
    cluster.host()
    bench = tmp_path / "bench"
    bench.mkdir()
    net_guest(cluster, "b", "--net", "segment:slow", "--mac", "52:54:00:00:40:02",
              "--net-run", "tools.bench_apps:net_bench",
              env={"VE_BENCH_DIR": str(bench), "VE_BENCH_PLAN": '[["tx", 200, 3000]]',
                   "VE_BENCH_DST": "525400004009"})
    seg = cluster.run_dir / "net-slow"
    me = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    me.setsockopt(so.SOL_SOCKET, so.SO_RCVBUF, 8192)
    me.bind(str(seg / "525400004009.sock"))
    try:
        # announce our MAC so b's port learns where it lives
        me.sendto(b"\xff" * 6 + bytes.fromhex("525400004009") + b"\x88\xb6" + bytes(46),
                  str(seg / "525400004002.sock"))
        wait_until(lambda: any(d.get("guest") == "b" and d["stats"].get("rx_frames", 0) >= 1
                               for d in read_all(cluster.run_dir) if d.get("role") == "device"),
                   10, "announcement taken in by b's port")
        (bench / "go-0").touch()
        time.sleep(1.5)        # the thing under test: not reading a while, b's sends hit a full port
        me.settimeout(3)
        got = 0
        while got < 3000:
            try:
                f = me.recv(65536)
            except TimeoutError:
                break
            assert f[:6] == bytes.fromhex("525400004009") and len(f) == 200
            got += 1
        assert got == 3000
        st = fresh_snapshots(cluster.run_dir)[0]["stats"]
        assert st["tx_full"] > 0 and st["tx_frames"] >= 3000 and st["tx_dropped"] == 0, st
    finally:
        me.close()
        (seg / "525400004009.sock").unlink(missing_ok=True)


def test_set_backend_swapped_and_detached_under_traffic(cluster, tmp_path):
    """The guest's VMM swaps the tx backend (SET_BACKEND) while frames flow, detaches it (frames
    wait on the ring) and re-attaches it: every frame arrives once, in order, at the right peer."""
    import socket as so

    def port():
        s = so.socket(so.AF_INET, so.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        return p
    l1, r1, l2, r2 = port(), port(), port(), port()
    peers = []
    for r in (r1, r2):
        s = so.socket(so.AF_INET, so.SOCK_DGRAM)
        s.setsockopt(so.SOL_SOCKET, so.SO_RCVBUF, 1 << 21)
        s.bind(("127.0.0.1", r))
        s.settimeout(0.5)
        peers.append(s)
    cluster.host()
    out = tmp_path / "swap.json"
    net_guest(cluster, "s", "--net", f"udp:{l1}:{r1}", "--net-run", "tests.net_apps:swap_under_traffic",
              env={"VE_APP_OUT": str(out), "VE_APP_N": "300", "VE_APP_SPEC2": f"udp:{l2}:{r2}"})
    res = wait_file(out)
    assert res and res[0]["steps"] == ["swapped", "detached", "reattached"], res
    assert res[0]["waiting_while_detached"] > 0 and res[0]["left"] == 0, res

    def drain(s):
        got = []
        while True:
            try:
                got.append(int.from_bytes(s.recv(2048)[14:18], "big"))
            except TimeoutError:
                return got
    a, b = drain(peers[0]), drain(peers[1])
    for s in peers:
        s.close()
    assert a == list(range(100)) and b == list(range(100, 300)), (a[-3:], b[:3], len(a), len(b))


def test_malformed_tx_chain_needs_reset_others_undisturbed(cluster, tmp_path):
    from shared.constants import VIRTIO_CONFIG_S_NEEDS_RESET
    from shared.stats import read_all
    cluster.host()
    net_guest(cluster, "a", "--net", "segment:lan", "--ip", "169.254.10.1/24", "--mac", "52:54:00:00:50:01")
    bad_out = tmp_path / "bad.json"
    bad = net_guest(cluster, "evil", "--net", "segment:lan", "--ip", "169.254.10.6/24",
                    "--mac", "52:54:00:00:50:06", "--net-run", "tests.net_apps:bad_tx_chain",
                    env={"VE_APP_OUT": str(bad_out)})
    assert wait_file(bad_out)
    assert bad.wait_log("NEEDS_RESET", 10), bad.text()
    out = tmp_path / "b.json"
    net_guest(cluster, "b", "--net", "segment:lan", "--ip", "169.254.10.2/24", "--mac", "52:54:00:00:50:02",
              "--net-run", "tests.net_apps:ping_peer",
              env={"VE_APP_OUT": str(out), "VE_APP_PEER": "169.254.10.1", "VE_APP_COUNT": "3"})
    res = wait_file(out)
    assert res and res[0]["replies"] == 3 and res[0]["udp_echo_ok"], res
    devs = {d["guest"]: d for d in fresh_snapshots(cluster.run_dir)}
    assert devs["evil"]["status"] & VIRTIO_CONFIG_S_NEEDS_RESET and devs["evil"]["stats"]["errors"] == 1
    assert "Unexpected descriptor format for TX" in devs["evil"]["stats"]["last_error"]
    assert not devs["a"]["stats"]["broken"] and not devs["b"]["stats"]["broken"]
