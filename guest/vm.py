"""The VM: boots guest RAM, the kernel and the virtio-vsock device, runs services, survives hosts.

Boot (VM.boot): reap what dead processes left in the run dir; record, then create, the guest RAM
segment; start the kernel's workqueue; connect the device's control channel (an unreachable host
is a BootError: one line, non-zero exit); probe the virtio-vsock transport (handshake, rings,
doorbells, rx and event buffers, DRIVER_OK); start interrupt threads; start services and user
functions.

While running, a watcher thread notices the host going away (EOF on the control connection) and
reconnects when a host is back: VirtioDevice.reconnect() replays the device state, and the new host
raises TRANSPORT_RESET on the event queue, which resets connected sockets (ECONNRESET) and keeps
listeners.

Shutdown (VM.shutdown, on SIGINT/SIGTERM): stop services, remove the device as the seed's remove
does (reset, detach unused buffers, free), close the control connection, stop the kernel, unmap and
unlink RAM and doorbells (owner record released).
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.control import ControlError
from shared.resources import OwnerRecord, RunDirError, ensure_run_dir, reap, resource_base
from shared.net.hdr import default_mac, format_mac
from shared.stats import remove_stats, write_stats
from shared.vsock.pcap import PcapWriter

from .kernel import Kernel
from .net.device import VirtioNetDevice
from .virtio_dev import IRQ_POLL
from .ram import GuestRAM
from .virtio_dev import VirtioDevice
from .vsock import services
from .vsock.socket import GuestVsock
from .vsock.transport import VirtioVsockTransport

log = logging.getLogger("guest")

WATCH_INTERVAL = 0.2
RECONNECT_INTERVAL = 0.5
STATS_INTERVAL = 0.5
CONNECT_RETRY = 0.1        # boot: how often to look for a host that is not serving yet



def transport_mode(credit_policy: str) -> dict:
    """The transport's shape for a credit policy: "every-read" is the 2016-17 seeds' mode, with
    the seeds' transport too (a kmalloc per packet, no autocork, every payload copied); the
    modern policies get the fast path (fixed buffer pools, autocork, rx buffers lent to readers)."""
    seeds = credit_policy == "every-read"
    return {"pool": not seeds, "coalesce": not seeds}

class BootError(Exception):
    """The VM could not boot (no host, refused CID, ...)."""


@dataclass
class GuestOptions:
    run_dir: Path
    cid: int | None                 # None: no vsock device
    name: str = ""
    mem: int = 64 << 20
    services: list = field(default_factory=list)      # [ServiceSpec]
    run: list = field(default_factory=list)           # ["module:function"]
    pcap: Path | None = None
    queue_size: int = 128
    credit_policy: str = "half-window"
    buf_size: int = 1 << 20
    rx_buf_size: int = 64 * 1024
    poll_us: int = 0
    doorbell: str = "sem"           # sem | eventfd (guest/virtio_dev.py)
    connect_timeout: float = 5.0
    net: str | None = None          # a vhost-net backend spec (shared/net/spec.py)
    ip: object = None               # IPv4Interface of the net device
    mac: bytes | None = None
    net_run: list = field(default_factory=list)       # ["module:function"] run with the NetDev
    packed: bool = False            # ask for VIRTIO_F_RING_PACKED (--packed)
    incoming: str | None = None     # unix:PATH: wait for a live migration instead of booting devices
    monitor: Path | None = None     # the monitor socket (migrate, query-migrate: guest/monitor.py)


class VM:
    def __init__(self, opts: GuestOptions):
        self.opts = opts
        self.stop_event = threading.Event()
        self._next_reconnect = 0.0
        self.connected = threading.Event()
        self.ram: GuestRAM | None = None
        self.owner: OwnerRecord | None = None
        self.kernel: Kernel | None = None
        self.vdev = None
        self.transport = None
        self.vsock = None
        self.capture = None
        self.services: list = []
        self.reconnects = 0
        self.devices: list = []      # devices besides vsock (each: remove(), stats(), vdev)
        self.net = None              # the NetDev of the net device, for programs in the guest
        self.migration = None        # the outgoing Migration (guest/migration/source.py)
        self.migrated = False        # it completed: the guest runs on the destination now
        self.monitor = None

    # --- boot -----------------------------------------------------------------------------------
    def boot(self) -> None:
        o = self.opts
        try:
            run_dir = ensure_run_dir(o.run_dir)
        except RunDirError as e:
            raise BootError(str(e)) from None
        n = reap(run_dir)
        if n:
            log.info("reaped the resources of %d dead process(es)", n)
        control_path = run_dir / "control.sock"
        if o.pcap:
            try:
                self.capture = PcapWriter(o.pcap)       # header now, packets as they go
            except OSError as e:
                raise BootError(f"cannot write the capture {o.pcap}: {e.strerror or e}") from None
        base = resource_base(run_dir)
        self.owner = OwnerRecord(run_dir, "guest")
        self.owner.add(shm=[f"{base}-ram"])
        self.ram = GuestRAM(f"{base}-ram", o.mem)
        log.info("guest %s: %d MiB of RAM in %s (regions %s)", o.name, o.mem >> 20, f"{base}-ram",
                 ", ".join(f"{r['guest_phys_addr']:#x}+{r['memory_size']:#x}" for r in self.ram.table))
        self.kernel = Kernel(o.name, poll_us=o.poll_us)
        self.kernel.start()

        if o.incoming is not None:
            from .migration.incoming import IncomingError, run_incoming
            try:
                run_incoming(self, run_dir, control_path, base)
            except IncomingError as e:
                raise BootError(str(e)) from None
        else:
            if o.cid is not None:
                self._boot_vsock(run_dir, control_path, base)
            if o.net is not None:
                self._boot_net(run_dir, control_path, base)
        if o.monitor is not None:
            from .monitor import MonitorServer
            self.monitor = MonitorServer(self, o.monitor)
            self.monitor.start()
        self._start_services()

    def _boot_vsock(self, run_dir, control_path, base, reconnect: bool = False) -> None:
        o = self.opts
        self.vdev = VirtioDevice(self.ram, run_dir, control_path, "vsock", o.name, {"cid": o.cid},
                                 resource_base=f"{base}-vsock", owner=self.owner,
                                 timeout=o.connect_timeout, doorbell=o.doorbell,
                                 packed=o.packed)
        self._connect_waiting(run_dir, reconnect=reconnect)
        self.transport = VirtioVsockTransport(self.kernel, self.vdev, self.ram,
                                              queue_sizes=(o.queue_size, o.queue_size, 8),
                                              credit_policy=o.credit_policy, buf_size=o.buf_size,
                                              rx_buf_size=o.rx_buf_size, capture=self.capture,
                                              **transport_mode(o.credit_policy))
        try:
            with self.kernel.lock:
                self.transport.probe()
        except (ControlError, ConnectionError, TimeoutError, OSError, ValueError) as e:
            raise BootError(f"probing the vsock device failed: {e}") from None
        self.vdev.start_irq_threads(self.stop_event, engine=self.kernel, poll=self.transport.poll_ops,
                                    err_thread=False)       # run() looks at the err doorbells
        self.connected.set()
        log.info("guest %s: vsock device ready, cid %d, features %#x", o.name, o.cid, self.vdev.features)
        self.vsock = GuestVsock(self.transport)

    def _boot_net(self, run_dir, control_path, base, migrated: dict | None = None) -> None:
        """The virtio-net device: its own control connection, rings and doorbells (migrated: the
        state an incoming migration brought; the rings carry on)."""
        o = self.opts
        mac = bytes.fromhex(migrated["mac"]) if migrated else (o.mac or default_mac(os.getpid()))
        vdev = VirtioDevice(self.ram, run_dir, control_path, "net", o.name,
                            {"backend": o.net, "mac": format_mac(mac)},
                            resource_base=f"{base}-net", owner=self.owner, timeout=o.connect_timeout, doorbell=o.doorbell,
                            packed=o.packed)
        try:
            vdev.connect(reconnect=migrated is not None)
        except ControlError as e:
            raise BootError(f"the host refused the net device: {e}") from None
        except (ConnectionError, TimeoutError, OSError) as e:
            raise BootError(str(e)) from None
        dev = VirtioNetDevice(self.kernel, vdev, self.ram, o.ip, queue_size=max(o.queue_size, 64))
        self.devices.append(dev)
        try:
            if migrated is not None:
                dev.resume(migrated)
            else:
                dev.probe()
        except (ControlError, ConnectionError, TimeoutError, OSError) as e:
            raise BootError(f"{'resuming' if migrated else 'probing'} the net device failed: {e}") from None
        vdev.start_irq_threads(self.stop_event, err_thread=False)
        self.net = dev.netdev

    def _connect_waiting(self, run_dir: Path, reconnect: bool = False) -> None:
        """Connect the device's control channel, waiting up to --connect-timeout for a host to
        serve the run dir (its control socket missing or not yet accepting: try again)."""
        end = time.monotonic() + self.opts.connect_timeout
        while True:
            try:
                self.vdev.connect(reconnect=reconnect)
                return
            except ControlError as e:
                raise BootError(f"the host refused the vsock device: {e}") from None
            except ConnectionError as e:
                if self.stop_event.is_set():
                    raise BootError("stopped while waiting for the host") from None
                if time.monotonic() >= end:
                    raise BootError(f"no host is serving {run_dir} after {self.opts.connect_timeout:g} s "
                                    f"(start one with: python -m host --run-dir {run_dir}): {e}") from None
                self.stop_event.wait(CONNECT_RETRY)
            except (TimeoutError, OSError) as e:
                raise BootError(str(e)) from None

    def _start_services(self) -> None:
        for spec in self.opts.services:
            self.services.append(services.start_service(self.vsock, spec))
            log.info("service %s listening on vsock port %d", spec.name, spec.port)
        for spec in self.opts.run:
            self.services.append(services.run_user_function(spec, self.vsock))
            log.info("running %s in the guest", spec)
        for spec in self.opts.net_run:
            self.services.append(services.run_user_function(spec, self.net))
            log.info("running %s in the guest with its net device", spec)

    # --- the host link ----------------------------------------------------------------------------
    def _host_gone(self) -> bool:
        client = self.vdev.client if self.vdev is not None else None
        if client is None or client.closed:
            return True
        if not client._lock.acquire(blocking=False):
            return False                   # a request is in flight: it will see EOF itself
        try:
            r, _, _ = select.select([client.sock], [], [], 0)
            if not r:
                return False
            return client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (OSError, ValueError):
            return True
        finally:
            client._lock.release()

    def _watch_host(self) -> None:
        """Every WATCH_INTERVAL: notice a host that went away, then try to reconnect to it every
        RECONNECT_INTERVAL until one serves the run dir again (on the main thread, in run())."""
        if self.vdev is None:
            return
        if self.connected.is_set():
            if not self._host_gone():
                return
            self.connected.clear()
            self._next_reconnect = 0.0
            log.warning("guest %s: lost the host; reconnecting when it is back", self.opts.name)
        if time.monotonic() < self._next_reconnect:
            return
        try:
            self.vdev.reconnect()
        except (ControlError, ConnectionError, TimeoutError, OSError, RuntimeError) as e:
            log.debug("reconnect failed: %s", e)
            self._next_reconnect = time.monotonic() + RECONNECT_INTERVAL
            return
        self.reconnects += 1
        self.connected.set()
        log.info("guest %s: reconnected to the host", self.opts.name)

    def _check_errors(self) -> None:
        """Every IRQ_POLL, with no lock held (control round trips): the devices' err doorbells
        (SET_VRING_ERR), and the CID after a TRANSPORT_RESET."""
        for vdev in [self.vdev] + [d.vdev for d in self.devices]:
            if vdev is not None:
                vdev.check_errors()
        if self.transport is not None and self.transport.refresh_guest_cid():
            log.info("guest %s: CID %d after a transport reset", self.opts.name, self.transport.guest_cid)

    def write_stats(self) -> None:
        t = self.transport
        if t is None:
            self._write_net_stats()
            return
        stats = dict(t.stats)
        stats.update(rx_buf_nr=getattr(t, "rx_buf_nr", None), queued_replies=getattr(t, "queued_replies", None),
                     send_pkt_list=len(getattr(t, "send_pkt_list", ())),
                     sockets=len(getattr(t.core, "connected", {})) if getattr(t, "core", None) else None,
                     kicks=sum(self.vdev.kicks), interrupts=sum(self.vdev.interrupts))
        if self.kernel is not None:
            stats.update(self.kernel.stats)            # wakeups, handler runs, poll hits and time
        # For monitors: each queue's driver side, the RAM to attach read-only, the connections.
        vdev = self.vdev
        vqs = []
        for i, vq in enumerate(list(getattr(vdev, "vqs", ()))):
            snap = vq.snapshot() if hasattr(vq, "snapshot") else {}
            if snap:
                for key, src in (("kicks", "kicks"), ("interrupts", "interrupts"),
                                 ("kicks_suppressed", "kicks_suppressed")):
                    counts = getattr(vdev, src, None)
                    if counts is not None and i < len(counts):
                        snap[key] = counts[i]
            vqs.append(snap)
        core = getattr(t, "core", None)
        try:        # the kernel's threads change the table meanwhile; a torn read is retried next time
            socks = sorted(getattr(core, "connected", {}).values(), key=lambda sk: (sk.local_port, sk.remote_port))
        except RuntimeError:
            socks = []
        try:
            write_stats(self.opts.run_dir, "guest", {
                "name": self.opts.name, "cid": self.opts.cid, "connected": self.connected.is_set(),
                "reconnects": self.reconnects, "stats": stats,
                "mem_in_use": self.ram.alloc.in_use, "mem_total": self.ram.alloc.total,
                "ram": {"shm": self.ram.name, "size": self.ram.size, "table": self.ram.table},
                "vqs": vqs, "conns": [sk.snapshot() for sk in socks[:64]],
                "device_status": getattr(vdev, "status", None),
                "needs_reset": bool(getattr(vdev, "needs_reset", False)),
                "migration": self.migration_info()})
        except OSError:
            pass

    def migration_info(self) -> dict | None:
        m = self.migration
        if m is None:
            return None
        return {k: v for k, v in m.info.items() if k != "rounds"} | {"rounds": m.info["rounds"][-8:]}

    def _write_net_stats(self) -> None:
        if not self.devices:
            return
        stats = {}
        for dev in self.devices:
            stats.update(dev.stats())
            stats.update(kicks=sum(dev.vdev.kicks), interrupts=sum(dev.vdev.interrupts))
        try:
            write_stats(self.opts.run_dir, "guest", {
                "name": self.opts.name, "cid": None, "connected": True, "reconnects": 0,
                "stats": stats, "mem_in_use": self.ram.alloc.in_use, "mem_total": self.ram.alloc.total,
                "migration": self.migration_info()})
        except OSError:
            pass

    # --- run and shut down ------------------------------------------------------------------------
    def run(self) -> int:
        """The main thread's housekeeping until stopped: the host link, the err doorbells and
        the stats file, each on its period (timers on this thread, not threads of their own)."""
        t0 = time.monotonic()
        jobs = [[t0, IRQ_POLL, self._check_errors], [t0, STATS_INTERVAL, self.write_stats],
                [t0, WATCH_INTERVAL, self._watch_host]]
        while not self.stop_event.is_set():
            now = time.monotonic()
            for job in jobs:
                if now >= job[0]:
                    # on a grid from t0: jobs of the same period stay together (one wake-up)
                    job[0] += job[1] * (1 + int((now - job[0]) // job[1]))
                    try:
                        job[2]()
                    except Exception:       # housekeeping must not take the guest down
                        log.exception("guest %s: %s failed", self.opts.name, job[2].__name__)
            self.stop_event.wait(max(0.0, min(j[0] for j in jobs) - time.monotonic()))
        log.info("guest %s: shutting down", self.opts.name)
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        self.stop_event.set()
        if self.monitor is not None:
            self.monitor.close()
        for svc in self.services:
            try:
                svc.stop()
            except Exception:
                log.exception("stopping a service failed")
        self.services.clear()
        for dev in self.devices:
            try:
                dev.remove()
            except Exception:
                log.exception("removing a device failed")
            dev.vdev.join_irq_threads()
            dev.vdev.close()
        if self.transport is not None and self.kernel is not None:
            try:
                with self.kernel.lock:
                    self.transport.remove()     # reset, detach unused buffers, free, del_vqs
            except (ControlError, ConnectionError, TimeoutError, OSError) as e:
                log.info("device removal without the host: %s", e)
                self._force_del_vqs()
            except Exception:
                log.exception("removing the vsock device failed")
                self._force_del_vqs()
        if self.vdev is not None:
            self.vdev.join_irq_threads()
            self.vdev.close()
        if self.kernel is not None:
            self.kernel.stop()
        if self.capture is not None:
            self.capture.close()
        if self.ram is not None:
            self.ram.close()
        if self.owner is not None:
            self.owner.release_all()         # unlink RAM and every doorbell we recorded
        remove_stats(self.opts.run_dir, "guest")

    def _force_del_vqs(self) -> None:
        try:
            self.vdev.del_vqs()
        except Exception:
            log.debug("del_vqs after a failed remove", exc_info=True)


def wait_for(pred, timeout: float, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
