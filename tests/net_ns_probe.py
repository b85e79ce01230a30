"""Run inside a fresh network namespace (unshare -n): give Linux an interface, put a guest rig on
the other side of it, and let Linux's ping(8) reach the guest. Used by test_net_backends.

    tap        ip tuntap tap0; the guest on tap:tap0; Linux at 169.254.20.1 on tap0
    tap-vnet   the same with IFF_VNET_HDR (the header passes through to the tap)
    packet     a veth pair; the guest on packet:veth1; Linux at 169.254.20.1 on veth0
    process    like tap, but a real host daemon and guest process (python -m host / -m guest)
Also checks that a second guest on the same tap is refused. Exit 0 and ping's output on success.
"""
from __future__ import annotations

import subprocess
import sys

from host.net.backends.spec import open_backend
from shared.net.hdr import parse_ip
from tests.net_rig import NetRig

MAC = bytes.fromhex("525400001402")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def process_mode() -> int:
    import tempfile
    import time
    from tests.procs import Cluster, Proc
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "tuntap", "add", "tap0", "mode", "tap")
    sh("ip", "addr", "add", "169.254.20.1/24", "dev", "tap0")
    sh("ip", "link", "set", "tap0", "up")
    from pathlib import Path
    base = Path(tempfile.mkdtemp(prefix="ve-ns-"))
    c = Cluster(base / "run")
    try:
        c.host()
        g = Proc(["-m", "guest", "--run-dir", str(c.run_dir), "--name", "ns", "--mem", "16M",
                  "--net", "tap:tap0", "--ip", "169.254.20.2/24"], c._log("guest"))
        c.procs.append(g)
        if not g.wait_log("virtio-net:", 30):
            print(g.text())
            return 1
        second = subprocess.run([sys.executable, "-m", "guest", "--run-dir", str(c.run_dir), "--mem", "8M",
                                 "--net", "tap:tap0"], capture_output=True, text=True, timeout=30)
        print("second guest:", second.returncode, second.stderr.strip().splitlines()[-1])
        if second.returncode == 0 or "already in use" not in second.stderr:
            return 1
        time.sleep(0.2)
        r = subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "169.254.20.2"],
                           capture_output=True, text=True)
        print(r.stdout, r.stderr)
        return r.returncode
    finally:
        c.close()
        import shutil
        shutil.rmtree(base, ignore_errors=True)


def main(kind: str) -> int:
    if kind == "process":
        return process_mode()
    sh("ip", "link", "set", "lo", "up")
    if kind.startswith("tap"):
        sh("ip", "tuntap", "add", "tap0", "mode", "tap")
        ifname, spec = "tap0", "tap:tap0" + (",vnet_hdr=on" if kind == "tap-vnet" else "")
    else:
        sh("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        sh("ip", "link", "set", "veth1", "up")
        ifname, spec = "veth0", "packet:veth1"
    backend = open_backend(spec, mac=MAC)
    if kind.startswith("tap"):
        try:
            open_backend("tap:tap0", mac=MAC)
        except ValueError as e:
            print("second guest refused:", e)
        else:
            print("a second guest attached to the same tap")
            return 1
    sh("ip", "addr", "add", "169.254.20.1/24", "dev", ifname)
    sh("ip", "link", "set", ifname, "up")
    rig = NetRig(MAC, backend, parse_ip("169.254.20.2/24")).start()
    try:
        r = subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "169.254.20.2"],
                           capture_output=True, text=True)
        print(r.stdout, r.stderr)
        if kind == "packet":     # and the guest pings Linux back
            print("guest ping replies:", len(rig.net.ping("169.254.20.1", count=2)))
        return r.returncode
    finally:
        rig.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
