"""virtio-net constants and layouts (uapi virtio_net.h; drivers/vhost/net.c; spec 5.1).

    struct virtio_net_hdr            { u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
                                       le16 csum_start; le16 csum_offset; }            10 bytes
    struct virtio_net_hdr_mrg_rxbuf  { struct virtio_net_hdr hdr; le16 num_buffers; } 12 bytes
    struct virtio_net_config         { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; }

A VERSION_1 device always uses the 12-byte form (spec 5.1.6, virtio_net_hdr_v1); a legacy one uses
it only when MRG_RXBUF is negotiated, else the 10-byte form.
"""
from __future__ import annotations

import ipaddress
import re
import struct

from shared.constants import VIRTIO_F_VERSION_1, has

# feature bits (virtio_net.h, vhost.h)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VHOST_NET_F_VIRTIO_NET_HDR = 27     # vhost adds/strips the header (else it passes to the backend)

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0

NET_VQ_RX = 0
NET_VQ_TX = 1

NET_HDR = struct.Struct("<BBHHHH")          # 10 bytes
NET_HDR_MRG = struct.Struct("<BBHHHHH")     # 12 bytes (num_buffers last)
NET_CONFIG = struct.Struct("<6sHH")

ETH_HLEN = 14
ETH_MIN_FRAME = 14          # a destination, a source, an ethertype
ETH_MAX_FRAME = 1514        # no VLAN, no GSO: MTU 1500 + Ethernet header
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
BROADCAST = b"\xff" * 6


def hdr_len(features: int) -> int:
    """sizeof the header the driver and device exchange (virtio_net_probe's hdr_len choice)."""
    if has(features, VIRTIO_F_VERSION_1) or has(features, VIRTIO_NET_F_MRG_RXBUF):
        return NET_HDR_MRG.size
    return NET_HDR.size


def pack_hdr(size: int, num_buffers: int = 1) -> bytes:
    """A receive header: no checksum offload, GSO_NONE (vhost's handle_rx writes exactly this)."""
    if size == NET_HDR_MRG.size:
        return NET_HDR_MRG.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, num_buffers)
    return NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0)


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; a multicast or all-zero address is refused (ValueError)."""
    if not isinstance(text, str) or not _MAC_RE.match(text):
        raise ValueError(f"bad MAC address {text!r} (want six hex pairs like 52:54:00:12:34:56)")
    mac = bytes(int(p, 16) for p in text.split(":"))
    if mac[0] & 1 or mac == bytes(6):
        raise ValueError(f"bad MAC address {text!r}: multicast or all-zero")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(n: int) -> bytes:
    """A locally administered unicast MAC derived from n (QEMU's 52:54:00 prefix)."""
    return bytes([0x52, 0x54, 0x00, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF])


def parse_ip(text: str) -> ipaddress.IPv4Interface:
    """'169.254.10.2/24' -> IPv4Interface; only link-local addresses are used by this project."""
    try:
        ifc = ipaddress.IPv4Interface(text)
    except (ValueError, TypeError):
        raise ValueError(f"bad IPv4 address {text!r} (want A.B.C.D/PREFIX)") from None
    if "/" not in str(text):
        raise ValueError(f"bad IPv4 address {text!r}: give a prefix length, e.g. /24")
    if not ifc.ip.is_link_local:
        raise ValueError(f"IPv4 address {text!r} is not link-local (169.254.0.0/16)")
    return ifc
