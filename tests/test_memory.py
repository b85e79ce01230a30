"""GuestMemory: the memory table, bounds checks, single aligned index stores."""
import pytest

from guest.ram import HIGH_BASE, LOW_BASE, UVA_BASE, GuestRAM
from shared.errors import GuestMemoryError
from shared.memory import GuestMemory, MemoryRegion


def two_regions():
    a, b = bytearray(4096), bytearray(4096)
    return GuestMemory([MemoryRegion(0x2000, 4096, memoryview(b), 0x9000),
                        MemoryRegion(0x1000, 4096, memoryview(a), 0x8000)]), a, b


def test_regions_sorted_and_bounds_checked():
    mem, a, b = two_regions()
    assert [r.guest_phys_addr for r in mem.regions] == [0x1000, 0x2000]
    mem.write(0x1ffe, b"xy")
    assert a[-2:] == b"xy"
    for gpa, n in [(0, 1), (0xfff, 2), (0x3000, 1), (0x2fff, 2), (-1, 1)]:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, n)
    assert not mem.check_range(0x3000, 1)


def test_translate_splits_at_adjacent_region_boundary():
    mem, a, b = two_regions()
    iov = mem.translate(0x1ff0, 0x20)
    assert [len(v) for v in iov] == [0x10, 0x10]
    assert mem.check_range(0x1ff0, 0x20)
    with pytest.raises(GuestMemoryError):
        mem.view(0x1ff0, 0x20)          # a single view may not straddle


def test_overlapping_regions_rejected():
    with pytest.raises(ValueError):
        GuestMemory([MemoryRegion(0x1000, 4096, memoryview(bytearray(4096))),
                     MemoryRegion(0x1800, 4096, memoryview(bytearray(4096)))])


def test_load_store16_are_aligned_single_stores():
    mem, a, _ = two_regions()
    mem.store16(0x1002, 0xBEEF)
    assert a[2:4] == b"\xef\xbe"        # little endian on x86, as virtio 1.x wants
    assert mem.load16(0x1002) == 0xBEEF
    with pytest.raises(GuestMemoryError):
        mem.store16(0x1003, 1)
    mem.store16(0x1004, 0x12345)        # truncated to u16
    assert mem.load16(0x1004) == 0x2345
    v = mem.u16_view(0x1000, 4)
    v[3] = 7
    assert mem.load16(0x1006) == 7


def test_uva_translation():
    mem, _, _ = two_regions()
    assert mem.uva_to_gpa(0x9010, 16) == 0x2010
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x9ff8, 16)


def test_guest_ram_layout_has_nonzero_bases_and_a_hole():
    size = 1 << 20
    ram = GuestRAM("t", size, buf=bytearray(size))
    assert [r["guest_phys_addr"] for r in ram.table] == [LOW_BASE, HIGH_BASE]
    assert ram.table[1]["mmap_offset"] == size // 2
    assert ram.gpa_to_uva(HIGH_BASE + 8) == UVA_BASE + size // 2 + 8
    assert not ram.mem.check_range(0, 16)     # an offset never passes for an address
    assert not ram.mem.check_range(LOW_BASE + size // 2, 1)  # the hole
    ram.close()
