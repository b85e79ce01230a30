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
"""
from __future__ import annotations

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

    def view(self, gpa: int, length: int) -> memoryview:
        """A single contiguous view; the range must lie inside one region."""
        r = self._region(gpa, length)
        off = gpa - r.guest_phys_addr
        return r.buf[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r = self._region(gpa, length)
        off = gpa - r.guest_phys_addr
        return bytes(r.buf[off:off + length])

    def write(self, gpa: int, data) -> None:
        n = len(data)
        r = self._region(gpa, n)
        off = gpa - r.guest_phys_addr
        r.buf[off:off + n] = data

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

    def u16_view(self, gpa: int, count: int) -> memoryview:
        """A view of `count` aligned u16 words starting at gpa: element stores are single stores."""
        r = self._region(gpa, 2 * count)
        if r._u16 is None or gpa & 1:
            raise GuestMemoryError(f"unaligned 16-bit view at {gpa:#x}")
        i = (gpa - r.guest_phys_addr) >> 1
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
