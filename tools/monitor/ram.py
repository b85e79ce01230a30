"""Guest RAM attached read-only, for the ring picture.

The segment is opened O_RDONLY with `_posixshmem.shm_open` and mapped PROT_READ: the monitor can
never write a guest's memory, and it does not go through multiprocessing.shared_memory, which
maps read-write and registers the name with the resource tracker (that would unlink a guest's RAM
when the monitor exits). The descriptor stays open so every read can first check the segment's
size: a guest that shrinks its segment would otherwise kill the monitor with SIGBUS.
"""
from __future__ import annotations

import mmap
import os

import _posixshmem


class RamError(Exception):
    """The guest RAM cannot be read (gone, shrunk, or the address is not in the table)."""


class ReadOnlyRAM:
    def __init__(self, shm: str, table: list[dict]):
        name = shm if shm.startswith("/") else "/" + shm
        try:
            self.fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0)
        except OSError as e:
            raise RamError(f"cannot open guest RAM {shm}: {e.strerror}") from None
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size <= 0:
                raise RamError(f"guest RAM {shm} is empty")
            self.mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError) as e:
            os.close(self.fd)
            raise RamError(f"cannot map guest RAM {shm}: {e}") from None
        self.shm = shm
        self.regions = [(int(r["guest_phys_addr"]), int(r["memory_size"]), int(r["mmap_offset"]))
                        for r in table if r.get("shm", shm) == shm]

    def read(self, gpa: int, n: int) -> bytes:
        for base, size, off in self.regions:
            if base <= gpa and gpa + n <= base + size:
                start = off + gpa - base
                if start + n > self.size or os.fstat(self.fd).st_size < start + n:
                    raise RamError(f"guest RAM {self.shm} shrank below {start + n:#x}")
                return self.mm[start:start + n]
        raise RamError(f"{gpa:#x}+{n:#x} is not in the guest's memory table")

    def close(self) -> None:
        try:
            self.mm.close()
        finally:
            os.close(self.fd)
