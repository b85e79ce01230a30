"""The guest's memory table and dirty log, mapped into a device process: the session's
`attach_memory` and `attach_log` for both transports.

native: each Region's source is the name of one of our shared-memory segments (one mapping per
segment, however many regions it holds); the segment's size is checked again before each batch
(`mem_ok`): a guest that ftruncate()s its RAM smaller would otherwise SIGBUS us.
vhost-user (vhost-user.rst "Memory regions description"): each region arrives with its own fd
(QEMU's memory-backend-memfd: the same memfd, one fd per region) and an mmap_offset into it. The
whole [0, mmap_offset + memory_size) of the fd is mapped MAP_SHARED (mmap offsets must be
page-aligned; mmap_offset need not be) and the region is the slice at mmap_offset. The fds are
closed once mapped: the mappings keep the memory.
"""
from __future__ import annotations

import mmap
import os
from typing import Any

from shared.memory import GuestMemory, MemoryRegion
from shared.resources import attach_shm, close_shm

from host.session import close_fds


class MappedGuestMemory(GuestMemory):
    """A GuestMemory over mappings it owns (shm segments or mmaps); release() drops the views and
    closes them. `needed`: segment -> bytes the table maps of it (mem_ok)."""

    def __init__(self, regions: list[MemoryRegion], maps: list, needed: dict | None = None):
        super().__init__(regions)
        self._maps = maps
        self._needed = needed or {}

    def mem_ok(self) -> str | None:
        """Each segment's current size (fstat of its fd) must still cover what we mapped."""
        for shm, need in self._needed.items():
            try:
                size = os.fstat(shm._fd).st_size
            except (OSError, AttributeError, TypeError) as e:
                return f"guest memory {shm.name} cannot be checked: {e}"
            if size < need:
                return f"guest memory {shm.name} shrank to {size:#x} bytes; the memory table maps {need:#x}"
        return None

    def release(self) -> None:
        super().release()
        maps, self._maps = self._maps, []
        for m in maps:
            _unmap(m)


def _unmap(m) -> None:
    if isinstance(m, mmap.mmap):
        try:
            m.close()
        except BufferError:     # a view escaped; the mapping goes with the process
            pass
    else:
        close_shm(m)


def _attach(source, end: int, what: str):
    """(mapping, view) covering [0, end) of a region's source: a segment name or an fd."""
    if isinstance(source, str):
        shm = attach_shm(source)
        if end > shm.size:
            close_shm(shm)
            raise ValueError(f"{what} is beyond segment {source} ({shm.size:#x} bytes)")
        return shm, memoryview(shm.buf)
    size = os.fstat(source).st_size
    if end > size:
        raise ValueError(f"{what} is beyond its fd ({size:#x} bytes)")
    m = mmap.mmap(source, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return m, memoryview(m)


def attach_memory(regions) -> MappedGuestMemory:
    """attach_memory for both transports: map each Region from its source at mmap_offset."""
    maps: dict[Any, tuple] = {}         # source -> (mapping, view): a segment is mapped once
    out: list[MemoryRegion] = []
    try:
        for r in regions:
            end = r.mmap_offset + r.memory_size
            what = f"region [{r.mmap_offset:#x}, +{r.memory_size:#x})"
            if r.source not in maps:
                maps[r.source] = _attach(r.source, end, what)
            base = maps[r.source][1]
            if end > len(base):          # another region of a segment already mapped
                raise ValueError(f"{what} is beyond segment {r.source} ({len(base):#x} bytes)")
            out.append(MemoryRegion(r.guest_phys_addr, r.memory_size, base[r.mmap_offset:end], r.userspace_addr))
        needed: dict[Any, int] = {}
        for r in regions:
            if isinstance(r.source, str):
                shm = maps[r.source][0]
                needed[shm] = max(needed.get(shm, 0), r.mmap_offset + r.memory_size)
        for _, v in maps.values():
            v.release()
        return MappedGuestMemory(out, [m for m, _ in maps.values()], needed)
    except Exception:
        for x in out + [v for _, v in maps.values()]:
            x.release()
        for m, _ in maps.values():
            _unmap(m)
        raise
    finally:
        close_fds(r.source for r in regions if isinstance(r.source, int))


def attach_log(source, offset: int, size: int) -> tuple[memoryview, Any]:
    """attach_log for both transports: `size` bytes at `offset` of a segment or an fd (LOG_SHMFD),
    writable. Returns (bitmap view, the mapping to close with it); ValueError / OSError when
    unusable. An fd is closed in any case."""
    try:
        m, base = _attach(source, offset + size, f"the log [{offset:#x}, +{size:#x})")
    finally:
        close_fds([source] if isinstance(source, int) else [])
    view = base[offset:offset + size]
    base.release()
    return view, m
