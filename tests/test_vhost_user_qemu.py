"""QEMU + a real Linux guest (TCG) against our vhost-user-vsock backend (`python -m host --vhost-user`).

One boot serves several scenarios (a TCG boot costs seconds; one test runs them all): the guest's /scenario.sh runs them in
order and prints results on the serial console, while host-side threads here listen on the bridge's
`<run-dir>/vsock-3.sock_PORT` sockets and CONNECT through `<run-dir>/vsock-3.sock`. Then that QEMU
is SIGKILLed and a second QEMU boots against the same backend process.

Skips (with the reason) when QEMU or the kernel package cannot be had (tools/linux_guest.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.waiting import fresh_snapshots
from shared.vsock.pcap import FRAME_OVERHEAD, SNAPLEN, read_pcap
from tests.procs import Proc

pytestmark = [pytest.mark.qemu, pytest.mark.multiprocess]

MiB = 1 << 20
CID = 3
BOOT_TIMEOUT = float(os.environ.get("VE_QEMU_TIMEOUT", "300"))

SCENARIO = r"""
echo first | socat -t 10 - VSOCK-CONNECT:2:4999
head -c 1048576 /dev/urandom > /tmp/g1
echo "G2H-SENT $(sha256sum /tmp/g1 | cut -d' ' -f1)"
socat -b 65536 -t 60 - VSOCK-CONNECT:2:5000 < /tmp/g1 > /tmp/h1
echo "G2H-RECV $(sha256sum /tmp/h1 | cut -d' ' -f1) $(wc -c < /tmp/h1)"
head -c 1048576 /dev/urandom > /tmp/g2
echo "H2G-SENT $(sha256sum /tmp/g2 | cut -d' ' -f1)"
socat -b 65536 -t 60 VSOCK-LISTEN:6000 SYSTEM:'cat /tmp/g2 & cat > /tmp/h2; wait' &
L=$!
sleep 1
echo H2G-LISTENING
wait $L
echo "H2G-RECV $(sha256sum /tmp/h2 | cut -d' ' -f1) $(wc -c < /tmp/h2)"
for i in 1 2 3 4; do
  head -c 262144 /dev/urandom > /tmp/m$i
  echo "MULTI-SENT $i $(sha256sum /tmp/m$i | cut -d' ' -f1)"
done
for i in 1 2 3 4; do socat -t 60 -u OPEN:/tmp/m$i VSOCK-CONNECT:2:5001 & done
wait
echo MULTI-DONE
timeout -s KILL 3 socat -u VSOCK-CONNECT:2:5002 - > /dev/null
echo CLOSED-MID
echo after-close | socat -t 10 - VSOCK-CONNECT:2:5003
echo AFTER-CLOSE-DONE
echo WAITING-FOR-KILL
sleep 600
"""

SCENARIO_2 = r"""
echo second-boot | socat -t 10 - VSOCK-CONNECT:2:5003
echo SECOND-DONE
"""


class Listener:
    """A host program on <run-dir>/vsock-3.sock_PORT: each connection is handled by `fn(conn)`."""

    def __init__(self, run_dir: Path, port: int, fn):
        self.path = run_dir / f"vsock-{CID}.sock_{port}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(16)
        self.sock.settimeout(1.0)
        self.fn = fn
        self.results: list = []
        self.errors: list = []
        self.first_at: float | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.first_at is None:
                self.first_at = time.monotonic()
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(120)
            self.results.append(self.fn(conn))
        except Exception as e:  # recorded; the test asserts on it
            self.errors.append(repr(e))
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.path.unlink(missing_ok=True)


def recv_all(conn: socket.socket) -> tuple[bytes, float]:
    t0 = time.monotonic()
    chunks = []
    while True:
        b = conn.recv(65536)
        if not b:
            return b"".join(chunks), time.monotonic() - t0
        chunks.append(b)


def send_64k(conn: socket.socket, data: bytes) -> None:
    for i in range(0, len(data), 65536):
        conn.sendall(data[i:i + 65536])


def exchange(conn: socket.socket, data: bytes) -> dict:
    """Send `data` (64 KiB writes, then SHUT_WR) while receiving until EOF."""
    t0 = time.monotonic()
    sent_at = []

    def sender():
        send_64k(conn, data)
        sent_at.append(time.monotonic() - t0)
        conn.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=sender, daemon=True)
    t.start()
    got, dt = recv_all(conn)
    t.join(120)
    return {"recv": got, "recv_s": dt, "send_s": sent_at[0] if sent_at else None,
            "sent_sha": hashlib.sha256(data).hexdigest()}


def endless(conn: socket.socket) -> dict:
    """Send until the guest goes away; count what it took."""
    n = 0
    block = b"x" * 65536
    try:
        while True:
            conn.sendall(block)
            n += len(block)
    except OSError as e:
        return {"sent": n, "error": type(e).__name__}


@pytest.fixture(scope="module", params=["split", "packed"])
def session(request, linux_guest, tmp_path_factory):
    """One backend, one boot running every scenario; yields what the host side saw. "packed":
    the backend offers VIRTIO_F_RING_PACKED (--packed) and QEMU's device has packed=on (issue 19:
    QEMU 7.2's vhost-user-vsock passes the bit through to the backend)."""
    from tools.linux_guest import QemuGuest, qemu_vsock_cmd, scenario_initrd
    packed = request.param == "packed"
    base = tmp_path_factory.mktemp(f"vhost-user-qemu-{request.param}")
    run_dir = base / "run"
    run_dir.mkdir(mode=0o700)
    sock = base / "vu.sock"
    host = Proc(["-m", "host", "--vhost-user", str(sock), "--cid", str(CID), "--run-dir",
                 str(run_dir), "--log-level", "DEBUG", "--pcap", str(base / "vsock.pcap")]
                + (["--packed"] if packed else []), base / "host.log")
    ctx = {"base": base, "run_dir": run_dir, "sock": sock, "host": host, "listeners": {},
           "packed": packed}
    try:
        assert host.wait_log("listening on", 20), host.text()
        ls = ctx["listeners"]
        ls[4999] = Listener(run_dir, 4999, lambda c: recv_all(c)[0])
        h2g = os.urandom(MiB)
        g2h_data = os.urandom(MiB)
        ls[5000] = Listener(run_dir, 5000, lambda c: exchange(c, g2h_data))
        ls[5001] = Listener(run_dir, 5001, lambda c: hashlib.sha256(recv_all(c)[0]).hexdigest())
        ls[5002] = Listener(run_dir, 5002, endless)
        ls[5003] = Listener(run_dir, 5003, lambda c: recv_all(c)[0])
        initrd = scenario_initrd(linux_guest, SCENARIO, base / "initrd1.gz")
        guest = QemuGuest(qemu_vsock_cmd(linux_guest, initrd, sock, packed=packed), base / "serial1.log")
        ctx["guest"] = guest
        ctx["g2h_host_data"] = g2h_data
        ctx["h2g_host_data"] = h2g
        guest.wait_for("H2G-LISTENING", BOOT_TIMEOUT)
        # host -> guest through the bridge: CONNECT 6000, OK, then 1 MiB each way
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(120)
        c.connect(str(run_dir / f"vsock-{CID}.sock"))
        c.sendall(b"CONNECT 6000\n")
        line = b""
        while not line.endswith(b"\n"):
            b = c.recv(1)
            assert b, f"bridge closed before OK (got {line!r})"
            line += b
        ctx["h2g_ok"] = line
        ctx["h2g"] = exchange(c, h2g)
        c.close()
        guest.wait_for("WAITING-FOR-KILL", BOOT_TIMEOUT)
        ctx["stats"] = fresh_snapshots(run_dir)     # counted up to the guest's last transfer
        yield ctx
    finally:
        if "guest" in ctx:
            ctx["guest"].kill()
        for lst in ctx["listeners"].values():
            lst.close()
        host.stop()
        _write_report(ctx)


def _write_report(ctx) -> None:
    out = os.environ.get("VE_QEMU_REPORT")
    if out and "report" in ctx:
        Path(out).write_text(json.dumps(ctx["report"], indent=1))


def _sha_line(guest, prefix: str) -> list[str]:
    lines = guest.find(prefix)
    assert lines, f"guest printed no {prefix}"
    return lines[0].split()[1:]


def check_guest_to_host_1mib_each_way(session):
    guest, ls = session["guest"], session["listeners"]
    assert ls[4999].results == [b"first\n"], ls[4999].errors
    assert not ls[5000].errors and len(ls[5000].results) == 1, ls[5000].errors
    r = ls[5000].results[0]
    (guest_sent,) = _sha_line(guest, "G2H-SENT")
    assert len(r["recv"]) == MiB
    assert hashlib.sha256(r["recv"]).hexdigest() == guest_sent
    guest_got, n = _sha_line(guest, "G2H-RECV")
    assert (guest_got, int(n)) == (r["sent_sha"], MiB)
    session["report"] = {"first_byte_s": ls[4999].first_at - guest.t0,
                         "g2h_recv_s": r["recv_s"], "g2h_host_send_s": r["send_s"]}


def check_host_to_guest_1mib_each_way(session):
    guest = session["guest"]
    assert session["h2g_ok"].startswith(b"OK "), session["h2g_ok"]
    r = session["h2g"]
    (guest_sent,) = _sha_line(guest, "H2G-SENT")
    assert len(r["recv"]) == MiB
    assert hashlib.sha256(r["recv"]).hexdigest() == guest_sent
    guest_got, n = _sha_line(guest, "H2G-RECV")
    assert (guest_got, int(n)) == (r["sent_sha"], MiB)
    session.setdefault("report", {}).update(h2g_recv_s=r["recv_s"], h2g_host_send_s=r["send_s"])


def check_several_connections_at_once(session):
    guest, lst = session["guest"], session["listeners"][5001]
    sent = sorted(line.split()[2] for line in guest.find("MULTI-SENT"))
    assert len(sent) == 4 and guest.find("MULTI-DONE")
    assert not lst.errors
    assert sorted(lst.results) == sent


def check_guest_closes_mid_transfer(session):
    guest, ls = session["guest"], session["listeners"]
    assert guest.find("CLOSED-MID")
    deadline = time.monotonic() + 10
    while not ls[5002].results and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ls[5002].results, f"the host sender never saw the guest go: {ls[5002].errors}"
    r = ls[5002].results[0]
    assert r["sent"] > 0 and r["error"] in ("BrokenPipeError", "ConnectionResetError"), r
    # and the device still works afterwards, on a new connection
    assert guest.find("AFTER-CLOSE-DONE")
    assert b"after-close\n" in ls[5003].results


def check_pcap_and_stats(session):
    """The same capture and monitor figures as a native guest."""
    recs = read_pcap(session["base"] / "vsock.pcap")
    to_host = [len(p.payload) for _, _, p in recs if p.src_cid == CID and p.dst_port == 5000]
    # frames longer than the snaplen (65535 + 76) are cut: a 64 KiB payload is captured as 65535
    cut = sum(1 for n in to_host if n == SNAPLEN - FRAME_OVERHEAD)
    assert sum(to_host) + cut == MiB, (sum(to_host), cut)
    assert any(p.src_cid == 2 and p.dst_cid == CID for _, _, p in recs)
    (st,) = session["stats"]
    assert st["cid"] == CID and st["stats"]["tx_bytes"] >= 2 * MiB and st["stats"]["rx_bytes"] >= 2 * MiB
    # the layout the guest chose reached the backend: packed rings only with packed=on
    from shared.constants import VIRTIO_F_RING_PACKED
    s = st["stats"]
    assert bool(s["features"] >> VIRTIO_F_RING_PACKED & 1) == session["packed"], hex(s["features"])
    assert [bool(q.get("packed")) for q in s["vqs"]] == [session["packed"]] * 2, s["vqs"]
    assert s["errors"] == 0, s["last_error"]


def check_qemu_killed_backend_serves_next(session, linux_guest):
    from tools.linux_guest import QemuGuest, qemu_vsock_cmd, scenario_initrd
    host, base = session["host"], session["base"]
    session["guest"].kill()                          # SIGKILL: no GET_VRING_BASE, no goodbye
    assert host.wait_log("ready for the next frontend", 20), host.text()[-3000:]
    assert host.p.poll() is None
    n_before = len(session["listeners"][5003].results)
    initrd = scenario_initrd(linux_guest, SCENARIO_2, base / "initrd2.gz")
    g2 = QemuGuest(qemu_vsock_cmd(linux_guest, initrd, session["sock"], packed=session["packed"]),
                   base / "serial2.log")
    try:
        g2.wait_for("SECOND-DONE", BOOT_TIMEOUT)
        assert g2.wait(BOOT_TIMEOUT) == 0            # clean poweroff
    finally:
        g2.kill()
    assert b"second-boot\n" in session["listeners"][5003].results[n_before:]
    log = host.text()
    assert log.count("frontend connected") == 2
    assert "GET_VRING_BASE" in log                   # the clean poweroff stopped the rings
    if session["packed"]:
        # QEMU's SET_VRING_BASE carries both positions with their wrap counters (0x80008000 for
        # a new ring); our GET_VRING_BASE answers in the same layout
        assert "base 2147516416" in log and "stopped at base 0x" in log, log[-3000:]
    assert host.p.poll() is None


def test_linux_guest_through_vhost_user(session, linux_guest):
    """One boot, every scenario; then the kill and a second boot. One test, so pytest-xdist
    never splits the scenarios of one boot over two workers (each would boot its own QEMU).
    Every check runs; the failures are reported together."""
    failures = []
    for check in (check_guest_to_host_1mib_each_way, check_host_to_guest_1mib_each_way,
                  check_several_connections_at_once, check_guest_closes_mid_transfer,
                  check_pcap_and_stats):
        try:
            check(session)
        except AssertionError as e:
            failures.append(f"{check.__name__}: {e}")
    try:
        check_qemu_killed_backend_serves_next(session, linux_guest)
    except (AssertionError, TimeoutError) as e:
        failures.append(f"check_qemu_killed_backend_serves_next: {e}")
    assert not failures, "\n".join(failures)


def test_qemu_packed_vsock_against_a_split_only_backend_is_refused_in_one_line(linux_guest, tmp_path):
    """What QEMU 7.2's vhost-user-vsock does with packed=on when the backend does not offer
    VIRTIO_F_RING_PACKED: it acks the guest's features to the backend wholesale, packed bit
    included (vhost-user-net masks it; see the test above and test_vhost_user_net_qemu.py). Our
    backend refuses that SET_FEATURES (EOPNOTSUPP, one line, no traceback) and serves the next
    frontend; it never runs a packed guest on split rings."""
    from tools.linux_guest import QemuGuest, qemu_vsock_cmd, scenario_initrd
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sock = tmp_path / "vu.sock"
    host = Proc(["-m", "host", "--vhost-user", str(sock), "--cid", str(CID), "--run-dir",
                 str(run_dir), "--log-level", "DEBUG"], tmp_path / "host.log")
    guest = None
    try:
        assert host.wait_log("listening on", 20), host.text()
        initrd = scenario_initrd(linux_guest, "echo hi | socat -t 5 - VSOCK-CONNECT:2:4999\n",
                                 tmp_path / "initrd.gz")
        guest = QemuGuest(qemu_vsock_cmd(linux_guest, initrd, sock, packed=True), tmp_path / "serial.log")
        assert host.wait_log("features 0x400000000 were not offered", BOOT_TIMEOUT), host.text()[-3000:]
        guest.kill()
        assert host.wait_log("ready for the next frontend", 20), host.text()[-2000:]
        log = host.text()
        assert "Traceback" not in log and "SET_FEATURES refused: EOPNOTSUPP" in log
        assert host.p.poll() is None
    finally:
        if guest is not None:
            guest.kill()
        host.stop()
