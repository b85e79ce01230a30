"""The host daemon: accepts device connections and runs each device in a process of its own.

    parent (this module's Daemon.serve)
      listens on <run-dir>/control.sock; for each connection reads the first message (HELLO),
      checks it (version, device type, and the resources the device claims from host/devices.py:
      a vsock CID, a tap, a MAC: valid and not in use), then
      forks a device process and forgets the socket. It reaps children, frees their CIDs, reaps
      the resources of dead guests (shared.resources.reap), and on SIGINT/SIGTERM stops them all.
    device process (host/runner.py run_device)
      one DeviceRunner: the engine's thread runs the control socket, the device's own file
      objects and selectable kicks; a semaphore kick doorbell has a thread of its own. A guest's mistakes mark only its device
      NEEDS_RESET; a guest that dies (control EOF) only ends its own device process.

A process per device keeps one guest's work off every other guest's GIL.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from shared import control
from shared.errors import ProtocolError
from shared.ratelimit import RateLimitedLog
from shared import unixsock
from shared.resources import ensure_run_dir, reap
from shared.stats import prune as prune_stats
from shared.vsock.pcap import PcapWriter

from host.devices import DEVICE_KINDS
from host.runner import Children, exit_status, run_device

log = logging.getLogger("host")

HELLO_TIMEOUT = 5.0
SUPPORTED_DEVICES = tuple(DEVICE_KINDS)


@dataclass
class HostOptions:
    run_dir: Path
    pcap: Path | None = None
    credit_policy: str = "half-window"
    dialect: str = "firecracker"
    max_queue_size: int = 1024
    stats_interval: float = 0.5
    poll_us: int = 0
    doorbell: str = "any"                          # native doorbell kinds accepted: any, sem, eventfd
    buf_size: int = 1 << 20
    services: list = field(default_factory=list)   # [ServiceSpec]: in-device services per guest
    run: list = field(default_factory=list)        # ["module:function"]: run in each device process
    packed: bool = False                           # offer VIRTIO_F_RING_PACKED (--packed)


@dataclass
class Child:
    pid: int
    device: str
    guest: str
    cid: int | None
    claims: list = field(default_factory=list)


def peer_pid(sock: socket.socket) -> int:
    """The connecting process's pid from SO_PEERCRED (not what it claims)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def send_msg(sock: socket.socket, msg: dict) -> None:
    try:
        sock.sendall(control.encode(msg))
    except OSError:
        pass


def read_hello(sock: socket.socket, timeout: float = HELLO_TIMEOUT) -> tuple[dict, control.Decoder, list]:
    """Read up to the first message, which must be HELLO.

    Returns (hello, the connection's decoder, messages that followed in the same read): the
    device process carries on with the same decoder, so nothing pipelined after HELLO is lost.
    """
    dec = control.Decoder()
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    while True:
        if time.monotonic() > end:
            raise ProtocolError("no HELLO within %.0f s" % timeout, "ETIMEDOUT")
        try:
            data = sock.recv(65536)
        except socket.timeout:
            raise ProtocolError("no HELLO within %.0f s" % timeout, "ETIMEDOUT") from None
        if not data:
            raise ProtocolError("connection closed before HELLO", "ECONNRESET")
        msgs = dec.feed(data)
        if msgs:
            return msgs[0], dec, msgs[1:]


class Daemon:
    def __init__(self, opts: HostOptions):
        self.opts = opts
        self.run_dir = ensure_run_dir(opts.run_dir)
        self.path = self.run_dir / "control.sock"
        self.children = Children(self._ended)   # device process pid -> Child
        self.claims: dict[str, int] = {}        # "cid:3", "tap:tap0", "mac:..." -> device process pid
        self._stop = False
        self.listener: socket.socket | None = None
        self._refusals = RateLimitedLog()

    # --- setup --------------------------------------------------------------------------------
    def bind(self) -> None:
        unixsock.claim(self.path, f"host: another host is already serving {self.run_dir}")
        if self.opts.pcap:
            try:
                PcapWriter(self.opts.pcap).close()   # the file header; device processes append records
            except OSError as e:
                raise SystemExit(f"host: cannot write the capture {self.opts.pcap}: {e.strerror or e}") from None
        self.listener = unixsock.listen(self.path, 64)
        n = reap(self.run_dir)
        if n:
            log.info("reaped %d dead owner(s) in %s", n, self.run_dir)
        log.info("host listening on %s", self.path)

    def request_stop(self, *_: object) -> None:
        self._stop = True

    # --- the accept loop ------------------------------------------------------------------------
    def serve(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        try:
            while not self._stop:
                for _ in sel.select(0.2):
                    self._accept()
                self._reap_children()
        finally:
            sel.close()
            self.shutdown()
        return 0

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        seq = None               # the request's seq once we have one; nil until then (PROTOCOL.md 2, 7)
        try:
            pid = peer_pid(conn)
            hello, decoder, rest = read_hello(conn)
            if isinstance(hello.get("seq"), int):
                seq = hello["seq"]
            if hello["op"] != "HELLO":
                raise ProtocolError(f"the first message must be HELLO, not {hello['op']}")
            claims = self._check_hello(hello)
        except ProtocolError as e:
            # a client that closes before HELLO (a readiness probe) is not worth a warning;
            # refusals a hostile client can repeat are rate-limited (the first, then counts)
            if e.code == "ECONNRESET":
                log.info("refused a connection: %s", e)
            else:
                self._refusals.log(log, f"refused a connection: {e}")
            if getattr(e, "seq", None) is not None:
                seq = e.seq          # an invalid HELLO whose seq could be read
            send_msg(conn, control.error_reply(seq, e.code, str(e)))
            conn.close()
            return
        except (OSError, ValueError, msgpack.ExtraData) as e:
            log.warning("refused a connection: %s", e)
            conn.close()
            return
        cid = next((int(k[4:]) for k in claims if k.startswith("cid:")), None)
        child = self._spawn(conn, hello, pid, cid, decoder, rest)
        conn.close()
        if child is not None:
            child.claims = claims
            self.children[child.pid] = child
            for key in claims:
                self.claims[key] = child.pid
            log.info("guest %r (pid %d): %s device in process %d%s", hello["guest"], pid,
                     hello["device"], child.pid, f", cid {cid}" if cid is not None else "")

    def _check_hello(self, hello: dict) -> list:
        if hello["version"] != control.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {hello['version']} is not supported "
                                f"(this host speaks {control.PROTOCOL_VERSION})", "ENOTSUP")
        if hello["device"] not in SUPPORTED_DEVICES:
            raise ProtocolError(f"unknown device type {hello['device']!r}", "ENODEV")
        kind = DEVICE_KINDS[hello["device"]]
        params = hello["params"] if isinstance(hello.get("params"), dict) else {}
        claims = kind.claims(params)
        for key in claims:
            if key in self.claims:
                other = self.children.get(self.claims[key])
                what = f"CID {key[4:]}" if key.startswith("cid:") else key
                raise ProtocolError(f"{what} is already in use by guest "
                                    f"{other.guest if other else '?'!r}", "EADDRINUSE")
        return claims

    def _spawn(self, conn: socket.socket, hello: dict, peer: int, cid: int | None,
               decoder: control.Decoder, rest: list) -> Child | None:
        try:
            pid = self.children.fork(lambda: run_device(conn, hello, peer, self.opts, decoder, rest),
                                     close=[self.listener])
        except OSError as e:
            log.error("fork failed: %s", e)
            send_msg(conn, control.error_reply(hello.get("seq", 0), "EAGAIN", f"host cannot fork: {e}"))
            return None
        return Child(pid, hello["device"], hello["guest"], cid)

    def _ended(self, pid: int, child: Child, status: int) -> None:
        for key in child.claims:
            if self.claims.get(key) == pid:
                del self.claims[key]
        log.info("device process %d (%s of guest %r) ended, %s", pid, child.device, child.guest,
                 exit_status(status))

    def _reap_children(self) -> None:
        if self.children.reap():
            reap(self.run_dir)
            prune_stats(self.run_dir)     # snapshots of device processes that were killed

    def shutdown(self) -> None:
        self.children.stop()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        reap(self.run_dir)
        prune_stats(self.run_dir)
        log.info("host stopped")


__all__ = ["Daemon", "HostOptions", "peer_pid", "read_hello"]
