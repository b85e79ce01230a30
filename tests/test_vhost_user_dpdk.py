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
import socket
from pathlib import Path

import pytest

from tests.waiting import fresh_snapshots
from tests.procs import Proc
from tools.launch import free_udp_port
from tools.testpmd import LATE_PROBES, TESTPMD, Testpmd, send_and_collect

pytestmark = [pytest.mark.multiprocess, pytest.mark.dpdk]


def _udp_backend(tmp_path, extra: list[str]):
    """Our vhost-user-net (extra flags) on a UDP backend whose far end is `peer`."""
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
    host = Proc(["-m", "host", *extra, "--vhost-user-net", str(sock), "--net-backend",
                 f"udp:{lport}:{peer.getsockname()[1]}", "--run-dir", str(run), "--log-level", "DEBUG"],
                tmp_path / "host.log")
    try:
        assert host.wait_log("listening on", 20), host.text()
        yield {"host": host, "sock": sock, "peer": peer, "lport": lport, "run": run}
    finally:
        host.stop()
        peer.close()


@pytest.fixture
def udp_backend(tmp_path):
    yield from _udp_backend(tmp_path, [])


def device_stats(run: Path) -> dict:
    (st,) = fresh_snapshots(run)                  # written after the frames were counted
    return st


def forward_frames(b: dict, pmd: Testpmd, n: int = 2000) -> tuple[dict, int, int, float]:
    """Once testpmd forwards (skip if it cannot run here), n numbered frames through it and back
    in order; returns the device's stats snapshot, the probes sent and come back, the seconds."""
    host, peer, lport = b["host"], b["peer"], b["lport"]
    probes = host.wait_log("queue 1 started", 60) and pmd.wait_forwarding(peer, lport)
    if not probes:
        pmd.stop()
        if "virtio_user" not in pmd.text() or pmd.p.returncode not in (None, 0):
            pytest.skip(f"testpmd cannot run here: {pmd.text()[-500:]}")
        raise AssertionError(host.text()[-3000:] + pmd.text()[-2000:])
    got, dt = send_and_collect(peer, lport, range(n))
    assert got == list(range(n)), (len(got), got[:5], got[-5:])
    sent, back = probes
    back += len(LATE_PROBES)
    LATE_PROBES.clear()
    return device_stats(b["run"]), sent, back, dt


def test_testpmd_forwards_our_frames_back(udp_backend, tmp_path):
    host, peer, lport = udp_backend["host"], udp_backend["peer"], udp_backend["lport"]
    pmd = Testpmd(udp_backend["sock"], tmp_path / "testpmd1.log")
    n = 2000
    try:
        st, sent, back, dt = forward_frames(udp_backend, pmd, n)
        s = st["stats"]
        probes = (sent, back)
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


@pytest.fixture
def udp_backend_packed(tmp_path):
    yield from _udp_backend(tmp_path, ["--packed"])


def test_testpmd_with_packed_vq_forwards_our_frames_back(udp_backend_packed, tmp_path):
    """Issue 19: virtio_user with packed_vq=1 against our --packed vhost-net: the rings are packed
    (VIRTIO_F_RING_PACKED acked, both queues VhostVirtqueuePacked), the same frames come back in
    order, the counts agree; SET_VRING_BASE carried the avail wrap counter (bit 15) and
    GET_VRING_BASE returns both positions with theirs."""
    from shared.constants import VIRTIO_F_RING_PACKED
    b = udp_backend_packed
    host = b["host"]
    pmd = Testpmd(b["sock"], tmp_path / "testpmd-packed.log", packed=True)
    n = 2000
    try:
        st, sent, back, dt = forward_frames(b, pmd, n)
        s = st["stats"]
        probes = (sent, back)
        print(f"packed: device stats: rx {s['rx_packets']} tx {s['tx_packets']} interrupts "
              f"{s['vq_interrupts']} kicks {s['vq_kicks']}; probes {probes}")
        assert s["features"] >> VIRTIO_F_RING_PACKED & 1, hex(s["features"])
        assert [q.get("packed") for q in s["vqs"]] == [True, True], s["vqs"]
        assert s["drops"] == 0 and s["errors"] == 0, s
        assert s["rx_packets"] == n + sent and s["tx_packets"] == n + back, (s, probes)
    finally:
        fwd = pmd.stop()
    assert fwd == {"rx": n + back, "tx": n + back}, pmd.text()[-1500:]
    log = host.text()
    assert "base 32768" in log, log[-2000:]                 # SET_VRING_BASE 0x8000: slot 0, wrap 1
    assert "stopped at base 0x" in log and host.wait_log("ready for the next frontend", 10)
    print(f"testpmd packed loop: {n} frames of 64 bytes back in {dt:.3f} s ({n / dt:.0f} frames/s)")
