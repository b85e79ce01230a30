"""The destination side (QEMU -incoming): listen, take the stream into guest RAM, then set the
devices up from the migrated state and resume them.

    net    the rings carry on: the same rings in the migrated RAM, the driver's queue state
           restored (vmstate.restore_vq), SET_VRING_BASE from the source's GET_VRING_BASE, then
           DRIVER_OK; the guest announces itself (gratuitous ARP, what VIRTIO_NET_F_GUEST_ANNOUNCE
           asks a driver to do; we have no control queue, so the driver does it on resume)
    vsock  the source's vsock allocations are freed and a vsock device is probed on the new host
           (HELLO reconnect): its TRANSPORT_RESET resets connected sockets; listening services
           listen again; the CID is kept (the same --cid)

Programs in the guest (--service, --run, --net-run) are Python, not guest RAM: they start again on
the destination as after a boot (a difference from a real guest, whose processes live in RAM).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from .pages import PAGE_SIZE, PageMap
from .stream import VERSION, Stream, StreamError, parse_uri
from . import vmstate

log = logging.getLogger("guest.migration")


class IncomingError(Exception):
    """The incoming migration failed (one line for the user)."""


def listen(uri: str) -> tuple[socket.socket, Path]:
    path = Path(parse_uri(uri))
    if path.exists():
        raise IncomingError(f"{path} already exists (another incoming guest?); remove it or pick another")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
    except OSError as e:
        s.close()
        raise IncomingError(f"cannot listen on {path}: {e}") from None
    s.listen(1)
    return s, path


def accept(lsock: socket.socket, stop) -> socket.socket:
    lsock.settimeout(0.2)
    while True:
        if stop():
            raise IncomingError("stopped while waiting for the migration")
        try:
            conn, _ = lsock.accept()
            conn.settimeout(None)
            return conn
        except socket.timeout:
            continue


def check_hello(msg: dict, vm) -> str | None:
    """Why this guest cannot take the migration (None: it can): QEMU's 'same command line'."""
    o = vm.opts
    if msg.get("version") != VERSION:
        return f"stream version {msg.get('version')} (we speak {VERSION})"
    if msg.get("mem") != vm.ram.size:
        return f"source RAM is {msg.get('mem')} bytes, ours {vm.ram.size} (use the same --mem)"
    mine = [{k: v for k, v in r.items() if k != "shm"} for r in vm.ram.table]
    if msg.get("table") != mine:
        return "the memory tables differ"
    devs = msg.get("devices") or {}
    src_cid = (devs.get("vsock") or {}).get("cid")
    if src_cid != o.cid:
        return f"source vsock CID {src_cid}, ours {o.cid} (the CID is kept: use the same --cid)"
    net = devs.get("net") or []
    if len(net) != (1 if o.net else 0) or (net and net[0].get("backend") != o.net):
        return f"source net devices {net}, ours {o.net!r} (use the same --net)"
    return None


def receive(vm, stream: Stream, stop) -> dict:
    """hello .. state: RAM written as it comes; returns the state message."""
    hello = stream.expect("hello", None, stop)
    why = check_hello(hello, vm)
    if why:
        stream.send("error", message=why)
        raise IncomingError(f"refused the migration: {why}")
    stream.send("ready")
    pm = PageMap(vm.ram.table)
    seg = vm.ram._shm.buf
    pages = 0
    while True:
        msg = stream.recv(None, stop)
        if msg["t"] == "state":
            log.info("incoming migration: %d pages received", pages)
            return msg
        if msg["t"] != "pages":
            raise StreamError(f"unexpected {msg['t']} message")
        data = msg["data"]
        part = msg["pages"]
        if not isinstance(data, bytes) or len(data) != PAGE_SIZE * len(part):
            raise StreamError("a pages message whose data does not match its pages")
        for k, p in enumerate(part):
            try:
                o = pm.offset(p)
            except (ValueError, TypeError):
                raise StreamError(f"page {p!r} is not guest RAM") from None
            seg[o:o + PAGE_SIZE] = data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
        pages += len(part)


def run_incoming(vm, run_dir, control_path, base) -> None:
    """VM.boot's path for --incoming: everything up to resumed devices (services start after)."""
    o = vm.opts
    lsock, path = listen(o.incoming)
    log.info("guest %s: waiting for an incoming migration on %s", o.name, path)
    stop = vm.stop_event.is_set
    try:
        conn = accept(lsock, stop)
        stream = Stream(conn)
        try:
            state = receive(vm, stream, stop)
            t = time.monotonic()
            try:
                resume(vm, state, run_dir, control_path, base)
            except Exception as e:
                stream.send("error", message=f"resuming on the destination failed: {e}")
                raise
            ms = (time.monotonic() - t) * 1000
            stream.send("resumed", ms=round(ms, 1))
            log.info("guest %s: resumed after an incoming migration (%.1f ms to resume)", o.name, ms)
        except StreamError as e:
            raise IncomingError(f"incoming migration failed: {e}") from None
        finally:
            stream.close()
    finally:
        lsock.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def resume(vm, state: dict, run_dir, control_path, base) -> None:
    devs = state["devices"]
    vmstate.load_alloc(vm.ram.alloc, state["alloc"])
    vs = devs.get("vsock")
    if vs is not None:
        for g in vs["blocks"]:
            if g in vm.ram.alloc._used:
                vm.ram.alloc.free(g)
        vm._boot_vsock(run_dir, control_path, base, reconnect=True)
    for st in devs.get("net") or []:
        vm._boot_net(run_dir, control_path, base, migrated=st)
