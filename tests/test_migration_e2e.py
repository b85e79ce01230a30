"""Live migration across processes (issue 18): a guest with a virtio-net device on host A moves to
an incoming guest on host B (another run dir) while a UDP echo stream flows through it."""
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from guest.net.ipv4 import IPPROTO_UDP, UDP_ECHO_PORT, Ipv4Stack
from shared.net.hdr import parse_ip
from shared.resources import ours_in_dev_shm, run_tag

from .procs import ROOT, Cluster, Proc, _env

pytestmark = pytest.mark.multiprocess

GUEST_MAC = bytes.fromhex("525400001801")
PEER_MAC = bytes.fromhex("525400001899")


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture
def two_hosts(tmp_path):
    dirs = []
    for n in ("a", "b"):
        d = tmp_path / n / "run"
        d.mkdir(parents=True, mode=0o700)
        (d / "owners").mkdir(mode=0o700)
        dirs.append(d)
    cs = [Cluster(d) for d in dirs]
    yield cs
    for c in cs:
        c.close()
    from shared.resources import reap
    for d in dirs:
        reap(d)
        tag = run_tag(d)
        assert not [n for n in ours_in_dev_shm() if tag in n], "leaked in /dev/shm"
        assert not list((d / "owners").glob("*.json")), "owner records left"


def guest(c: Cluster, name: str, *extra: str) -> Proc:
    p = Proc(["-m", "guest", "--run-dir", str(c.run_dir), "--name", name, "--mem", "64M", *extra],
             c._log(name))
    c.procs.append(p)
    return p


def net_args() -> tuple[int, int, list[str]]:
    """A udp backend on two free ports, and the guest's --net/--ip/--mac for it."""
    lport, rport = free_port(), free_port()
    return lport, rport, ["--net", f"udp:{lport}:{rport}", "--ip", "169.254.18.2/24",
                          "--mac", "52:54:00:00:18:01"]


def migrate(mon, inc, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """python -m tools.migrate from the source's monitor to the destination's --incoming."""
    return subprocess.run([sys.executable, "-m", "tools.migrate", "--monitor", str(mon), "--to",
                           f"unix:{inc}", *extra], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


class EchoStream:
    """Numbered UDP echo requests every `interval` s from a peer on the guest's udp backend;
    each payload carries its number and a SHA-256 of itself, checked when it comes back."""

    def __init__(self, lport: int, rport: int, guest_ip: str, interval: float = 0.004):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", rport))
        self.sock.settimeout(0.05)
        self.dst = ("127.0.0.1", lport)
        self.peer = Ipv4Stack(PEER_MAC, __import__("ipaddress").ip_interface("169.254.18.1/24"))
        self.gip = parse_ip(guest_ip).ip.packed
        self.interval = interval
        self.sent: dict[int, float] = {}
        self.back: dict[int, float] = {}
        self.bad = 0
        self.garps = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._tx, daemon=True),
                        threading.Thread(target=self._rx, daemon=True)]

    def payload(self, n: int) -> bytes:
        body = n.to_bytes(8, "big") * 64
        return body + hashlib.sha256(body).digest()

    def _tx(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            udp = self.peer.udp(41000, self.gip, UDP_ECHO_PORT, self.payload(n))
            self.sent[n] = time.monotonic()
            try:
                self.sock.sendto(self.peer.frame_to(GUEST_MAC, self.gip, IPPROTO_UDP, udp), self.dst)
            except OSError:
                pass                         # nobody bound to the guest's port right now
            time.sleep(self.interval)

    def _rx(self):
        while not self.stop.is_set():
            try:
                f = self.sock.recv(65536)
            except (socket.timeout, OSError):
                continue
            if f[12:14] == b"\x08\x06" and f[0:6] == b"\xff" * 6 and f[28:32] == f[38:42] == self.gip:
                self.garps += 1
                continue
            self.peer.input(f)
            while self.peer.udp_in:
                _sip, _sport, _dport, data = self.peer.udp_in.popleft()
                body, digest = data[:-32], data[-32:]
                if hashlib.sha256(body).digest() != digest or len(body) != 512:
                    self.bad += 1
                    continue
                self.back[int.from_bytes(body[:8], "big")] = time.monotonic()

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self.sock.close()


def test_net_guest_migrates_between_two_hosts_with_an_echo_stream(two_hosts, tmp_path):
    a, b = two_hosts
    a.host()
    b.host()
    lport, rport, net = net_args()
    mon = tmp_path / "src.mon"
    inc = tmp_path / "incoming.sock"
    src = guest(a, "mig", *net, "--monitor-socket", str(mon))
    assert src.wait_log("virtio-net:", 30), src.text()
    dst = guest(b, "mig", *net, "--incoming", f"unix:{inc}")
    assert dst.wait_log("waiting for an incoming migration", 30), dst.text()
    stream = EchoStream(lport, rport, "169.254.18.2/24").start()
    try:
        time.sleep(1.0)
        before = len(stream.back)
        assert before > 50, (before, src.text()[-2000:])
        t0 = time.monotonic()
        r = migrate(mon, inc, "--json", timeout=120)
        total = time.monotonic() - t0
        assert r.returncode == 0, (r.stdout, r.stderr, src.text()[-3000:], dst.text()[-3000:])
        info = json.loads(r.stdout.strip().splitlines()[-1])
        assert dst.wait_log("resumed after an incoming migration", 10), dst.text()
        n_at_end_of_migration = max(stream.sent)
        time.sleep(1.5)
    finally:
        stream.close()
    # the source exits once the destination resumed; the destination runs on
    assert src.p.wait(15) == 0, src.text()[-2000:]
    assert dst.p.poll() is None, dst.text()[-3000:]
    assert stream.bad == 0                                   # every echo SHA-256-correct
    after = [n for n in stream.back if n > n_at_end_of_migration]
    assert len(after) > 100, (len(after), dst.text()[-3000:])  # the stream carries on, served by b
    assert stream.garps >= 1                                 # the guest announced itself
    lost = [n for n in range(1, max(stream.back)) if n not in stream.back]
    # only what was sent while no one served the guest's port (the downtime) may be lost
    assert len(lost) * stream.interval * 1000 < info["downtime_ms"] + 1000, (len(lost), info)
    assert info["status"] == "completed" and info["round"] >= 2 and info["pages_sent"] >= 16384
    assert info["dirty_device"] > 0 and info["dirty_guest"] > 0
    print("\nMIGRATION", json.dumps({k: info[k] for k in ("total_ms", "downtime_ms", "round", "pages_sent",
                                                          "dirty_guest", "dirty_device", "rounds")}),
          f"lost {len(lost)} echoes, wall {total:.2f} s")


def test_vsock_guest_migrates_connections_reset_listeners_kept(two_hosts, tmp_path):
    """vsock (issue 18 item 2): the destination's device raises TRANSPORT_RESET; a connection
    open across the migration is reset, the echo service listens again on the destination with
    the same CID, and a stream through host B comes back SHA-256-correct."""
    import os
    from host.vsock.api import VsockHost
    from shared.stats import read_all
    a, b = two_hosts
    a.host()
    b.host()
    mon = tmp_path / "v.mon"
    inc = tmp_path / "v.sock"
    args = ["--cid", "18", "--service", "echo=5000"]
    src = guest(a, "vm18", *args, "--monitor-socket", str(mon))
    assert src.wait_log("vsock device ready", 30), src.text()
    dst = guest(b, "vm18", *args, "--incoming", f"unix:{inc}")
    assert dst.wait_log("waiting for an incoming migration", 30), dst.text()
    old = VsockHost(a.run_dir).connect(18, 5000, timeout=20)
    old.settimeout(10)
    old.sendall(b"before")
    assert old.recv(100) == b"before"
    echoed = [0, None]

    def busy():                            # an echo stream on the old connection meanwhile
        try:
            while True:
                old.sendall(b"x" * 4096)
                n = 0
                while n < 4096:
                    c = old.recv(65536)
                    if not c:
                        raise ConnectionResetError("EOF")
                    n += len(c)
                echoed[0] += n
        except OSError as e:
            echoed[1] = e
    bt = threading.Thread(target=busy, daemon=True)
    bt.start()
    time.sleep(0.5)
    r = migrate(mon, inc, "--json", timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr, src.text()[-3000:], dst.text()[-3000:])
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["dirty_device"] > 0 and echoed[0] > 0
    print("\nVSOCK MIGRATION", json.dumps({k: info[k] for k in ("total_ms", "downtime_ms", "round", "pages_sent",
                                                                "dirty_guest", "dirty_device", "rounds")}))
    bt.join(15)                            # the connection did not survive: reset or EOF
    assert isinstance(echoed[1], OSError), echoed
    old.close()
    assert src.p.wait(15) == 0, src.text()[-2000:]
    data = os.urandom(300_000)
    s = VsockHost(b.run_dir).connect(18, 5000, timeout=20)
    s.settimeout(30)
    t = threading.Thread(target=s.sendall, args=(data,))
    t.start()
    got = bytearray()
    while len(got) < len(data):
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    t.join()
    s.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    time.sleep(0.8)
    g = [d for d in read_all(b.run_dir) if d.get("role") == "guest"]
    assert g and g[0]["cid"] == 18 and g[0]["stats"]["transport_resets"] >= 1, g


def test_failed_migration_leaves_the_source_running(two_hosts, tmp_path):
    """The destination refuses (another --mem): tools.migrate exits 1 with one line, the source's
    dirty logging is off again and its echo stream never stops."""
    a, b = two_hosts
    a.host()
    b.host()
    lport, rport, net = net_args()
    mon = tmp_path / "f.mon"
    inc = tmp_path / "f.sock"
    src = guest(a, "fail", *net, "--monitor-socket", str(mon))
    assert src.wait_log("virtio-net:", 30), src.text()
    dst = Proc(["-m", "guest", "--run-dir", str(b.run_dir), "--name", "fail", "--mem", "32M", *net,
                "--incoming", f"unix:{inc}"], b._log("dst"))
    b.procs.append(dst)
    assert dst.wait_log("waiting for an incoming migration", 30), dst.text()
    stream = EchoStream(lport, rport, "169.254.18.2/24").start()
    try:
        time.sleep(0.5)
        r = migrate(mon, inc)
        assert r.returncode == 1 and "failed" in r.stderr and "--mem" in r.stderr, (r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        n = max(stream.sent)
        time.sleep(1.0)
    finally:
        stream.close()
    assert src.p.poll() is None and len([k for k in stream.back if k > n]) > 50
    assert dst.p.wait(15) != 0                               # the refusing side gives up


def test_migration_failing_after_the_pause_resumes_the_source(two_hosts, tmp_path):
    """No host serves the destination's run dir: the destination cannot resume its device after
    the source paused and stopped its rings. The source replays its device to its own host and
    its echo stream carries on."""
    a, b = two_hosts
    a.host()                                  # b: no host
    lport, rport, net = net_args()
    mon = tmp_path / "p.mon"
    inc = tmp_path / "p.sock"
    src = guest(a, "late", *net, "--monitor-socket", str(mon))
    assert src.wait_log("virtio-net:", 30), src.text()
    dst = guest(b, "late", *net, "--incoming", f"unix:{inc}", "--connect-timeout", "1")
    assert dst.wait_log("waiting for an incoming migration", 30), dst.text()
    stream = EchoStream(lport, rport, "169.254.18.2/24").start()
    try:
        time.sleep(0.5)
        r = migrate(mon, inc)
        assert r.returncode == 1 and "resuming on the destination failed" in r.stderr, (r.stdout, r.stderr)
        n = max(stream.sent)
        time.sleep(1.5)
    finally:
        stream.close()
    assert src.p.poll() is None, src.text()[-2000:]
    assert len([k for k in stream.back if k > n]) > 50, src.text()[-3000:]
    host_log = a.procs[0].text()
    assert "dirty logging toggled" in host_log and "stopped at base" in host_log
    assert dst.p.wait(15) != 0
