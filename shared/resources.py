"""Names, ownership records and reaping of our shared-memory segments and semaphores.

Every name of ours starts with "ve-" followed by 16 random hex digits (unguessable), so nothing
else on the machine is touched. A process that creates resources first writes an owner record,
`<run-dir>/owners/<pid>-<starttime>.json`, listing the names it is about to create; it removes
the record after unlinking them on a clean exit. Any host or guest that starts, and the host
whenever a guest disappears, calls `reap(run_dir)`: records whose process is gone (or whose pid
was reused: the start time differs) have their resources unlinked and the record deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import warnings
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import posix_ipc

log = logging.getLogger(__name__)
PREFIX = "ve-"


def new_token() -> str:
    return secrets.token_hex(8)


def run_tag(run_dir) -> str:
    """8 hex digits naming a run dir, so a test (or an operator) can tell whose names are whose."""
    return hashlib.blake2s(str(Path(run_dir).resolve()).encode(), digest_size=4).hexdigest()


def resource_base(run_dir) -> str:
    """The stem of a new set of names: "ve-<run tag>-<16 random hex digits>"."""
    return f"{PREFIX}{run_tag(run_dir)}-{new_token()}"


def default_run_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "virtio-emu"
    return Path(f"/tmp/virtio-emu-{os.getuid()}")


class RunDirError(Exception):
    """The run directory cannot be used (one line, for the user)."""


def ensure_run_dir(path: Path) -> Path:
    """Make the run directory (0700) or check an existing one; never change one we did not make.

    An existing directory must be a directory owned by us, not writable by group or others
    (a shared directory like /tmp would let another user replace our sockets and records) and
    writable by us; otherwise RunDirError says why. Its owners/ subdirectory is created 0700.
    """
    path = Path(path)
    if not str(path).strip() or str(path) == ".":
        raise RunDirError("the run directory must not be empty or '.' (give a path of its own)")
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise RunDirError(f"cannot create run directory {path}: {e.strerror or e}") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise RunDirError(f"cannot use run directory {path}: {e.strerror or e}") from None
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run directory {path} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise RunDirError(f"run directory {path} belongs to uid {st.st_uid}, not to us; "
                          f"give a new path (it is created 0700), e.g. {path / 'virtio-emu'}")
    if st.st_mode & 0o022:
        raise RunDirError(f"run directory {path} is writable by other users (mode "
                          f"{_stat.S_IMODE(st.st_mode):04o}); give a new path (it is created 0700), "
                          f"e.g. {path / 'virtio-emu'}, or a private directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {path} is not writable by us")
    try:
        (path / "owners").mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {path / 'owners'}: {e.strerror or e}") from None
    return path


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat, or None if the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] == b"Z":
        return None
    return int(rest[19])


# --- shared memory with the 3.11 resource-tracker pitfall handled ---------------------------------
def _untrack(shm: shared_memory.SharedMemory) -> None:
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - tracker not running
        pass


def create_shm(name: str, size: int) -> shared_memory.SharedMemory:
    """Create a 0600 segment owned by our records (not by multiprocessing's tracker)."""
    shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    _untrack(shm)
    return shm


def attach_shm(name: str) -> shared_memory.SharedMemory:
    """Attach without letting the resource tracker unlink the owner's segment at our exit."""
    if not name.startswith(PREFIX) or "/" in name or len(name) > 64:
        raise ValueError(f"shared memory name {name!r} is not one of ours")
    shm = shared_memory.SharedMemory(name=name, create=False)
    _untrack(shm)
    return shm


def close_shm(shm: shared_memory.SharedMemory) -> bool:
    """Close, tolerating views that are still alive elsewhere (the mapping then dies with us)."""
    try:
        shm.close()
        return True
    except BufferError:
        log.debug("shared memory %s still has live views; left mapped", shm.name)
        return False


def unlink_shm(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory("/" + name.lstrip("/"))
    except posix_ipc.ExistentialError:
        pass


def unlink_sem(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass


# --- owner records --------------------------------------------------------------------------------
class OwnerRecord:
    """What this process created (or is about to create) under a run dir."""

    def __init__(self, run_dir: Path, role: str):
        self.run_dir = Path(run_dir)
        self.pid = os.getpid()
        self.start = proc_starttime(self.pid)
        self.role = role
        self.shm: list[str] = []
        self.sems: list[str] = []
        self.path = self.run_dir / "owners" / f"{self.pid}-{self.start}.json"

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "start": self.start, "role": self.role,
                                   "shm": self.shm, "sems": self.sems}))
        os.replace(tmp, self.path)

    def add(self, shm: list[str] = (), sems: list[str] = ()) -> None:
        """Record names *before* creating them, so a SIGKILL in between leaks nothing."""
        self.shm.extend(shm)
        self.sems.extend(sems)
        self._save()

    def remove(self, shm: list[str] = (), sems: list[str] = ()) -> None:
        for n in shm:
            if n in self.shm:
                self.shm.remove(n)
        for n in sems:
            if n in self.sems:
                self.sems.remove(n)
        self._save()

    def release_all(self) -> None:
        for n in self.shm:
            unlink_shm(n)
        for n in self.sems:
            unlink_sem(n)
        self.shm, self.sems = [], []
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def reap(run_dir: Path) -> int:
    """Unlink the resources of every dead owner under run_dir. Returns how many owners were reaped."""
    owners = Path(run_dir) / "owners"
    reaped = 0
    if not owners.is_dir():
        return 0
    for rec in owners.glob("*.json"):
        try:
            data = json.loads(rec.read_text())
            pid, start = int(data["pid"]), data["start"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if proc_starttime(pid) == start and start is not None:
            continue  # alive
        for n in data.get("shm", []):
            unlink_shm(n)
        for n in data.get("sems", []):
            unlink_sem(n)
        try:
            rec.unlink()
        except FileNotFoundError:
            pass
        reaped += 1
        log.info("reaped resources of dead %s pid %d", data.get("role", "process"), pid)
    for tmp in owners.glob("*.tmp"):
        try:
            pid = int(tmp.name.split("-")[0])
        except ValueError:
            continue
        if proc_starttime(pid) is None:
            tmp.unlink(missing_ok=True)
    return reaped


def ours_in_dev_shm() -> list[str]:
    """Names in /dev/shm that belong to virtio-emu (segments and sem.* semaphores)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(PREFIX) or n.startswith("sem." + PREFIX))


warnings.filterwarnings("ignore", message="resource_tracker", category=UserWarning)
