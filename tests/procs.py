"""Start and stop real host and guest processes for multi-process tests (hard timeouts, cleanup)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XDG_RUNTIME_DIR", None)
    env["VIRTIO_EMU_LOG_LEVEL"] = "INFO"       # the tests wait for INFO lines
    return env


class Proc:
    def __init__(self, args: list[str], log: Path):
        self.args = args
        self.log = log
        self._f = open(log, "wb")
        self.p = subprocess.Popen([sys.executable, *args], stdout=self._f, stderr=subprocess.STDOUT,
                                  env=_env(), cwd=ROOT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 20.0, start: int = 0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text()[start:]:
                return True
            if self.p.poll() is not None:
                return needle in self.text()[start:]
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        try:
            self.p.send_signal(sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.p.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._f.close()
        return self.p.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            pass


class Cluster:
    """A run dir with a host and guests; `close()` stops (then kills) everything it started."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.procs: list[Proc] = []
        self.n = 0

    def _log(self, what: str) -> Path:
        self.n += 1
        return self.run_dir.parent / f"{self.n:02d}-{what}.log"

    def host(self, *extra: str, wait: bool = True) -> Proc:
        p = Proc(["-m", "host", "--run-dir", str(self.run_dir), *extra], self._log("host"))
        self.procs.append(p)
        if wait:
            assert p.wait_log("host listening", 20), p.text()
        return p

    def guest(self, cid: int, *extra: str, wait: bool = True) -> Proc:
        p = Proc(["-m", "guest", "--run-dir", str(self.run_dir), "--cid", str(cid), "--mem", "16M", *extra],
                 self._log(f"guest{cid}"))
        self.procs.append(p)
        if wait:
            assert p.wait_log("vsock device ready", 30), p.text()
        return p

    def close(self) -> None:
        # guests first (they unlink their RAM and doorbells), then hosts
        for p in sorted(self.procs, key=lambda p: "host" in p.args[1]):
            p.stop()
        for p in self.procs:
            p.kill()
