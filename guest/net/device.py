"""virtio_net probe and remove: the VirtioNet driver core and NetDev on a VirtioDevice.

probe (virtnet_probe): negotiate VERSION_1, EVENT_IDX, MAC, MRG_RXBUF, STATUS and the vhost
header bit; find the rx and tx queues; read the MAC from config space (VIRTIO_NET_F_MAC); fill rx;
DRIVER_OK. Interrupts (skb_recv_done / skb_xmit_done) queue the NAPI poll on the guest kernel's
workqueue. remove (virtnet_remove): reset, detach and free every posted buffer, del_vqs.
"""
from __future__ import annotations

import logging

from shared.constants import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, bit, has
from shared.net.hdr import (NET_CONFIG, VHOST_NET_F_VIRTIO_NET_HDR, VIRTIO_NET_F_MAC,
                            VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, format_mac)

from .driver import VirtioNet
from .netdev import NetDev

log = logging.getLogger(__name__)

WANTED = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_NET_F_MAC)
          | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_STATUS) | bit(VHOST_NET_F_VIRTIO_NET_HDR))


def wanted_features(backend_spec: str) -> int:
    """The VMM's header choice (QEMU vhost_net_init): VHOST_NET_F_VIRTIO_NET_HDR (vhost strips
    and adds the header) unless the backend carries it itself (a tap with vnet_hdr=on)."""
    if "vnet_hdr=on" in (backend_spec or "").split(":")[-1].split(","):
        return WANTED & ~bit(VHOST_NET_F_VIRTIO_NET_HDR)
    return WANTED


class VirtioNetDevice:
    def __init__(self, kernel, vdev, ram, ifc=None, queue_size: int = 256, mac: bytes | None = None):
        self.kernel = kernel
        self.vdev = vdev
        self.ram = ram
        self.ifc = ifc
        self.queue_size = queue_size
        self.mac = mac
        self.driver: VirtioNet | None = None
        self.netdev: NetDev | None = None

    def probe(self) -> None:
        features = self.vdev.probe(wanted_features(getattr(self.vdev, "params", {}).get("backend", "")))
        rxq, txq = self.vdev.find_vqs([self._irq, self._irq], [self.queue_size, self.queue_size])
        if has(features, VIRTIO_NET_F_MAC):
            self.mac = NET_CONFIG.unpack(self.vdev.config_get(0, NET_CONFIG.size))[0]
        if self.mac is None:
            raise OSError("virtio-net: the device gave no MAC address")
        self.driver = VirtioNet(self.ram.mem, self.ram.alloc, rxq, txq, features, self.mac,
                                kick=self.vdev.notify)
        self.netdev = NetDev(self.driver, self.ifc)
        # VHOST_NET_SET_BACKEND from inside the guest's VMM (tests, demos): swap a queue's backend
        self.netdev.set_backend = lambda index, spec: self.vdev._req("SET_BACKEND", index=index, backend=spec)
        self.driver.try_fill_recv()
        self.vdev.driver_ok()
        self.driver.kick(rxq)
        log.info("virtio-net: %s up, features %#x%s", format_mac(self.mac), features,
                 f", {self.ifc}" if self.ifc else "")

    def resume(self, st: dict) -> None:
        """An incoming migration (guest/migration/incoming.py): the same rings, in the RAM that
        came with the migration, carry on: features as negotiated on the source, each queue's
        driver state restored, SET_VRING_BASE from the source's GET_VRING_BASE, DRIVER_OK; then
        the guest announces itself (a gratuitous ARP, as VIRTIO_NET_F_GUEST_ANNOUNCE asks)."""
        from guest.migration import vmstate
        vdev = self.vdev
        vdev._negotiate(st["features"], exact=True)
        saved = [vmstate.ring_bytes(self.ram.mem, q) for q in st["vqs"]]
        rxq, txq = vdev.find_vqs([self._irq, self._irq], [q["num"] for q in st["vqs"]],
                                 at=[(q["desc"], q["avail"], q["used"]) for q in st["vqs"]],
                                 bases=st["bases"])
        for vq, q, sv in zip((rxq, txq), st["vqs"], saved):
            vmstate.restore_vq(vq, q, sv)
        self.mac = bytes.fromhex(st["mac"])
        self.driver = VirtioNet(self.ram.mem, self.ram.alloc, rxq, txq, st["features"], self.mac,
                                kick=self.vdev.notify)
        self.driver.stats.update(st["stats"])
        self.netdev = NetDev(self.driver, self.ifc)
        self.netdev.set_backend = lambda index, spec: self.vdev._req("SET_BACKEND", index=index, backend=spec)
        vdev.driver_ok()
        self.announce()
        self.driver.kick(rxq)
        self.kernel.queue_work(self.netdev.poll)     # buffers the device used before the pause
        log.info("virtio-net: %s resumed after migration, rings at %s", format_mac(self.mac), st["bases"])

    def announce(self) -> None:
        if self.netdev is not None and self.netdev.stack is not None:
            self.netdev.send_frame(self.netdev.stack.garp())
            self.netdev.announced = getattr(self.netdev, "announced", 0) + 1

    def _irq(self, vq) -> None:
        self.netdev.interrupts += 1
        self.kernel.queue_work(self.netdev.poll)

    def remove(self) -> None:
        if self.driver is None:
            return
        try:
            self.vdev.reset()
        except Exception:
            log.info("virtio-net: reset without the host", exc_info=True)
        with self.netdev.lock:
            self.driver.free_old_xmit()
            for vq in (self.driver.rxq, self.driver.txq):
                while (tok := vq.detach_unused_buf()) is not None:
                    self.ram.alloc.free(tok)
        try:
            self.vdev.del_vqs()
        except Exception:
            log.exception("virtio-net: del_vqs failed")
        self.driver = None

    def stats(self) -> dict:
        d = self.driver
        if d is None:
            return {}
        out = dict(d.stats)
        if self.netdev.stack is not None:
            out.update(self.netdev.stack.stats)
        return out
