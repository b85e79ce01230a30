"""The tap backend: an existing tap interface opened through /dev/net/tun (TUNSETIFF).

`tap:IFNAME` attaches to a tap that already exists (created with `ip tuntap add`); a missing tap
is an error, never created behind the user's back, and a tap another process holds (a second
guest) is refused (EBUSY). With `vnet_hdr=on` the tap carries the virtio_net_hdr itself
(IFF_VNET_HDR, TUNSETVNETHDRSZ): vhost-net then passes the header through instead of stripping it.
With `multi_queue=on` (a tap made with `ip tuntap add ... multi_queue`) the fd is one queue of the
tap (IFF_MULTI_QUEUE): a second process may attach another, as the destination of a live
migration does while the source still holds its own. Such a queue is detached (TUNSETQUEUE
IFF_DETACH_QUEUE: the kernel steers no frame to it) except while a device's rx queue uses it
(`steer(True)` from VhostNet.set_backend), so an idle backend swallows no flow.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
TUNSETQUEUE = 0x400454D9


class Tap:
    kind = "tap"

    def __init__(self, ifname: str, vnet_hdr: bool = False, hdr_size: int = 12, multi_queue: bool = False):
        if not ifname or len(ifname) > 15 or "/" in ifname:
            raise ValueError(f"tap backend: bad interface name {ifname!r}")
        try:
            socket.if_nametoindex(ifname)     # this network namespace's view (sysfs may not be)
        except OSError:
            raise ValueError(f"tap backend: no interface {ifname!r} (create it: ip tuntap add {ifname} mode tap)") from None
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ValueError(f"tap backend: cannot open /dev/net/tun: {e.strerror}") from None
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), flags))
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_size))
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:
                raise ValueError(f"tap backend: {ifname!r} is already in use (another guest?)") from None
            if e.errno == errno.EINVAL:
                raise ValueError(f"tap backend: {ifname!r} is not a tap interface") from None
            raise ValueError(f"tap backend: cannot attach {ifname!r}: {e.strerror}") from None
        self.fd = fd
        self.multi_queue = multi_queue
        self.steered = True
        if multi_queue:
            self.steer(False)
        self.vnet_hdr = vnet_hdr
        self.name = f"tap:{ifname}"
        self.drops = 0

    def steer(self, on: bool) -> None:
        """multi_queue: let the kernel send frames to this queue (attached) or not (detached)."""
        if not self.multi_queue or on == self.steered or self.fd < 0:
            return
        fcntl.ioctl(self.fd, TUNSETQUEUE, struct.pack("16sH", b"", IFF_ATTACH_QUEUE if on else IFF_DETACH_QUEUE))
        self.steered = on

    def fileno(self) -> int:
        return self.fd

    def send(self, frame) -> bool:
        try:
            os.write(self.fd, frame)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno == errno.EIO:          # the tap is down: the kernel drops it, so do we
                self.drops += 1
                return True
            raise
        return True

    def recv(self):
        try:
            return os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return None

    def writable(self) -> bool:
        return bool(select.select([], [self.fd], [], 0)[1])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
