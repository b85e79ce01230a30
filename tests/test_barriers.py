"""Issue 21 item 4: each publish-then-read site calls the full barrier between its store and its load.

shared/barrier.py names four places where one side stores a ring word and then loads the other
side's (plus virtqueue_enable_cb_delayed, a variant of enable_cb). Without the fence the load may
pass the store (x86 store buffering) and both sides sleep: a lost wake-up. On x86 under CPython
that reordering practically never shows, so even a million round trips pass without the fence;
a timing test cannot guard it.

A recording fence can: `mb` is replaced, in every module that imported it, by a fence that
  1. checks the store is already in guest memory when the fence runs (store before fence), then
  2. plays the other side, changing the very word the site loads next, so that only a load made
     after the fence sees the change (load after fence): the site's answer tells which it saw.
A deleted fence, or a fence moved below the load, flips the answer and fails the test.
"""
from __future__ import annotations

import sys

import pytest

import shared.barrier
from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from host.vhost_vq import VhostVirtqueue
from shared.constants import VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY
from shared.ring_layout import (avail_event_addr, avail_flags_addr, avail_idx_addr,
                                used_event_addr, used_flags_addr, used_idx_addr)

NUM = 8
REAL_MB = shared.barrier.mb


class RecordingFence:
    """Stands in for shared.barrier.mb; `arm(action)` runs action inside the next fence call."""

    def __init__(self):
        self.calls = 0
        self._action = None

    def arm(self, action) -> None:
        self._action = action
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        action, self._action = self._action, None
        if action is not None:
            action()
        REAL_MB()


@pytest.fixture
def fence(monkeypatch):
    """Install a RecordingFence wherever the real mb was imported (and in shared.barrier)."""
    f = RecordingFence()
    patched = []
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.split(".")[0] in ("guest", "host", "shared") \
                and getattr(mod, "mb", None) is REAL_MB:
            monkeypatch.setattr(mod, "mb", f)
            patched.append(name)
    assert "guest.virtqueue" in patched and "host.vhost_vq" in patched, patched
    return f


def pair(event_idx: bool):
    ram = GuestRAM("t", 1 << 20, buf=bytearray(1 << 20))
    d, a, u = VirtQueue.alloc_rings(ram, NUM)
    vq = VirtQueue(ram.mem, 0, NUM, d, a, u, event_idx=event_idx)
    h = VhostVirtqueue(0, "test")
    h.num, h.desc, h.avail, h.used = NUM, d, a, u
    h.event_idx = event_idx
    assert h.access_ok(ram.mem)
    h.init_access(ram.mem)
    return ram, ram.mem, vq, h


def add(ram, vq) -> int:
    g = ram.alloc.alloc(64)
    assert vq.add_sgs([(g, 32)], [(g + 32, 32)], g)
    return g


MODES = pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])


@MODES
def test_kick_prepare_fences_avail_idx_store_before_reading_avail_event(fence, event_idx):
    """virtqueue_kick_prepare: store avail.idx -> mb -> load avail_event / used.flags."""
    ram, mem, vq, h = pair(event_idx)
    add(ram, vq)
    assert vq.kick_prepare()
    assert h.get_vq_desc(mem) is not None
    h.disable_notify(mem)                       # the device is busy: no kicks wanted
    add(ram, vq)

    def device_rearms():
        assert mem.load16(avail_idx_addr(vq.avail)) == vq.avail_idx_shadow, \
            "avail.idx was not published before the fence"
        if event_idx:                           # what vhost_enable_notify stores
            mem.store16(avail_event_addr(vq.used, NUM), h.last_avail_idx)
        else:
            mem.store16(used_flags_addr(vq.used), 0)

    fence.arm(device_rearms)
    assert vq.kick_prepare(), "kick_prepare read the device's notification word before the fence"
    assert fence.calls == 1


@MODES
@pytest.mark.parametrize("enable", ["enable_cb", "enable_cb_delayed"])
def test_enable_cb_fences_used_event_store_before_reading_used_idx(fence, event_idx, enable):
    """virtqueue_enable_cb and virtqueue_enable_cb_delayed: store used_event (or avail.flags)
    -> mb -> load used.idx."""
    ram, mem, vq, h = pair(event_idx)
    add(ram, vq)
    vq.kick_prepare()
    c = h.get_vq_desc(mem)
    vq.disable_cb()

    def device_uses():
        if event_idx:
            assert mem.load16(used_event_addr(vq.avail, NUM)) == vq.last_used_idx, \
                "used_event was not published before the fence"
        else:
            assert not mem.load16(avail_flags_addr(vq.avail)) & VRING_AVAIL_F_NO_INTERRUPT, \
                "avail.flags was not published before the fence"
        h.add_used(mem, c.head, 32)

    fence.arm(device_uses)
    assert not getattr(vq, enable)(), f"{enable} read used.idx before the fence"
    assert fence.calls == 1


@MODES
def test_vhost_enable_notify_fences_its_store_before_reading_avail_idx(fence, event_idx):
    """vhost_enable_notify: store avail_event (or used.flags) -> mb -> load avail.idx."""
    ram, mem, vq, h = pair(event_idx)
    add(ram, vq)
    vq.kick_prepare()
    assert h.get_vq_desc(mem) is not None
    h.disable_notify(mem)
    assert h.get_vq_desc(mem) is None

    def driver_adds():
        if event_idx:
            assert mem.load16(avail_event_addr(vq.used, NUM)) == h.last_avail_idx, \
                "avail_event was not published before the fence"
        else:
            assert not mem.load16(used_flags_addr(vq.used)) & VRING_USED_F_NO_NOTIFY, \
                "used.flags was not published before the fence"
        add(ram, vq)

    fence.arm(driver_adds)
    assert h.enable_notify(mem), "enable_notify read avail.idx before the fence"
    assert fence.calls == 1


@MODES
def test_vhost_signal_fences_used_idx_store_before_reading_used_event(fence, event_idx):
    """vhost_notify (signal): store used.idx -> mb -> load used_event / avail.flags."""
    ram, mem, vq, h = pair(event_idx)
    add(ram, vq)
    add(ram, vq)
    vq.kick_prepare()
    c1, c2 = h.get_vq_desc(mem), h.get_vq_desc(mem)
    h.add_used(mem, c1.head, 0)
    assert h.signal(mem)                        # the first decision after init always signals
    vq.disable_cb()                             # the driver is polling: no interrupts wanted
    h.add_used(mem, c2.head, 0)

    def driver_rearms():
        assert mem.load16(used_idx_addr(vq.used)) == h.last_used_idx, \
            "used.idx was not published before the fence"
        if event_idx:                           # what virtqueue_enable_cb stores
            mem.store16(used_event_addr(vq.avail, NUM), (h.last_used_idx - 1) & 0xFFFF)
        else:
            mem.store16(avail_flags_addr(vq.avail), 0)

    fence.arm(driver_rearms)
    assert h.signal(mem), "signal read the driver's interrupt word before the fence"
    assert fence.calls == 1


def test_the_fence_is_shared_barrier_mb():
    """Both ring modules fence with shared.barrier.mb (what the fixture replaces)."""
    import guest.virtqueue
    import host.vhost_vq
    assert guest.virtqueue.mb is REAL_MB and host.vhost_vq.mb is REAL_MB
