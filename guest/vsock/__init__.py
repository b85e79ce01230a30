"""virtio-vsock in the guest: the transport driver (transport.py), a socket-like API for
programs in the guest (socket.py) and built-in services (services.py)."""

from guest.vsock.socket import GuestVsock, VsockSocket
from guest.vsock.transport import VirtioVsockTransport

__all__ = ["GuestVsock", "VsockSocket", "VirtioVsockTransport"]
