"""Split virtqueue, driver side (the guest half of drivers/virtio/virtio_ring.c).

Theory of operation
-------------------
The driver owns three parts of guest RAM (virtio 1.x 2.7, linux/virtio_ring.h):

    desc table  16*N bytes, align 16   struct vring_desc {le64 addr; le32 len; le16 flags; le16 next}
    avail ring  6+2*N bytes, align 2   {flags, idx, ring[N], used_event}      driver writes
    used ring   6+8*N bytes, align 4   {flags, idx, ring[N]{id,len}, avail_event}  device writes

`add_sgs` takes descriptors off a free list (virtqueue_add_split), writes them, puts the head in
avail.ring[avail_idx_shadow % N] and only then publishes avail.idx with one aligned 16-bit store.
`kick_prepare` decides whether the device wants a notification (vring_need_event against
avail_event with EVENT_IDX, else !VRING_USED_F_NO_NOTIFY); the caller rings the doorbell.
`get_buf` consumes used.ring[last_used_idx % N] once used.idx moved, validates the id the device
wrote (BAD_RING: out of range or not in flight marks the queue broken) and returns the chain's
descriptors to the free list. `disable_cb`/`enable_cb`/`enable_cb_delayed` steer interrupts.

The free list is chained through a driver-private copy of desc.next (Linux's desc_extra[].next):
the device can scribble on the shared table, the driver never reads its own bookkeeping back from
it. Per-head state (desc_state) holds the token, the number of descriptors and the indirect table.

Everything is pure computation over a GuestMemory: no locks (the caller serialises, as the
kernel's vq users do), no doorbells. Hot-path accesses go through views cached at construction:
descriptors and used elements with precompiled struct.Struct, index/flags/event words through a
u16 view (each publish is a single aligned store).
"""
from __future__ import annotations


from shared.constants import (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                              VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY)
from shared.barrier import mb
from shared.memory import GuestMemory
from shared.ring_layout import (DESC, USED_ELEM, avail_size, check_num, desc_table_size, used_size,
                                vring_need_event)

_U16 = 0xFFFF


class DriverRing:
    """What the driver's split and packed virtqueues share (the guest's counterpart of the
    device's VringMapping): the ring's place and features, BAD_RING, allocating and freeing
    its parts in guest RAM, and dropping the cached views. A subclass gives `ring_parts(num)`
    ((size, align) of its three parts) and lists its views in `_views`."""

    kind = ""                             # "packed " for messages

    def _init_ring(self, mem: GuestMemory, index: int, num: int, desc: int, avail: int, used: int,
                   event_idx: bool, indirect: bool, alloc, name: str) -> None:
        self.mem = mem
        self.index = index
        self.name = name or f"vq{index}"
        self.num = num                    # queue size N
        self.desc = desc                  # gpa of the descriptor table (packed: ring)
        self.avail = avail                # gpa of the available ring (packed: driver area)
        self.used = used                  # gpa of the used ring (packed: device area)
        self.event_idx = event_idx        # VIRTIO_RING_F_EVENT_IDX negotiated
        self.indirect = indirect and alloc is not None   # VIRTIO_RING_F_INDIRECT_DESC usable
        self.alloc = alloc                # GuestAllocator for indirect tables
        self.broken = False               # set by BAD_RING; the queue then refuses work
        self.broken_reason = ""           # what the device did wrong

    def _bad_ring(self, why: str) -> None:
        # BAD_RING: the device wrote something impossible; stop using the queue.
        self.broken = True
        self.broken_reason = why

    @staticmethod
    def _alloc_mem(ram_or_alloc, mem):
        alloc = getattr(ram_or_alloc, "alloc", None)
        if alloc is not None and not callable(alloc):   # a GuestRAM: .alloc is the allocator
            return alloc, mem if mem is not None else ram_or_alloc.mem
        return ram_or_alloc, mem

    @classmethod
    def alloc_rings(cls, ram_or_alloc, num: int, mem: GuestMemory | None = None) -> tuple[int, int, int]:
        """Allocate and zero the three parts (vring_alloc_queue).

        Takes a GuestRAM, or a GuestAllocator plus the GuestMemory it carves. Raises MemoryError
        when guest RAM is exhausted (nothing stays allocated).
        """
        alloc, mem = cls._alloc_mem(ram_or_alloc, mem)
        if mem is None:
            raise ValueError("alloc_rings needs the GuestMemory to zero the rings")
        parts = cls.ring_parts(num)
        got: list[int] = []
        for size, align in parts:
            gpa = alloc.alloc(size, align)
            if gpa is None:
                for g in got:
                    alloc.free(g)
                raise MemoryError(f"no guest memory for a {num}-entry {cls.kind}virtqueue")
            got.append(gpa)
        for gpa, (size, _) in zip(got, parts):
            mem.write(gpa, bytes(size))
        return got[0], got[1], got[2]

    @classmethod
    def free_rings(cls, ram_or_alloc, desc: int, avail: int, used: int) -> None:
        alloc, _ = cls._alloc_mem(ram_or_alloc, None)
        for gpa in (desc, avail, used):
            alloc.free(gpa)

    def close(self) -> None:
        """Drop the cached views so the guest RAM can be unmapped."""
        for v in self._views():
            v.release()


class VirtQueue(DriverRing):
    """One split virtqueue as the driver sees it (struct vring_virtqueue, split half)."""

    packed = False

    def __init__(self, mem: GuestMemory, index: int, num: int, desc: int, avail: int, used: int,
                 *, event_idx: bool = False, indirect: bool = False, alloc=None, name: str = ""):
        check_num(num)
        if desc % 16 or avail % 2 or used % 4:
            raise ValueError(f"ring parts misaligned: desc {desc:#x} avail {avail:#x} used {used:#x}")
        self._init_ring(mem, index, num, desc, avail, used, event_idx, indirect, alloc, name)
        self.num_free = num               # descriptors on the free list
        self.free_head = 0                # first free descriptor
        self.num_added = 0                # buffers added since the last kick_prepare
        self.avail_idx_shadow = 0         # our copy of avail.idx (the device may not write it)
        self.avail_flags_shadow = 0       # our copy of avail.flags (NO_INTERRUPT intent)
        self.last_used_idx = 0            # next used.ring entry to consume
        self._mask = num - 1
        self._next = list(range(1, num)) + [0]     # desc_extra[].next: the free-list chain
        # desc_state[head] = (token, descriptors used, last descriptor, indirect table gpa or None)
        self._state: list[tuple | None] = [None] * num
        # Cached views (each part lies inside one region; GuestMemory.view raises otherwise).
        self._dv = mem.view(desc, desc_table_size(num))
        self._av = mem.u16_view(avail, avail_size(num) // 2)   # [flags, idx, ring[N], used_event]
        self._ub = mem.view(used, used_size(num))               # used elements via USED_ELEM
        self._uv = mem.u16_view(used, used_size(num) // 2)     # [flags, idx, ..., avail_event]
        self._used_event = 2 + num          # word index of used_event in _av
        self._avail_event = 2 + 4 * num     # word index of avail_event in _uv
        self._pack_desc = DESC.pack_into
        self._unpack_used = USED_ELEM.unpack_from
        # Initial state as vring_init/virtqueue_init leave it: free chain written through desc.next.
        for i in range(num):
            self._pack_desc(self._dv, 16 * i, 0, 0, 0, self._next[i])
        self._av[0] = 0
        self._av[1] = 0

    # --- layout helpers ----------------------------------------------------------------------
    @staticmethod
    def layout(num: int) -> tuple[int, int, int]:
        """(desc_size, avail_size, used_size) of a queue of size num, spec 2.7 table."""
        check_num(num)
        return desc_table_size(num), avail_size(num), used_size(num)

    @staticmethod
    def ring_parts(num: int) -> list[tuple[int, int]]:
        """(size, align) of desc/avail/used: alignments 16/2/4 (spec 2.7)."""
        return list(zip(VirtQueue.layout(num), (16, 2, 4)))

    # --- adding buffers ----------------------------------------------------------------------
    def add_sgs(self, out_sgs: list[tuple[int, int]], in_sgs: list[tuple[int, int]], token) -> bool:
        """virtqueue_add_sgs: expose out (device-readable) then in (device-writable) buffers.

        Returns False, with nothing changed, when there is no room (or the queue is broken).
        """
        if token is None:
            raise ValueError("token must not be None")
        total = len(out_sgs) + len(in_sgs)
        if total == 0:
            raise ValueError("a buffer needs at least one scatter-gather entry")
        if self.broken:
            return False
        table = None
        # virtqueue_add_split: an indirect table for multi-entry buffers while there is room.
        if self.indirect and total > 1 and self.num_free:
            table = self.alloc.alloc(16 * total, 16)
        used_descs = 1 if table is not None else total
        if self.num_free < used_descs:
            return False
        pack = self._pack_desc
        head = self.free_head
        if table is not None:
            tv = self.mem.view(table, 16 * total)
            k = 0
            for addr, ln in out_sgs:
                k += 1
                pack(tv, 16 * k - 16, addr, ln, VRING_DESC_F_NEXT if k < total else 0, k)
            for addr, ln in in_sgs:
                k += 1
                pack(tv, 16 * k - 16, addr, ln,
                     (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) if k < total else VRING_DESC_F_WRITE, k)
            # The head descriptor points at the table; the device ignores its WRITE bit.
            pack(self._dv, 16 * head, table, 16 * total, VRING_DESC_F_INDIRECT, 0)
            last = head
            self.free_head = self._next[head]
        else:
            dv = self._dv
            nxt = self._next
            i = head
            k = 0
            last = head
            for addr, ln in out_sgs:
                k += 1
                n = nxt[i]
                pack(dv, 16 * i, addr, ln, VRING_DESC_F_NEXT if k < total else 0, n)
                last = i
                i = n
            for addr, ln in in_sgs:
                k += 1
                n = nxt[i]
                pack(dv, 16 * i, addr, ln,
                     (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) if k < total else VRING_DESC_F_WRITE, n)
                last = i
                i = n
            self.free_head = i
        self.num_free -= used_descs
        self._state[head] = (token, used_descs, last, table)
        # Put the head in the avail ring, then publish avail.idx: the descriptors and the ring
        # entry must be visible before the index that hands them over (virtio_wmb in Linux).
        shadow = self.avail_idx_shadow
        av = self._av
        av[2 + (shadow & self._mask)] = head
        shadow = (shadow + 1) & _U16
        self.avail_idx_shadow = shadow
        av[1] = shadow
        self.num_added += 1
        return True

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare_split: True when the device asked to be notified."""
        # virtio_mb: the avail.idx store (add_sgs) must be visible before we read the device's
        # avail_event / used.flags, or the device may sleep on a ring it saw empty.
        mb()
        new = self.avail_idx_shadow
        old = (new - self.num_added) & _U16
        self.num_added = 0
        if self.event_idx:
            return vring_need_event(self._uv[self._avail_event], new, old)
        return not (self._uv[0] & VRING_USED_F_NO_NOTIFY)

    # --- used buffers ------------------------------------------------------------------------
    def used_idx(self) -> int:
        """used.idx as the device last published it (one aligned load)."""
        return self._uv[1]

    def more_used(self) -> bool:
        """more_used_split: has the device published used entries we have not consumed? Never
        on a broken queue (virtqueue_poll): nothing more will be taken from it."""
        return not self.broken and self.last_used_idx != self._uv[1]

    def device_pending(self) -> bool:
        """Has the device not yet used everything the driver made available? (avail.idx !=
        used.idx: autocork's "in flight")"""
        return self.avail_idx_shadow != self._uv[1]

    def resume_base(self) -> int:
        """Where a new device resumes after a reconnect without inflight tracking: used.idx."""
        return self._uv[1]

    def _detach_buf(self, head: int):
        """detach_buf_split: give the chain's descriptors back to the free list."""
        token, count, last, table = self._state[head]
        self._state[head] = None
        self._next[last] = self.free_head
        self.free_head = head
        self.num_free += count
        if table is not None:
            self.alloc.free(table)
        return token

    def get_buf(self):
        """virtqueue_get_buf: (token, len) of the next used buffer, or None."""
        if self.broken:
            return None
        last = self.last_used_idx
        if last == self._uv[1]:
            return None
        # used.idx was read first: the element it covers is complete (virtio_rmb).
        i, ln = self._unpack_used(self._ub, 4 + 8 * (last & self._mask))
        if i >= self.num:
            self._bad_ring(f"id {i} out of range")
            return None
        if self._state[i] is None:
            self._bad_ring(f"id {i} is not a head")
            return None
        token = self._detach_buf(i)
        last = (last + 1) & _U16
        self.last_used_idx = last
        # Callbacks enabled with EVENT_IDX: ask for an interrupt at the next entry.
        if self.event_idx and not (self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT):
            self._av[self._used_event] = last
        return token, ln

    def detach_unused_buf(self):
        """virtqueue_detach_unused_buf_split: reclaim a buffer the device never used (after reset)."""
        for head in range(self.num):
            if self._state[head] is not None:
                token = self._detach_buf(head)
                # Linux rewinds avail.idx here: the device is reset, nobody consumes it.
                self.avail_idx_shadow = (self.avail_idx_shadow - 1) & _U16
                self._av[1] = self.avail_idx_shadow
                return token
        return None

    # --- interrupt suppression ---------------------------------------------------------------
    @property
    def cb_enabled(self) -> bool:
        """Does the driver want interrupts for this queue now (not disabled by disable_cb)?"""
        return not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT

    def disable_cb(self) -> None:
        """virtqueue_disable_cb_split: ask the device not to interrupt.

        Without EVENT_IDX this sets VRING_AVAIL_F_NO_INTERRUPT; with it the driver keeps
        avail.flags = 0 (spec 2.7.10) and simply stops moving used_event forward.
        """
        if not (self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT):
            self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._av[0] = self.avail_flags_shadow

    def suppress_cb(self) -> None:
        """Stop interrupts for a busy-poll window (NAPI polling): disable_cb, and with EVENT_IDX
        also move used_event behind last_used_idx, so the device's vring_need_event stays false
        until enable_cb publishes a new one (Linux's disable_cb writes a stale value likewise)."""
        self.disable_cb()
        if self.event_idx:
            self._av[self._used_event] = (self.last_used_idx - 1) & _U16

    def _enable_cb_prepare(self) -> None:
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._av[0] = self.avail_flags_shadow

    def enable_cb(self) -> bool:
        """virtqueue_enable_cb: re-arm interrupts; False when buffers raced in (poll again).
        True on a broken queue (virtqueue_poll is false there): no loop spins on it."""
        if self.broken:
            return True
        self._enable_cb_prepare()
        last = self.last_used_idx
        if self.event_idx:
            self._av[self._used_event] = last     # interrupt me at the very next used entry
        mb()                                       # virtio_mb: publish before re-reading used.idx
        return last == self._uv[1]

    def enable_cb_after(self, k: int) -> bool:
        """enable_cb, asking for the interrupt only once k more buffers are used (EVENT_IDX's
        used_event k-1 ahead; interrupt moderation for a reader expecting a burst). Without
        EVENT_IDX it is enable_cb. False when buffers raced in."""
        if k <= 1 or not self.event_idx or self.broken:
            return self.enable_cb()
        self._enable_cb_prepare()
        last = self.last_used_idx
        self._av[self._used_event] = (last + k - 1) & _U16
        mb()                                       # virtio_mb: publish before re-reading used.idx
        return last == self._uv[1]

    def enable_cb_delayed(self) -> bool:
        """virtqueue_enable_cb_delayed: interrupt after ~3/4 of the outstanding buffers are used."""
        if self.broken:
            return True
        self._enable_cb_prepare()
        last = self.last_used_idx
        bufs = ((self.avail_idx_shadow - last) & _U16) * 3 // 4
        if self.event_idx:
            self._av[self._used_event] = (last + bufs) & _U16
        mb()                                       # virtio_mb: publish before re-reading used.idx
        return not (((self._uv[1] - last) & _U16) > bufs)

    # --- introspection -----------------------------------------------------------------------
    def in_flight(self) -> int:
        """Buffers handed to the device and not yet returned by get_buf/detach."""
        return sum(1 for s in self._state if s is not None)

    def snapshot(self) -> dict:
        """A read-only picture of the driver's side of the queue, for monitors (shared.stats).

        Reads the shadows and the ring words as they are now; writes nothing. Keys: see
        docs/monitor.md ("queue snapshot"). Returns {} once close() dropped the views.
        """
        try:
            av, uv = self._av, self._uv
            out = {"index": self.index, "name": self.name, "num": self.num,
                   "desc": self.desc, "avail": self.avail, "used": self.used,
                   "event_idx": self.event_idx, "indirect": self.indirect,
                   "avail_idx": self.avail_idx_shadow, "last_used": self.last_used_idx,
                   "used_idx": uv[1], "avail_flags": av[0], "used_flags": uv[0],
                   "num_free": self.num_free, "in_flight": self.in_flight(),
                   "cb_disabled": bool(self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT),
                   "broken": self.broken, "broken_reason": self.broken_reason}
            if self.event_idx:
                out["used_event"] = av[self._used_event]
                out["avail_event"] = uv[self._avail_event]
            return out
        except ValueError:          # views released
            return {}

    def _views(self) -> tuple:
        return self._dv, self._av, self._ub, self._uv

    def __repr__(self) -> str:
        return (f"VirtQueue({self.name} num={self.num} free={self.num_free} "
                f"avail={self.avail_idx_shadow} last_used={self.last_used_idx}"
                f"{' BROKEN' if self.broken else ''})")
