"""The real guest transport and the real vhost-vsock device as a pair, in one process.

`VsockPair` wires a `VirtioVsockTransport` (guest/vsock/transport.py) to a `VhostVsock`
(host/vsock/device.py) over one bytearray of guest RAM: the guest's rings are the device's, a
guest kick runs the device's kick handler and a device interrupt runs the guest's callback, each
deferred to `pump()`, which alternates the two sides until neither has anything left (no
threads, no semaphores: deterministic). Both cores are the real `VsockCore`s, so a test (or a
profile: `python -m tests.pair`) sees exactly the code the processes run, with its real partner.
"""
from __future__ import annotations

import threading
from collections import deque

from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from guest.vsock.transport import VirtioVsockTransport
from host.vsock.device import VhostVsock
from shared.constants import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
                              VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, bit, has)
from shared.memory import GuestMemory, MemoryRegion
from tests.test_guest_transport import FakeKernel

GUEST_CID = 3
DRIVER_OK = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
             | VIRTIO_CONFIG_S_DRIVER_OK)


def _work(lock) -> FakeKernel:
    """queue_work / call_later for one side (tests/test_guest_transport.py FakeKernel): the
    work runs, with the pair's one lock held, when the pair is pumped."""
    w = FakeKernel()
    w.lock = lock
    w.poll_us = 0
    w.stats = {}
    return w


class _Bell:
    """A doorbell whose ring() is remembered until the pair is pumped."""

    def __init__(self, pending: deque, what):
        self.pending, self.what = pending, what
        self.rings = 0

    def ring(self) -> None:
        self.rings += 1
        if self.what not in self.pending:
            self.pending.append(self.what)

    def wait(self, timeout=None) -> int:
        return 0

    def close(self) -> None:
        pass


class _Vdev:
    """The guest transport's VirtioDevice surface, its kicks going to the pair's device."""

    def __init__(self, pair: "VsockPair"):
        self.pair = pair
        self.vqs: list[VirtQueue] = []
        self.callbacks: list = []
        self.rings: list = []
        self.features = 0
        self.irq_threads: dict = {}

    def probe(self, wanted: int) -> int:
        self.features = wanted & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX))
        return self.features

    def find_vqs(self, callbacks, sizes, **sharing):
        ram = self.pair.ram
        self.callbacks = list(callbacks)
        for i, num in enumerate(sizes):
            d, a, u = VirtQueue.alloc_rings(ram, num)
            self.rings.append((d, a, u))
            self.vqs.append(VirtQueue(ram.mem, i, num, d, a, u,
                                      event_idx=has(self.features, VIRTIO_RING_F_EVENT_IDX)))
        return list(self.vqs)

    def config_get(self, offset: int, size: int) -> bytes:
        return self.pair.dev.config_bytes()[offset:offset + size]

    def driver_ok(self) -> None:
        self.pair._device_up()

    def kick(self, vq) -> bool:
        if not vq.kick_prepare():
            return False
        self.pair._kick(vq.index)
        return True

    def reset(self) -> None:
        self.pair.dev.stop()

    def del_vqs(self) -> None:
        for vq, (d, a, u) in zip(self.vqs, self.rings):
            vq.close()
            VirtQueue.free_rings(self.pair.ram, d, a, u)
        self.vqs, self.rings = [], []


class VsockPair:
    """A probed guest transport and a started device over one guest RAM; see the module doc."""

    def __init__(self, *, ram_size: int = 32 << 20, pool: bool = True, coalesce: bool = True,
                 rx_buf_size: int = 65536, credit_policy: str = "low-space",
                 buf_size: int = 1 << 20, queue_sizes=(128, 128, 8), **dev_kw):
        self.buf = bytearray(ram_size)
        self.ram = GuestRAM("pair", ram_size, buf=self.buf)
        self.lock = threading.RLock()          # one lock for both sides: one thread pumps
        self.guest_work = self.kernel = _work(self.lock)
        self.dev = VhostVsock(GUEST_CID, credit_policy=credit_policy, buf_size=buf_size, **dev_kw)
        self.dev.lock = self.lock
        self.host_work = _work(self.lock)
        self.dev.worker = self.host_work
        self.kicks: deque = deque()
        self.irqs: deque = deque()
        self.vdev = _Vdev(self)
        self.t = VirtioVsockTransport(self.kernel, self.vdev, self.ram, pool=pool,
                                      coalesce=coalesce, rx_buf_size=rx_buf_size,
                                      queue_sizes=queue_sizes, credit_policy=credit_policy,
                                      buf_size=buf_size)
        self.t.probe()
        self.pump()

    # --- wiring -----------------------------------------------------------------------------
    def _device_up(self) -> None:
        dev = self.dev
        for i, vq in enumerate(self.vdev.vqs):
            d, a, u = self.vdev.rings[i]
            hvq = dev.vqs[i]
            hvq.num, hvq.desc, hvq.avail, hvq.used = vq.num, d, a, u
            hvq.enabled = True
            dev.calls[i] = _Bell(self.irqs, i)
        dev.set_features(self.vdev.features)
        dev.set_mem(GuestMemory([MemoryRegion(r["guest_phys_addr"], r["memory_size"],
                                              memoryview(self.buf)[r["mmap_offset"]:
                                                                   r["mmap_offset"] + r["memory_size"]],
                                              r["userspace_addr"]) for r in self.ram.table]))
        dev.status = DRIVER_OK
        dev.start()

    def _kick(self, qidx: int) -> None:
        if qidx not in self.kicks:
            self.kicks.append(qidx)

    # --- driving ----------------------------------------------------------------------------
    def pump(self, limit: int = 100_000) -> int:
        """Run kicks, interrupts and both sides' work until all is quiet; returns the steps."""
        n = 0
        while n < limit:
            did = self.guest_work.run() + self.host_work.run()
            while self.kicks:
                q = self.kicks.popleft()
                with self.lock:
                    self.dev.kick_received(q)
                did += 1
            while self.irqs:
                q = self.irqs.popleft()
                cb = self.vdev.callbacks[q]
                if cb is not None:
                    cb(self.vdev.vqs[q])
                did += 1
            if not did:
                return n
            n += did
        raise AssertionError("the pair never settled")

    def connect(self, port: int = 1234):
        """A host listener on `port`, a guest socket connected to it: (guest sk, host sk)."""
        hcore, gcore = self.dev.core, self.t.core
        with self.lock:
            lst = hcore.socket()
            hcore.bind(lst, port)
            hcore.listen(lst, 16)
            gsk = gcore.socket()
            gcore.connect(gsk, 2, port)
        self.pump()
        with self.lock:
            hsk = hcore.accept(lst)
        assert hsk is not None and gsk.state.name == "ESTABLISHED"
        return gsk, hsk

    def close(self) -> None:
        self.t.remove()
        self.dev.close()


def _profile() -> None:  # pragma: no cover - a tool: python -m tests.pair [size] [count]
    import cProfile
    import pstats
    import sys
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    p = VsockPair()
    gsk, hsk = p.connect()
    g, h = p.t.core, p.dev.core
    data = memoryview(b"x" * size)
    out = memoryview(bytearray(max(size, 65536)))

    def stream(sender, ssk, sbatch, receiver, rsk, rbatch):
        for _ in range(count):
            with p.lock, sbatch:
                sender.send(ssk, data)
            p.pump()
            while rsk.rx_bytes:
                with p.lock, rbatch:
                    receiver.recv_into(rsk, out)
            p.pump()
    for name, args in (("g2h", (g, gsk, p.t.batch, h, hsk, p.dev.batch)),
                       ("h2g", (h, hsk, p.dev.batch, g, gsk, p.t.batch))):
        pr = cProfile.Profile()
        pr.runcall(stream, *args)
        st = pstats.Stats(pr)
        print(f"== {name} {size} B x {count}: {st.total_calls / count:.1f} calls per packet "
              f"(both sides, incl. the pump)")
        st.sort_stats("tottime").print_stats(18)
    p.close()


if __name__ == "__main__":  # pragma: no cover
    _profile()
