"""Packed virtqueue, driver side (the packed half of drivers/virtio/virtio_ring.c).

Theory of operation
-------------------
With VIRTIO_F_RING_PACKED (virtio 1.1+ 2.8) one ring of N descriptors replaces the split ring's
desc table, avail ring and used ring:

    descriptor ring  16*N, align 16   struct vring_packed_desc {le64 addr; le32 len; le16 id; le16 flags}
    driver area       4,   align 4    struct vring_packed_desc_event {off_wrap, flags}: driver writes
    device area       4,   align 4    the same structure, device writes

Both sides walk the ring in order and keep a wrap counter that flips each time they pass slot N-1
(both start at 1). The driver makes a descriptor available by writing AVAIL = its avail wrap
counter and USED = the inverse; the device marks a buffer used by overwriting one descriptor slot
with the buffer id, the written length and AVAIL = USED = its used wrap counter. Used descriptors
are written in the order the device completes buffers, from the slot the driver's next used read
waits at; each used buffer moves that position on by as many slots as its chain took.

`add_sgs` (virtqueue_add_packed) writes the chain's descriptors from next_avail_idx on, every one
with the buffer id, all but the head with their flags at once, and the head's flags word last with
one aligned 16-bit store: that store is the publish (virtio_wmb before it). With INDIRECT_DESC a
multi-entry buffer takes one slot pointing at a table. `kick_prepare`
(virtqueue_kick_prepare_packed) reads the device area: ENABLE kicks, DISABLE does not, DESC (with
EVENT_IDX) kicks when the descriptors added since the last kick cross its offset in the lap its
wrap bit names. `get_buf` (virtqueue_get_buf_ctx_packed) checks the flags at last_used_idx, then
reads id and len, validates the id (BAD_RING otherwise) and frees the buffer's slots.
`disable_cb`/`enable_cb`/`enable_cb_delayed` write the driver area (flags DISABLE, ENABLE or DESC
with off_wrap = where to interrupt).

Buffer ids: one per buffer, from a driver-private free list (Linux takes one per descriptor; one
per buffer is enough for the device, which echoes the id of a chain's last descriptor, and keeps
the bookkeeping smaller). The device can scribble on the ring; the driver never reads its own
bookkeeping back from it. The interface is VirtQueue's (guest/virtqueue.py), so drivers do not
know which layout they hold.
"""
from __future__ import annotations

from guest.virtqueue import DriverRing
from shared.barrier import mb
from shared.constants import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from shared.memory import GuestMemory
from shared.ring_layout import (DESC_F_AVAIL, DESC_F_USED, PACKED_DESC, PACKED_DESC_BODY,
                                PACKED_USED_BODY, VRING_PACKED_EVENT_F_WRAP_CTR,
                                VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
                                VRING_PACKED_EVENT_FLAG_ENABLE, check_packed_num,
                                packed_need_event, packed_parts)

_AU = DESC_F_AVAIL | DESC_F_USED


class VirtQueuePacked(DriverRing):
    """One packed virtqueue as the driver sees it (struct vring_virtqueue, packed half)."""

    packed = True
    kind = "packed "

    def __init__(self, mem: GuestMemory, index: int, num: int, desc: int, driver: int, device: int,
                 *, event_idx: bool = False, indirect: bool = False, alloc=None, name: str = ""):
        check_packed_num(num)
        if desc % 16 or driver % 4 or device % 4:
            raise ValueError(f"ring parts misaligned: desc {desc:#x} driver {driver:#x} device {device:#x}")
        # avail/used: the driver and device areas (SET_VRING_ADDR's avail and used)
        self._init_ring(mem, index, num, desc, driver, device, event_idx, indirect, alloc, name)
        self.num_free = num               # free descriptor slots
        self.num_added = 0                # descriptors added since the last kick_prepare
        self.next_avail_idx = 0           # the slot the next buffer starts at
        self.avail_wrap_counter = 1
        self.avail_used_flags = DESC_F_AVAIL     # AVAIL/USED bits of this lap (wrap 1: AVAIL)
        self.last_used_idx = 0            # the slot the next used descriptor appears in
        self.used_wrap_counter = 1
        self.event_flags_shadow = VRING_PACKED_EVENT_FLAG_ENABLE
        self.free_head = 0                # buffer-id free list
        self._next = list(range(1, num)) + [num]
        # desc_state[id] = (token, slots used, indirect table gpa or None)
        self._state: list[tuple | None] = [None] * num
        self._inflight = 0                # buffers in _state (in_flight() without a scan)
        self._dv = mem.view(desc, 16 * num)
        self._dw = mem.u16_view(desc, 8 * num)     # flags of slot i: word 8*i + 7
        self._drv = mem.u16_view(driver, 2)        # [off_wrap, flags] we write
        self._devw = mem.u16_view(device, 2)       # [off_wrap, flags] the device writes
        self._devb = mem.view(device, 4)
        self._dev32 = self._devb.cast("I")         # one aligned load of both (Linux's snapshot)
        for i in range(num):                       # vring_alloc_queue_packed zeroes the ring
            PACKED_DESC.pack_into(self._dv, 16 * i, 0, 0, 0, 0)
        self._drv[0] = 0
        self._drv[1] = VRING_PACKED_EVENT_FLAG_ENABLE

    # --- layout helpers ----------------------------------------------------------------------
    @staticmethod
    def layout(num: int) -> tuple[int, int, int]:
        """(descriptor ring, driver area, device area) sizes, spec 2.8.10."""
        check_packed_num(num)
        return tuple(s for s, _ in packed_parts(num))

    @staticmethod
    def ring_parts(num: int) -> list[tuple[int, int]]:
        """(size, align) of the descriptor ring and the two event areas (align 16/4/4)."""
        check_packed_num(num)
        return list(packed_parts(num))

    # --- adding buffers ----------------------------------------------------------------------
    def add_sgs(self, out_sgs: list[tuple[int, int]], in_sgs: list[tuple[int, int]], token) -> bool:
        """virtqueue_add_packed: out (device-readable) then in (device-writable) buffers.
        False, with nothing changed, when there is no room (or the queue is broken)."""
        if token is None:
            raise ValueError("token must not be None")
        total = len(out_sgs) + len(in_sgs)
        if total == 0:
            raise ValueError("a buffer needs at least one scatter-gather entry")
        if self.broken:
            return False
        table = None
        if self.indirect and total > 1 and self.num_free:
            table = self.alloc.alloc(16 * total, 16)
        descs = 1 if table is not None else total
        if self.num_free < descs or self.free_head >= self.num:
            if table is not None:
                self.alloc.free(table)
            return False
        num = self.num
        bid = self.free_head
        self.free_head = self._next[bid]
        head = i = self.next_avail_idx
        wrap = self.avail_wrap_counter
        au = self.avail_used_flags
        dv, dw = self._dv, self._dw
        body = PACKED_DESC_BODY.pack_into
        if table is not None:
            # virtqueue_add_indirect_packed: a table of `total` descriptors, only WRITE meaningful
            tv = self.mem.view(table, 16 * total)
            k = 0
            for addr, ln in out_sgs:
                PACKED_DESC.pack_into(tv, 16 * k, addr, ln, 0, 0)
                k += 1
            for addr, ln in in_sgs:
                PACKED_DESC.pack_into(tv, 16 * k, addr, ln, 0, VRING_DESC_F_WRITE)
                k += 1
            tv.release()
            body(dv, 16 * i, table, 16 * total, bid)
            head_flags = VRING_DESC_F_INDIRECT | au
            i += 1
            if i >= num:
                i = 0
                wrap ^= 1
                au ^= _AU
        else:
            head_flags = 0
            k = 0
            for sgs, w in ((out_sgs, 0), (in_sgs, VRING_DESC_F_WRITE)):
                for addr, ln in sgs:
                    k += 1
                    f = (VRING_DESC_F_NEXT if k < total else 0) | w | au
                    body(dv, 16 * i, addr, ln, bid)
                    if i == head:
                        head_flags = f          # published last, below
                    else:
                        dw[8 * i + 7] = f
                    i += 1
                    if i >= num:
                        i = 0
                        wrap ^= 1
                        au ^= _AU
        self._state[bid] = (token, descs, table)
        self._inflight += 1
        self.num_free -= descs
        self.next_avail_idx = i
        self.avail_wrap_counter = wrap
        self.avail_used_flags = au
        self.num_added += descs
        # virtio_wmb, then the head's flags: one aligned store hands the whole chain over
        dw[8 * head + 7] = head_flags
        return True

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare_packed: True when the device asked to be notified."""
        mb()        # virtio_mb: the head flags before the device area is read
        new = self.next_avail_idx
        old = new - self.num_added      # may be negative: a position of the lap before
        self.num_added = 0
        snap = self._dev32[0]
        flags = snap >> 16
        if flags != VRING_PACKED_EVENT_FLAG_DESC or not self.event_idx:
            return flags != VRING_PACKED_EVENT_FLAG_DISABLE
        return packed_need_event(snap & 0xFFFF, self.avail_wrap_counter, self.num, new, old)

    # --- used buffers ------------------------------------------------------------------------
    def _is_used(self, i: int, wrap: int) -> bool:
        return self._dw[8 * i + 7] & _AU == (_AU if wrap else 0)

    def more_used(self) -> bool:
        """more_used_packed; never on a broken queue."""
        return not self.broken and self._is_used(self.last_used_idx, self.used_wrap_counter)

    def _detach_buf(self, bid: int):
        token, descs, table = self._state[bid]
        self._state[bid] = None
        self._inflight -= 1
        self._next[bid] = self.free_head
        self.free_head = bid
        self.num_free += descs
        if table is not None:
            self.alloc.free(table)
        return token, descs

    def get_buf(self):
        """virtqueue_get_buf_ctx_packed: (token, len) of the next used buffer, or None."""
        if self.broken:
            return None
        i = self.last_used_idx
        wrap = self.used_wrap_counter
        if self._dw[8 * i + 7] & _AU != (_AU if wrap else 0):     # not used (yet)
            return None
        # flags were read first (virtio_rmb): id and len are the device's
        ln, bid = PACKED_USED_BODY.unpack_from(self._dv, 16 * i + 8)
        if bid >= self.num:
            self._bad_ring(f"id {bid} out of range")
            return None
        if self._state[bid] is None:
            self._bad_ring(f"id {bid} is not a buffer in flight")
            return None
        token, descs = self._detach_buf(bid)
        i += descs
        if i >= self.num:
            i -= self.num
            wrap ^= 1
        self.last_used_idx = i
        self.used_wrap_counter = wrap
        if self.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DESC:
            # interrupt me at the next used descriptor (virtio_store_mb)
            self._drv[0] = i | (wrap << VRING_PACKED_EVENT_F_WRAP_CTR)
            mb()
        return token, ln

    def detach_unused_buf(self):
        """virtqueue_detach_unused_buf_packed: reclaim a buffer the device never used (after reset)."""
        for bid in range(self.num):
            if self._state[bid] is not None:
                return self._detach_buf(bid)[0]
        return None

    def _scan_used(self) -> tuple[int, int, int]:
        """Walk the used descriptors the device wrote ahead of last_used_idx (not consumed yet):
        (buffers, slot after them, its wrap counter). Bounded by the buffers in flight."""
        i, wrap, n = self.last_used_idx, self.used_wrap_counter, 0
        limit = self.in_flight()
        while n < limit and self._is_used(i, wrap):
            bid = PACKED_USED_BODY.unpack_from(self._dv, 16 * i + 8)[1]
            st = self._state[bid] if bid < self.num else None
            if st is None:
                break
            n += 1
            i += st[1]
            if i >= self.num:
                i -= self.num
                wrap ^= 1
        return n, i, wrap

    def device_pending(self) -> bool:
        """Has the device not yet used everything the driver made available? (autocork's
        "in flight"; split: avail.idx != used.idx)"""
        inflight = self._inflight
        if not inflight:
            return False
        # the next used slot is not used: the device has not used everything (no walk); else
        # walk the used descriptors waiting to be reaped (at most the buffers in flight)
        if not self._is_used(self.last_used_idx, self.used_wrap_counter):
            return True
        return self._scan_used()[0] < inflight

    def resume_base(self) -> int:
        """Where a new device resumes after a reconnect without inflight tracking: the slot after
        the last used descriptor, its wrap counter in bit 15 (vhost-user's packed vring base)."""
        _, i, wrap = self._scan_used()
        return i | (wrap << VRING_PACKED_EVENT_F_WRAP_CTR)

    # --- interrupt suppression ---------------------------------------------------------------
    @property
    def cb_enabled(self) -> bool:
        return self.event_flags_shadow != VRING_PACKED_EVENT_FLAG_DISABLE

    def disable_cb(self) -> None:
        """virtqueue_disable_cb_packed: flags = DISABLE in the driver area."""
        if self.event_flags_shadow != VRING_PACKED_EVENT_FLAG_DISABLE:
            self.event_flags_shadow = VRING_PACKED_EVENT_FLAG_DISABLE
            self._drv[1] = VRING_PACKED_EVENT_FLAG_DISABLE

    def suppress_cb(self) -> None:
        """Busy-poll window: the packed ring's DISABLE is explicit, so disable_cb is enough."""
        self.disable_cb()

    def _enable_at(self, off: int, wrap: int) -> None:
        """virtqueue_enable_cb_prepare_packed: off_wrap first (EVENT_IDX), then the flags."""
        if self.event_idx:
            self._drv[0] = off | (wrap << VRING_PACKED_EVENT_F_WRAP_CTR)
            # virtio_wmb: off_wrap before the flags that make the device look at it
        if self.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DISABLE:
            self.event_flags_shadow = (VRING_PACKED_EVENT_FLAG_DESC if self.event_idx
                                       else VRING_PACKED_EVENT_FLAG_ENABLE)
            self._drv[1] = self.event_flags_shadow

    def _ahead(self, k: int) -> tuple[int, int]:
        off, wrap = self.last_used_idx + k, self.used_wrap_counter
        if off >= self.num:
            off -= self.num
            wrap ^= 1
        return off, wrap

    def enable_cb(self) -> bool:
        """virtqueue_enable_cb: re-arm; False when buffers raced in (poll again)."""
        if self.broken:
            return True
        self._enable_at(self.last_used_idx, self.used_wrap_counter)
        mb()        # virtio_mb: publish before virtqueue_poll_packed re-reads the ring
        return not self._is_used(self.last_used_idx, self.used_wrap_counter)

    def enable_cb_after(self, k: int) -> bool:
        """enable_cb asking for the interrupt only once about k more buffers are used (EVENT_IDX;
        else enable_cb). False when buffers raced in."""
        if k <= 1 or not self.event_idx or self.broken:
            return self.enable_cb()
        # events count slots, not buffers: k-1 buffers of the average length in flight ahead
        per = max(1, (self.num - self.num_free) // max(1, self._inflight))
        self._enable_at(*self._ahead(min((k - 1) * per, self.num - 1)))
        mb()
        return not self._is_used(self.last_used_idx, self.used_wrap_counter)

    def enable_cb_delayed(self) -> bool:
        """virtqueue_enable_cb_delayed_packed: interrupt after ~3/4 of the outstanding slots."""
        if self.broken:
            return True
        bufs = (self.num - self.num_free) * 3 // 4
        off, wrap = self._ahead(bufs)
        self._enable_at(off, wrap)
        mb()
        # Linux looks at the descriptor the event points at: used there means most came back
        return not self._is_used(off, wrap) and not (bufs == 0 and self.more_used())

    # --- introspection -----------------------------------------------------------------------
    def in_flight(self) -> int:
        return self._inflight

    def ring_flags(self) -> list[int]:
        """Every slot's flags word as it is now (the monitor's ring picture)."""
        dw = self._dw
        return [dw[8 * i + 7] for i in range(self.num)]

    def snapshot(self) -> dict:
        """A read-only picture for monitors (docs/monitor.md "queue snapshot", packed keys)."""
        try:
            drv, dev = self._drv, self._devw
            return {"index": self.index, "name": self.name, "num": self.num, "packed": True,
                    "desc": self.desc, "avail": self.avail, "used": self.used,
                    "event_idx": self.event_idx, "indirect": self.indirect,
                    "avail_idx": self.next_avail_idx, "avail_wrap": self.avail_wrap_counter,
                    "last_used": self.last_used_idx, "used_wrap": self.used_wrap_counter,
                    "driver_event": (drv[0], drv[1]), "device_event": (dev[0], dev[1]),
                    "num_free": self.num_free, "in_flight": self.in_flight(),
                    "cb_disabled": self.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DISABLE,
                    "broken": self.broken, "broken_reason": self.broken_reason}
        except ValueError:
            return {}

    def _views(self) -> tuple:
        return self._dev32, self._devb, self._dv, self._dw, self._drv, self._devw

    def __repr__(self) -> str:
        return (f"VirtQueuePacked({self.name} num={self.num} free={self.num_free} "
                f"avail={self.next_avail_idx}/{self.avail_wrap_counter} "
                f"used={self.last_used_idx}/{self.used_wrap_counter}{' BROKEN' if self.broken else ''})")
