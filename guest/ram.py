"""Guest RAM: one shared-memory segment the guest owns, described to the host as a memory table.

Layout (like a small x86 machine with a hole below 4 GiB):

    region 0: guest-physical 0x4000_0000, the first half of the segment  (mmap_offset 0)
    region 1: guest-physical 0x1_0000_0000, the second half              (mmap_offset size/2)

`userspace_addr` of each region is a made-up frontend address (0x7f00_0000_0000 + offset), so
ring addresses in SET_VRING_ADDR go through the same translation vhost-user's do.
"""
from __future__ import annotations

from multiprocessing import shared_memory

from shared.memory import GuestMemory, MemoryRegion
from shared.resources import close_shm, create_shm

from .alloc import GuestAllocator

LOW_BASE = 0x4000_0000
HIGH_BASE = 0x1_0000_0000
UVA_BASE = 0x7F00_0000_0000
PAGE = 4096


class GuestRAM:
    def __init__(self, shm_name: str, size: int, *, buf=None):
        """Create the segment (or wrap `buf`, a bytearray, for single-process tests)."""
        if size < 2 * PAGE or size % (2 * PAGE):
            raise ValueError(f"guest RAM size {size} must be a multiple of {2 * PAGE} bytes")
        self.name = shm_name
        self.size = size
        self._shm: shared_memory.SharedMemory | None = None
        if buf is None:
            self._shm = create_shm(shm_name, size)
            base = memoryview(self._shm.buf)
        else:
            base = memoryview(buf).cast("B")
            if base.nbytes != size:
                raise ValueError("buffer size mismatch")
        half = size // 2
        self.table = [
            {"guest_phys_addr": LOW_BASE, "memory_size": half, "userspace_addr": UVA_BASE,
             "mmap_offset": 0, "shm": shm_name},
            {"guest_phys_addr": HIGH_BASE, "memory_size": half, "userspace_addr": UVA_BASE + half,
             "mmap_offset": half, "shm": shm_name},
        ]
        self.mem = GuestMemory([MemoryRegion(r["guest_phys_addr"], r["memory_size"],
                                             base[r["mmap_offset"]:r["mmap_offset"] + r["memory_size"]],
                                             r["userspace_addr"]) for r in self.table])
        base.release()
        self.mem.track_views = True          # writable views are mappings for the dirty log
        self.alloc = GuestAllocator([(r["guest_phys_addr"], r["memory_size"]) for r in self.table])
        self.alloc.on_free = self.mem.unmap

    def gpa_to_uva(self, gpa: int) -> int:
        for r in self.table:
            if r["guest_phys_addr"] <= gpa < r["guest_phys_addr"] + r["memory_size"]:
                return r["userspace_addr"] + gpa - r["guest_phys_addr"]
        raise ValueError(f"{gpa:#x} is not guest RAM")

    def close(self) -> None:
        self.mem.release()
        if self._shm is not None:
            close_shm(self._shm)
            self._shm = None
