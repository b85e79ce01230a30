"""One device connection's process: the control session, the device and its vhost worker.

Runs after the daemon forked us with the accepted control socket and the HELLO it already read.
The VhostWorker (shared/engine.py) runs control messages from the socket, queued work, timers and
the device's own file objects (the vsock bridge) on this process's main thread; each queue's kick
doorbell has a thread of its own that runs the device's handler itself (KickPollers). All of them
hold the one device lock, so device state never sees two threads at once.

Lifetime: the connection's EOF (guest gone or closed), an error reply that closes the session, or
SIGTERM from the daemon ends the worker; then pollers are stopped *before* the device releases its
doorbells and memory, and the process exits.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
from functools import partial

from shared.constants import VIRTIO_CONFIG_S_DRIVER_OK
from shared.errors import ProtocolError
from shared.stats import remove_stats, write_stats

from host.control_session import ControlSession, attach_shm_memory
from host.worker import VhostWorker

log = logging.getLogger("host.device")


class KickPollers:
    """One engine doorbell thread per kick doorbell (vhost_poll): the thread that wakes runs the
    device's handler itself, under the device lock, and with --poll-us polls the ring for a while
    before it sleeps again. Queues whose driver gave them one doorbell between them (the guest's
    kick_alias: vsock's rx and event queues) share one thread, which looks at each of them."""

    def __init__(self, worker: VhostWorker, device):
        self.worker = worker
        self.device = device
        self.threads: dict[tuple, tuple[object, object]] = {}   # queues -> (DoorbellThread, doorbell)
        self._done: dict[int, tuple[int, int]] = {}   # counters of stopped threads, per queue

    @staticmethod
    def _key(db) -> object:
        return getattr(db, "name", None) or id(db)

    def sync(self) -> None:
        """Match the pollers to the device's current kick doorbells (after every control message).

        Runs with the device lock held: stopping a poller only flags it (it exits within the
        engine's wait timeout), and a doorbell closed under a waiter is closed when it leaves."""
        dev = self.device
        live = dev.running and dev.status & VIRTIO_CONFIG_S_DRIVER_OK
        groups: dict[object, list[int]] = {}
        for i in range(dev.num_queues):
            db = dev.kicks[i] if live else None
            if db is not None:
                groups.setdefault(self._key(db), []).append(i)
        want = {tuple(qs): dev.kicks[qs[0]] for qs in groups.values()}
        for qs in list(self.threads):
            cur = self.threads[qs]
            if qs in want and self._key(cur[1]) == self._key(want[qs]) and cur[1] is dev.kicks[qs[0]]:
                continue
            self._stop(qs)
        for qs, db in want.items():
            if qs in self.threads:
                continue
            if len(qs) == 1:
                i = qs[0]
                t = self.worker.add_doorbell(db, partial(dev.kick_received, i),
                                             poll=dev.poll_ops(i), name=f"kick-q{i}")
            else:
                t = self.worker.add_doorbell(db, partial(self._shared_kick, qs),
                                             poll=dev.poll_ops(qs[0]),
                                             name="kick-q" + "+".join(map(str, qs)))
            self.threads[qs] = (t, db)
            for i in qs:
                dev.kick_threads[i] = t

    def _shared_kick(self, queues: tuple) -> None:
        for i in queues:
            self.device.kick_received(i)

    def _stop(self, qs: tuple) -> None:
        t, _ = self.threads.pop(qs)
        for i in qs:
            if self.device.kick_threads.get(i) is t:
                del self.device.kick_threads[i]
        self.worker.remove_doorbell(t)
        for i in qs:
            w, p = self._done.get(i, (0, 0))
            self._done[i] = (w + t.wakeups, p + t.polled_ns)

    def queue_stats(self) -> dict:
        """Per queue, for monitors: kick wake-ups of its doorbell thread, seconds spent polling."""
        n = self.device.num_queues
        wake, poll = [0] * n, [0.0] * n
        for i in range(n):
            w, p = self._done.get(i, (0, 0))
            for qs, (t, _) in self.threads.items():
                if i in qs:
                    w, p = w + t.wakeups, p + t.polled_ns
            wake[i], poll[i] = w, p / 1e9
        return {"vq_wakeups": wake, "vq_poll_time": poll}

    def stop_all(self) -> None:
        threads = [t for t, _ in self.threads.values()]
        for qs in list(self.threads):
            self._stop(qs)
        for t in threads:
            t.join()


class DeviceProcess:
    def __init__(self, conn: socket.socket, hello: dict, peer_pid: int, opts, decoder=None, rest=()):
        self.conn = conn
        self.hello = hello
        self.peer_pid = peer_pid
        self.opts = opts
        self.worker = VhostWorker(name=f"{hello['device']}-{hello['guest']}",
                                  poll_us=getattr(opts, "poll_us", 0))
        self.device = None
        self.session = ControlSession(self._make_device, attach_memory=attach_shm_memory,
                                      name=f"control[{hello['guest']}]")
        if decoder is not None:
            self.session.decoder = decoder     # bytes the daemon already read stay in order
        self.rest = list(rest)
        self.pollers: KickPollers | None = None
        self.endpoint = None           # in-device services and --run programs
        self.capture = None
        self._out = bytearray()

    # --- device construction (ControlSession's device_factory) -------------------------------------
    def _make_device(self, hello: dict):
        from host.devices import DEVICE_KINDS
        kind = DEVICE_KINDS.get(hello["device"])
        if kind is None:
            raise ProtocolError(f"unknown device type {hello['device']!r}", "ENODEV")
        dev = kind.make(hello, self.opts, self.worker, self)
        dev.max_queue_size = self.opts.max_queue_size
        dev.worker = self.worker
        dev.lock = self.worker.lock          # one big lock: engine work, kicks, control, programs
        dev.hello = hello
        self.device = dev
        if (self.opts.services or self.opts.run) and hasattr(dev, "start_hooks"):
            from host.vsock.endpoint import HostEndpoint
            self.endpoint = HostEndpoint(dev, self.opts.services, self.opts.run)
        self.pollers = KickPollers(self.worker, dev)
        return dev

    # --- the control socket ---------------------------------------------------------------------
    def _send(self, chunks: list[bytes]) -> None:
        for c in chunks:
            self._out += c
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = self.conn.send(self._out)
            except BlockingIOError:
                self.worker.modify(self.conn, 3, self._on_control)   # EVENT_READ | EVENT_WRITE
                return
            except OSError:
                self._out.clear()
                self.worker.stop()
                return
            del self._out[:n]
        self.worker.modify(self.conn, 1, self._on_control)

    def _on_control(self, mask: int) -> None:
        if mask & 2:
            self._flush()
        if not mask & 1:
            return
        try:
            data = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.info("guest %r (pid %d) closed its control connection", self.hello["guest"], self.peer_pid)
            self.worker.stop()
            return
        replies, close = self.session.feed(data)
        self._send(replies)
        self._after_control()
        if close:
            log.warning("closing the control connection of guest %r: %s", self.hello["guest"],
                        self.session.error or "session closed")
            self.worker.stop()

    def _after_control(self) -> None:
        if self.pollers is not None:
            self.pollers.sync()

    # --- stats for the monitor ------------------------------------------------------------------
    def _write_stats(self) -> None:
        dev = self.device
        try:
            write_stats(self.opts.run_dir, "device", {
                "guest": self.hello["guest"], "device": self.hello["device"],
                "cid": self.hello.get("params", {}).get("cid"), "guest_pid": self.peer_pid,
                "status": dev.status if dev else 0, "pid": os.getpid(),
                "stats": dict(dev.get_stats() if dev else {}, **self.worker.stats,
                              **(self.pollers.queue_stats() if self.pollers else {}))})
        except OSError as e:
            log.debug("cannot write stats: %s", e)
        if not self.worker.stopping:
            self.worker.call_later(self.opts.stats_interval, self._write_stats)

    # --- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.worker.stop())
        self.conn.setblocking(False)
        from shared.control import encode
        replies = []
        for msg in [self.hello] + self.rest:
            reply, close = self.session.handle(msg)
            replies.append(encode(reply))
            if close:
                break
        self.worker.register(self.conn, 1, self._on_control)
        self._send(replies)
        if close:
            self.worker.stop()
        self._after_control()
        self._write_stats()
        try:
            self.worker.run()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()          # no services re-listen while the device goes down
        if self.pollers is not None:
            self.pollers.stop_all()        # before the device closes the doorbells they wait on
        try:
            self.session.close()           # device.close(): stop, reset, release memory
        except Exception:
            log.exception("releasing the device failed")
        if self.capture is not None:
            self.capture.close()
        try:
            self.conn.close()
        except OSError:
            pass
        remove_stats(self.opts.run_dir, "device")


def run_device(conn: socket.socket, hello: dict, peer_pid: int, opts, decoder=None, rest=()) -> int:
    return DeviceProcess(conn, hello, peer_pid, opts, decoder, rest).run()
