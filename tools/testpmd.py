"""DPDK testpmd as a vhost-user-net frontend: start it on a socket, probe until it forwards, count
frames through it, stop it by pid and remove what it leaves (/var/run/dpdk/<prefix>).

Used by tests/test_vhost_user_dpdk.py and tools.bench_vhost_user_net. testpmd runs with
`--no-huge -m 256 --no-pci --no-shconf` (real-peers.md), a private `--file-prefix`, one
`net_virtio_user0` port in io forwarding with port topology loop: every frame it receives on the
port goes back out of it. Frames are numbered 64-byte Ethernet frames (ethertype 0x88b5, the
number in bytes 14..18); our backend is `udp:LPORT:RPORT`, so a frame is a datagram to LPORT and
comes back from RPORT.
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

from tools.launch import free_udp_port

TESTPMD = shutil.which("dpdk-testpmd")
PROBE = 1 << 30                     # probe frames' numbers
FRAME = bytes.fromhex("ffffffffffff525400ee0001") + b"\x88\xb5"


def frame(i: int, size: int = 64) -> bytes:
    return FRAME + i.to_bytes(4, "big") + bytes(size - len(FRAME) - 4)


class Testpmd:
    """dpdk-testpmd with a virtio_user port on SOCK (packed: a packed ring, `packed_vq=1`); stopped
    by pid, its runtime dir removed."""

    __test__ = False                # not a test class where a test module imports it

    def __init__(self, sock: Path, log: Path, packed: bool = False):
        self.prefix = f"ve{uuid.uuid4().hex[:10]}"
        self.log = log
        self._f = open(log, "wb")
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []    # a readable log
        cmd = [*line_buffered, TESTPMD, "--no-huge", "-m", "256", "--no-pci", "--no-shconf",
               f"--file-prefix={self.prefix}", "--vdev",
               f"net_virtio_user0,path={sock},queues=1" + (",packed_vq=1" if packed else ""), "--",
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


def measure(frames: int = 20000, windows=(64, 256), workdir: Path | None = None) -> dict:
    """Frames/s through our backend and testpmd's io loop, next to a Python UDP reflector process
    (recv -> send: the socket work of our backend without the rings) in the same run, for each
    window of frames in flight; testpmd on split rings and on packed ones (`packed_vq=1` against
    the backend's --packed) in the same run. Needs dpdk-testpmd and root."""
    import sys
    import tempfile
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="ve-testpmd-", dir=workdir) as tmp:
        base = Path(tmp)
        for window in windows:
            for what in ("python-udp-reflector", "testpmd-via-vhost-user-net",
                         "testpmd-packed-via-vhost-user-net"):
                peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
                peer.bind(("127.0.0.1", 0))
                lport = free_udp_port()
                procs: list[subprocess.Popen] = []
                pmd = None
                try:
                    if what == "python-udp-reflector":
                        procs.append(subprocess.Popen([sys.executable, "-c", (
                            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                            f"s.bind(('127.0.0.1', {lport})); s.connect(('127.0.0.1', {peer.getsockname()[1]}))\n"
                            "while True: s.send(s.recv(2048))\n")]))
                        ready = _probe(peer, lport, 20)
                    else:
                        packed = "packed" in what
                        sock = base / f"pmd-{window}{'-packed' if packed else ''}.sock"
                        log = open(base / "host.log", "ab")
                        procs.append(subprocess.Popen(
                            [sys.executable, "-m", "host", "--vhost-user-net", str(sock), "--net-backend",
                             f"udp:{lport}:{peer.getsockname()[1]}", "--run-dir", str(base / "run")]
                            + (["--packed"] if packed else []),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                        log.close()
                        end = time.monotonic() + 20
                        while not sock.exists() and time.monotonic() < end:
                            time.sleep(0.05)
                        pmd = Testpmd(sock, base / "testpmd.log", packed=packed)
                        ready = pmd.wait_forwarding(peer, lport)
                    if not ready:
                        out[f"{what} w{window}"] = {"error": "never forwarded"}
                        continue
                    LATE_PROBES.clear()
                    got, dt = send_and_collect(peer, lport, range(frames), timeout=120, burst=window)
                    out[f"{what} w{window}"] = {"frames_back": len(got), "in_order": got == list(range(frames)),
                                                "seconds": round(dt, 3), "frames_per_s": round(len(got) / dt)}
                finally:
                    if pmd is not None:
                        out.setdefault(f"{what} w{window}", {})["testpmd_forwarded"] = pmd.stop()
                    for p in procs:
                        p.terminate()
                        try:
                            p.wait(10)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            p.wait(5)
                    peer.close()
    return out


def _probe(peer, lport: int, timeout: float) -> bool:
    """A reflector is up once a probe comes back."""
    end = time.monotonic() + timeout
    peer.settimeout(0.2)
    n = 0
    while time.monotonic() < end:
        peer.sendto(frame(PROBE + n), ("127.0.0.1", lport))
        n += 1
        try:
            while True:
                if int.from_bytes(peer.recv(2048)[14:18], "big") >= PROBE:
                    return True
        except TimeoutError:
            pass
    return False
