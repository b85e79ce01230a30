"""Guest RAM as pages (gpa >> 12, the numbering both dirty logs use) and the vhost log bitmap as
a set of pages: pure helpers of the migration's two ends."""
from __future__ import annotations

import hashlib
import re

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_NONZERO = re.compile(rb"[^\x00]")


class PageMap:
    """Page number <-> offset in the RAM segment, from a memory table (guest/ram.py's `table`)."""

    def __init__(self, table: list[dict]):
        self.spans = []                     # (first page, pages, segment offset)
        for r in table:
            if r["guest_phys_addr"] % PAGE_SIZE or r["memory_size"] % PAGE_SIZE:
                raise ValueError("memory regions must be page aligned")
            self.spans.append((r["guest_phys_addr"] >> PAGE_SHIFT, r["memory_size"] >> PAGE_SHIFT,
                               r["mmap_offset"]))

    def all_pages(self) -> list[int]:
        return [p for first, n, _ in self.spans for p in range(first, first + n)]

    def offset(self, page: int) -> int:
        for first, n, off in self.spans:
            if first <= page < first + n:
                return off + ((page - first) << PAGE_SHIFT)
        raise ValueError(f"page {page:#x} is not guest RAM")

    def log_bytes(self) -> int:
        """Bytes of vhost log bitmap covering every page (session.log_pages_needed)."""
        end = max(first + n for first, n, _ in self.spans)
        return -(-end // 8)

    def hashes(self, seg) -> dict[int, bytes]:
        """SHA-256 of each page: the byte-for-byte comparison of two RAMs."""
        mv = memoryview(seg)
        out = {}
        for first, n, off in self.spans:
            for k in range(n):
                o = off + (k << PAGE_SHIFT)
                out[first + k] = hashlib.sha256(mv[o:o + PAGE_SIZE]).digest()
        mv.release()
        return out


def log_pages(bitmap, clear: bool = True) -> set[int]:
    """The pages a vhost dirty bitmap marks (bit page%8 of byte page/8), then zero it. Only for a
    log no device writes meanwhile (the retired half of a ping-pong pair, or a stopped device):
    a byte-wise read-and-clear races with a device's read-modify-write."""
    mv = memoryview(bitmap).cast("B")
    data = bytes(mv)
    pages: set[int] = set()
    for m in _NONZERO.finditer(data):
        i = m.start()
        b = data[i]
        pages.update(i * 8 + k for k in range(8) if b >> k & 1)
        if clear:
            mv[i] = 0
    mv.release()
    return pages
