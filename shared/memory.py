"""Guest memory: guest-physical addresses mapped onto buffers through a memory table.

Layout of one region (the vhost_memory_region / VhostUserMemoryRegion analogue):

    guest_phys_addr  first guest-physical address of the region (never 0 here: an offset
                     cannot pass for an address)
    memory_size      bytes in the region
    userspace_addr   the address the *frontend* uses for the region (vhost-user's QEMU virtual
                     address); ring addresses in SET_VRING_ADDR are given in this space
    buf              a writable memoryview of exactly memory_size bytes (shared memory, or a
                     bytearray in single-process tests)

Every access is bounds-checked (ring rule 11); a range that leaves every region
raises GuestMemoryError. `load16`/`store16` are single aligned 16-bit machine accesses, the
only way ring indices may be read or published across processes (struct.pack_into tears).

Dirty tracking (live migration; the role KVM's dirty log plays for a vCPU's writes): between
`start_dirty_log()` and `stop_dirty_log()` every write this object makes or lends marks its
4 KiB pages (gpa >> 12, the vhost log's numbering), and `sync_dirty_log()` hands the marked set
over and starts a new one (KVM_GET_DIRTY_LOG). A Python memoryview cannot trap its writes, so a
memory object with `track_views` set (the guest's: guest/ram.py) remembers each *writable* view
it lends (`view`, `u16_view`, or `map()` for views made untracked) as a mapping, keyed by its
gpa, and reports every page of every live mapping dirty at every sync (a page KVM cannot
write-protect); `unmap(gpa)` (the allocator's free calls it) drops the mapping and marks its pages
a last time. A read-only view (`view(..., writable=False)`) is not a mapping: a write through it
raises TypeError, so a driver cannot write guest RAM without the log knowing.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import GuestMemoryError


@dataclass(eq=False)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    buf: memoryview
    userspace_addr: int = 0
    _u16: memoryview | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.buf, memoryview):
            self.buf = memoryview(self.buf)
        if self.buf.readonly:
            raise ValueError("guest memory must be writable")
        if self.buf.nbytes != self.memory_size:
            raise ValueError(f"region buffer holds {self.buf.nbytes} bytes, table says {self.memory_size}")
        if self.memory_size <= 0 or self.guest_phys_addr < 0:
            raise ValueError("region must have a positive size and a non-negative base")
        if self.guest_phys_addr % 2 == 0 and self.memory_size % 2 == 0:
            self._u16 = self.buf.cast("B").cast("H")

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    def contains(self, gpa: int, length: int) -> bool:
        return self.guest_phys_addr <= gpa and gpa + length <= self.end

    def release(self) -> None:
        """Drop this region's views so the backing shared memory can be closed."""
        if self._u16 is not None:
            self._u16.release()
            self._u16 = None
        self.buf.release()


class GuestMemory:
    """A memory table: an ordered, non-overlapping list of regions."""

    def __init__(self, regions: list[MemoryRegion]):
        regions = sorted(regions, key=lambda r: r.guest_phys_addr)
        for a, b in zip(regions, regions[1:]):
            if a.end > b.guest_phys_addr:
                raise ValueError(f"regions overlap at {b.guest_phys_addr:#x}")
        self.regions = regions
        self._last = regions[0] if regions else None
        self.track_views = False                  # remember writable views as mappings (guest side)
        self.mapped: dict[int, int] = {}          # gpa -> bytes of a live writable mapping
        self._dirty: set[int] | None = None       # pages marked since the last sync (None: log off)
        self._dlock = threading.Lock()

    @classmethod
    def from_buffer(cls, buf, guest_phys_addr: int, userspace_addr: int | None = None) -> "GuestMemory":
        mv = memoryview(buf).cast("B")
        return cls([MemoryRegion(guest_phys_addr, mv.nbytes, mv,
                                 guest_phys_addr if userspace_addr is None else userspace_addr)])

    # --- lookup -------------------------------------------------------------------------------
    def _region(self, gpa: int, length: int) -> MemoryRegion:
        r = self._last
        if r is not None and r.contains(gpa, length):
            return r
        for r in self.regions:
            if r.contains(gpa, length):
                self._last = r
                return r
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is not in the memory table")

    def check_range(self, gpa: int, length: int) -> bool:
        """True when [gpa, gpa+length) is backed by memory (possibly across adjacent regions)."""
        try:
            self.translate(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def translate(self, gpa: int, length: int) -> list[memoryview]:
        """The iovec for a guest range, split at region boundaries (vhost translate_desc)."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range [{gpa:#x}, +{length:#x})")
        if self._dirty is not None:              # the caller may write the iovec: mark it
            self.mark_dirty(gpa, length)
        r = self._last
        if r is not None and length:            # the common case: inside the last region used
            off = gpa - r.guest_phys_addr
            if off >= 0 and off + length <= r.memory_size:
                return [r.buf[off:off + length]]
        out: list[memoryview] = []
        while length > 0:
            for r in self.regions:
                if r.guest_phys_addr <= gpa < r.end:
                    self._last = r
                    n = min(length, r.end - gpa)
                    off = gpa - r.guest_phys_addr
                    out.append(r.buf[off:off + n])
                    gpa += n
                    length -= n
                    break
            else:
                raise GuestMemoryError(f"guest address {gpa:#x} is not in the memory table")
        return out

    def view(self, gpa: int, length: int, *, writable: bool = True, mapped: bool = True) -> memoryview:
        """A single contiguous view; the range must lie inside one region. writable=False: a
        read-only view; mapped=False: a writable view the caller maps itself (`map`/`unmap`)."""
        r = self._region(gpa, length)
        off = gpa - r.guest_phys_addr
        v = r.buf[off:off + length]
        if not writable:
            return v.toreadonly()
        if mapped:
            self._lend(gpa, length)
        return v

    def read(self, gpa: int, length: int) -> bytes:
        r = self._region(gpa, length)
        off = gpa - r.guest_phys_addr
        return bytes(r.buf[off:off + length])

    def write(self, gpa: int, data) -> None:
        n = len(data)
        r = self._region(gpa, n)
        off = gpa - r.guest_phys_addr
        r.buf[off:off + n] = data
        if self._dirty is not None:
            self.mark_dirty(gpa, n)

    # --- dirty tracking (live migration) ---------------------------------------------------------
    def _lend(self, gpa: int, length: int) -> None:
        if self.track_views:
            self.map(gpa, length)
        if self._dirty is not None:
            self.mark_dirty(gpa, length)

    def map(self, gpa: int, length: int) -> None:
        """Remember [gpa, +length) as lent writable until unmap(gpa): dirty at every sync."""
        if self.track_views and length > 0:
            if self.mapped.get(gpa, 0) < length:
                self.mapped[gpa] = length

    def unmap(self, gpa: int) -> None:
        """The mapping at gpa is given back (its memory freed): its pages dirty one last time."""
        n = self.mapped.pop(gpa, 0)
        if n and self._dirty is not None:
            self.mark_dirty(gpa, n)

    def mark_dirty(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        with self._dlock:
            d = self._dirty
            if d is not None:
                first, last = gpa >> 12, (gpa + length - 1) >> 12
                if first == last:
                    d.add(first)
                else:
                    d.update(range(first, last + 1))

    @property
    def dirty_logging(self) -> bool:
        return self._dirty is not None

    def start_dirty_log(self) -> None:
        with self._dlock:
            self._dirty = set()

    def stop_dirty_log(self) -> None:
        with self._dlock:
            self._dirty = None

    def sync_dirty_log(self) -> set[int]:
        """The pages written since the last sync (and every page of a live writable mapping);
        a new round starts empty (KVM_GET_DIRTY_LOG + clear)."""
        with self._dlock:
            if self._dirty is None:
                raise RuntimeError("dirty logging is off (start_dirty_log first)")
            out, self._dirty = self._dirty, set()
        for gpa, n in list(self.mapped.items()):
            out.update(range(gpa >> 12, ((gpa + n - 1) >> 12) + 1))
        return out

    # --- single aligned 16-bit accesses: ring indices ------------------------------------------
    def load16(self, gpa: int) -> int:
        r = self._region(gpa, 2)
        if r._u16 is None or gpa & 1:
            raise GuestMemoryError(f"unaligned 16-bit access at {gpa:#x}")
        return r._u16[(gpa - r.guest_phys_addr) >> 1]

    def store16(self, gpa: int, value: int) -> None:
        r = self._region(gpa, 2)
        if r._u16 is None or gpa & 1:
            raise GuestMemoryError(f"unaligned 16-bit access at {gpa:#x}")
        r._u16[(gpa - r.guest_phys_addr) >> 1] = value & 0xFFFF
        if self._dirty is not None:
            self.mark_dirty(gpa, 2)

    def u16_view(self, gpa: int, count: int) -> memoryview:
        """A view of `count` aligned u16 words starting at gpa: element stores are single stores."""
        r = self._region(gpa, 2 * count)
        if r._u16 is None or gpa & 1:
            raise GuestMemoryError(f"unaligned 16-bit view at {gpa:#x}")
        i = (gpa - r.guest_phys_addr) >> 1
        self._lend(gpa, 2 * count)
        return r._u16[i:i + count]

    # --- frontend (userspace) addresses: vhost-user SET_VRING_ADDR ------------------------------
    def uva_to_gpa(self, uva: int, length: int) -> int:
        for r in self.regions:
            if r.userspace_addr <= uva and uva + length <= r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + (uva - r.userspace_addr)
        raise GuestMemoryError(f"frontend address [{uva:#x}, +{length:#x}) is not in the memory table")

    def mem_ok(self) -> str | None:
        """None while every region is still backed; else why not (one line).

        A bytearray cannot shrink under us; host/guest_memory.py's MappedGuestMemory overrides this to notice a guest that
        truncated its shared memory (touching the lost pages would be SIGBUS). The data path
        calls it (through VhostDevice.mem_ok) before it touches guest memory for a batch."""
        return None

    def release(self) -> None:
        for r in self.regions:
            r.release()
        self.regions = []
        self._last = None
