"""Starting and stopping host and guest processes for the tools (demo, benchmarks)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (for udp: backends and their peers)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(args: list[str], log: Path, new_session: bool = False, **env_extra: str) -> subprocess.Popen:
    """`python ARGS` with this checkout importable, output to `log`; `new_session` keeps a terminal's
    Ctrl-C from reaching it (the caller stops it in order). The processes log at INFO: the tools
    wait for INFO lines."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VIRTIO_EMU_LOG_LEVEL="INFO", **env_extra)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=new_session)


def wait_for_log(path: Path, needle: str, timeout: float) -> bool:
    """Wait until `needle` appears in the log file at `path`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and needle in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def wait_ready(proc: subprocess.Popen, path: Path, needle: str, timeout: float) -> str | None:
    """Wait for `needle` in the log at `path`; None when it came, else why not (one line):
    the process exited (fail fast, with its exit status) or the time ran out."""
    end = time.monotonic() + timeout
    while True:
        if path.exists() and needle in path.read_text(errors="replace"):
            return None
        code = proc.poll()
        if code is not None:
            return f"exited with status {code}"
        if time.monotonic() >= end:
            return f"not ready after {timeout:g} s"
        time.sleep(0.05)


def last_lines(path: Path, n: int = 3) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def stop_all(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM in reverse start order (guests before their host), SIGKILL what does not exit."""
    for p in reversed(procs):
        if p.poll() is not None:
            continue
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
