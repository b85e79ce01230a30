"""Unix stream sockets the host listens on (control socket, vhost-user sockets, vsock bridges).

`claim(path, busy)` makes the path free for us: a socket file that no longer accepts connections
is a dead process's and is removed; one that still accepts means another process serves it, and
SystemExit(busy) says so in one line. `listen(path, backlog)` binds a new socket there with mode
0600 (the umask is narrowed around bind, so the file never exists with wider permissions) and
returns it listening and non-blocking. `unlink(path)` removes our socket file, if it is there.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def claim(path: Path, busy: str) -> None:
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()                    # stale: its process is gone
    else:
        raise SystemExit(busy)
    finally:
        probe.close()


def listen(path: Path, backlog: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    except OSError:
        s.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(backlog)
    s.setblocking(False)
    return s


def unlink(path: Path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
