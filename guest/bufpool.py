"""Packet buffers in guest RAM for a driver's rings: a fixed pool (slab) or the allocator per use.

A `Buf` is the token a driver hands to add_sgs: its guest-physical address, its capacity and a
memoryview of its bytes, so headers are packed and payloads copied in place (one copy, no
intermediate bytes). Two kinds, one interface (`get()`, `put(buf)`, `release()`):

  BufPool(mem, alloc, size, count)   `count` buffers carved once at probe and recycled: nothing
                                     on the hot path touches the allocator
  BufPool(mem, alloc, size, 0)       one allocation per get(n) and a free per put() (the seeds'
                                     kmalloc per packet, sized to it), so exhaustion degrades as
                                     they do

`get()` returns None when nothing is free; the driver retries later. `release()` gives every
buffer back to the allocator (after the device was reset and the rings drained).

Dirty log (shared/memory.py): a pool of device-written buffers (rx) is made with writable=False,
read-only views the driver cannot write through, so device writes there are the device's log's
alone; a writable (tx) buffer is a mapping while it is out of the pool (get .. put) and dirty at
every sync meanwhile.
"""
from __future__ import annotations


class Buf:
    __slots__ = ("gpa", "size", "view", "pool", "pkt")

    def __init__(self, gpa: int, size: int, view: memoryview, pool: "BufPool"):
        self.gpa = gpa
        self.size = size          # bytes the buffer holds
        self.view = view          # its bytes in guest RAM
        self.pool = pool          # where it goes back to
        self.pkt = None           # tx: the packet it carries (capture, debugging)


class BufPool:
    def __init__(self, mem, alloc, size: int, count: int = 0, *, writable: bool = True):
        if size <= 0 or count < 0:
            raise ValueError("a buffer pool needs a positive size and a count >= 0")
        self.mem = mem
        self.writable = writable
        self.alloc = alloc
        self.size = size
        self.fixed = count > 0
        self.free: list[Buf] = []
        self.all: list[Buf] = []
        self.failures = 0
        for _ in range(count):
            b = self._new(size)
            if b is None:
                break                     # guest RAM ran out: a smaller pool still works
            self.all.append(b)
            self.free.append(b)

    def _new(self, size: int) -> Buf | None:
        gpa = self.alloc.alloc(size)
        if gpa is None:
            return None
        # fixed pools map a writable buffer on get() (a view made once would stay a mapping)
        return Buf(gpa, size, self.mem.view(gpa, size, writable=self.writable,
                                            mapped=not self.fixed), self)

    def get(self, size: int | None = None) -> Buf | None:
        """A buffer of at least `size` bytes (default: the pool's size), or None."""
        if self.fixed:
            if self.free and (size is None or size <= self.size):
                b = self.free.pop()
                if self.writable:
                    self.mem.map(b.gpa, b.size)
                return b
        else:
            b = self._new(self.size if size is None else size)
            if b is not None:
                return b
        self.failures += 1
        return None

    def put(self, b: Buf) -> None:
        b.pkt = None
        if self.fixed:
            if self.writable:
                self.mem.unmap(b.gpa)
            self.free.append(b)
        else:
            b.view.release()
            self.alloc.free(b.gpa)

    def release(self) -> None:
        """Give every pooled buffer back to the allocator (buffers still out are the caller's)."""
        for b in self.all:
            b.view.release()
            self.alloc.free(b.gpa)
        self.all.clear()
        self.free.clear()

    @property
    def available(self) -> int:
        return len(self.free)
