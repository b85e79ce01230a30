"""QEMU (TCG) + a real Linux guest's virtio-net through our vhost-user-net backend, next to the
same guest on QEMU's own virtio-net (`-netdev tap`), in the same run, on the same kind of tap.

    python -m tools.bench_vhost_user_net [--pings 10] [--mib 1] [--testpmd-frames 20000] [--json FILE]

Each mode boots the guest once with a tap `tap0` (169.254.10.1/16) in a fresh network namespace:
  qemu-tap        QEMU in the namespace, `-netdev tap,ifname=tap0` (QEMU's userspace virtio-net)
  vhost-user-net  `python -m host --vhost-user-net SOCK --net-backend tap:tap0` in the namespace,
                  QEMU outside it with `-netdev vhost-user` (vectors=0)
and measures: QEMU start to the end of the guest's `ping -c 3` to the namespace (boot included);
the namespace's `ping -c N -i 0.2` to the guest (avg RTT); N MiB over TCP each way with socat
(guest -> namespace, namespace -> guest; MiB/s from the namespace side). Needs root, iproute2,
socat, ping and QEMU (see .ci/run); the network namespaces and taps are deleted afterwards.
TCG emulates the guest's CPU: the figures are the guest's, the ratio is what our backend costs.

Then, with dpdk-testpmd installed (and --testpmd-frames not 0): numbered 64-byte frames through
our backend (`udp:` spec) and testpmd's io loop, 64 and 256 in flight, next to a Python UDP
reflector process in the same run (tools/testpmd.py `measure`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tools.linux_guest import QemuGuest, ensure_guest, qemu_net_cmd, scenario_initrd
from shared.cli import add_version

HOST_IP, GUEST_IP = "169.254.10.1", "169.254.10.2"
SCENARIO = r"""
ip addr add 169.254.10.2/16 dev eth0
ip link set eth0 up
ping -c 3 169.254.10.1
echo "PING-RC $?"
head -c {size} /dev/urandom > /tmp/out
socat -u OPEN:/tmp/out TCP-LISTEN:7000,reuseaddr &
socat -u TCP-LISTEN:7001,reuseaddr CREATE:/tmp/in &
sleep 1
echo GUEST-LISTENING
wait
echo "IN-SHA $(sha256sum /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
"""


def _rtt(text: str) -> float | None:
    m = re.search(r"min/avg/max(?:/mdev)? = [\d.]+/([\d.]+)/", text)
    return float(m.group(1)) if m else None


class NetNs:
    def __init__(self):
        self.name = f"ve-bench-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"],
                    ["ip", "addr", "add", f"{HOST_IP}/16", "dev", "tap0"], ["ip", "link", "set", "tap0", "up"]):
            self.run(*cmd, check=True)

    def run(self, *cmd, timeout: float = 120, **kw):
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True,
                              timeout=timeout, **kw)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def scenario(guest: QemuGuest, ns: NetNs, pings: int, size: int) -> dict:
    r: dict = {}
    t, line = guest.wait_for("PING-RC", 300)
    r["boot_to_ping_s"] = round(t, 2)
    r["guest_ping_ok"] = line.split()[-1] == "0"
    r["guest_ping_ms"] = [float(m) for m in re.findall(r"time=([\d.]+) ms", "\n".join(guest.find("seq=")))]
    guest.wait_for("GUEST-LISTENING", 300)
    p = ns.run("ping", "-c", str(pings), "-i", "0.2", "-W", "5", GUEST_IP, text=True)
    r["ns_ping_avg_ms"] = _rtt(p.stdout)
    t0 = time.monotonic()
    p = ns.run("socat", "-u", f"TCP:{GUEST_IP}:7000,retry=10,interval=0.5", "-")
    r["tcp_guest_to_ns_err"] = p.stderr.decode(errors="replace")[-300:]
    r["tcp_guest_to_ns_MiB_s"] = round(len(p.stdout) / (1 << 20) / (time.monotonic() - t0), 2)
    r["tcp_guest_to_ns_ok"] = len(p.stdout) == size
    data = os.urandom(size)
    t0 = time.monotonic()
    ns.run("socat", "-u", "-", f"TCP:{GUEST_IP}:7001,retry=10,interval=0.5", input=data)
    _, line = guest.wait_for("IN-SHA", 120)
    r["tcp_ns_to_guest_MiB_s"] = round(size / (1 << 20) / (time.monotonic() - t0), 2)
    r["tcp_ns_to_guest_ok"] = line.split()[1:] == [hashlib.sha256(data).hexdigest(), str(size)]
    guest.wait(120)
    return r


def run_mode(mode: str, g, initrd: Path, base: Path, pings: int, size: int) -> dict:
    ns = NetNs()
    host = None
    try:
        cmd = qemu_net_cmd(g, initrd, base / "vun.sock")
        if mode == "qemu-tap":
            i = cmd.index("-chardev")
            cmd = ["ip", "netns", "exec", ns.name] + cmd[:i] + [
                "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n0,vectors=0"]
        else:
            log = open(base / "host.log", "wb")
            host = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-m", "host",
                                     "--vhost-user-net", str(base / "vun.sock"), "--net-backend", "tap:tap0",
                                     "--run-dir", str(base / "run")], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            end = time.monotonic() + 20
            while not (base / "vun.sock").exists() and time.monotonic() < end:
                time.sleep(0.05)
        guest = QemuGuest(cmd, base / f"serial-{mode}.log")
        try:
            return scenario(guest, ns, pings, size)
        finally:
            guest.kill()
    finally:
        if host is not None:
            host.terminate()
            try:
                host.wait(10)
            except subprocess.TimeoutExpired:
                host.kill()
                host.wait(5)
        ns.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_vhost_user_net")
    add_version(p)
    p.add_argument("--pings", type=int, default=10)
    p.add_argument("--mib", type=int, default=1)
    p.add_argument("--testpmd-frames", type=int, default=20000, metavar="N",
                   help="frames through DPDK testpmd (0: skip; skipped without dpdk-testpmd)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_vhost_user_net: needs root (network namespaces, taps)", file=sys.stderr)
        return 1
    try:
        g = ensure_guest()
    except Exception as e:  # GuestUnavailable, and QEMU's absence surfaces the same way
        print(f"bench_vhost_user_net: {e}", file=sys.stderr)
        return 1
    out = {"load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="ve-bench-vun-") as tmp:
        base = Path(tmp)
        initrd = scenario_initrd(g, SCENARIO.format(size=a.mib << 20), base / "initrd.gz")
        for mode in ("qemu-tap", "vhost-user-net"):
            try:
                out[mode] = run_mode(mode, g, initrd, base, a.pings, a.mib << 20)
            except (TimeoutError, OSError, subprocess.SubprocessError) as e:
                out[mode] = {"error": str(e)}
                print(f"bench_vhost_user_net: {mode}: {e}", file=sys.stderr)
    out["load_avg_end"] = os.getloadavg()[0]
    keys = ("boot_to_ping_s", "ns_ping_avg_ms", "tcp_guest_to_ns_MiB_s", "tcp_ns_to_guest_MiB_s")
    print(f"{'':22}" + "".join(f"{k:>24}" for k in keys))
    for mode in ("qemu-tap", "vhost-user-net"):
        print(f"{mode:22}" + "".join(f"{str(out[mode].get(k)):>24}" for k in keys))
    print(f"guest ping ms: qemu-tap {out['qemu-tap']['guest_ping_ms']}, "
          f"vhost-user-net {out['vhost-user-net']['guest_ping_ms']}; load average "
          f"{out['load_avg_start']:.1f} -> {out['load_avg_end']:.1f}")
    from tools.testpmd import TESTPMD, measure
    if a.testpmd_frames and TESTPMD:
        out["testpmd"] = measure(a.testpmd_frames)
        for k, v in out["testpmd"].items():
            print(f"{k:38} {v.get('frames_per_s', '-')!s:>8} frames/s  back {v.get('frames_back')} "
                  f"in order {v.get('in_order')}" + (f"  testpmd {v['testpmd_forwarded']}"
                                                     if "testpmd_forwarded" in v else ""))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    ok = all(out[m].get(k) for m in ("qemu-tap", "vhost-user-net")
             for k in ("guest_ping_ok", "tcp_guest_to_ns_ok", "tcp_ns_to_guest_ok"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
