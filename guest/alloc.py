"""A bounded first-fit allocator over extents of guest-physical memory (the guest's kmalloc).

Pure bookkeeping: it never touches memory. `alloc` returns None when no extent fits, and the
drivers then degrade as the seeds do on -ENOMEM: stop filling, retry later. Blocks never straddle
two extents (each extent is one memory-table region), and free neighbours coalesce.
"""
from __future__ import annotations

import bisect


class GuestAllocator:
    def __init__(self, extents: list[tuple[int, int]], granule: int = 64):
        self.granule = granule
        self.on_free = None                      # called with the address of each block freed
        self._free: list[tuple[int, int]] = []   # sorted (start, size)
        self._used: dict[int, int] = {}          # start -> size
        self.total = 0
        for start, size in sorted(extents):
            start2 = -(-start // granule) * granule
            size2 = (size - (start2 - start)) // granule * granule
            if size2 > 0:
                self._free.append((start2, size2))
                self.total += size2
        self._limits = [(s, s + n) for s, n in self._free]  # blocks never cross these
        self.failures = 0

    @property
    def in_use(self) -> int:
        return sum(self._used.values())

    @property
    def available(self) -> int:
        return self.total - self.in_use

    def alloc(self, size: int, align: int = 16) -> int | None:
        """A block of at least `size` bytes aligned to max(align, granule), or None."""
        if size <= 0:
            raise ValueError("allocation size must be positive")
        g = self.granule
        need = -(-size // g) * g
        align = max(align, g)
        for i, (start, n) in enumerate(self._free):
            a = -(-start // align) * align
            pad = a - start
            if pad + need <= n:
                del self._free[i]
                if pad:
                    self._free.insert(i, (start, pad))
                    i += 1
                rest = n - pad - need
                if rest:
                    self._free.insert(i, (a + need, rest))
                self._used[a] = need
                return a
        self.failures += 1
        return None

    def free(self, addr: int) -> None:
        size = self._used.pop(addr)  # KeyError on a double free: a driver bug, not guest input
        if self.on_free is not None:
            self.on_free(addr)       # GuestRAM: the memory's writable mapping there ends (dirty log)
        i = bisect.bisect_left(self._free, (addr, 0))
        self._free.insert(i, (addr, size))
        # coalesce with neighbours inside the same extent
        if i + 1 < len(self._free) and self._mergeable(self._free[i], self._free[i + 1]):
            s, n = self._free[i]
            self._free[i] = (s, n + self._free.pop(i + 1)[1])
        if i > 0 and self._mergeable(self._free[i - 1], self._free[i]):
            s, n = self._free[i - 1]
            self._free[i - 1] = (s, n + self._free.pop(i)[1])

    def _mergeable(self, a: tuple[int, int], b: tuple[int, int]) -> bool:
        if a[0] + a[1] != b[0]:
            return False
        return any(lo <= a[0] and b[0] + b[1] <= hi for lo, hi in self._limits)

    def size_of(self, addr: int) -> int:
        return self._used[addr]
