"""Issue 8 items 3-5 for the demo: its failure path, Ctrl-C and its table at 80 columns."""
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from tests.procs import ROOT, _env
from tools.demo import Traffic, traffic_table


def _demo(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "tools.demo", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _kept_logs(out: str) -> str:
    m = re.search(r"logs kept in (\S+)", out)
    assert m, out
    return m.group(1)


@pytest.mark.multiprocess
def test_a_guest_that_dies_at_boot_fails_fast_keeps_logs_exits_1():
    t0 = time.monotonic()
    p = _demo("--guests", "1", "--seconds", "1", "--guest-flags", "--queue-size 4096")
    out, _ = p.communicate(timeout=60)
    took = time.monotonic() - t0
    logs = _kept_logs(out)
    try:
        assert p.returncode == 1, out
        assert took < 20, f"took {took:.1f} s: {out}"
        assert "guest 3 exited with status 1" in out and "demo FAILED" in out, out
        log = os.path.join(logs, "guest-3.log")
        assert os.path.exists(log) and "larger than the host's maximum" in open(log).read()
        assert "Traceback" not in out
    finally:
        shutil.rmtree(logs, ignore_errors=True)


@pytest.mark.multiprocess
def test_ctrl_c_stops_everything_without_a_traceback():
    p = _demo("--guests", "1", "--seconds", "60", "--streams", "1")
    lines = []
    end = time.monotonic() + 60
    for line in p.stdout:                    # synchronise on the demo's own progress line
        lines.append(line)
        if "traffic for" in line or time.monotonic() > end:
            break
    os.killpg(p.pid, signal.SIGINT)          # what a terminal's Ctrl-C does: the whole group
    out, _ = p.communicate(timeout=60)
    out = "".join(lines) + out
    logs = _kept_logs(out)
    shutil.rmtree(logs, ignore_errors=True)
    assert p.returncode == 130, out
    assert "Traceback" not in out and "demo interrupted" in out, out
    assert "nothing of this run is left" in out


def test_traffic_table_is_never_cut_at_80_columns_or_in_a_file():
    t = Traffic()
    t.add(3, 123_456_789_012)
    t.add(12345, 9)
    for width in (80, 50):
        buf = io.StringIO()
        Console(file=buf, width=width, force_terminal=False).print(traffic_table([3, 12345], t, 8.0))
        text = buf.getvalue()
        assert "…" not in text
        flat = re.sub(r"[\s│┃|]", "", text)
        assert "123,456,789,012" in flat and "12345" in flat and "15432.1" in flat, text
