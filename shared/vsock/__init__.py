"""virtio-vsock, the parts both ends share: the packet header, the stream protocol with its
credit flow control (VsockCore), and vsockmon packet capture."""

from shared.vsock.packet import HDR, Packet, reply_to
from shared.vsock.proto import SockState, VsockCore, VsockSock

__all__ = ["HDR", "Packet", "reply_to", "SockState", "VsockCore", "VsockSock"]
