"""Issue 20 item 8 and item 6: small things a newcomer trips over (labels, empty names, the
README's example module, --net-run checked at start)."""
import subprocess
import sys

import pytest

from .procs import ROOT, _env


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


def test_bench_ring_labels_rows_with_the_depth_the_ring_allows():
    """--depth 1000 on a ring of 8: the rows ran at depth 8 and must say so (not "depth 1000")."""
    r = run_cli("-m", "tools.bench_ring", "--seconds", "0.05", "--ring-size", "8", "--depth", "1000")
    assert r.returncode == 0, r.stderr
    assert "depth 1000," not in r.stdout and "ring, depth 8, suppression on" in r.stdout, r.stdout
    assert "depth 8 used" in r.stdout
