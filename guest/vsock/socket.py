"""AF_VSOCK for programs running inside the guest: the guest family of shared/vsock/socket.py.

`GuestVsock(transport)` is the address family over a probed VirtioVsockTransport: its lock is
the guest kernel's big lock (`kernel.lock`), its timers are kernel timers (`kernel.call_later`,
run on the kernel's worker with the lock held), its cancel_pkt is the transport's, and it is up
while the transport is probed. The sockets (`VsockSocket`), their waiting, timeouts and errors
are the shared layer's, written once for the guest and the host (host/vsock/endpoint.py).
Packets the core emits go to the transport's `send_pkt`, which puts them on the tx ring (one
kick per send: `batch`); a waiting call serves the rx ring itself (the rx interrupt's doorbell).
"""
from __future__ import annotations

from shared.constants import VMADDR_CID_ANY, VMADDR_PORT_ANY
from shared.vsock.socket import (DEFAULT_BACKLOG, SHUT_RD, SHUT_RDWR, SHUT_WR, VsockFamily,
                                 VsockSocket)


class GuestVsock(VsockFamily):
    """AF_VSOCK inside one guest: a socket factory over a probed VirtioVsockTransport."""

    what = "virtio-vsock device"

    def __init__(self, transport):
        self.transport = transport
        self.kernel = transport.kernel
        self.lock = transport.kernel.lock
        self.batch = transport.batch  # the fast path: one kick per send (the transport's, for good)

    @property
    def current_core(self):
        return self.transport.core

    @property
    def up(self) -> bool:
        return bool(self.transport.probed)

    @property
    def local_cid(self) -> int:
        """IOCTL_VM_SOCKETS_GET_LOCAL_CID."""
        return self.transport.get_local_cid()

    def call_later(self, delay: float, fn):
        return self.kernel.call_later(delay, fn)      # kernel work: runs with kernel.lock held

    def cancel_pkt(self, sk) -> int:
        return self.transport.cancel_pkt(sk)

    # --- the fast path: waiting calls serve the rx ring ------------------------------------------
    @property
    def stats(self) -> dict:
        return getattr(self.kernel, "stats", {})

    def doorbell(self):
        """The rx queue's interrupt doorbell thread: a waiting call serves the rx ring itself."""
        return self.transport.rx_doorbell()


__all__ = ["GuestVsock", "VsockSocket", "SHUT_RD", "SHUT_WR", "SHUT_RDWR", "VMADDR_CID_ANY",
           "VMADDR_PORT_ANY", "DEFAULT_BACKLOG"]
