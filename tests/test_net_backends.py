"""vhost-net with real backends, in one process: UDP pair, the Unix L2 segment, loopback; spec errors;
tap and AF_PACKET in a network namespace of the test's own (tests/net_ns_probe.py)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from host.net.backends.loopback import Loopback
from host.net.backends.sockets import Segment, UdpPair
from host.net.backends.spec import open_backend
from shared.net.spec import check_spec, claim_key
from shared.net.hdr import parse_ip
from tests.net_rig import NetRig
from tests.waiting import wait_until
from tools.launch import free_udp_port

MAC_A = bytes.fromhex("525400000a01")
MAC_B = bytes.fromhex("525400000a02")
ROOT = Path(__file__).resolve().parent.parent


def frame(i: int, size: int, src: bytes = MAC_A) -> bytes:
    return b"\xff" * 6 + src + b"\x88\xb5" + (i.to_bytes(4, "big") * size)[:size - 14]


def test_frames_both_ways_over_udp_pair():
    lport, rport = free_udp_port(), free_udp_port()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", rport))
    peer.settimeout(5)
    rig = NetRig(MAC_A, UdpPair(lport, rport)).start()
    try:
        sent = [frame(i, 64 if i % 2 else 1514) for i in range(50)]
        for f in sent:
            rig.net.send_frame(f)
        got = [peer.recv(65536) for _ in sent]
        assert got == sent                                   # one frame a datagram, in order
        back = [frame(100 + i, 60 + 29 * i, MAC_B) for i in range(50)]
        for f in back:
            peer.sendto(f, ("127.0.0.1", lport))
        assert [rig.net.recv_frame(5) for _ in back] == back
    finally:
        rig.close()
        peer.close()


def test_loopback_backend_reflects_through_the_stack():
    rig = NetRig(MAC_A, Loopback()).start()
    try:
        rig.net.send_frame(frame(1, 1514))
        assert rig.net.recv_frame(5) == frame(1, 1514)
    finally:
        rig.close()


def test_two_guests_ping_and_udp_echo_over_the_segment(tmp_path):
    a = NetRig(MAC_A, Segment(tmp_path, "lan", MAC_A), parse_ip("169.254.10.1/24")).start()
    b = NetRig(MAC_B, Segment(tmp_path, "lan", MAC_B), parse_ip("169.254.10.2/24")).start()
    try:
        rtts = a.net.ping("169.254.10.2", count=3)
        assert len(rtts) == 3
        assert len(b.net.ping("169.254.10.1", count=2)) == 2
        assert a.net.udp_echo("169.254.10.2", b"hello over the segment") == b"hello over the segment"
        assert a.backend.fdb[MAC_B] == str(b.backend.path)   # learned from B's replies
        assert b.net.stack.stats["echo_answered"] == 3
    finally:
        a.close()
        b.close()
    assert not (tmp_path / "net-lan").exists()               # the last port out removed it


def test_segment_floods_unknown_and_refuses_a_duplicate_mac(tmp_path):
    ports = [Segment(tmp_path, "s", bytes.fromhex(f"5254000000{i:02x}")) for i in range(1, 4)]
    try:
        f = bytes.fromhex("5254000000ee") + bytes.fromhex("525400000001") + b"\x88\xb5" + bytes(50)
        assert ports[0].send(f)                               # unknown destination: flooded
        assert wait_until(lambda: ports[1].readable()) and ports[1].recv() == f
        assert wait_until(lambda: ports[2].readable()) and ports[2].recv() == f
        with pytest.raises(ValueError, match="already on segment"):
            Segment(tmp_path, "s", bytes.fromhex("525400000001"))
    finally:
        for p in ports:
            p.close()


def test_segment_sends_to_a_registered_port_it_has_not_learned(tmp_path):
    """Each port is named by its guest's MAC (a static entry): unicast to a guest that has not
    sent yet goes to its port alone, with backpressure, not flooded (where a full port drops)."""
    ports = [Segment(tmp_path, "s", bytes.fromhex(f"5254000000{i:02x}")) for i in range(1, 4)]
    try:
        f = bytes.fromhex("525400000002") + bytes.fromhex("525400000001") + b"\x88\xb5" + bytes(50)
        assert ports[0].send(f)
        assert wait_until(lambda: ports[1].readable()) and ports[1].recv() == f
        assert not ports[2].readable()      # not flooded (a flood is sent by the same send())
        assert ports[0].fdb[bytes.fromhex("525400000002")].endswith("525400000002.sock")
    finally:
        for p in ports:
            p.close()


def test_segment_in_a_run_dir_deeper_than_sun_path(tmp_path):
    """sun_path holds 107 bytes; a deep run dir still gets a working segment (ports are named
    through a descriptor of the segment's directory) and learning still finds the peer."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    a = NetRig(MAC_A, Segment(deep, "lan", MAC_A), parse_ip("169.254.10.1/24")).start()
    b = NetRig(MAC_B, Segment(deep, "lan", MAC_B), parse_ip("169.254.10.2/24")).start()
    try:
        assert len(str(a.backend.path)) > 108
        assert len(a.net.ping("169.254.10.2", count=2)) == 2
        assert a.net.udp_echo("169.254.10.2", b"deep") == b"deep"
        assert a.backend.fdb[MAC_B].endswith(b.backend.path.name)
    finally:
        a.close()
        b.close()
    assert not (deep / "net-lan").exists()


@pytest.mark.parametrize("spec,msg", [
    ("", "empty"), ("wire:x", "unknown net backend"), ("udp:1", "want udp:LPORT:RPORT"),
    ("udp:x:2", "bad port"), ("udp:0:2", "bad port"), ("tap:", "malformed"),
    ("tap:nosuchtap0", "no interface"), ("packet:nosuchif0", "no interface"),
    ("segment:a/b", "bad segment name"), ("loopback:1", "no arguments"),
    ("tap:x,foo=1", "unknown tap option"),
])
def test_bad_specs_are_one_line_errors(spec, msg, tmp_path):
    with pytest.raises(ValueError, match=msg) as e:
        open_backend(spec, run_dir=tmp_path, mac=MAC_A)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []                    # nothing left behind


def test_claim_keys():
    assert claim_key("tap:tap0,vnet_hdr=on") == "tap:tap0"
    assert claim_key("udp:4000:4001") == "udp:4000"
    assert claim_key("segment:lan") is None
    assert check_spec("packet:veth0") == ("packet", ["veth0"])


def _netns_ok() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return "network namespaces need root, unshare(1) and iproute2"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if r.returncode:
        return f"this machine forbids network namespaces: {r.stderr.decode().strip()}"
    if not shutil.which("ping"):
        return "ping(8) is not installed (apt-get install iputils-ping)"
    return None


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["tap", "tap-vnet", "packet",
                                  pytest.param("process", marks=pytest.mark.slow)])
def test_linux_ping_reaches_the_guest(kind):
    why = _netns_ok()
    if why:
        pytest.skip(why)
    r = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.net_ns_probe", kind],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 packets transmitted, 3 received" in r.stdout, r.stdout
