"""Dirty-page logging for live migration (VHOST_F_LOG_ALL + SET_LOG_BASE; vhost.c log_write).

The log is a bitmap, one bit per 4 KiB page of guest-physical memory (VHOST_PAGE_SIZE), bit
(page % 8) of byte (page / 8). Every device write into guest RAM (rx buffers and the used ring)
marks the pages it touched. Unlike the 2010 code, a page beyond the bitmap is not written: it is
reported (an out-of-bounds write in the 2010 seed), and `overflow` counts it.
"""
from __future__ import annotations

VHOST_PAGE_SIZE = 0x1000


class DirtyLog:
    def __init__(self, bitmap, owner=None):
        """bitmap: anything a writable memoryview can be made of; owner: what it views (an mmap,
        a shared-memory segment), closed with the log (None: the caller keeps it)."""
        bits = memoryview(bitmap)
        if bits.readonly:
            bits.release()
            raise ValueError("the dirty log must be writable")
        self.bits = bits.cast("B")
        bits.release()
        self.owner = owner
        self.pages = self.bits.nbytes * 8
        self.overflow = 0
        self.stats: dict | None = None     # the device's stats: "dirty_logged" counts pages newly marked

    def log_write(self, gpa: int, length: int) -> None:
        """log_write: mark every page of [gpa, gpa+length)."""
        if length <= 0:
            return
        first = gpa // VHOST_PAGE_SIZE
        last = (gpa + length - 1) // VHOST_PAGE_SIZE
        bits = self.bits
        new = 0
        for page in range(first, last + 1):
            if page >= self.pages:
                self.overflow += 1
                continue
            b, m = page >> 3, 1 << (page & 7)
            if not bits[b] & m:
                bits[b] |= m
                new += 1
        if new and self.stats is not None:
            self.stats["dirty_logged"] = self.stats.get("dirty_logged", 0) + new

    def log_iov(self, addrs: list[tuple[int, int]], written: int) -> None:
        """vhost_log_write: log the write descriptors in order, up to `written` bytes."""
        for gpa, ln in addrs:
            if written <= 0:
                break
            n = min(ln, written)
            self.log_write(gpa, n)
            written -= n

    def dirty_pages(self) -> set[int]:
        bits = self.bits
        return {i * 8 + b for i in range(bits.nbytes) if bits[i] for b in range(8) if bits[i] >> b & 1}

    def release(self) -> None:
        self.bits.release()
        owner, self.owner = self.owner, None
        if owner is not None:
            try:
                owner.close()
            except (BufferError, OSError):
                pass
