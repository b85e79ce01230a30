"""Ring layout constants against linux/virtio_ring.h."""
import pytest

from shared.ring_layout import (DESC, USED_ELEM, avail_event_addr, avail_size, check_num, used_event_addr,
                                used_size, vring_init, vring_need_event, vring_size)


@pytest.mark.parametrize("num,used,total", [(64, 4096, 4614), (128, 4096, 5126), (256, 8192, 10246),
                                            (1024, 20480, 28678)])
def test_legacy_layout_matches_linux(num, used, total):
    assert vring_init(num, 0, 4096).used == used
    assert vring_size(num, 4096) == total


def _linux_vring_size(num, align):
    # uapi: ((sizeof(desc)*num + sizeof(__virtio16)*(3+num) + align-1) & ~(align-1))
    #        + sizeof(__virtio16)*3 + sizeof(used_elem)*num
    return ((16 * num + 2 * (3 + num) + align - 1) & ~(align - 1)) + 2 * 3 + 8 * num


@pytest.mark.parametrize("align", [1, 2, 4, 16, 64, 4096, 65536])
def test_vring_size_every_num(align):
    for shift in range(16):
        num = 1 << shift
        assert vring_size(num, align) == _linux_vring_size(num, align)
        addrs = vring_init(num, 0x10000, align)
        assert addrs.avail == 0x10000 + 16 * num
        assert addrs.used % align == 0 and addrs.used >= addrs.avail + avail_size(num)


def test_struct_sizes_and_event_fields():
    assert DESC.size == 16 and USED_ELEM.size == 8
    assert avail_size(256) == 518 and used_size(256) == 2054
    assert used_event_addr(0x1000, 8) == 0x1000 + 4 + 16
    assert avail_event_addr(0x2000, 8) == 0x2000 + 4 + 64


def test_check_num():
    for ok in (1, 2, 256, 32768):
        check_num(ok)
    for bad in (0, 3, 65536, -2, 1.0):
        with pytest.raises(ValueError):
            check_num(bad)


def test_need_event_wraps():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)     # crossed 0xffff while wrapping
    assert not vring_need_event(10, 0x0001, 0xFFFE)
