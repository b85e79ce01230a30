"""An in-process guest + vhost-net pair on bytearray RAM with a real backend, and a pump thread
standing in for the device process's worker and the guest's interrupt thread (tests only)."""
from __future__ import annotations

import threading

from guest.net.driver import VirtioNet
from guest.net.netdev import NetDev
from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from host.net.device import VhostNet
from shared.constants import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
                              VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, bit)
from shared.memory import GuestMemory, MemoryRegion
from shared.net.hdr import (NET_VQ_RX, NET_VQ_TX, VHOST_NET_F_VIRTIO_NET_HDR, VIRTIO_NET_F_MAC,
                            VIRTIO_NET_F_MRG_RXBUF)

RAM_SIZE = 1 << 22
DRIVER_OK = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
             | VIRTIO_CONFIG_S_DRIVER_OK)
FEATURES = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_NET_F_MAC)
            | bit(VHOST_NET_F_VIRTIO_NET_HDR) | bit(VIRTIO_NET_F_MRG_RXBUF))


class NetRig:
    def __init__(self, mac: bytes, backend, ifc=None, features: int = FEATURES, sizes=(256, 256)):
        self.buf = bytearray(RAM_SIZE)
        self.ram = GuestRAM("t", RAM_SIZE, buf=self.buf)
        mem = self.ram.mem
        self.dev = dev = VhostNet(mac)
        vqs = []
        for i, num in enumerate(sizes):
            d, a, u = VirtQueue.alloc_rings(self.ram, num)
            vqs.append(VirtQueue(mem, i, num, d, a, u, event_idx=True))
            hvq = dev.vqs[i]
            hvq.num, hvq.desc, hvq.avail, hvq.used = num, d, a, u
            hvq.enabled = True
        dev.set_features(features)
        base = memoryview(self.buf)
        dev.set_mem(GuestMemory([MemoryRegion(r["guest_phys_addr"], r["memory_size"],
                                              base[r["mmap_offset"]:r["mmap_offset"] + r["memory_size"]],
                                              r["userspace_addr"]) for r in self.ram.table]))
        dev.status = DRIVER_OK
        dev.start()
        self.backend = backend
        dev.set_backend(NET_VQ_RX, backend)
        dev.set_backend(NET_VQ_TX, backend)
        self.drv = VirtioNet(mem, self.ram.alloc, vqs[0], vqs[1], features, mac,
                             kick=lambda vq: dev.kick_received(vq.index))
        self.drv.refill_and_kick()
        self.net = NetDev(self.drv, ifc)
        self._stop = threading.Event()
        self._thread = None

    def pump_once(self) -> None:
        dev = self.dev
        if getattr(self.backend, "readable", lambda: True)():
            dev.backend_readable()
        if dev.tx_polling and self.backend.writable():
            dev.backend_writable()
        dev.run_local_work()
        self.net.poll()

    def start(self) -> "NetRig":
        def loop():
            while not self._stop.is_set():
                self.pump_once()
                self._stop.wait(0.001)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.backend.close()
