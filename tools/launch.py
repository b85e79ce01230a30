"""Starting and stopping host and guest processes for the tools (demo, benchmarks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], log: Path, new_session: bool = False, **env_extra: str) -> subprocess.Popen:
    """`python ARGS` with this checkout importable, output to `log`; `new_session` keeps a terminal's
    Ctrl-C from reaching it (the caller stops it in order)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
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


def stop_all(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM in reverse start order (guests before their host), SIGKILL what does not exit."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
