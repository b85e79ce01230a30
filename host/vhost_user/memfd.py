"""SET_MEM_TABLE's fds mapped into a GuestMemory (vhost-user.rst "Memory regions description").

Each region arrives with its own fd (QEMU's memory-backend-memfd: the same memfd for every region,
one fd per region) and an mmap_offset into it. The whole [0, mmap_offset + memory_size) of the fd
is mapped MAP_SHARED (mmap offsets must be page-aligned; mmap_offset need not be) and the region is
the slice at mmap_offset. The fds are closed once mapped: the mappings keep the memory.
"""
from __future__ import annotations

import mmap
import os

from shared.memory import GuestMemory, MemoryRegion


class MmapGuestMemory(GuestMemory):
    """A GuestMemory over mmap()ed fds; release() drops the views and unmaps."""

    def __init__(self, regions: list[MemoryRegion], maps: list[mmap.mmap]):
        super().__init__(regions)
        self._maps = maps

    def release(self) -> None:
        super().release()
        maps, self._maps = self._maps, []
        for m in maps:
            try:
                m.close()
            except BufferError:     # a view escaped; the mapping goes with the process
                pass


def map_regions(regions) -> MmapGuestMemory:
    """attach_memory for vhost-user: each Region's source is its fd (closed once mapped)."""
    return map_memory_table(regions, [r.source for r in regions])


def map_log_fd(fd: int, offset: int, size: int):
    """attach_log for vhost-user (LOG_SHMFD): map [offset, +size) of fd as the dirty bitmap.
    Returns (bitmap view, the mapping to close with it); the fd is closed in any case."""
    try:
        end = offset + size
        have = os.fstat(fd).st_size
        if have < end:
            raise ValueError(f"the fd holds {have} bytes, the log ends at {end}")
        m = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)                     # the mapping keeps the memory
    view = memoryview(m)
    bitmap = view[offset:end]
    view.release()
    return bitmap, m


def map_memory_table(regions, fds) -> MmapGuestMemory:
    """regions: MemRegion-likes (guest_phys_addr, memory_size, userspace_addr, mmap_offset)."""
    maps: list[mmap.mmap] = []
    views: list[memoryview] = []
    out: list[MemoryRegion] = []
    try:
        for r, fd in zip(regions, fds, strict=True):
            size = os.fstat(fd).st_size
            end = r.mmap_offset + r.memory_size
            if end > size:
                raise ValueError(f"region [{r.mmap_offset:#x}, +{r.memory_size:#x}) is beyond its "
                                 f"fd ({size:#x} bytes)")
            m = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            maps.append(m)
            base = memoryview(m)
            views.append(base)
            out.append(MemoryRegion(r.guest_phys_addr, r.memory_size,
                                    base[r.mmap_offset:end], r.userspace_addr))
        for v in views:
            v.release()
        return MmapGuestMemory(out, maps)
    except Exception:
        for region in out:
            region.release()
        for v in views:
            v.release()
        for m in maps:
            m.close()
        raise
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
