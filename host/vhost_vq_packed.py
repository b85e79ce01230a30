"""Packed virtqueue, device side (virtio 1.1+ 2.8; QEMU's virtqueue_packed_pop / DPDK vhost's
packed dequeue, vhost_get_vq_desc's role).

Theory of operation
-------------------
The ring is one table of N descriptors {addr, len, id, flags}; the driver area and the device area
(SET_VRING_ADDR's avail and used addresses) each hold one event suppression structure
{off_wrap, flags}. The device keeps two positions with their wrap counters (both start at 1):

    last_avail_idx / avail_wrap   the slot the next available chain starts at
    last_used_idx / used_wrap     the slot the next used descriptor is written to

    get_vq_desc   load the flags word at last_avail_idx once: available when AVAIL == avail_wrap
                  and USED != avail_wrap (else the ring is empty). Then copy each descriptor of the
                  chain out once (NEXT links run to the following slot, wrapping at N), checking
                  every rule of docs/ring-rules.md on the copy; an INDIRECT head is the whole chain
                  and points at a table read in order. The buffer id is the last descriptor's.
    add_used(_n)  write {len, id} into the slot at last_used_idx and then its flags word with
                  AVAIL = USED = used_wrap (one aligned 16-bit store: the publish); move on by as
                  many slots as that buffer's chain took. A batch writes the first flags last.
    signal        read the driver area: DISABLE no, ENABLE yes, DESC (EVENT_IDX) when the used
                  descriptors written since the last interrupt cross its off_wrap.
    enable_notify / disable_notify: the device area (flags DISABLE, ENABLE or DESC + off_wrap).

Everything the guest wrote is hostile. Beyond the split rules (bounded walks, translated buffers,
order of directions, lengths) the packed ring adds: every descriptor of a chain after its head
must be marked available for its lap (rule 15: wrong flags), and a buffer id must be below N and
not already in flight (rule 16: wrong ids). The interface is VhostVirtqueue's
(host/vhost_vq.py), so the devices do not know which layout they serve.

vhost-user ring state (GET/SET_VRING_BASE, docs/interop/vhost-user.rst "packed virtqueues"):
bits 0-14 last_avail_idx, bit 15 its wrap counter, bits 16-30 last_used_idx, bit 31 its wrap
counter. A SET whose upper half is 0 (DPDK's virtio-user sends only the avail half) puts the used
position at the avail one, as DPDK's vhost library does.
"""
from __future__ import annotations

from collections import deque

from shared.barrier import mb
from shared.constants import (INDIRECT_MAX_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                              VRING_DESC_F_WRITE)
from shared.errors import GuestMemoryError, VringError
from shared.ring_layout import (DESC_F_AVAIL, DESC_F_USED, PACKED_DESC, PACKED_MAX_SIZE,
                                PACKED_USED_BODY, VRING_PACKED_EVENT_F_WRAP_CTR,
                                VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
                                VRING_PACKED_EVENT_FLAG_ENABLE, packed_need_event, packed_parts)

from host.vhost_vq import DescChain, VringMapping

_U32 = 0xFFFFFFFF
_AU = DESC_F_AVAIL | DESC_F_USED
_unpack_desc = PACKED_DESC.unpack_from
_pack_used = PACKED_USED_BODY.pack_into


def _enc(idx: int, wrap: int) -> int:
    return idx | (wrap << VRING_PACKED_EVENT_F_WRAP_CTR)


class VhostVirtqueuePacked(VringMapping):
    """One packed ring as the backend sees it (the packed half of struct vhost_virtqueue)."""

    packed = True
    _VIEWS = ("_drv32", "_dv", "_dw", "_drvb", "_devw")      # the cast before the view it casts

    def __init__(self, index: int, name: str = ""):
        self.index = index
        self.name = name or f"vq{index}"
        self._num = 0
        self._desc = 0                  # gpa of the descriptor ring
        self._avail = 0                 # gpa of the driver area (driver event suppression)
        self._used = 0                  # gpa of the device area (device event suppression)
        self._event_idx = False
        self.indirect = False
        self.notify_on_empty = False
        self.enabled = False
        self._last_avail = 0
        self._avail_wrap = 1
        self._last_used = 0
        self._used_wrap = 1
        self._seen = (0, 1)             # furthest position popped (enable_notify(seen=True))
        self._chain_slots = 1           # slots the last chain took (k chains ~ k * this slots)
        self.notify_disabled = False    # our intent in the device area
        self.signalled_used = (0, 1)
        self.signalled_used_valid = False
        self._since_signal = 0          # slots written since the last interrupt decision
        self._inflight: dict[int, int] = {}        # buffer id -> slots its chain took
        self._history: deque = deque()             # (slot, wrap, id) of recent pops (discard)
        self.last_used_slots: list[int] = []       # slots the last add_used(_n) wrote (dirty log)
        self._mem = None

    @staticmethod
    def parts(num: int):
        """((size, align) of the descriptor ring, driver area, device area) for SET_VRING_ADDR."""
        return packed_parts(num)

    @property
    def last_avail_idx(self) -> int:
        """last_avail_idx with the avail wrap counter in bit 15."""
        return _enc(self._last_avail, self._avail_wrap)

    @last_avail_idx.setter
    def last_avail_idx(self, v: int) -> None:
        self._last_avail = v & 0x7FFF
        self._avail_wrap = (v >> 15) & 1
        self._seen = (self._last_avail, self._avail_wrap)
        self._history.clear()
        self._inflight.clear()

    @property
    def last_used_idx(self) -> int:
        """last_used_idx with the used wrap counter in bit 15."""
        return _enc(self._last_used, self._used_wrap)

    @last_used_idx.setter
    def last_used_idx(self, v: int) -> None:
        # SET_VRING_BASE's 32-bit value: the upper half is the used position when given
        if v > 0xFFFF:
            v >>= 16
        self._last_used = v & 0x7FFF
        self._used_wrap = (v >> 15) & 1
        self.signalled_used_valid = False

    def vring_base(self) -> int:
        """GET_VRING_BASE's value: avail position in bits 0-15, used position in 16-31."""
        return self.last_avail_idx | (self.last_used_idx << 16)

    # --- mapping: ring rule 13 ----------------------------------------------------------------
    def _map(self, mem) -> None:
        self.unmap()
        num = self._num
        if not isinstance(num, int) or num < 1 or num > PACKED_MAX_SIZE:
            raise VringError(13, f"packed queue size {num!r} is not in 1..{PACKED_MAX_SIZE}")
        if self._desc % 16 or self._avail % 4 or self._used % 4:
            raise VringError(13, f"ring addresses misaligned: desc {self._desc:#x} driver "
                                 f"{self._avail:#x} device {self._used:#x}")
        if self._last_avail >= num or self._last_used >= num:
            raise VringError(13, f"ring base {self._last_avail}/{self._last_used} outside a "
                                 f"{num}-entry ring")
        try:
            dv = mem.view(self._desc, 16 * num)
            dw = mem.u16_view(self._desc, 8 * num)
            drvb = mem.view(self._avail, 4)
            devw = mem.u16_view(self._used, 2)
        except GuestMemoryError as exc:
            raise VringError(13, f"vq_access_ok failed: {exc}") from None
        self._dv, self._dw, self._drvb, self._devw = dv, dw, drvb, devw
        self._drv32 = drvb.cast("I")            # one aligned load of {off_wrap, flags}
        if self._history.maxlen != num:         # discard_vq_desc looks back at most N chains
            self._history = deque(self._history, maxlen=num)
        self._mem = mem

    def init_access(self, mem) -> None:
        """Map and publish our kick intent (a killed backend may have left DISABLE behind)."""
        if mem is not self._mem:
            self._map(mem)
        self._write_notify(self._last_avail, self._avail_wrap)

    # --- avail side ---------------------------------------------------------------------------
    def _is_avail(self, i: int, wrap: int) -> bool:
        return self._dw[8 * i + 7] & _AU == (DESC_F_AVAIL if wrap else DESC_F_USED)

    def get_vq_desc(self, mem) -> DescChain | None:
        """The next available chain (head = its buffer id), or None when the ring is empty."""
        if mem is not self._mem:
            self._map(mem)
        num = self._num
        i, wrap = self._last_avail, self._avail_wrap
        au = DESC_F_AVAIL if wrap else DESC_F_USED  # the AVAIL/USED bits of this lap
        if self._dw[8 * i + 7] & _AU != au:         # one aligned load: the handover
            return None                             # ring rule 2: not available, empty
        # flags first, then the rest (virtio_rmb; x86 keeps loads in order)
        start = i
        out: list[memoryview] = []
        in_: list[memoryview] = []
        in_addrs: list[tuple[int, int]] = []
        out_len = in_len = 0
        seen_write = False
        translate = mem.translate
        dv = self._dv
        count = 0
        while True:
            if count >= num:
                raise VringError(5, f"Loop detected: chain from slot {start} longer than the "
                                    f"ring ({num})")                       # ring rule 5
            addr, ln, bid, flags = _unpack_desc(dv, i << 4)
            if count and (flags & _AU) != au:
                raise VringError(15, f"descriptor at slot {i} (chain from {start}) is not "
                                     f"available in lap {wrap}: flags {flags:#x}")   # rule 15
            count += 1
            if flags & VRING_DESC_F_INDIRECT:
                if count != 1 or flags & VRING_DESC_F_NEXT:
                    raise VringError(8, f"Indirect descriptor at slot {i} chained with others")
                if not self.indirect:
                    raise VringError(8, f"Indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC: slot {i}")
                out_len, in_len = self._indirect(mem, i, addr, ln, out, in_, in_addrs)
            else:
                if flags & VRING_DESC_F_WRITE:
                    seen_write = True
                elif seen_write:
                    raise VringError(10, f"Descriptor has out after in: slot {i}")    # rule 10
                if out_len + in_len + ln > _U32:
                    raise VringError(12, f"chain length {out_len + in_len + ln} exceeds 2^32 - 1 "
                                         f"bytes, from slot {start}")                # rule 12
                try:
                    iov = translate(addr, ln)
                except GuestMemoryError as exc:
                    raise VringError(11, f"Translation failure -EFAULT slot {i}: {exc}") from None
                if seen_write:
                    in_ += iov
                    in_len += ln
                    in_addrs.append((addr, ln))
                else:
                    out += iov
                    out_len += ln
            i += 1
            if i >= num:
                i = 0
                wrap ^= 1
                au ^= _AU
            if not flags & VRING_DESC_F_NEXT:
                break
        # ring rule 16: the id of the chain's last descriptor names the buffer
        if bid >= num:
            raise VringError(16, f"buffer id {bid} out of range (ring of {num}), slot {start}")
        if bid in self._inflight:
            raise VringError(16, f"buffer id {bid} is already in flight, slot {start}")
        self._inflight[bid] = count
        self._chain_slots = count
        self._history.append((start, self._avail_wrap, bid))      # bounded: maxlen num
        self._last_avail, self._avail_wrap = i, wrap
        self._seen = (i, wrap)
        return DescChain(bid, out, in_, out_len, in_len, in_addrs)

    def _indirect(self, mem, slot, addr, ln, out, in_, in_addrs) -> tuple[int, int]:
        """An indirect table: len/16 descriptors in order; only WRITE is meaningful in them
        (spec 2.8.19; NEXT, INDIRECT and id are reserved and ignored)."""
        if ln % 16 or ln == 0:
            raise VringError(6, f"Invalid length in indirect descriptor: len {ln:#x} not multiple of 0x10")
        n = ln // 16
        if n > INDIRECT_MAX_DESC:
            raise VringError(7, f"Indirect buffer length too big: {ln}")
        try:
            parts = mem.translate(addr, ln)
        except GuestMemoryError as exc:
            raise VringError(11, f"Translation failure -EFAULT in indirect: {exc}") from None
        table = b"".join(parts) if len(parts) > 1 else bytes(parts[0])   # copied out once
        out_len = in_len = 0
        seen_write = False
        for k in range(n):
            a, length, _id, flags = _unpack_desc(table, k << 4)
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise VringError(10, f"Descriptor has out after in: entry {k} of the table at slot {slot}")
            if out_len + in_len + length > _U32:
                raise VringError(12, f"chain length exceeds 2^32 - 1 bytes, table at slot {slot}")
            try:
                iov = mem.translate(a, length)
            except GuestMemoryError as exc:
                raise VringError(11, f"Translation failure -EFAULT entry {k} of the table at "
                                     f"slot {slot}: {exc}") from None
            if seen_write:
                in_ += iov
                in_len += length
                in_addrs.append((a, length))
            else:
                out += iov
                out_len += length
        return out_len, in_len

    def discard_vq_desc(self, n: int) -> None:
        """Un-pop the last n chains (they will be returned again)."""
        for _ in range(n):
            if not self._history:
                break
            slot, wrap, bid = self._history.pop()
            self._inflight.pop(bid, None)
            self._last_avail, self._avail_wrap = slot, wrap

    def avail_empty(self, mem) -> bool:
        if mem is not self._mem:
            self._map(mem)
        return not self._is_avail(self._last_avail, self._avail_wrap)

    # --- used side ----------------------------------------------------------------------------
    def _write_used(self, head: int, length: int, publish: bool) -> int:
        """Write one used descriptor at last_used_idx; its flags only when publish. -> slot."""
        count = self._inflight.pop(head, None)
        if count is None:
            raise ValueError(f"{self.name}: add_used of buffer id {head} that is not in flight")
        i = self._last_used
        _pack_used(self._dv, (i << 4) + 8, length & _U32, head)
        if publish:
            self._dw[(i << 3) + 7] = (_AU if self._used_wrap else 0) | (VRING_DESC_F_WRITE if length else 0)
        j = i + count
        if j >= self._num:
            j -= self._num
            self._used_wrap ^= 1
        self._last_used = j
        self._since_signal += count
        if self._since_signal > self._num:
            self.signalled_used_valid = False
        return i

    def add_used(self, mem, head: int, length: int) -> None:
        if mem is not self._mem:
            self._map(mem)
        self.last_used_slots = [self._write_used(head, length, True)]

    def add_used_n(self, mem, used: list[tuple[int, int]]) -> None:
        """Write every used descriptor, the first one's flags last: the batch appears at once."""
        if not used:
            return
        if mem is not self._mem:
            self._map(mem)
        first_wrap = self._used_wrap
        slots = []
        head0, len0 = used[0]
        slots.append(self._write_used(head0, len0, False))
        for head, length in used[1:]:
            slots.append(self._write_used(head, length, True))
        # virtio_wmb, then the first flags word publishes the batch
        self._dw[8 * slots[0] + 7] = (_AU if first_wrap else 0) | (VRING_DESC_F_WRITE if len0 else 0)
        self.last_used_slots = slots

    def used_idx(self, mem) -> int:
        """The used position (wrap in bit 15): a packed ring has no used.idx in guest memory, so
        this is ours (the session resumes from it at ring start)."""
        return self.last_used_idx

    def signal(self, mem) -> bool:
        """vhost_notify for packed rings (QEMU virtio_packed_should_notify)."""
        if mem is not self._mem:
            self._map(mem)
        mb()            # the used flags before the driver area is read
        if self.notify_on_empty and not self._is_avail(self._last_avail, self._avail_wrap):
            return True
        snap = self._drv32[0]
        flags = snap >> 16
        old, old_wrap = self.signalled_used
        valid = self.signalled_used_valid
        new = self._last_used
        self.signalled_used = (new, self._used_wrap)
        self.signalled_used_valid = True
        self._since_signal = 0
        if flags == VRING_PACKED_EVENT_FLAG_DISABLE:
            return False
        if flags != VRING_PACKED_EVENT_FLAG_DESC or not self._event_idx or not valid:
            return True            # ENABLE (or a value we do not know: interrupting is safe)
        if old_wrap != self._used_wrap:
            old -= self._num       # a position of the lap before
        return packed_need_event(snap & 0xFFFF, self._used_wrap, self._num, new, old)

    # --- kick suppression ---------------------------------------------------------------------
    def _write_notify(self, off: int, wrap: int) -> None:
        devw = self._devw
        if self.notify_disabled:
            devw[1] = VRING_PACKED_EVENT_FLAG_DISABLE
        elif self._event_idx:
            devw[0] = _enc(off, wrap)
            devw[1] = VRING_PACKED_EVENT_FLAG_DESC     # off_wrap first (smp_wmb), then flags
        else:
            devw[1] = VRING_PACKED_EVENT_FLAG_ENABLE

    def disable_notify(self, mem) -> None:
        if mem is not self._mem:
            self._map(mem)
        if self.notify_disabled:
            return
        self.notify_disabled = True
        self._devw[1] = VRING_PACKED_EVENT_FLAG_DISABLE

    def suppress_notify(self, mem) -> None:
        """Busy-poll window: DISABLE is explicit in a packed ring."""
        self.disable_notify(mem)

    def enable_notify(self, mem, seen: bool = False) -> bool:
        """Re-arm kicks; True when buffers raced in. seen=True (after discard_vq_desc): ask for a
        kick past the furthest chain popped, so the un-popped ones do not count as new."""
        if mem is not self._mem:
            self._map(mem)
        if not self.notify_disabled:
            return False
        self.notify_disabled = False
        off, wrap = self._seen if seen else (self._last_avail, self._avail_wrap)
        self._write_notify(off, wrap)
        mb()        # smp_mb: the device area before the ring is looked at again
        return self._is_avail(off, wrap)

    def enable_notify_after(self, mem, k: int) -> bool:
        """enable_notify asking for the kick only when about k more chains are available
        (EVENT_IDX; the event is a slot: k chains of the last chain's length ahead)."""
        if mem is not self._mem:
            self._map(mem)
        if k <= 1 or not self._event_idx:
            self.disable_notify(mem)
            return self.enable_notify(mem)
        self.notify_disabled = False
        # events count slots, not buffers: k chains ahead, if they are as long as the last one
        off = self._last_avail + min((k - 1) * self._chain_slots, self._num - 1)
        wrap = self._avail_wrap
        if off >= self._num:
            off -= self._num
            wrap ^= 1
        self._write_notify(off, wrap)
        mb()
        return self._is_avail(self._last_avail, self._avail_wrap)

    # --- introspection ------------------------------------------------------------------------
    def ring_flags(self) -> list[int]:
        dw = self._dw
        return [dw[8 * i + 7] for i in range(self._num)]

    def snapshot(self) -> dict:
        out = {"index": self.index, "name": self.name, "num": self._num, "packed": True,
               "desc": self._desc, "avail": self._avail, "used": self._used,
               "event_idx": self._event_idx, "enabled": self.enabled,
               "last_avail": self._last_avail, "avail_wrap": self._avail_wrap,
               "last_used": self._last_used, "used_wrap": self._used_wrap,
               "in_flight": len(self._inflight), "notify_disabled": self.notify_disabled,
               "signalled_used": self.signalled_used[0],
               "signalled_used_valid": self.signalled_used_valid, "mapped": self._mem is not None}
        if self._mem is not None:
            try:
                snap = self._drv32[0]
                out.update(driver_event=(snap & 0xFFFF, snap >> 16),
                           device_event=(self._devw[0], self._devw[1]))
            except (ValueError, IndexError):
                pass
        return out

    def used_log_ranges(self, first: int, count: int, base: int) -> list[tuple[int, int]]:
        """Guest ranges the last add_used(_n) wrote (dirty logging): each used descriptor's
        len/id/flags. `first`, `count` and `base` (the used ring's log address) are the split
        ring's terms; a packed ring writes its used descriptors into the descriptor ring."""
        return [(self._desc + (s << 4) + 8, 8) for s in self.last_used_slots]

    def notify_log_ranges(self, base: int) -> list[tuple[int, int]]:
        """What enable/disable_notify wrote: the device area."""
        return [(base, 4)]

    def ring_log_ranges(self, base: int) -> list[tuple[int, int]]:
        """All the device writes in the ring: used descriptors land in the descriptor ring, and
        the device area."""
        return [(self._desc, 16 * self._num), (base, 4)]

    def __repr__(self) -> str:
        return (f"VhostVirtqueuePacked({self.name} num={self._num} avail={self._last_avail}/"
                f"{self._avail_wrap} used={self._last_used}/{self._used_wrap})")
