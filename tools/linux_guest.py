"""A real Linux guest for QEMU under TCG: the Debian cloud kernel and a busybox + socat initramfs.

    python -m tools.linux_guest fetch [--cache DIR]     download + unpack the kernel, build the base
                                                        initramfs (what .ci/run does before the tests)
    python -m tools.linux_guest boot-cmd SOCKET         print a QEMU command line for vhost-user-vsock
    python -m tools.linux_guest net-boot-cmd SOCKET     the same for vhost-user-net (virtio-net-pci)

Nothing is installed on the system: the kernel package is fetched with `apt-get download`, unpacked
with `dpkg-deb -x` into the cache and `depmod -b`-ed there (docs/readme-vhostuser.md,
/work/shared/reference/real-peers.md). The base initramfs holds busybox, socat with the libraries
`ldd` names, the virtio/vsock modules in dependency order and an /init that mounts proc/sys/dev,
insmods them, prints `VE-BOOTED`, runs /scenario.sh and powers off. A scenario is a second, tiny
cpio archive appended to the base one (the kernel unpacks concatenated archives in order), so one
cached base serves every test. The cache is guarded by a file lock: parallel pytest-xdist workers
build it once.
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from shared.cli import add_version

DEFAULT_CACHE = Path(os.environ.get("VIRTIO_EMU_CACHE", Path.home() / ".cache" / "virtio-emu"))
MODULES = ("virtio_pci", "vmw_vsock_virtio_transport", "virtio_net")
BOOT_MARKER = "VE-BOOTED"
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/ve-modules/$m 2>/dev/null; done
echo {marker}
[ -x /scenario.sh ] && /scenario.sh
echo VE-SCENARIO-DONE
poweroff -f
"""


class GuestUnavailable(Exception):
    """QEMU, the kernel package or the initramfs tools cannot be had here (tests skip with this)."""


@dataclass
class LinuxGuest:
    kernel: Path         # vmlinuz
    initrd: Path         # the base initramfs (cpio newc, gzip)
    version: str


def _run(cmd: list[str], **kw) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)
    except FileNotFoundError:
        raise GuestUnavailable(f"{cmd[0]} is not installed") from None
    except subprocess.CalledProcessError as e:
        raise GuestUnavailable(f"{' '.join(cmd)} failed: {e.stderr.strip()[:300]}") from None
    return p.stdout


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-cloud-amd64)", out)
    if not m:
        raise GuestUnavailable("apt-cache names no linux-image-*-cloud-amd64 (run apt-get update)")
    return m.group(1)


def _fetch_kernel(cache: Path) -> tuple[Path, str]:
    pkg = _kernel_package()
    version = pkg[len("linux-image-"):]
    root = cache / pkg
    if not (root / "boot" / f"vmlinuz-{version}").exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _run(["apt-get", "download", pkg], cwd=tmp)
            deb = next(Path(tmp).glob("*.deb"))
            part = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(deb), str(part)])
            _run(["depmod", "-b", str(part), version])
            if root.exists():
                shutil.rmtree(root)
            part.rename(root)
    return root, version


def _modules_in_order(root: Path, version: str, modules=MODULES) -> list[Path]:
    seen: list[Path] = []
    for mod in modules:
        out = _run(["modprobe", "-d", str(root), "-S", version, "--show-depends", mod])
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in seen:
                    seen.append(p)
    return seen


def _libs(binary: str) -> list[str]:
    out = _run(["ldd", binary])
    libs = re.findall(r"(/\S+) \(0x", out)
    return libs


def _cpio(entries: dict[str, tuple[bytes, int]]) -> bytes:
    """A cpio newc archive of regular files and directories {path: (data, mode)}."""
    buf = io.BytesIO()
    ino = 1

    def put(name: str, data: bytes, mode: int) -> None:
        nonlocal ino
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        buf.write(hdr.encode() + nb)
        buf.write(b"\0" * (-(110 + len(nb)) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))
        ino += 1

    dirs: set[str] = set()
    for path in sorted(entries):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in dirs:
                dirs.add(d)
                put(d, b"", 0o040755)
    for path, (data, mode) in sorted(entries.items()):
        if mode & 0o170000 == 0o040000:
            if path not in dirs:
                dirs.add(path)
                put(path, b"", mode)
            continue
        put(path, data, mode)
    put("TRAILER!!!", b"", 0)
    return buf.getvalue()


def cpio_gz(entries: dict[str, tuple[bytes, int]]) -> bytes:
    return gzip.compress(_cpio(entries), compresslevel=6)


def _build_initramfs(root: Path, version: str, out: Path) -> None:
    files: dict[str, tuple[bytes, int]] = {}
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise GuestUnavailable("busybox-static is not installed")
    files["bin/busybox"] = (Path(busybox).read_bytes(), 0o100755)
    socat = shutil.which("socat")
    if socat is None:
        raise GuestUnavailable("socat is not installed")
    files["bin/socat"] = (Path(socat).read_bytes(), 0o100755)
    for lib in _libs(socat):
        files[lib.lstrip("/")] = (Path(lib).read_bytes(), 0o100755)
    order = []
    for ko in _modules_in_order(root, version):
        files[f"lib/ve-modules/{ko.name}"] = (ko.read_bytes(), 0o100644)
        order.append(ko.name)
    files["modules.order"] = ("\n".join(order).encode() + b"\n", 0o100644)
    files["init"] = (INIT.format(marker=BOOT_MARKER).encode(), 0o100755)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        files[d] = (b"", 0o040755)
    tmp = out.with_suffix(".part")
    tmp.write_bytes(cpio_gz(files))
    tmp.rename(out)


def ensure_guest(cache: Path = DEFAULT_CACHE) -> LinuxGuest:
    """The cached kernel + base initramfs, fetched and built once (under a lock)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root, version = _fetch_kernel(cache)
        initrd = cache / f"initramfs-{version}.cpio.gz"
        if not initrd.exists():
            _build_initramfs(root, version, initrd)
    return LinuxGuest(root / "boot" / f"vmlinuz-{version}", initrd, version)


def scenario_initrd(guest: LinuxGuest, script: str, out: Path, modules: tuple[str, ...] = ()) -> Path:
    """The base initramfs with /scenario.sh appended as a second archive; `modules` (e.g.
    "8021q" for VLANs) and what they depend on beyond the base ones are added to it and loaded
    before the script runs."""
    files: dict[str, tuple[bytes, int]] = {}
    if modules:
        root = guest.kernel.parent.parent
        base = {p.name for p in _modules_in_order(root, guest.version)}
        extra_mods = [p for p in _modules_in_order(root, guest.version, modules) if p.name not in base]
        for ko in extra_mods:
            files[f"lib/ve-extra/{ko.name}"] = (ko.read_bytes(), 0o100644)
        script = "".join(f"insmod /lib/ve-extra/{ko.name}\n" for ko in extra_mods) + script
    files["scenario.sh"] = (("#!/bin/sh\n" + script).encode(), 0o100755)
    extra = cpio_gz(files)
    out.write_bytes(guest.initrd.read_bytes() + extra)
    return out


def _qemu_cmd(guest: LinuxGuest, initrd: Path, socket_path: Path, mem_mb: int) -> list[str]:
    """real-peers.md: TCG, RAM in a shared memfd (the backend maps it), chardev c0 on the
    vhost-user socket, no other NIC."""
    return ["qemu-system-x86_64", "-nographic", "-no-reboot", "-m", str(mem_mb), "-accel", "tcg",
            "-kernel", str(guest.kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3",
            "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
            "-numa", "node,memdev=mem",
            "-nic", "none", "-chardev", f"socket,id=c0,path={socket_path}"]


def qemu_vsock_cmd(guest: LinuxGuest, initrd: Path, socket_path: Path, mem_mb: int = 256,
                   packed: bool = False) -> list[str]:
    """QEMU with a vhost-user-vsock-pci (the CID comes from the backend's GET_CONFIG); packed:
    `packed=on` (VIRTIO_F_RING_PACKED offered to the guest)."""
    return _qemu_cmd(guest, initrd, socket_path, mem_mb) + [
        "-device", "vhost-user-vsock-pci,chardev=c0" + (",packed=on" if packed else "")]


def qemu_net_cmd(guest: LinuxGuest, initrd: Path, socket_path: Path, mem_mb: int = 256,
                 mac: str = "52:54:00:12:34:56", packed: bool = False) -> list[str]:
    """QEMU with a virtio-net-pci on a vhost-user-net backend (real-peers.md: `vectors=0`, or
    QEMU 7.2 crashes when the guest driver negotiates; shared memfd RAM for the backend)."""
    return _qemu_cmd(guest, initrd, socket_path, mem_mb) + [
        "-netdev", "vhost-user,id=n0,chardev=c0",
        "-device", f"virtio-net-pci,netdev=n0,vectors=0,mac={mac}" + (",packed=on" if packed else "")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.linux_guest")
    add_version(p)
    p.add_argument("command", choices=("fetch", "boot-cmd", "net-boot-cmd"))
    p.add_argument("socket", nargs="?", default="/tmp/vhost-vsock.sock")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = p.parse_args(argv)
    try:
        g = ensure_guest(a.cache)
    except GuestUnavailable as e:
        print(f"linux_guest: {e}", file=sys.stderr)
        return 1
    if a.command == "fetch":
        print(f"kernel {g.kernel}\ninitrd {g.initrd}")
    else:
        import shlex
        make = qemu_net_cmd if a.command == "net-boot-cmd" else qemu_vsock_cmd
        print(shlex.join(make(g, g.initrd, Path(a.socket))))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- running one: QEMU with timestamped serial lines ---------------------------------------------
class QemuGuest:
    """A QEMU process whose serial console lines are collected with their arrival times."""

    def __init__(self, cmd: list[str], log_path: Path | None = None):
        import threading
        import time
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._log = open(log_path, "w") if log_path else None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import time
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            t = time.monotonic() - self.t0
            if self._log:
                self._log.write(f"{t:8.3f} {line}\n")
                self._log.flush()
            with self._cond:
                self.lines.append((t, line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, prefix: str, timeout: float) -> tuple[float, str]:
        """The first serial line containing `prefix` (its time since start); TimeoutError if none."""
        import time
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, line in self.lines:
                    if prefix in line:
                        return t, line
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(f"no {prefix!r} on the guest console after {timeout:.0f} s "
                                       f"(QEMU {'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'running'}); "
                                       f"last lines: {[l for _, l in self.lines[-5:]]}")
                self._cond.wait(min(left, 0.5))

    def find(self, prefix: str) -> list[str]:
        with self._cond:
            return [line for _, line in self.lines if prefix in line]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self._log:
            self._log.close()
            self._log = None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)
