"""iovec helpers shared by every vhost device: a chain's buffers are a list of memoryviews over
guest memory (DescChain.out / DescChain.in_). One copy each way; a chain shorter than the data is
the guest's error (ring rule 14), raised as VringError so the device wrapper turns it into NEEDS_RESET.
"""
from __future__ import annotations

from shared.errors import VringError


def iov_views(iov: list[memoryview], offset: int, n: int) -> list[memoryview]:
    """Views of the n bytes starting `offset` bytes into the iovec (no copy; for a reader that
    fills guest buffers itself, or iov_read)."""
    parts = []
    for v in iov:
        ln = v.nbytes
        if offset >= ln:
            offset -= ln
            continue
        take = min(ln - offset, n)
        parts.append(v[offset:offset + take])
        n -= take
        offset = 0
        if not n:
            break
    if n:
        raise VringError(14, "descriptor chain shorter than the packet")
    return parts


def iov_read(iov: list[memoryview], offset: int, n: int) -> bytes:
    """Copy n bytes starting `offset` bytes into the iovec (the caller checked the total length)."""
    parts = iov_views(iov, offset, n)
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


def iov_write(iov: list[memoryview], offset: int, data) -> None:
    """Scatter `data` into the iovec starting `offset` bytes in (the caller checked the room)."""
    src = memoryview(data).cast("B")
    pos, n = 0, src.nbytes
    for v in iov:
        if pos >= n:
            break
        ln = v.nbytes
        if offset >= ln:
            offset -= ln
            continue
        take = min(ln - offset, n - pos)
        v[offset:offset + take] = src[pos:pos + take]
        pos += take
        offset = 0
    if pos < n:
        raise VringError(14, "descriptor chain shorter than the packet")
