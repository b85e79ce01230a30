"""Split virtqueue, device side (the ring half of drivers/vhost/vhost.c).

Theory of operation
-------------------
The control plane writes the ring configuration (num, desc/avail/used guest-physical addresses,
last_avail_idx / last_used_idx from SET_VRING_BASE, features). Every call that touches the ring is
handed the GuestMemory it works on (the rust-vmm shape); the first call with a new memory table,
or after the configuration changed, maps the three parts: `access_ok` (vhost_vq_access_ok,
ring rule 13) checks N and the alignments and that each part lies inside one region, then views
over them are cached so the hot path is plain struct/u16 accesses.

    get_vq_desc   vhost_get_vq_desc: read avail.idx (one aligned load, only when the cached copy
                  is used up), take the head at avail.ring[last_avail_idx % N], walk the chain
                  (direct or through one indirect table), validate every descriptor after copying
                  it out once, then translate the buffers into memoryviews of guest memory.
    add_used(_n)  vhost_add_used(_n): write used elements, then publish used.idx with one store.
    signal        vhost_notify: does the driver want an interrupt for what was just used?
    enable_notify / disable_notify: vhost's kick suppression (VRING_USED_F_NO_NOTIFY, or the
                  avail_event word with EVENT_IDX); enable returns True when buffers raced in.

Everything the guest wrote is hostile: descriptor contents, avail entries and indices are read
once, checked against the ring rules (docs/ring-rules.md), and chain walks are bounded by N (direct) and
the table length (indirect). A violation raises VringError(rule, message-quoting-Linux); the
device wrapper turns it into NEEDS_RESET (vq_err). The ring is pure code: no locks, no doorbells.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.constants import (INDIRECT_MAX_DESC, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
                              VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                              VIRTQUEUE_MAX_SIZE)
from shared.barrier import mb
from shared.errors import GuestMemoryError, VringError
from shared.ring_layout import DESC, USED_ELEM, split_parts, vring_need_event

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_unpack_desc = DESC.unpack_from
_pack_used = USED_ELEM.pack_into


@dataclass(slots=True)
class DescChain:
    head: int
    out: list[memoryview]   # device-readable buffers, in order (guest memory views)
    in_: list[memoryview]   # device-writable buffers, in order
    out_len: int
    in_len: int
    in_addrs: list | None = None   # (gpa, len) of each device-writable buffer (dirty logging)


class VringMapping:
    """What both ring layouts share (this one and host/vhost_vq_packed.py): the parameters the
    control plane writes, each change of which drops the cached views of guest memory, and the
    life of those views. A layout sets _VIEWS (its view attributes, each released before the
    view it was cast from) and _map(mem)."""

    _VIEWS: tuple = ()

    def _cfg(name):  # noqa: N805 - property factory: changing a ring parameter drops the mapping
        attr = "_" + name

        def get(self):
            return getattr(self, attr)

        def set_(self, v):
            setattr(self, attr, v)
            self.unmap()
        return property(get, set_)

    num = _cfg("num")
    desc = _cfg("desc")
    avail = _cfg("avail")
    used = _cfg("used")
    event_idx = _cfg("event_idx")
    del _cfg

    def unmap(self) -> None:
        """Drop the cached views (memory table replaced, ring reconfigured, device stopped)."""
        if getattr(self, "_mem", None) is not None:
            for name in self._VIEWS:
                getattr(self, name).release()
        self._mem = None

    def access_ok(self, mem) -> bool:
        """vhost_vq_access_ok: ring rule 13 (valid N, aligned parts, all inside the memory table)."""
        try:
            self._map(mem)
            return True
        except VringError:
            return False


class VhostVirtqueue(VringMapping):
    """struct vhost_virtqueue: one ring as the backend sees it."""

    packed = False
    _VIEWS = ("_dv", "_av", "_ub", "_uv")

    def __init__(self, index: int, name: str = ""):
        self.index = index
        self.name = name or f"vq{index}"
        self._num = 0                   # queue size N (SET_VRING_NUM)
        self._desc = 0                  # gpa of the descriptor table (SET_VRING_ADDR)
        self._avail = 0                 # gpa of the available ring
        self._used = 0                  # gpa of the used ring
        self._event_idx = False         # VIRTIO_RING_F_EVENT_IDX acked
        self.indirect = False           # VIRTIO_RING_F_INDIRECT_DESC acked
        self.notify_on_empty = False    # VIRTIO_F_NOTIFY_ON_EMPTY acked
        self.enabled = False            # SET_VRING_ENABLE
        self._last_avail = 0            # next avail.ring entry to consume
        self._avail_idx = 0             # last avail.idx read from the guest (cache)
        self._last_used = 0             # next used.ring slot; used.idx as we published it
        self.used_flags = 0             # our copy of used.flags (NO_NOTIFY intent)
        self.signalled_used = 0         # used index at the last interrupt decision
        self.signalled_used_valid = False
        self._mem = None                # the GuestMemory the cached views belong to
        self._mask = 0

    @staticmethod
    def parts(num: int):
        """((size, align) of the descriptor table, avail ring, used ring) for SET_VRING_ADDR."""
        return split_parts(num)

    def vring_base(self) -> int:
        """GET_VRING_BASE's value: last_avail_idx."""
        return self._last_avail

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, v: int) -> None:
        # SET_VRING_BASE: the cached avail.idx restarts from the base too.
        self._last_avail = self._avail_idx = v & _U16

    @property
    def last_used_idx(self) -> int:
        return self._last_used

    @last_used_idx.setter
    def last_used_idx(self, v: int) -> None:
        self._last_used = v & _U16
        self.signalled_used_valid = False   # vhost_vq_init_access

    # --- mapping: ring rule 13 ----------------------------------------------------------------
    def _map(self, mem) -> None:
        """vhost_vq_access_ok + map the rings; raises VringError(13) when they are not usable."""
        self.unmap()
        num = self._num
        if not isinstance(num, int) or num < 1 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise VringError(13, f"queue size {num!r} is not a power of 2 in 1..{VIRTQUEUE_MAX_SIZE}")
        # vring_desc/avail/used alignment (VRING_*_ALIGN_SIZE 16/2/4)
        if self._desc % 16 or self._avail % 2 or self._used % 4:
            raise VringError(13, f"ring addresses misaligned: desc {self._desc:#x} avail "
                                 f"{self._avail:#x} used {self._used:#x}")
        e = 2 if self._event_idx else 0     # used_event / avail_event exist only with EVENT_IDX
        try:
            # Like QEMU's region caches, each part must be one contiguous mapping.
            dv = mem.view(self._desc, 16 * num)
            av = mem.u16_view(self._avail, (4 + 2 * num + e) // 2)
            ub = mem.view(self._used, 4 + 8 * num + e)
            uv = mem.u16_view(self._used, (4 + 8 * num + e) // 2)
        except GuestMemoryError as exc:
            raise VringError(13, f"vq_access_ok failed: {exc}") from None
        self._dv, self._av, self._ub, self._uv = dv, av, ub, uv
        self._used_event = 2 + num          # avail->ring[num]
        self._avail_event = 2 + 4 * num     # *(u16 *)&used->ring[num]
        self._mask = num - 1
        self._mem = mem

    def init_access(self, mem) -> None:
        """vhost_vq_init_access: map the ring and publish our notification intent.

        A backend killed mid-batch leaves VRING_USED_F_NO_NOTIFY set (or avail_event behind) in
        guest memory; the driver would then never kick this new backend (vhost_update_used_flags).
        """
        if mem is not self._mem:
            self._map(mem)
        if self._event_idx:
            self._uv[self._avail_event] = self._last_avail
        else:
            self._uv[0] = self.used_flags

    # --- avail side --------------------------------------------------------------------------
    def _read_avail_idx(self) -> int:
        """One aligned load of avail.idx, checked against rule 1, cached in _avail_idx."""
        idx = self._av[1]
        last = self._last_avail
        if ((idx - last) & _U16) > self._num:
            # ring rule 1 (vhost_get_vq_desc)
            raise VringError(1, f"Guest moved used index from {last} to {idx}")
        self._avail_idx = idx
        return idx

    def get_vq_desc(self, mem) -> DescChain | None:
        """vhost_get_vq_desc: the next available chain, or None when the ring is empty."""
        if mem is not self._mem:
            self._map(mem)
        last = self._last_avail
        if self._avail_idx == last:
            # ring rule 2: avail.idx == last_avail_idx means empty
            if self._read_avail_idx() == last:
                return None
        num = self._num
        head = self._av[2 + (last & self._mask)]       # read once
        if head >= num:
            # ring rule 3
            raise VringError(3, f"Guest says index {head} > {num} is available")

        # The common chain (direct descriptors only) in one pass: each descriptor copied out
        # once and checked by the same rules as _walk, in the same order; an INDIRECT one or a
        # translation failure sends us to the general two-pass walk below, from the head again
        # (nothing was consumed yet), which reports exactly what it always did.
        out: list[memoryview] = []
        in_: list[memoryview] = []
        in_addrs: list[tuple[int, int]] = []
        out_len = in_len = 0
        dv = self._dv
        translate = mem.translate
        i = head
        found = 0
        seen_write = False
        while True:
            if i >= num:
                raise VringError(4, f"Desc index is {i} > {num}, head = {head}")   # ring rule 4
            found += 1
            if found > num:
                raise VringError(5, f"Loop detected: last one at {i} vq size {num} head {head}")
            addr, ln, flags, nxt = _unpack_desc(dv, i << 4)
            if flags & VRING_DESC_F_INDIRECT:
                break
            if out_len + in_len + ln > _U32:
                raise VringError(12, f"chain length {out_len + in_len + ln} exceeds 2^32 - 1 "
                                     f"bytes, head {head}")                         # ring rule 12
            try:
                iov = translate(addr, ln)
            except GuestMemoryError:
                break       # the general walk reports the chain's first error, structure first
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
                in_ += iov
                in_len += ln
                in_addrs.append((addr, ln))
            elif seen_write:
                raise VringError(10, f"Descriptor has out after in: idx {i}")       # ring rule 10
            else:
                out += iov
                out_len += ln
            if not flags & VRING_DESC_F_NEXT:
                self._last_avail = (last + 1) & _U16
                return DescChain(head, out, in_, out_len, in_len, in_addrs)
            i = nxt

        # Pass 1: structure. Each descriptor is copied out once (one unpack) and validated.
        segs: list[tuple[int, int, bool, int]] = []     # (addr, len, writable, where)
        self._walk(mem, self._dv, head, num, segs, 0, False, None)

        # Pass 2: memory. Translate every buffer into guest-memory views (ring rule 11).
        out: list[memoryview] = []
        in_: list[memoryview] = []
        out_len = in_len = 0
        in_addrs: list[tuple[int, int]] = []
        translate = mem.translate
        for addr, ln, w, where in segs:
            try:
                iov = translate(addr, ln)
            except GuestMemoryError as exc:
                raise VringError(11, f"Translation failure -EFAULT descriptor idx {where}: {exc}") from None
            if w:
                in_ += iov
                in_len += ln
                in_addrs.append((addr, ln))
            else:
                out += iov
                out_len += ln
        self._last_avail = (last + 1) & _U16
        return DescChain(head, out, in_, out_len, in_len, in_addrs)

    def _walk(self, mem, table, i: int, bound: int, segs: list, total: int, seen_write: bool,
              indirect_at: int | None) -> tuple[int, bool]:
        """Walk one chain through `table` (the ring's descriptor table, or a copied-out indirect
        table when indirect_at is the index of the descriptor that points to it), appending
        (addr, len, writable, where) to segs. Returns (total bytes, seen a writable buffer)."""
        head = i
        found = 0
        while True:
            if i >= bound:
                # ring rule 4 (an indirect table is bounded by its own length)
                raise VringError(4, f"Desc index is {i} > {bound}, head = {head}" if indirect_at is None
                                 else f"Desc index is {i} > {bound} in indirect table, desc {indirect_at}")
            found += 1
            if found > bound:
                # ring rule 5 (ring) / rule 9 (inside an indirect table)
                if indirect_at is None:
                    raise VringError(5, f"Loop detected: last one at {i} vq size {bound} head {head}")
                raise VringError(9, f"Loop detected: last one at {i} indirect size {bound}")
            addr, ln, flags, nxt = _unpack_desc(table, i << 4)
            if flags & VRING_DESC_F_INDIRECT:
                if indirect_at is not None:
                    # ring rule 8
                    raise VringError(8, f"Nested indirect descriptor: idx {i}, in table of desc {indirect_at}")
                total, seen_write = self._get_indirect(mem, i, addr, ln, flags, segs, total, seen_write)
            else:
                if flags & VRING_DESC_F_WRITE:
                    seen_write = True
                elif seen_write:
                    # ring rule 10 (spec 2.7.4.2: readable descriptors come first)
                    raise VringError(10, f"Descriptor has out after in: idx {i}")
                segs.append((addr, ln, bool(flags & VRING_DESC_F_WRITE), i))
                total += ln
                if total > _U32:
                    # ring rule 12
                    raise VringError(12, f"chain length {total} exceeds 2^32 - 1 bytes, head {head}")
            if not flags & VRING_DESC_F_NEXT:
                return total, seen_write
            i = nxt

    def _get_indirect(self, mem, i, addr, ln, flags, segs, total, seen_write):
        """get_indirect: walk one indirect table; its own WRITE bit is ignored (spec 2.7.5.3.2)."""
        if not self.indirect:
            # ring rule 8 family: INDIRECT only if negotiated (spec 2.7.5.3.1)
            raise VringError(8, f"Indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC: idx {i}")
        if flags & VRING_DESC_F_NEXT:
            # spec 2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT
            raise VringError(8, f"Indirect descriptor with NEXT set: idx {i}")
        if ln % 16 or ln == 0:
            # ring rule 6
            raise VringError(6, f"Invalid length in indirect descriptor: len {ln:#x} not multiple of 0x10")
        count = ln // 16
        if count > INDIRECT_MAX_DESC:
            # ring rule 7
            raise VringError(7, f"Indirect buffer length too big: {ln}")
        try:
            # Copy the table out once: the guest cannot change it under the walk.
            parts = mem.translate(addr, ln)
        except GuestMemoryError as exc:
            raise VringError(11, f"Translation failure -EFAULT in indirect: {exc}") from None
        table = b"".join(parts) if len(parts) > 1 else bytes(parts[0])
        return self._walk(mem, table, 0, count, segs, total, seen_write, i)

    def discard_vq_desc(self, n: int) -> None:
        """vhost_discard_vq_desc: un-pop the last n chains (they will be returned again)."""
        self._last_avail = (self._last_avail - n) & _U16

    def avail_empty(self, mem) -> bool:
        """vhost_vq_avail_empty: nothing left to pop (re-reads avail.idx only when needed)."""
        if mem is not self._mem:
            self._map(mem)
        if self._avail_idx != self._last_avail:
            return False
        return self._read_avail_idx() == self._last_avail

    # --- used side ---------------------------------------------------------------------------
    def add_used(self, mem, head: int, length: int) -> None:
        """vhost_add_used: one used element, then publish used.idx."""
        if mem is not self._mem:
            self._map(mem)
        last = self._last_used
        _pack_used(self._ub, 4 + ((last & self._mask) << 3), head, length)
        last = (last + 1) & _U16
        # The element is written; now hand it over with one aligned store of used.idx.
        self._uv[1] = last
        self._last_used = last
        if last == self.signalled_used:     # wrapped all the way round since the last signal
            self.signalled_used_valid = False

    def add_used_n(self, mem, used: list[tuple[int, int]]) -> None:
        """vhost_add_used_n: write all elements, then one used.idx store."""
        if not used:
            return
        if mem is not self._mem:
            self._map(mem)
        ub = self._ub
        mask = self._mask
        old = last = self._last_used
        for head, length in used:
            _pack_used(ub, 4 + ((last & mask) << 3), head, length)
            last = (last + 1) & _U16
        self._uv[1] = last
        self._last_used = last
        # __vhost_add_used_n: signalled_used went stale if we lapped it
        if ((last - self.signalled_used) & _U16) < ((last - old) & _U16):
            self.signalled_used_valid = False

    def used_idx(self, mem) -> int:
        """used.idx as it is in guest memory (GET_VRING_BASE / reconnect)."""
        if mem is not self._mem:
            self._map(mem)
        return self._uv[1]

    def signal(self, mem) -> bool:
        """vhost_notify: True when the driver must be interrupted for the buffers used so far."""
        if mem is not self._mem:
            self._map(mem)
        # VIRTIO_F_NOTIFY_ON_EMPTY: interrupt when we ran out of buffers, whatever the flags say.
        # smp_mb (vhost_notify): the used.idx store must be visible before used_event or
        # avail.flags is read, or the driver may re-arm after our read and never be woken.
        mb()
        if self.notify_on_empty and self._avail_idx == self._last_avail:
            return True
        if not self._event_idx:
            return not (self._av[0] & VRING_AVAIL_F_NO_INTERRUPT)
        old = self.signalled_used
        valid = self.signalled_used_valid
        new = self.signalled_used = self._last_used
        self.signalled_used_valid = True
        if not valid:
            return True
        # spec 2.7.10: interrupt when used.idx passes used_event
        return vring_need_event(self._av[self._used_event], new, old)

    # --- kick suppression --------------------------------------------------------------------
    def disable_notify(self, mem) -> None:
        """vhost_disable_notify: ask the driver not to kick (EVENT_IDX: just stop moving avail_event)."""
        if mem is not self._mem:
            self._map(mem)
        if self.used_flags & VRING_USED_F_NO_NOTIFY:
            return
        self.used_flags |= VRING_USED_F_NO_NOTIFY
        if not self._event_idx:
            self._uv[0] = self.used_flags

    def suppress_notify(self, mem) -> None:
        """Stop kicks for a busy-poll window (vhost_net_busy_poll): disable_notify, and with
        EVENT_IDX also move avail_event behind last_avail_idx, so the driver's
        vring_need_event stays false until enable_notify publishes a new one."""
        self.disable_notify(mem)
        if self._event_idx:
            self._uv[self._avail_event] = (self._last_avail - 1) & _U16

    def enable_notify(self, mem, seen: bool = False) -> bool:
        """vhost_enable_notify: re-arm kicks; True when buffers raced in (disable and poll again).

        seen=True (after discard_vq_desc): as vhost does, compare with the avail.idx last read and
        ask for a kick past it, so chains un-popped by the discard are not "new" (a mergeable rx
        frame waiting for more buffers would loop here forever) and the next one does kick."""
        if mem is not self._mem:
            self._map(mem)
        if not (self.used_flags & VRING_USED_F_NO_NOTIFY):
            return False
        self.used_flags &= ~VRING_USED_F_NO_NOTIFY
        seen = self._avail_idx if seen else self._last_avail
        if not self._event_idx:
            self._uv[0] = self.used_flags
        else:
            self._uv[self._avail_event] = seen   # kick me at the next new entry
        # smp_mb: the store above must be visible before avail.idx is re-read, or a driver that
        # read the old value and we, reading its old avail.idx, would both wait (lost kick).
        mb()
        return self._read_avail_idx() != seen

    def enable_notify_after(self, mem, k: int) -> bool:
        """enable_notify asking for the kick only once k more buffers are made available
        (EVENT_IDX's avail_event k-1 ahead: notification moderation for a reader expecting a
        burst); True when buffers raced in. Without EVENT_IDX it re-arms as enable_notify."""
        if mem is not self._mem:
            self._map(mem)
        if k <= 1 or not self._event_idx:
            self.disable_notify(mem)
            return self.enable_notify(mem)
        self.used_flags &= ~VRING_USED_F_NO_NOTIFY
        self._uv[self._avail_event] = (self._last_avail + k - 1) & _U16
        mb()                                     # smp_mb, as in enable_notify
        return self._read_avail_idx() != self._last_avail

    def used_log_ranges(self, first: int, count: int, base: int) -> list[tuple[int, int]]:
        """Guest ranges add_used_n wrote for `count` elements from used index `first`, the used
        ring being logged at `base` (dirty logging): the elements, then used.idx."""
        num = self._num
        return [(base + 4 + 8 * ((first + k) % num), 8) for k in range(count)] + [(base + 2, 2)]

    def notify_log_ranges(self, base: int) -> list[tuple[int, int]]:
        """What enable/disable_notify wrote: used.flags and avail_event."""
        return [(base, 2), (base + 4 + 8 * self._num, 2)]

    def ring_log_ranges(self, base: int) -> list[tuple[int, int]]:
        """All the device writes in the ring: the used ring (flags, idx, elements, avail_event)."""
        return [(base, 6 + 8 * self._num)]

    def snapshot(self) -> dict:
        """A read-only picture of the device's side of the queue, for monitors (GET_STATS).

        The indices we keep plus, when the ring is mapped, the guest's words as they are now
        (avail.idx, avail.flags, used_event, avail_event). Writes nothing, maps nothing.
        """
        out = {"index": self.index, "name": self.name, "num": self._num, "desc": self._desc,
               "avail": self._avail, "used": self._used, "event_idx": self._event_idx,
               "enabled": self.enabled, "last_avail": self._last_avail,
               "avail_idx_seen": self._avail_idx, "last_used": self._last_used,
               "used_flags": self.used_flags, "signalled_used": self.signalled_used,
               "signalled_used_valid": self.signalled_used_valid, "mapped": self._mem is not None}
        if self._mem is not None:
            try:
                av, uv = self._av, self._uv
                out.update(avail_idx=av[1], avail_flags=av[0], used_idx=uv[1])
                if self._event_idx:
                    out.update(used_event=av[self._used_event], avail_event=uv[self._avail_event])
            except (ValueError, IndexError):   # views released under us
                pass
        return out

    def __repr__(self) -> str:
        return (f"VhostVirtqueue({self.name} num={self._num} last_avail={self._last_avail} "
                f"avail_idx={self._avail_idx} last_used={self._last_used})")
