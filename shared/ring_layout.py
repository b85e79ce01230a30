"""Split virtqueue layout, byte for byte as virtio 1.x (2.7) and linux/virtio_ring.h.

    struct vring_desc      { le64 addr; le32 len; le16 flags; le16 next; }            16 B, align 16
    struct vring_avail     { le16 flags; le16 idx; le16 ring[N]; le16 used_event; }   6+2N, align 2
    struct vring_used_elem { le32 id; le32 len; }                                       8 B
    struct vring_used      { le16 flags; le16 idx; vring_used_elem ring[N]; le16 avail_event; }  6+8N, align 4

Publish-order contract (both sides): write descriptors / used elements first, then publish the
index (avail.idx, used.idx) with one aligned 16-bit store (GuestMemory.store16). Event fields
(used_event, avail_event) are published the same way.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import VIRTQUEUE_MAX_SIZE

DESC = struct.Struct("<QIHH")        # addr, len, flags, next
USED_ELEM = struct.Struct("<II")     # id, len
assert DESC.size == 16 and USED_ELEM.size == 8


def check_num(num: int) -> None:
    """Queue size: a power of 2, 1..32768 (spec 2.7)."""
    if not isinstance(num, int) or num < 1 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
        raise ValueError(f"queue size {num!r} is not a power of 2 in 1..{VIRTQUEUE_MAX_SIZE}")


def align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def desc_table_size(num: int) -> int:
    return 16 * num


def avail_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 6 + 2 * num


def used_size(num: int) -> int:
    """flags, idx, ring[num], avail_event."""
    return 6 + 8 * num


def vring_size(num: int, align: int) -> int:
    """Bytes of the legacy contiguous layout (uapi vring_size)."""
    return align_up(16 * num + 2 * (3 + num), align) + 2 * 3 + 8 * num


@dataclass(frozen=True, slots=True)
class VringAddrs:
    desc: int
    avail: int
    used: int


def vring_init(num: int, base: int, align: int) -> VringAddrs:
    """Legacy layout addresses (uapi vring_init): avail follows desc, used aligned after avail."""
    desc = base
    avail = base + 16 * num
    used = align_up(avail + 2 * (2 + num) + 2, align)
    return VringAddrs(desc, avail, used)


# --- field addresses ------------------------------------------------------------------------------
def avail_flags_addr(avail: int) -> int:
    return avail


def avail_idx_addr(avail: int) -> int:
    return avail + 2


def avail_ring_addr(avail: int, i: int) -> int:
    return avail + 4 + 2 * i


def used_event_addr(avail: int, num: int) -> int:
    """vring_used_event(): avail->ring[num]."""
    return avail + 4 + 2 * num


def used_flags_addr(used: int) -> int:
    return used


def used_idx_addr(used: int) -> int:
    return used + 2


def used_elem_addr(used: int, i: int) -> int:
    return used + 4 + 8 * i


def avail_event_addr(used: int, num: int) -> int:
    """vring_avail_event(): *(u16 *)&used->ring[num]."""
    return used + 4 + 8 * num


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """uapi vring_need_event: did [old, new) cross event_idx? All arithmetic mod 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)
