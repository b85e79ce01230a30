"""What moves besides RAM (QEMU's VMStateDescriptions): the driver-private state that lives in
Python objects here and in guest RAM in a real guest (the kernel's heap): the allocator's map, each
virtqueue's shadow and free list, the net driver's counters. Every value is msgpack-able.

The rings themselves are guest RAM and move with it. `restore_vq` builds the VirtQueue over the
migrated rings: its constructor writes a fresh ring (vring_init), so the ring bytes are saved
first and written back, then the shadow is restored.
"""
from __future__ import annotations

from shared.ring_layout import avail_size, desc_table_size, used_size

VQ_FIELDS = ("num_free", "free_head", "num_added", "avail_idx_shadow", "avail_flags_shadow",
             "last_used_idx", "broken", "broken_reason")


def save_alloc(alloc) -> dict:
    return {"free": [list(x) for x in alloc._free], "used": [[a, n] for a, n in alloc._used.items()],
            "total": alloc.total, "failures": alloc.failures}


def load_alloc(alloc, st: dict) -> None:
    if st["total"] != alloc.total:
        raise ValueError(f"allocator of {st['total']} bytes migrated into one of {alloc.total}")
    alloc._free = [tuple(x) for x in st["free"]]
    alloc._used = {a: n for a, n in st["used"]}
    alloc.failures = st["failures"]


def save_vq(vq, token=lambda t: t) -> dict:
    """A queue's driver state; `token` maps each in-flight token to something msgpack-able."""
    st = {k: getattr(vq, k) for k in VQ_FIELDS}
    st.update(index=vq.index, num=vq.num, desc=vq.desc, avail=vq.avail, used=vq.used,
              event_idx=vq.event_idx, indirect=vq.indirect, next=list(vq._next),
              state=[None if s is None else [token(s[0]), s[1], s[2], s[3]] for s in vq._state])
    return st


def ring_bytes(mem, st: dict) -> list[tuple[int, bytes]]:
    n = st["num"]
    return [(st["desc"], mem.read(st["desc"], desc_table_size(n))),
            (st["avail"], mem.read(st["avail"], avail_size(n))),
            (st["used"], mem.read(st["used"], used_size(n)))]


def restore_vq(vq, st: dict, saved: list[tuple[int, bytes]], token=lambda t: t) -> None:
    """Make a freshly constructed VirtQueue (same rings) the migrated one: ring bytes as they
    were (the constructor rewrote them), shadow, free list and in-flight tokens."""
    if (vq.num, vq.desc, vq.avail, vq.used) != (st["num"], st["desc"], st["avail"], st["used"]):
        raise ValueError(f"queue {vq.index}: the rings moved")
    for gpa, data in saved:
        vq.mem.write(gpa, data)
    for k in VQ_FIELDS:
        setattr(vq, k, st[k])
    vq._next = list(st["next"])
    vq._state = [None if s is None else (token(s[0]), s[1], s[2], s[3]) for s in st["state"]]


def vsock_blocks(transport) -> list[int]:
    """Every allocation the vsock driver holds (rings, pools, event buffers, in-flight buffers and
    indirect tables): the destination frees them and probes a new vsock device, whose TRANSPORT_
    RESET the driver handles as Linux does (guest/vsock/transport.py)."""
    out: set[int] = set()
    vdev = transport.vdev
    for r in vdev.rings:
        out.update((r.desc, r.avail, r.used))
    for vq in vdev.vqs:
        for s in vq._state:
            if s is not None:
                g = getattr(s[0], "gpa", None)
                if g is not None:
                    out.add(g)
                if s[3] is not None:
                    out.add(s[3])
    for pool in (transport.rx_pool, transport.tx_pool):
        if pool is not None:
            out.update(b.gpa for b in pool.all)
    for ev in getattr(transport, "event_list", ()) or ():
        g = getattr(ev, "gpa", None)
        if g is not None:
            out.add(g)
    return sorted(out)
