"""Proof the dirty logs are complete (issue 18, item 4): pre-copy guest RAM to a second buffer
while vhost-net writes rx buffers in every round; at the pause the destination's RAM equals the
source's page for page (SHA-256). One device write left out of the log must break it."""
import pytest

from guest.migration.pages import PageMap, log_pages
from guest.migration.precopy import Precopy
from host.dirty_log import DirtyLog
from host.net.backends.loopback import Sink
from shared.constants import VHOST_F_LOG_ALL, bit
from tests.net_rig import V1, Rig, MAC


def frame(i: int, size: int) -> bytes:
    body = (i.to_bytes(4, "big") + b"rx") * (size // 6 + 1)
    return b"\xff" * 6 + MAC + b"\x88\xb5" + body[:size - 14]


def precopy(buf, table, mem, bitmap, traffic, rounds: int = 6, before_pause=None):
    """Pre-copy `buf` (guest RAM laid out by `table`) to a new buffer, `traffic()` running in every
    round and once more between the last sync and the pause; the guest's log is `mem`'s, the
    device's `bitmap`. Returns (pages differing at the pause, the Precopy)."""
    pm = PageMap(table)
    dest = bytearray(len(buf))

    def copy(pages):
        for p in pages:
            o = pm.offset(p)
            dest[o:o + 4096] = buf[o:o + 4096]

    mem.start_dirty_log()
    log_pages(bitmap)                   # the log starts empty with the migration
    pc = Precopy(pm.all_pages(), downtime_ms=1e-9, max_rounds=rounds)
    step = pc.first_round()
    while True:
        copy(step.pages)
        pc.round_sent(len(step.pages), 0.01)
        traffic()                       # the guest runs and the device writes during the round
        step = pc.next_round(mem.sync_dirty_log(), log_pages(bitmap))
        if step.final:
            break
    if before_pause is not None:
        before_pause(step.pages)
    traffic()                           # between the last sync and the pause
    # pause: the driver and device stop; both logs synced a last time
    copy(pc.final_pages(step.pages, mem.sync_dirty_log(), log_pages(bitmap)))
    src, dst = pm.hashes(buf), pm.hashes(dest)
    return {p for p in src if src[p] != dst[p]}, pc


def migrate(rig, sink, rounds_of_traffic: int = 6, before_pause=None):
    """vhost-net: each round the device writes rx buffers and the guest sends, receives and
    refills."""
    n = [0]

    def traffic():
        for _ in range(8):
            n[0] += 1
            sink.inbox.append(frame(n[0], 200 + 97 * (n[0] % 13)))
        rig.drv.start_xmit(frame(1000 + n[0], 90), kick=False)
        rig.dev.handle_tx()
        rig.dev.handle_rx()
        rig.run()
        while rig.drv.receive():
            rig.run()
        rig.drv.refill_and_kick()
        rig.run()

    differ, pc = precopy(rig.buf, rig.ram.table, rig.mem, rig.bitmap, traffic, rounds_of_traffic,
                         before_pause)
    return differ, n[0], pc


def make_rig():
    sink = Sink()
    rig = Rig(V1 | bit(VHOST_F_LOG_ALL), sink, rx_buf_size=1600, log=True, direct_kick=False)
    return rig, sink


def test_destination_ram_equals_source_at_the_pause():
    rig, sink = make_rig()
    differ, frames, pc = migrate(rig, sink)
    assert rig.dev.stats["rx_frames"] == frames and frames >= 40
    assert pc.device_total > 0 and pc.guest_total > 0 and len(pc.rounds) == 6
    assert differ == set()


def test_one_unlogged_device_write_is_caught(monkeypatch):
    """Break the device's log once: after the last sync, the rx write into one page that neither
    the guest dirties itself nor the final step already sends is left out of the bitmap (and any later write into that page, which
    would otherwise log it). The comparison at the pause must find exactly that page."""
    rig, sink = make_rig()
    real_iov, real_write = DirtyLog.log_iov, DirtyLog.log_write
    dropped = []
    armed = []

    def log_iov(self, addrs, written):
        page = addrs[0][0] >> 12
        mapped = any(g >> 12 <= page <= (g + n - 1) >> 12 for g, n in rig.mem.mapped.items())
        logged = self.bits[page >> 3] >> (page & 7) & 1
        if armed and not dropped and not mapped and page not in armed[0] and not logged:
            dropped.append(page)         # this rx write, and any later one into its page
        real_iov(self, addrs, written)

    def log_write(self, gpa, length):
        for page in range(gpa >> 12, ((gpa + length - 1) >> 12) + 1):
            if page not in dropped:
                real_write(self, page << 12, 1)

    monkeypatch.setattr(DirtyLog, "log_write", log_write)
    monkeypatch.setattr(DirtyLog, "log_iov", log_iov)
    differ, _, _ = migrate(rig, sink, before_pause=lambda pending: armed.append(set(pending)))
    assert dropped and differ == set(dropped)


def test_vsock_destination_ram_equals_source_at_the_pause():
    """vhost-vsock (tests/pair.py): both directions of a stream every round; the device's
    rx writes (fast path and queued packets split over buffers, and used rings) are logged, the
    guest's tx buffers tracked by its memory."""
    from tests.pair import VsockPair
    p = VsockPair(ram_size=8 << 20, rx_buf_size=4096)    # payloads > 4 KiB split: do_send_pkt
    try:
        gsk, hsk = p.connect()
        end = max(r["guest_phys_addr"] + r["memory_size"] for r in p.ram.table)
        bitmap = bytearray(end // 4096 // 8 + 1)
        with p.lock:
            p.dev.set_log_base(bitmap)
            p.dev.set_features(p.dev.acked_features | bit(VHOST_F_LOG_ALL))
        n = [0]
        got = bytearray(1 << 20)

        def traffic():
            n[0] += 1
            with p.lock, p.dev.batch:
                # one that fits an rx buffer takes the fast path (send_rw), a larger one is
                # split over several buffers by do_send_pkt
                p.dev.core.send(hsk, bytes([n[0]]) * (1000 + 100 * n[0]))
            p.pump()
            with p.lock, p.dev.batch:
                p.dev.core.send(hsk, bytes([n[0] + 100]) * (9000 + 700 * n[0]))
            with p.lock, p.t.batch:
                p.t.core.send(gsk, bytes([n[0]]) * 5000)
            p.pump()
            with p.lock:
                p.t.core.recv_into(gsk, memoryview(got)) if hasattr(p.t.core, "recv_into") else None
                p.dev.core.recv_into(hsk, memoryview(got))
            p.pump()

        differ, pc = precopy(p.buf, p.ram.table, p.ram.mem, bitmap, traffic)
        assert p.dev.stats["rx_packets"] > 6 and pc.device_total > 0
        assert differ == set()
    finally:
        p.close()
