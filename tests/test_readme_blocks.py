"""Issue 8 item 2: README's "Running it by hand" works when pasted as written.

The shell blocks of that section are read from $README_BLOCKS_FILE (default DEFAULT_SOURCE), the
run dir /tmp/ve is replaced by a private one, and they run in one bash in a temporary directory;
then everything they started is stopped (SIGTERM to the process group, SIGKILL after).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT, _env

pytestmark = pytest.mark.multiprocess

DEFAULT_SOURCE = ROOT / "README.md"
SECTION = "## Running it by hand"


def section_blocks(text: str) -> list[str]:
    start = text.index(SECTION + "\n")
    rest = text[start + len(SECTION) + 1:]
    m = re.search(r"^#{1,2} ", rest, re.M)                # the next section of the same or higher level
    body = rest[:m.start()] if m else rest
    return re.findall(r"^```sh\n(.*?)^```", body, re.S | re.M)


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_running_it_by_hand_as_written(tmp_path):
    src = Path(os.environ.get("README_BLOCKS_FILE", DEFAULT_SOURCE))
    blocks = section_blocks(src.read_text())
    assert len(blocks) >= 2, blocks
    ve = tmp_path / "ve"
    script = "\n".join(b.replace("/tmp/ve", str(ve)) for b in blocks)
    env = blocks_env()
    out_path = tmp_path / "out.txt"
    with open(out_path, "wb") as out:
        p = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + 90
        text = ""
        while time.monotonic() < end:
            text = out_path.read_text(errors="replace")
            if "hello from the guest" in text and re.search(r"^OK \d+\nhello$", text, re.M):
                break
            time.sleep(0.1)
        assert re.search(r"^OK 1073741824\nhello$", text, re.M), text
        assert "hello from the guest" in text, text
        assert "Traceback" not in text and "No such file" not in text, text
        assert "virtio-emu monitor" in text, text                       # the monitor's snapshot
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            pass
        _kill_rest(p.pid)
    assert not list((ve / "owners").glob("*.json")) or _wait_no_owners(ve)


def blocks_env() -> dict:
    """The environment the blocks run in: `python` is the interpreter running the tests (its
    directory first on PATH), so a venv's packages are found even when the venv is not on PATH
    (`/path/to/venv/bin/python -m pytest`)."""
    env = _env()
    env.pop("VIRTIO_EMU_LOG_LEVEL", None)                  # the user's quiet default
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def test_blocks_run_the_interpreter_running_the_tests(tmp_path, monkeypatch):
    """Issue 21 item 7: `python` in the blocks is sys.executable even when PATH does not lead to
    it (a venv's python started by its path, the venv not activated)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    r = subprocess.run(["bash", "-c", "python -c 'import sys, posix_ipc; print(sys.executable)'"],
                       env=blocks_env(), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(r.stdout.strip()) == os.path.realpath(sys.executable)


def _kill_rest(pgid: int) -> None:
    """Background jobs of the script share its process group: let them exit, then SIGKILL."""
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_no_owners(ve: Path) -> bool:
    from shared.resources import reap
    reap(ve)
    return not list((ve / "owners").glob("*.json"))
