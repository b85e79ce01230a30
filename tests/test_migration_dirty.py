"""Guest-side dirty tracking (shared/memory.py): every write the guest makes or lends is logged."""
import pytest

from guest.bufpool import BufPool
from guest.ram import GuestRAM, LOW_BASE, HIGH_BASE

SIZE = 1 << 20


@pytest.fixture
def ram():
    r = GuestRAM("unused", SIZE, buf=bytearray(SIZE))
    yield r
    r.close()


def test_writes_and_store16_mark_their_pages(ram):
    mem = ram.mem
    mem.write(LOW_BASE, b"x")                       # before the log starts: not marked
    mem.start_dirty_log()
    assert mem.sync_dirty_log() == set()
    mem.write(LOW_BASE + 0x1FFF, b"ab")             # straddles pages 1 and 2
    mem.store16(HIGH_BASE + 0x10, 7)
    assert mem.sync_dirty_log() == {(LOW_BASE >> 12) + 1, (LOW_BASE >> 12) + 2, HIGH_BASE >> 12}
    assert mem.sync_dirty_log() == set()            # a sync clears


def test_lent_writable_views_are_dirty_until_freed(ram):
    gpa = ram.alloc.alloc(3 * 4096, 4096)
    v = ram.mem.view(gpa, 3 * 4096)
    ram.mem.start_dirty_log()
    pages = set(range(gpa >> 12, (gpa >> 12) + 3))
    assert ram.mem.sync_dirty_log() == pages        # mapped: dirty every round
    assert ram.mem.sync_dirty_log() == pages
    v[0] = 1
    v.release()
    ram.alloc.free(gpa)                             # unmapped: dirty one last time, then clean
    assert ram.mem.sync_dirty_log() == pages
    assert ram.mem.sync_dirty_log() == set()


def test_read_only_pool_is_not_a_mapping_and_refuses_writes(ram):
    rx = BufPool(ram.mem, ram.alloc, 4096, 4, writable=False)
    ram.mem.start_dirty_log()
    b = rx.get()
    with pytest.raises(TypeError):
        b.view[0] = 1                              # the driver cannot write around the log
    assert ram.mem.sync_dirty_log() == set()


def test_writable_pool_buffer_is_dirty_while_out_and_once_after(ram):
    tx = BufPool(ram.mem, ram.alloc, 4096, 4)
    ram.mem.start_dirty_log()
    assert ram.mem.sync_dirty_log() == set()        # in the pool: not mapped
    b = tx.get()
    page = b.gpa >> 12
    b.view[0:4] = b"data"
    assert page in ram.mem.sync_dirty_log()
    tx.put(b)
    assert page in ram.mem.sync_dirty_log()         # the put marks it a last time
    assert ram.mem.sync_dirty_log() == set()
