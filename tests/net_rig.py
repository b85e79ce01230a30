"""In-process guest + vhost-net pairs on bytearray RAM (tests only).

Rig: the driver core and the device, run by hand; the driver's kick calls kick_received directly
(or is recorded), work the device queues for itself runs with run(). NetRig adds the guest's
NetDev (IPv4 stack) and a pump thread standing in for the device process's worker and the guest's
interrupt thread."""
from __future__ import annotations

import threading

from guest.net.driver import VirtioNet
from guest.net.netdev import NetDev
from guest.ram import GuestRAM
from guest.virtqueue import VirtQueue
from host.dirty_log import VHOST_PAGE_SIZE
from host.net.device import VhostNet
from shared.constants import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                              VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
                              VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, bit)
from shared.memory import GuestMemory, MemoryRegion
from shared.net.hdr import (NET_VQ_RX, NET_VQ_TX, VHOST_NET_F_VIRTIO_NET_HDR, VIRTIO_NET_F_MAC,
                            VIRTIO_NET_F_MRG_RXBUF)

RAM_SIZE = 1 << 22
MAC = bytes.fromhex("525400000002")
DRIVER_OK = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
             | VIRTIO_CONFIG_S_DRIVER_OK)
V1 = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_NET_F_MAC)
      | bit(VHOST_NET_F_VIRTIO_NET_HDR))
FEATURES = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_NET_F_MAC)
            | bit(VHOST_NET_F_VIRTIO_NET_HDR) | bit(VIRTIO_NET_F_MRG_RXBUF))


class Rig:
    def __init__(self, features: int = V1, backend=None, sizes=(256, 256), rx_buf_size=None,
                 log: bool = False, direct_kick: bool = True, fill: bool = True, mac: bytes = MAC):
        self.buf = bytearray(RAM_SIZE)
        self.ram = GuestRAM("t", RAM_SIZE, buf=self.buf)
        self.mem = self.ram.mem
        self.dev = dev = VhostNet(mac)
        if log:
            end = max(r["guest_phys_addr"] + r["memory_size"] for r in self.ram.table)
            self.bitmap = bytearray(end // VHOST_PAGE_SIZE // 8 + 1)
            dev.set_log_base(self.bitmap)
        self.vqs = []
        for i, num in enumerate(sizes):
            d, a, u = VirtQueue.alloc_rings(self.ram, num)
            self.vqs.append(VirtQueue(self.mem, i, num, d, a, u,
                                      event_idx=bool(features & bit(VIRTIO_RING_F_EVENT_IDX))))
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
        self.kicks: list[int] = []
        kick = (lambda vq: dev.kick_received(vq.index)) if direct_kick else (lambda vq: self.kicks.append(vq.index))
        self.drv = VirtioNet(self.mem, self.ram.alloc, self.vqs[0], self.vqs[1], features, mac,
                             kick=kick, rx_buf_size=rx_buf_size)
        if backend is not None:
            dev.set_backend(NET_VQ_RX, backend)
            dev.set_backend(NET_VQ_TX, backend)
        if fill:
            self.drv.refill_and_kick()
        dev.run_local_work()

    def run(self) -> int:
        return self.dev.run_local_work()

    def rx(self) -> list[bytes]:
        self.dev.backend_readable()
        self.run()
        out = []
        while got := self.drv.receive():
            out += got
            self.run()
        return out


class NetRig(Rig):
    """Rig with the guest's NetDev (and IPv4 stack) and a pump thread."""

    def __init__(self, mac: bytes, backend, ifc=None, features: int = FEATURES, sizes=(256, 256)):
        if getattr(backend, "vnet_hdr", False):
            # the VMM's choice (QEMU vhost_net_init): a backend that carries the header itself
            # gets it from the guest as is, so VHOST_NET_F_VIRTIO_NET_HDR is not acked
            features &= ~bit(VHOST_NET_F_VIRTIO_NET_HDR)
        super().__init__(features, backend, sizes=sizes, mac=mac)
        self.backend = backend
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
