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


# --- packed virtqueue (virtio 1.1+ 2.8, linux/virtio_ring.h) -------------------------------------
#
#     struct vring_packed_desc       { le64 addr; le32 len; le16 id; le16 flags; }   16 B, align 16
#     struct vring_packed_desc_event { le16 off_wrap; le16 flags; }                   4 B, align 4
#
# One descriptor ring (16*N bytes) instead of desc/avail/used; the "driver area" holds the driver's
# event suppression structure (the device reads it before interrupting), the "device area" the
# device's (the driver reads it before kicking). Over SET_VRING_ADDR they travel as the avail and
# used addresses. A descriptor's flags word is its handover: it is written last, with one aligned
# 16-bit store, after the rest of the descriptor (and, for a chain, after all of the chain).
PACKED_DESC = struct.Struct("<QIHH")        # addr, len, id, flags
PACKED_DESC_BODY = struct.Struct("<QIH")    # addr, len, id: everything before the flags word
PACKED_USED_BODY = struct.Struct("<IH")     # len, id at offset 8 (the device leaves addr alone)
VRING_PACKED_DESC_F_AVAIL = 7               # bit numbers, as linux/virtio_ring.h
VRING_PACKED_DESC_F_USED = 15
DESC_F_AVAIL = 1 << VRING_PACKED_DESC_F_AVAIL
DESC_F_USED = 1 << VRING_PACKED_DESC_F_USED
VRING_PACKED_EVENT_FLAG_ENABLE = 0
VRING_PACKED_EVENT_FLAG_DISABLE = 1
VRING_PACKED_EVENT_FLAG_DESC = 2
VRING_PACKED_EVENT_F_WRAP_CTR = 15
PACKED_EVENT_SIZE = 4
PACKED_MAX_SIZE = 1 << 15                   # spec 2.8: queue size up to 32768, any number


def check_packed_num(num: int) -> None:
    """Packed queue size: 1..32768; unlike split it need not be a power of 2 (spec 2.8)."""
    if not isinstance(num, int) or isinstance(num, bool) or num < 1 or num > PACKED_MAX_SIZE:
        raise ValueError(f"packed queue size {num!r} is not in 1..{PACKED_MAX_SIZE}")


def packed_parts(num: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """((size, align) of the descriptor ring, the driver area, the device area)."""
    return (16 * num, 16), (PACKED_EVENT_SIZE, 4), (PACKED_EVENT_SIZE, 4)


def split_parts(num: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """((size, align) of the descriptor table, the avail ring, the used ring)."""
    return (desc_table_size(num), 16), (avail_size(num), 2), (used_size(num), 4)


def packed_flags_avail(wrap: int) -> int:
    """The AVAIL/USED bits a driver writes for a descriptor it makes available in lap `wrap`:
    AVAIL = wrap, USED = !wrap (spec 2.8.1)."""
    return DESC_F_AVAIL if wrap else DESC_F_USED


def packed_flags_used(wrap: int) -> int:
    """The AVAIL/USED bits a device writes for a used descriptor in lap `wrap`: both = wrap."""
    return (DESC_F_AVAIL | DESC_F_USED) if wrap else 0


def packed_is_avail(flags: int, wrap: int) -> bool:
    """Is a descriptor with these flags available to a device whose avail wrap counter is `wrap`?"""
    return bool(flags & DESC_F_AVAIL) == bool(wrap) and bool(flags & DESC_F_USED) != bool(wrap)


def packed_is_used(flags: int, wrap: int) -> bool:
    """Is it used, for a driver whose used wrap counter is `wrap` (AVAIL == USED == wrap)?"""
    return bool(flags & DESC_F_AVAIL) == bool(wrap) and bool(flags & DESC_F_USED) == bool(wrap)


def packed_need_event(off_wrap: int, wrap: int, num: int, new: int, old: int) -> bool:
    """vring_need_event for a packed ring: [old, new) are positions in the lap of wrap counter
    `wrap` (old may be negative, a position of the lap before); an event offset published for the
    other lap is moved back by num (Linux virtqueue_kick_prepare_packed, QEMU
    vring_packed_need_event)."""
    off = off_wrap & 0x7FFF
    if (off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR) != wrap:
        off -= num
    return vring_need_event(off & 0xFFFF, new & 0xFFFF, old & 0xFFFF)
