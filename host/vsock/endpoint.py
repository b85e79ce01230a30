"""The in-device host endpoint: programs inside a host device process using the guest's socket API.

Theory of operation
-------------------
On Linux a host program opens an AF_VSOCK socket and talks to a guest through kernel vhost-vsock;
here the counterpart runs inside the device process that serves one guest (host/runner.py),
directly over that device's own `VsockCore` (local CID 2), with no Unix bridge and no extra process
in between. `HostVsock(device)` is the host family of the one socket layer (shared/vsock/socket.py):

    lock          device.lock (the worker holds it around every core call: kicks, do_send_pkt,
                  timers, the bridge)
    current_core  device.core, which VhostVsock.stop() replaces with a fresh core
    up            device.running and not device.broken (DRIVER_OK, no NEEDS_RESET)
    local_cid     2 (VMADDR_CID_HOST)
    call_later    device.worker.call_later, the callback wrapped to run with device.lock held
    cancel_pkt    VhostVsock.cancel_pkt (vhost_transport_cancel_pkt)

A guest reset or reconnect stops the device: HostVsock's stop hook resets the old core's
connected sockets (ECONNRESET) and wakes its listeners, which then fail with ENODEV (their core
is stale). Whoever listens must listen again on the next start: `HostEndpoint` does that for the
built-in services (shared/vsock/services.py) on every start (DRIVER_OK), and starts the `--run`
user functions once, at the first start, each in a thread of its own with the HostVsock as its
argument (a user function that outlives a reset sees its sockets fail and opens new ones).

A service listening on port P wins over the bridge: the core looks up its bound table before it
asks the bridge's `unbound_request` hook, so a guest connecting to CID 2 port P reaches the
service, and other ports still reach `<run-dir>/vsock-<cid>.sock_<P>` programs.

Hooks run on the worker thread with device.lock held: nothing here blocks in them (services are
stopped without joining their threads; their threads end on their own when their sockets fail).
"""
from __future__ import annotations

import errno
import logging
import threading

from shared.constants import VMADDR_CID_HOST, VSOCK_VQ_TX
from shared.vsock import services as svc
from shared.vsock.socket import VsockFamily, reset_core

log = logging.getLogger(__name__)


class HostVsock(VsockFamily):
    """AF_VSOCK for programs in the device process of one guest (the host side, CID 2)."""

    what = "vhost-vsock device"

    def __init__(self, device):
        self.device = device
        self.lock = device.lock
        self.batch = device.batch       # the fast path: one interrupt per send (the device's, for good)
        self.up_event = threading.Event()
        device.start_hooks.append(self._started)
        device.stop_hooks.append(self._stopped)
        if device.running:
            self.up_event.set()

    # --- the family interface ------------------------------------------------------------------
    @property
    def current_core(self):
        return self.device.core

    @property
    def up(self) -> bool:
        d = self.device
        return bool(d.running and not d.broken)

    @property
    def local_cid(self) -> int:
        return VMADDR_CID_HOST

    @property
    def guest_cid(self) -> int:
        """The CID of the guest this device serves (where connect() should go)."""
        return self.device.guest_cid

    def call_later(self, delay: float, fn):
        lock = self.lock

        def locked() -> None:
            with lock:
                fn()
        worker = self.device.worker
        if worker is None:
            raise OSError(errno.ENODEV, "the device has no worker to run timers")
        return worker.call_later(delay, locked)

    def cancel_pkt(self, sk) -> int:
        return self.device.cancel_pkt(sk)

    # --- the fast path: waiting calls serve the tx ring -------------------------------------------
    @property
    def stats(self) -> dict:
        return getattr(self.device.worker, "stats", {})

    def doorbell(self):
        """The tx queue's kick doorbell thread: a waiting call serves the tx ring itself."""
        return self.device.kick_threads.get(VSOCK_VQ_TX)

    def wait_up(self, timeout: float | None = None) -> bool:
        """Wait until the device is running (DRIVER_OK); False on timeout."""
        return self.up_event.wait(timeout) and self.up

    # --- device hooks (worker thread, device.lock held) ----------------------------------------
    def _started(self) -> None:
        self.up_event.set()

    def _stopped(self, old_core) -> None:
        self.up_event.clear()
        reset_core(old_core, errno.ECONNRESET)

    def __repr__(self) -> str:
        return f"<HostVsock of guest CID {self.device.guest_cid}{'' if self.up else ' (down)'}>"


class HostEndpoint:
    """Built-in services (re-listened on every start) and user functions in one device process."""

    def __init__(self, device, services=(), run=()):
        self.vsock = HostVsock(device)
        self.specs = [s if isinstance(s, svc.ServiceSpec) else svc.parse_service(s)
                      for s in services]
        self.run_specs = list(run)
        self.services: list[svc.Service] = []
        self.tasks: list[svc.UserTask] = []
        self.closed = False
        device.start_hooks.append(self._started)
        device.stop_hooks.append(self._stopped)
        if device.running:
            self._started()

    def _started(self) -> None:
        if self.closed:
            return
        for spec in self.specs:
            try:
                self.services.append(svc.Service(self.vsock, spec))
                log.info("host service %s listening on vsock port %d (guest CID %d)", spec.name,
                         spec.port, self.vsock.guest_cid)
            except OSError as e:
                log.error("host service %s on port %d: %s", spec.name, spec.port, e)
        if not self.tasks:
            for spec in self.run_specs:
                self.tasks.append(svc.run_user_function(spec, self.vsock))
                log.info("running %s in the device process of guest CID %d", spec,
                         self.vsock.guest_cid)

    def _stopped(self, old_core=None) -> None:
        services, self.services = self.services, []
        for s in services:
            s.stop(timeout=0.0)        # closes listener and connections; threads end by themselves

    def close(self) -> None:
        self.closed = True
        with self.vsock.lock:
            self._stopped()


__all__ = ["HostVsock", "HostEndpoint"]
