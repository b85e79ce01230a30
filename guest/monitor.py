"""The guest's monitor socket (QMP's shape, msgpack instead of JSON): one request map per message,
one reply map.

    {"execute": "migrate", "arguments": {"uri": "unix:/path", "downtime_ms": 300, "max_rounds": 30}}
        -> {"return": {}}      the migration runs on its own thread; poll query-migrate
    {"execute": "query-migrate"}  -> {"return": {"status": "active", "round": 3, ...}}
    {"execute": "query-status"}   -> {"return": {"name": ..., "running": true}}
    anything else                 -> {"error": {"class": "CommandNotFound", "desc": "..."}}

The socket is created 0600 by the guest and unlinked when it exits. It never replaces a file,
except a stale socket whose guest died (nobody accepts on it: `stale_socket`).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import msgpack

log = logging.getLogger("guest.monitor")


def _error(cls: str, desc: str) -> dict:
    return {"error": {"class": cls, "desc": desc}}


def stale_socket(path: Path) -> bool:
    """True when `path` is a Unix socket nobody listens on (its guest was killed)."""
    import stat
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except OSError:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()


class MonitorServer:
    def __init__(self, vm, path: Path):
        self.vm = vm
        self.path = Path(path)
        if stale_socket(self.path):
            self.path.unlink()
        if self.path.exists():
            raise OSError(f"monitor socket {self.path} already exists")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="monitor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        unp = msgpack.Unpacker(raw=False, max_buffer_size=1 << 20)
        conn.settimeout(0.5)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    unp.feed(data)
                    msgs = list(unp)
                except (ValueError, msgpack.UnpackException, msgpack.BufferFull):
                    conn.sendall(msgpack.packb(_error("GenericError", "malformed request")))
                    return
                for m in msgs:
                    try:
                        rep = self.execute(m)
                    except Exception as e:  # noqa: BLE001 - one reply, never a dead monitor
                        log.debug("monitor command failed", exc_info=True)
                        rep = _error("GenericError", f"{type(e).__name__}: {e}")
                    conn.sendall(msgpack.packb(rep, use_bin_type=True))

    def execute(self, m) -> dict:
        if not isinstance(m, dict) or not isinstance(m.get("execute"), str):
            return _error("GenericError", "a request is a map with an 'execute' string")
        cmd, args = m["execute"], m.get("arguments") or {}
        if not isinstance(args, dict):
            return _error("GenericError", "'arguments' must be a map")
        vm = self.vm
        if cmd == "query-status":
            return {"return": {"name": vm.opts.name, "running": not vm.migrated,
                               "status": "postmigrate" if vm.migrated else "running"}}
        if cmd == "query-migrate":
            return {"return": dict(vm.migration.info) if vm.migration else {}}
        if cmd == "migrate":
            from .migration.source import Migration
            if vm.migration is not None and vm.migration.info["status"] in ("setup", "active", "device"):
                return _error("GenericError", "a migration is already in progress")
            if vm.migrated:
                return _error("GenericError", "this guest already migrated away")
            uri = args.get("uri")
            if not isinstance(uri, str):
                return _error("GenericError", "migrate needs 'uri' (unix:PATH)")
            try:
                mig = Migration(vm, uri, downtime_ms=float(args.get("downtime_ms", 300)),
                                max_rounds=int(args.get("max_rounds", 30)))
            except (ValueError, TypeError) as e:
                return _error("GenericError", str(e))
            vm.migration = mig
            mig.start()
            return {"return": {}}
        return _error("CommandNotFound", f"the command {cmd} has not been found")
