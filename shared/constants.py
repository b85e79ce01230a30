"""Spec constants (virtio 1.x, linux/virtio_ring.h, virtio_config.h, virtio_vsock.h, vhost.h).

Values checked against /usr/include/linux on the development machine.
"""

# --- split ring (linux/virtio_ring.h) -------------------------------------------------------------
VRING_DESC_F_NEXT = 1          # chain continues via the next field
VRING_DESC_F_WRITE = 2         # device-writable buffer
VRING_DESC_F_INDIRECT = 4      # buffer holds a table of descriptors
VRING_USED_F_NO_NOTIFY = 1     # device -> driver: don't kick me
VRING_AVAIL_F_NO_INTERRUPT = 1 # driver -> device: don't interrupt me

VRING_DESC_ALIGN_SIZE = 16
VRING_AVAIL_ALIGN_SIZE = 2
VRING_USED_ALIGN_SIZE = 4
VIRTQUEUE_MAX_SIZE = 32768     # spec: queue size is a power of 2, at most 32768
INDIRECT_MAX_DESC = 65536      # ring rule 7: an indirect table may hold at most 2^16 descriptors

# --- feature bits (virtio_config.h, virtio_ring.h, vhost.h) ----------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_TRANSPORT_F_START = 28
VIRTIO_TRANSPORT_F_END = 42


def bit(n: int) -> int:
    """The feature mask for feature bit n."""
    return 1 << n


def has(features: int, n: int) -> bool:
    return bool(features >> n & 1)


# --- device status (virtio_config.h) ---------------------------------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# --- device ids (virtio_ids.h) ---------------------------------------------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_VSOCK = 19

# --- vsock (virtio_vsock.h, vm_sockets.h) ----------------------------------------------------------
VSOCK_VQ_RX = 0
VSOCK_VQ_TX = 1
VSOCK_VQ_EVENT = 2
VSOCK_VQ_MAX = 3

VIRTIO_VSOCK_F_STREAM = 0
VIRTIO_VSOCK_F_SEQPACKET = 1
VIRTIO_VSOCK_F_NO_IMPLIED_STREAM = 2

VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
VIRTIO_VSOCK_SHUTDOWN_MASK = 3

VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

VIRTIO_VSOCK_DEFAULT_MIN_BUF_SIZE = 128
VIRTIO_VSOCK_DEFAULT_BUF_SIZE = 256 * 1024
VIRTIO_VSOCK_DEFAULT_MAX_BUF_SIZE = 256 * 1024
VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE = 4 * 1024
VIRTIO_VSOCK_MAX_BUF_SIZE = 0xFFFFFFFF
VIRTIO_VSOCK_MAX_PKT_BUF_SIZE = 64 * 1024
VIRTIO_VSOCK_HDR_SIZE = 44
VSOCK_CLOSE_TIMEOUT = 8.0      # seconds (8*HZ in af_vsock)
VSOCK_DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds (2*HZ in af_vsock)

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
VMADDR_PORT_ANY = 0xFFFFFFFF
RESERVED_CIDS = frozenset({0, 1, 2, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF})

# vhost-vsock's per-kick weights (drivers/vhost/vsock.c)
VHOST_VSOCK_WEIGHT = 0x80000
VHOST_VSOCK_PKT_WEIGHT = 256

# --- vhost-net (drivers/vhost/net.c) ---------------------------------------------------------------
VHOST_NET_WEIGHT = 0x80000
VHOST_NET_PKT_WEIGHT = 256
