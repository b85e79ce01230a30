"""Issue 21 item 2: the dirty log across used-ring wraps (VHOST_F_LOG_ALL, live migration).

Used element i lives at used + 4 + 8 * (i % num). A log that forgets the `% num` marks pages past
the end of the used ring once the ring wraps, and leaves the pages really written unmarked: the
migration's last pass then copies stale used elements and the guest sees buffers it never got.
The older dirty-log test never wrapped the ring. These tests push hundreds of ring lengths through
small rings (8 entries: element 512 would sit a whole page beyond the ring) and check, batch by
batch, every logged page against the pages the device actually wrote and was allowed to write.
"""
from __future__ import annotations

from host.dirty_log import VHOST_PAGE_SIZE, DirtyLog
from host.net.backends.loopback import Sink
from shared.constants import VHOST_F_LOG_ALL, bit
from shared.net.hdr import NET_VQ_RX, NET_VQ_TX
from tests.net_rig import MAC, V1, Rig

NUM = 8
FRAMES = 700                # > 512 used entries: an unwrapped index lands a page past the ring


def frame(i: int, size: int = 64) -> bytes:
    body = i.to_bytes(4, "big") * (size // 4 + 1)
    return b"\xff" * 6 + MAC + b"\x88\xb5" + body[:size - 14]


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // VHOST_PAGE_SIZE, (gpa + length - 1) // VHOST_PAGE_SIZE + 1))


class LogWatch:
    """Clears the bitmap, snapshots guest RAM; `check()` compares what changed with what was
    logged, and returns the logged pages."""

    def __init__(self, rig: Rig):
        self.rig = rig

    def start(self) -> None:
        self.rig.bitmap[:] = bytes(len(self.rig.bitmap))
        self.before = bytes(self.rig.buf)

    def check(self) -> set[int]:
        rig = self.rig
        after = bytes(rig.buf)
        changed = set()
        before = self.before
        for r in rig.ram.table:                      # RAM offset -> gpa, region by region
            o, g0, size = r["mmap_offset"], r["guest_phys_addr"], r["memory_size"]
            if before[o:o + size] == after[o:o + size]:
                continue
            for page in pages(g0, size):
                lo = max(page * VHOST_PAGE_SIZE, g0) - g0 + o
                hi = min((page + 1) * VHOST_PAGE_SIZE, g0 + size) - g0 + o
                if before[lo:hi] != after[lo:hi]:
                    changed.add(page)
        logged = DirtyLog(rig.bitmap).dirty_pages()
        assert changed <= logged, f"pages written but not logged: {sorted(changed - logged)}"
        assert rig.dev.dirty_log.overflow == 0
        return logged


def used_ring_pages(vq) -> set[int]:
    return pages(vq.used, 4 + 8 * vq.num + 2)


def used_elem_pages(vq, first: int, last: int) -> set[int]:
    """Pages of the used elements [first, last) (indices mod 2^16) and of used.idx."""
    out = pages(vq.used + 2, 2)
    i = first
    while i != last:
        out |= pages(vq.used + 4 + 8 * (i % vq.num), 8)
        i = (i + 1) & 0xFFFF
    return out


def test_tx_log_across_used_ring_wraps():
    sink = Sink()
    rig = Rig(V1 | bit(VHOST_F_LOG_ALL), sink, sizes=(NUM, NUM), log=True, direct_kick=False)
    hvq = rig.dev.vqs[NET_VQ_TX]
    ring = used_ring_pages(rig.vqs[NET_VQ_TX])
    watch = LogWatch(rig)
    batch = 6
    for b in range(FRAMES // batch):
        for k in range(batch):                       # the driver's writes (kicks recorded)
            assert rig.drv.start_xmit(frame(b * batch + k))
        watch.start()
        first = hvq.last_used_idx
        rig.dev.kick_received(NET_VQ_TX)             # the device's writes
        rig.run()
        logged = watch.check()
        # tx writes nothing but its used ring: every logged page is one of the ring's
        assert logged <= ring, (b, sorted(logged - ring))
        assert (hvq.last_used_idx - first) & 0xFFFF == batch
        assert used_elem_pages(rig.vqs[NET_VQ_TX], first, hvq.last_used_idx) <= logged
    assert hvq.last_used_idx > 512 and len(sink.queue) == FRAMES // batch * batch


def test_rx_log_across_used_ring_wraps():
    sink = Sink()
    rig = Rig(V1 | bit(VHOST_F_LOG_ALL), sink, sizes=(NUM, NUM), log=True)
    rxq = rig.vqs[NET_VQ_RX]
    hvq = rig.dev.vqs[NET_VQ_RX]
    ring = used_ring_pages(rxq)
    watch = LogWatch(rig)
    got = 0
    batch = 5
    for b in range(FRAMES // batch):
        watch.start()
        first = hvq.last_used_idx
        sink.inbox.extend(frame(b * batch + k, 60 + 13 * k) for k in range(batch))
        rig.dev.backend_readable()
        rig.run()
        logged = watch.check()
        written = set()                              # pages of the bytes the device wrote
        while (r := rxq.get_buf()) is not None:
            g, ln = r
            written |= pages(g, ln)
            want = frame(got, 60 + 13 * (got % batch))
            assert rig.mem.read(g + 12, ln - 12) == want
            rig.ram.alloc.free(g)
            got += 1
        assert written <= logged, sorted(written - logged)
        assert used_elem_pages(rxq, first, hvq.last_used_idx) <= logged
        assert logged <= ring | written, (b, sorted(logged - ring - written))
        rig.drv.refill_and_kick()
    assert got == FRAMES and hvq.last_used_idx > 512


def test_a_page_just_past_the_bitmap_is_counted_not_written():
    """The bitmap of 8 pages: page 7 is the last one marked, page 8 (and beyond) only counted."""
    bits = bytearray(1)
    log = DirtyLog(bits)
    log.log_write(7 * VHOST_PAGE_SIZE + 100, 1)
    assert bits == b"\x80" and log.overflow == 0
    log.log_write(8 * VHOST_PAGE_SIZE, 1)
    log.log_write(7 * VHOST_PAGE_SIZE + 4000, 200)       # spans pages 7 and 8
    assert bits == b"\x80" and log.overflow == 2
    assert log.dirty_pages() == {7}
