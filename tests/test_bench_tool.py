"""tools.bench: argument checking and the report's rendering (no benchmark runs here)."""
import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tools.bench.model import figure
from tools.bench.report import render, targets

ROOT = Path(__file__).resolve().parent.parent


def test_bad_json_path_is_one_line_and_nonzero(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--json", str(tmp_path / "no" / "x.json")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--json" in lines[0] and "does not exist" in lines[0]


def _results() -> dict:
    f = []
    for size, sp, dev in ((64, 14.03, 2.11), (65536, 4786.2, 61.7), (1 << 20, 5252.4, 1234.56)):
        f.append(figure("stream", "socketpair", "MB/s", size=size, samples=[sp * 0.9, sp, sp * 1.1],
                        cpu_s_per_gb={"writer": 0.16, "reader": 0.14}))
        f.append(figure("stream", "pipe", "MB/s", size=size, samples=[sp / 3]))
        f.append(figure("stream", "bridge", "MB/s", dir="g2h", size=size, samples=[dev, dev * 1.2],
                        per_packet={"kicks": 10, "interrupts": 30, "packets": 400, "wakeups": None},
                        cpu_s_per_gb={"guest": 123.4, "device": 98.76, "external": 7.5}))
        f.append(figure("stream", "in-device", "MB/s", dir="h2g", size=size,
                        na="this build's host has no --service (no in-device endpoint)"))
    f.append(figure("rr", "socketpair", "median µs", samples=[22.1]))
    f.append(figure("rr", "socketpair", "p99 µs", samples=[62.0]))
    f.append(figure("rr", "bridge", "median µs", samples=[575.25, 612.5]))
    f.append(figure("rr", "bridge", "p99 µs", samples=[1999.0]))
    f.append(figure("pairs", "socketpair", "MB/s", pairs=8, samples=[7654.3]))
    f.append(figure("pairs", "bridge", "MB/s", pairs=8, samples=[99.87]))
    f.append(figure("idle", "guest+device", "% core", samples=[0.42], processes={"guest": 0.2, "device": 0.22}))
    return {"figures": f, "modes": {"defaults": "no flags"}}


def test_report_fits_80_columns_and_cuts_nothing():
    res = _results()
    res["targets"] = targets(res["figures"])
    buf = io.StringIO()
    render(Console(file=buf, width=80, color_system=None, force_terminal=False), res)
    out = buf.getvalue()
    assert "\x1b[" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for word in ("socketpair 64 KiB", "4,786", "1,235", "575", "1,999", "12.6–15.4", "123", "98.8", "7,654",
                 "99.9", "n/a", "in-device h2g 1 MiB", "0.42", "no --service"):
        assert word in out, word
    assert "…" not in out
    # a target that is measured is judged: bridge g2h 64 KiB median 67.87 / 4786 = 0.014 < 0.35
    row = next(r for r in res["targets"] if r["target"] == "bridge g2h 64 KiB")
    assert row["status"] == "missed" and abs(row["value"] - 61.7 * 1.1 / 4786.2) < 1e-9
    assert next(r for r in res["targets"] if r["target"] == "in-device h2g 1 MiB")["status"] == "n/a"
    assert next(r for r in res["targets"] if r["target"] == "idle pair CPU, % of a core")["status"] == "met"
