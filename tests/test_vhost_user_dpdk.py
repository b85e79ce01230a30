"""DPDK testpmd's virtio_user as the vhost-user frontend of our vhost-net (a second real peer).

testpmd (`--no-huge --no-pci`, io forwarding, port topology loop) sends SET_OWNER first, gives one
memfd region whose guest addresses are its own virtual addresses, posts its rx buffers with
avail.flags NO_INTERRUPT and polls: no call eventfd is ever needed. Our backend is
`--net-backend udp:LPORT:RPORT`: a datagram this test sends to LPORT is a frame for testpmd's rx
ring; testpmd forwards it out of the same port (our tx ring), and it comes back to RPORT. Counts:
every frame back, in order, equal to testpmd's own forward statistics and our device's counters.
A second testpmd then uses the same backend process. Skips without dpdk-testpmd (.ci/run installs
dpdk-dev) or when it cannot start here.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from shared.stats import read_all
from tests.procs import Proc

pytestmark = [pytest.mark.multiprocess, pytest.mark.dpdk]

TESTPMD = shutil.which("dpdk-testpmd")
PROBE = 1 << 30                     # probe frames' numbers
FRAME = bytes.fromhex("ffffffffffff525400ee0001") + b"\x88\xb5"


def frame(i: int, size: int = 64) -> bytes:
    return FRAME + i.to_bytes(4, "big") + bytes(size - len(FRAME) - 4)


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Testpmd:
    __test__ = False
    """dpdk-testpmd with a virtio_user port on SOCK; stopped by pid, its runtime dir removed."""

    def __init__(self, sock: Path, log: Path):
        self.prefix = f"ve{uuid.uuid4().hex[:10]}"
        self.log = log
        self._f = open(log, "wb")
        cmd = [*(["stdbuf", "-oL"] if shutil.which("stdbuf") else []), TESTPMD, "--no-huge", "-m", "256", "--no-pci", "--no-shconf", f"--file-prefix={self.prefix}",
               "--vdev", f"net_virtio_user0,path={sock},queues=1", "--",
               "--forward-mode=io", "--auto-start", "--port-topology=loop", "--total-num-mbufs=4096"]
        # stdin stays open: without -i, testpmd runs until enter (or a signal)
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._f, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_forwarding(self, peer, lport: int, timeout: float = 60) -> tuple[int, int] | None:
        """Probe frames until one comes back: frames that reach testpmd's rx ring before its port
        started are dropped (the virtio PMD flushes used rx entries at the start). Returns
        (probes sent, probes back) once every probe sent has had its chance, None on timeout."""
        end = time.monotonic() + timeout
        sent = back = 0
        peer.settimeout(0.2)
        while time.monotonic() < end and self.p.poll() is None:
            peer.sendto(frame(PROBE + sent), ("127.0.0.1", lport))
            sent += 1
            try:
                while True:
                    if int.from_bytes(peer.recv(2048)[14:18], "big") >= PROBE:
                        back += 1
            except TimeoutError:
                pass
            if back:
                return sent, back
        return None

    def stop(self) -> dict:
        """SIGINT (testpmd prints its forward statistics), then SIGKILL if it hangs."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        if self.p.stdin:
            self.p.stdin.close()
        self._f.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        m = re.search(r"Accumulated forward statistics.*?RX-packets: (\d+).*?TX-packets: (\d+)", self.text(), re.S)
        return {"rx": int(m.group(1)), "tx": int(m.group(2))} if m else {}


@pytest.fixture
def udp_backend(tmp_path):
    if TESTPMD is None:
        pytest.skip("dpdk-testpmd is not installed (apt-get install dpdk-dev; see .ci/run)")
    if os.geteuid() != 0:
        pytest.skip("dpdk-testpmd needs root (its runtime directory is /var/run/dpdk)")
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    peer.bind(("127.0.0.1", 0))
    lport = free_udp_port()
    run = tmp_path / "run"
    sock = tmp_path / "pmd.sock"
    host = Proc(["-m", "host", "--vhost-user-net", str(sock), "--net-backend",
                 f"udp:{lport}:{peer.getsockname()[1]}", "--run-dir", str(run), "--log-level", "DEBUG"],
                tmp_path / "host.log")
    try:
        assert host.wait_log("listening on", 20), host.text()
        yield {"host": host, "sock": sock, "peer": peer, "lport": lport, "run": run}
    finally:
        host.stop()
        peer.close()


LATE_PROBES: list[int] = []


def send_and_collect(peer, lport: int, ids, timeout: float = 10.0, burst: int = 64) -> tuple[list[int], float]:
    """Send frames `ids` with at most `burst` in flight; return what came back (late probes are
    set aside in LATE_PROBES) and the time it took."""
    got: list[int] = []
    ids = list(ids)
    peer.settimeout(0.05)
    t0 = time.monotonic()
    end = t0 + timeout
    sent = 0
    while (len(got) < len(ids)) and time.monotonic() < end:
        while sent < len(ids) and sent - len(got) < burst:
            peer.sendto(frame(ids[sent]), ("127.0.0.1", lport))
            sent += 1
        try:
            data = peer.recv(2048)
        except TimeoutError:
            continue
        i = int.from_bytes(data[14:18], "big")
        (LATE_PROBES if i >= PROBE else got).append(i)
    return got, time.monotonic() - t0


def device_stats(run: Path) -> dict:
    time.sleep(0.7)                               # the next stats snapshot (every 0.5 s)
    (st,) = [d for d in read_all(run) if d.get("role") == "device"]
    return st


def test_testpmd_forwards_our_frames_back(udp_backend, tmp_path):
    host, peer, lport = udp_backend["host"], udp_backend["peer"], udp_backend["lport"]
    pmd = Testpmd(udp_backend["sock"], tmp_path / "testpmd1.log")
    try:
        probes = host.wait_log("queue 1 started", 60) and pmd.wait_forwarding(peer, lport)
        if not probes:
            pmd.stop()
            if "virtio_user" not in pmd.text() or pmd.p.returncode not in (None, 0):
                pytest.skip(f"testpmd cannot run here: {pmd.text()[-500:]}")
            raise AssertionError(host.text()[-3000:] + pmd.text()[-2000:])
        n = 2000
        got, dt = send_and_collect(peer, lport, range(n))
        assert got == list(range(n)), (len(got), got[:5], got[-5:])
        st = device_stats(udp_backend["run"])
        s = st["stats"]
        sent, back = probes
        back += len(LATE_PROBES)
        LATE_PROBES.clear()
        print(f"device stats: rx {s['rx_packets']} tx {s['tx_packets']} interrupts {s['vq_interrupts']} "
              f"suppressed {s['vq_interrupts_suppressed']} kicks {s['vq_kicks']}; probes {probes}")
        assert st["device"] == "net" and s["drops"] == 0, s
        assert s["rx_packets"] == n + sent and s["tx_packets"] == n + back, (s, probes)
        assert s["vq_interrupts"] == [0, 0] and s["vq_interrupts_suppressed"][0] > 0, s   # NO_INTERRUPT
    finally:
        fwd = pmd.stop()
    assert fwd == {"rx": n + back, "tx": n + back}, pmd.text()[-1500:]
    log = host.text()
    assert "SET_OWNER" in log.split("SET_PROTOCOL_FEATURES")[0]    # DPDK's order: SET_OWNER first
    assert "GET_VRING_BASE" in log and host.wait_log("ready for the next frontend", 10)
    print(f"testpmd loop: {n} frames of 64 bytes back in {dt:.3f} s ({n / dt:.0f} frames/s, "
          f"at most 64 in flight)")
    # the backend stays: a second testpmd is served by the same process
    pmd2 = Testpmd(udp_backend["sock"], tmp_path / "testpmd2.log")
    try:
        assert host.wait_log("frontend connected (connection 2)", 60), host.text()[-2000:]
        probes2 = pmd2.wait_forwarding(peer, lport)
        assert probes2, pmd2.text()[-2000:]
        got, _ = send_and_collect(peer, lport, range(10_000, 10_100))
        assert got == list(range(10_000, 10_100))
    finally:
        fwd2 = pmd2.stop()
    back2 = probes2[1] + len(LATE_PROBES)
    assert fwd2 == {"rx": 100 + back2, "tx": 100 + back2}
    assert host.p.poll() is None and "Traceback" not in host.text()
