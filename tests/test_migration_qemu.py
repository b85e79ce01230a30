"""Issue 18 item 3: two QEMUs (TCG), each on its own `python -m host --vhost-user-net` (run dirs
of their own), migrate a running Linux guest between them over a local socket while a TCP stream
flows into it: LOG_SHMFD, SET_LOG_BASE, SET_FEATURES with LOG_ALL on the running device,
GET_VRING_BASE on the source; at the pause (the destination started with -S) both RAMs are equal
page for page (pmemsave); the stream arrives SHA-256-correct and ping works after it.

Both hosts attach one multi-queue tap (`tap:tap0,multi_queue=on`) in a namespace: the destination
takes its queue while the source still holds its own; quitting the source QEMU drops the source's.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.stats import read_all
from tests.procs import ROOT, _env
from tests.test_vhost_user_net_qemu import BOOT_TIMEOUT, GUEST_IP, HOST_IP, NetNs, NsProc, _netns_skip_reason

pytestmark = [pytest.mark.qemu, pytest.mark.multiprocess, pytest.mark.slow]

STREAM_BYTES = 6 << 20
SCENARIO = r"""
ip addr add 169.254.10.2/16 dev eth0
ip link set eth0 up
socat -u TCP-LISTEN:7001,reuseaddr CREATE:/tmp/in &
sleep 1
echo GUEST-LISTENING
wait
echo "IN-SHA $(sha256sum /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
sleep 600
"""

# the namespace's sender: STREAM_BYTES of a seeded stream, paced so the transfer spans the migration
SENDER = r"""
import hashlib, random, socket, sys, time
n, ip = int(sys.argv[1]), sys.argv[2]
rnd = random.Random(18)
s = socket.create_connection((ip, 7001), timeout=60)
h = hashlib.sha256()
sent = 0
while sent < n:
    chunk = rnd.randbytes(min(65536, n - sent))
    s.sendall(chunk)
    h.update(chunk)
    sent += len(chunk)
    time.sleep(0.05)
s.close()
print("SENT", sent, h.hexdigest(), flush=True)
"""


class MqNetNs(NetNs):
    """NetNs with tap0 made multi_queue (ip tuntap ... multi_queue)."""

    def __init__(self):
        self.name = f"ve-mig-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            for cmd in (["ip", "link", "set", "lo", "up"],
                        ["ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "multi_queue"],
                        ["ip", "addr", "add", f"{HOST_IP}/16", "dev", "tap0"], ["ip", "link", "set", "tap0", "up"]):
                self.run(*cmd, check=True)
        except Exception:
            self.close()
            raise


class Qmp:
    def __init__(self, path: Path, timeout: float = 60):
        end = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(str(path))
                break
            except OSError:
                self.s.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
        self.f = self.s.makefile("rwb")
        json.loads(self.f.readline())                  # the greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args) -> dict:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            rep = json.loads(self.f.readline())
            if "return" in rep:
                return rep["return"]
            if "error" in rep:
                raise RuntimeError(f"QMP {name}: {rep['error']}")

    def close(self) -> None:
        try:
            self.s.close()
        except OSError:
            pass


MEM_MB = 256           # tools.linux_guest.qemu_net_cmd's default


def _ram_differs(qs: Qmp, qd: Qmp, tmp: Path, mem_mb: int) -> list[int]:
    """Pages (gpa >> 12) whose bytes differ between the two paused guests (pmemsave of each)."""
    files = []
    for q, name in ((qs, "src.ram"), (qd, "dst.ram")):
        f = tmp / name
        q.cmd("pmemsave", val=0, size=mem_mb << 20, filename=str(f))
        files.append(f)
    out = []
    with open(files[0], "rb") as a, open(files[1], "rb") as b:
        page = 0
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            if not x and not y:
                break
            if x != y:
                for k in range(0, max(len(x), len(y)), 4096):
                    if x[k:k + 4096] != y[k:k + 4096]:
                        out.append(page + k // 4096)
            page += 256
    for f in files:
        f.unlink()
    return out


def _device(run_dir: Path) -> dict:
    devs = [d for d in read_all(run_dir) if d.get("role") == "device"]
    return devs[0] if devs else {}


def test_linux_guest_migrates_between_two_qemus_with_a_tcp_stream(linux_guest, tmp_path):
    reason = _netns_skip_reason()
    if reason:
        pytest.skip(reason)
    from tools.linux_guest import QemuGuest, qemu_net_cmd, scenario_initrd
    ns = MqNetNs()
    procs: list = []
    qemus: list = []
    qmps: list = []
    report: dict = {}
    try:
        socks, runs = [], []
        for side in ("a", "b"):
            run = tmp_path / f"run-{side}"
            run.mkdir(mode=0o700)
            sock = tmp_path / f"vun-{side}.sock"
            h = NsProc(ns, ["-m", "host", "--vhost-user-net", str(sock), "--net-backend", "tap:tap0,multi_queue=on",
                            "--run-dir", str(run), "--log-level", "DEBUG"], tmp_path / f"host-{side}.log")
            procs.append(h)
            assert h.wait_log("listening on", 20), h.text()
            socks.append(sock)
            runs.append(run)
        initrd = scenario_initrd(linux_guest, SCENARIO, tmp_path / "initrd.gz")
        mig = tmp_path / "mig.sock"
        qa, qb = tmp_path / "qmp-a.sock", tmp_path / "qmp-b.sock"
        src = QemuGuest(qemu_net_cmd(linux_guest, initrd, socks[0]) + ["-qmp", f"unix:{qa},server=on,wait=off"],
                        tmp_path / "serial-a.log")
        qemus.append(src)
        # -S: the destination stays paused after the migration, so both RAMs can be compared
        dst = QemuGuest(qemu_net_cmd(linux_guest, initrd, socks[1]) + ["-qmp", f"unix:{qb},server=on,wait=off",
                                                                        "-incoming", f"unix:{mig}", "-S"],
                        tmp_path / "serial-b.log")
        qemus.append(dst)
        src.wait_for("GUEST-LISTENING", BOOT_TIMEOUT)
        sender = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", SENDER,
                                   str(STREAM_BYTES), GUEST_IP], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        procs.append(sender)
        time.sleep(2.0)                                 # the stream is flowing
        qs, qd = Qmp(qa), Qmp(qb)
        qmps += [qs, qd]
        t0 = time.monotonic()
        # Pre-copy at 32 MiB/s, so its rounds run for seconds while the device writes the stream
        # into rx buffers (LOG_ALL on the running device); then `stop` the source while
        # migration is still active, and let it finish at full speed. Why not let QEMU stop the
        # guest itself at completion: QEMU 7.2 under TCG then sometimes misses the guest *CPU's*
        # last writes (tens of kernel pages differ by a counter or a timestamp). A control run
        # with no vhost device at all shows it (2 of 8 and 1 of 5 migrations under load), and 0
        # of 8 with this `stop`. (Which device write the log must carry, page by page, is
        # tests/test_migration_log_proof.py's proof; here `logged` below shows the device logged.)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 20})
        qs.cmd("migrate", uri=f"unix:{mig}")
        time.sleep(1.0)
        mid = qs.cmd("query-migrate")
        assert mid.get("status") == "active", f"pre-copy should still run after 1 s: {mid}"
        qs.cmd("stop")
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        while True:
            info = qs.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > 300:
                raise AssertionError(f"migration did not finish: {info}")
            time.sleep(0.2)
        assert info["status"] == "completed", info
        time.sleep(0.7)                                  # the device's stats snapshot catches up
        logged = (_device(runs[0]).get("stats") or {}).get("dirty_logged") or 0
        # rx buffers were logged, not only the two used rings (at most 2 pages each at num 256)
        assert logged > 4, f"the device logged {logged} pages while the stream flowed"
        end = time.monotonic() + 60
        while qd.cmd("query-status")["status"] != "paused" and time.monotonic() < end:
            time.sleep(0.1)
        # item 4 for QEMU: at the pause the destination's RAM equals the source's, page for page
        differ = _ram_differs(qs, qd, tmp_path, MEM_MB)
        n_differ = len(differ)
        assert not differ, f"{len(differ)} pages differ, e.g. {[hex(p << 12) for p in differ[:8]]}"
        qd.cmd("cont")
        assert qd.cmd("query-status")["status"] == "running"
        try:
            qs.cmd("quit")                               # the source's tap queue goes with it
        except (OSError, ValueError, json.JSONDecodeError):
            pass                                         # it may close before answering
        src.wait(30)
        out, _ = sender.communicate(timeout=300)
        assert out.startswith("SENT"), out
        _, n, sha = out.split()
        _, line = dst.wait_for("IN-SHA", 300)            # the destination's console: same guest
        assert line.split()[1:] == [sha, n], (line, out)
        r = ns.run("ping", "-c", "3", "-i", "0.3", "-W", "5", GUEST_IP, text=True)
        assert r.returncode == 0 and "3 received" in r.stdout, r.stdout + r.stderr
        ram = info.get("ram", {})
        report = {"total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                  "setup_ms": info.get("setup-time"), "rounds (dirty-sync-count)": ram.get("dirty-sync-count"),
                  "ram_transferred": ram.get("transferred"), "normal_pages": ram.get("normal"),
                  "zero_pages": ram.get("duplicate"), "device_logged_pages": logged,
                  "dirty_pages_rate": ram.get("dirty-pages-rate"), "pages_differing_at_pause": n_differ}
        alog = procs[0].text()
        for needle in ("SET_LOG_BASE", "dirty logging toggled", "stopped at base"):
            assert needle in alog, (needle, alog[-3000:])
        assert "Traceback" not in alog + procs[1].text()
        print("\nQEMU MIGRATION", json.dumps(report))
    finally:
        for q in qmps:
            q.close()
        for g in qemus:
            g.kill()
        for p in procs:
            if isinstance(p, subprocess.Popen):
                if p.poll() is None:
                    p.kill()
                p.wait(10)
            else:
                p.stop()
        ns.close()
        out = os.environ.get("VE_QEMU_MIG_REPORT")
        if out:
            Path(out).write_text(json.dumps(report, indent=1))
