"""Processes of a stress group: start (own session), signal, restart, sample RSS, find leftovers.

Every process gets its own session (start_new_session), so a host's device processes share the
daemon's process group and `signal_group` reaches all of them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tools.launch import ROOT



def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VIRTIO_EMU_LOG_LEVEL", "INFO")     # the orchestrator waits for INFO lines
    return env


class Proc:
    """One started process; `restart()` starts the same command again with a new log file."""

    def __init__(self, role: str, args: list[str], log_dir: Path, env: dict | None = None,
                 cancel: threading.Event | None = None):
        self.role = role
        self.cancel = cancel or threading.Event()      # set: every wait gives up at once
        self.env = env or {}
        self.args = args
        self.log_dir = log_dir
        self.generation = 0
        self.logs: list[Path] = []
        self.p: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        self.generation += 1
        log = self.log_dir / f"{self.role}.{self.generation}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.p = subprocess.Popen([sys.executable, *self.args], stdout=out, stderr=subprocess.STDOUT,
                                      env={**_env(), **self.env}, cwd=ROOT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def alive(self) -> bool:
        return self.p.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float, count: int = 1) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.cancel.is_set():
            if self.text().count(needle) >= count:
                return True
            if not self.alive():
                return False
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def restart(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.role} is still running")
        self._start()

    def stop(self, timeout: float) -> bool:
        """SIGCONT + SIGTERM, wait; True if it exited in time (else it is SIGKILLed: hung)."""
        if not self.alive():
            return True
        self.signal_group(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.p.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.kill_group()
            return False

    def kill_group(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def children(pid: int) -> list[int]:
    """Direct children of pid (the host's device processes)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def rss(pid: int) -> int | None:
    """Private resident memory (RssAnon) in bytes, None if the process is gone.

    Not VmRSS: that also counts the pages of guest RAM (shared memory) a guest or its device
    process has touched so far, which grow towards --mem as buffers move around the RAM and are
    bounded by it; a leak is private memory."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None
    return None


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a run dir): leftovers after a run."""
    me = os.getpid()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and state(int(d)) not in ("Z", ""):
            found.append(int(d))
    return found
