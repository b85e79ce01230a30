"""The guest allocator: bounded, first fit, coalescing, never across an extent."""
from hypothesis import given, settings
from hypothesis import strategies as st

from guest.alloc import GuestAllocator


def test_exhaustion_returns_none_and_counts():
    a = GuestAllocator([(0x1000, 4096)])
    blocks = [a.alloc(1000) for _ in range(4)]
    assert None not in blocks
    assert a.alloc(1) is None and a.failures == 1
    for b in blocks:
        a.free(b)
    assert a.available == 4096 and a.alloc(4096) == 0x1000


def test_blocks_never_straddle_extents():
    a = GuestAllocator([(0x1000, 4096), (0x2000, 4096)])   # adjacent, but two regions
    x = a.alloc(4096)
    y = a.alloc(4096)
    assert {x, y} == {0x1000, 0x2000}
    a.free(x)
    a.free(y)
    assert a.alloc(8192) is None    # coalescing must not merge across the extent limit


def test_alignment():
    a = GuestAllocator([(0x1040, 8192)])
    p = a.alloc(100, align=4096)
    assert p % 4096 == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000)), max_size=80))
def test_no_overlap_and_accounting(ops):
    a = GuestAllocator([(0x10000, 1 << 15), (0x100000, 1 << 14)])
    live = {}
    for do_alloc, n in ops:
        if do_alloc or not live:
            p = a.alloc(n)
            if p is not None:
                live[p] = a.size_of(p)
        else:
            p = sorted(live)[n % len(live)]
            a.free(p)
            del live[p]
        spans = sorted(live.items())
        for (p1, n1), (p2, _) in zip(spans, spans[1:]):
            assert p1 + n1 <= p2
        assert a.in_use == sum(live.values())
    for p in list(live):
        a.free(p)
    assert a.available == a.total
