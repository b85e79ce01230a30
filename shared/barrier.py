"""Memory barriers for the ring protocol (Linux's virtio_mb / smp_mb, rust-vmm's fence(SeqCst)).

Every ring index and event field is stored and loaded with one aligned machine access (shared/
memory.py), so a value is never torn. Ordering is a separate matter. x86 keeps stores in order
with stores and loads in order with loads, but lets a load pass an earlier store to another
address (store buffering). Four places in the split-ring protocol store one field and then load
the other side's, and each needs the store visible before the load, or both sides can miss each
other and sleep forever (a lost wake-up):

  driver  virtqueue_kick_prepare   store avail.idx     -> load avail_event / used.flags
  driver  virtqueue_enable_cb      store used_event    -> load used.idx
  device  vhost_enable_notify      store avail_event   -> load avail.idx
  device  vhost_signal             store used.idx      -> load used_event / avail.flags

CPython offers no fence, but an atomic read-modify-write is a full barrier on every CPU it runs
on (a `lock cmpxchg` on x86): an uncontended lock's acquire and release cost about 75 ns here.
"""
from __future__ import annotations

import threading

_fence = threading.Lock()
_acquire = _fence.acquire
_release = _fence.release


def mb() -> None:
    """Full memory barrier: earlier stores are visible to other CPUs before later loads."""
    _acquire()
    _release()
