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


# --- issue 15: the ceiling, × ceiling, the new targets, threads, zero copy ------------------------
def _results15() -> dict:
    """Synthetic figures of one run: baselines, the ceiling, in-device (copy and zero copy),
    bridge, round trips, pairs, threads, idle."""
    f = []
    sp = {64: 20.0, 65536: 6000.0, 1 << 20: 8000.0}
    ceil = {("g2h", 65536): 9000.0, ("h2g", 65536): 7500.0, ("g2h", 1 << 20): 8000.0, ("h2g", 1 << 20): 10000.0,
            ("g2h", 64): 12.0, ("h2g", 64): 25.0}
    dev = {("g2h", 65536): 6000.0, ("h2g", 65536): 3000.0, ("g2h", 1 << 20): 4000.0, ("h2g", 1 << 20): 9000.0,
           ("g2h", 64): 11.0, ("h2g", 64): 5.0}
    for size, v in sp.items():
        f.append(figure("stream", "socketpair", "MB/s", size=size, samples=[v]))
    for (d, size), v in ceil.items():
        f.append(figure("stream", "ceiling", "MB/s", dir=d, size=size, mode="bare ring", samples=[v],
                        per_packet={"kicks": 1, "interrupts": 2, "packets": 300, "wakeups": 3}))
    for (d, size), v in dev.items():
        f.append(figure("stream", "in-device", "MB/s", dir=d, size=size, samples=[v],
                        per_packet={"kicks": 5, "interrupts": 5, "packets": 100, "wakeups": None}))
        f.append(figure("stream", "bridge", "MB/s", dir=d, size=size, samples=[v / 4]))
    f.append(figure("stream", "in-device", "MB/s", dir="g2h", size=65536, mode="zero copy", samples=[9600.0]))
    f.append(figure("stream", "in-device", "MB/s", dir="h2g", size=65536, mode="zero copy",
                    na="this build's vsock sockets have no recv_view (zero-copy receive)"))
    for path, mode, med in (("socketpair", "defaults", 20.0), ("ceiling", "bare ring", 30.0),
                            ("in-device", "semaphores", 50.0), ("in-device", "poll 50 µs", 60.0),
                            ("bridge", "defaults", 70.0)):
        f.append(figure("rr", path, "median µs", mode=mode, samples=[med]))
        f.append(figure("rr", path, "p99 µs", mode=mode, samples=[med * 3]))
    f.append(figure("pairs", "in-device", "MB/s", pairs=1, samples=[1000.0]))
    f.append(figure("pairs", "in-device", "MB/s", pairs=8, samples=[850.0]))
    f.append(figure("threads", "guest", "threads", mode="bare", samples=[5]))
    f.append(figure("threads", "device", "threads", mode="bare", samples=[3]))
    f.append(figure("idle", "guest+device", "% core", samples=[0.5], threads={"guest": 9, "device": 7}))
    return {"figures": f, "modes": {"defaults": "no flags"}}


def _rowmap(rows):
    return {r["target"]: r for r in rows}


def test_issue15_targets_judge_must_and_mark_aim():
    rows = _rowmap(targets(_results15()["figures"]))
    # vs the ceiling of the same direction and size: 6000/9000 = 0.667 met (must 0.6), aim 0.8 not
    r = rows["in-device g2h 64 KiB vs ceiling"]
    assert abs(r["value"] - 6000 / 9000) < 1e-12 and r["status"] == "met" and r["aim_met"] is False
    r = rows["in-device h2g 64 KiB vs ceiling"]                 # 3000/7500 = 0.4
    assert abs(r["value"] - 0.4) < 1e-12 and r["status"] == "missed" and r["note"] == "1.5× short"
    r = rows["in-device h2g 1 MiB vs ceiling"]                  # 9000/10000 = 0.9: aim met
    assert r["status"] == "met" and r["aim_met"] is True and r["aim"] == "≥ 0.8×"
    # × socketpair; the 64 KiB aim is judged with zero copy when that figure exists
    r = rows["in-device g2h 64 KiB"]                            # 1.0× copying, 1.6× zero copy
    assert abs(r["value"] - 1.0) < 1e-12 and r["status"] == "met" and r["want"] == "≥ 0.8×"
    assert r["aim_met"] is True and abs(r["aim_value"] - 1.6) < 1e-12 and "zero copy" in r["note"]
    r = rows["in-device h2g 64 KiB"]                            # 0.5×, zero copy n/a
    assert r["status"] == "missed" and r["aim_met"] is False and "aim_value" not in r
    assert rows["in-device h2g 64 B"]["status"] == "missed"     # 5/20 = 0.25 < 0.5
    assert rows["in-device g2h 64 B"]["status"] == "met"        # 0.55
    # round trips: 50/20 = 2.5× (must ≤ 3 met, aim ≤ 2 not); poll 60/20 = 3× > 2 missed
    r = rows["in-device 64 B rr, semaphores"]
    assert abs(r["value"] - 2.5) < 1e-12 and r["status"] == "met" and r["aim_met"] is False
    assert rows["in-device 64 B rr, adaptive poll"]["status"] == "missed"
    r = rows["in-device rr, poll over semaphores"]              # 60/50: polling made it slower
    assert abs(r["value"] - 1.2) < 1e-12 and r["status"] == "missed"
    r = rows["bridge g2h 64 KiB"]                               # 1500/6000 = 0.25 < 0.3
    assert r["status"] == "missed" and r["aim"] == "≥ 0.45×"
    assert rows["bridge h2g 1 MiB"]["status"] == "missed"       # 2250/8000 = 0.28 < 0.35
    assert rows["bridge 64 B rr (defaults)"]["status"] == "met"  # 3.5× ≤ 4, aim ≤ 3 not met
    assert rows["bridge 64 B rr (defaults)"]["aim_met"] is False
    r = rows["in-device kicks+irqs/packet, bulk (worst)"]       # 10/100 = 0.1: must met, aim not
    assert abs(r["value"] - 0.1) < 1e-12 and r["status"] == "met" and r["aim_met"] is False
    assert rows["threads, idle guest"]["status"] == "missed" and rows["threads, idle guest"]["value"] == 5
    assert rows["threads, idle device process"]["status"] == "met"
    r = rows["in-device 8 pairs vs one"]                        # 850/1000 = 85 % < 90 %
    assert abs(r["value"] - 85.0) < 1e-9 and r["status"] == "missed"
    assert rows["bridge 8 pairs vs one"]["status"] == "n/a"
    assert rows["idle pair CPU, % of a core"]["status"] == "met"


def test_report_shows_ceiling_ratios_and_threads_in_80_columns():
    res = _results15()
    res["targets"] = targets(res["figures"])
    buf = io.StringIO()
    render(Console(file=buf, width=80, color_system=None, force_terminal=False), res)
    out = buf.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out
    lines = [line.strip() for line in out.splitlines()]
    row = next(line for line in lines if line.startswith("in-device h2g 64 ") and "3,000" in line)
    assert "0.50" in row and "0.40" in row                      # × socketpair, × ceiling
    row = next(line for line in lines if line.startswith("in-device") and "50.0" in line)
    assert "2.50" in row and "1.67" in row                      # 50/20, 50/30
    assert "Threads per process" in out and "guest 5" in out and "guest 9" in out
    assert "+aim" in out and "no recv_view" in out


def test_baseline_of_ceiling_is_same_direction_and_size():
    from tools.bench.model import ratio
    figs = _results15()["figures"]
    f = find_fig(figs, path="in-device", dir="h2g", size=1 << 20, mode="defaults")
    assert abs(ratio(figs, f, "ceiling") - 0.9) < 1e-12
    c = find_fig(figs, path="ceiling", dir="h2g", size=1 << 20)
    assert ratio(figs, c, "ceiling") is None                    # not a ratio to itself
    assert abs(ratio(figs, c) - 10000 / 8000) < 1e-12           # the ceiling × socketpair


def find_fig(figs, **want):
    from tools.bench.model import find
    return find(figs, kind="stream", **want)


def test_ceiling_smoke_moves_every_byte_and_leaves_nothing(tmp_path):
    from shared.resources import ours_in_dev_shm, run_tag
    from tools.bench import ceiling
    run = tmp_path / "run"
    r = ceiling.stream("g2h", 65536, 8 << 20, run)
    assert r["bytes"] == 8 << 20 and r["packets"] == 128 and r["mbps"] > 0
    r = ceiling.stream("h2g", 1 << 20, 4 << 20, run)
    assert r["bytes"] == 4 << 20 and r["packets"] == 64
    r = ceiling.stream("g2h", 64, 64 * 2000, run)                # more writes than descriptors
    assert r["bytes"] == 64 * 2000 and r["packets"] == 2000
    r = ceiling.rr(64, 0.05, run)
    assert len(r["lat_us"]) > 10 and min(r["lat_us"]) > 0
    assert not [n for n in ours_in_dev_shm() if run_tag(run) in n]


def test_ceiling_device_rejects_a_bad_descriptor(tmp_path):
    """The device side checks every descriptor: one pointing past guest RAM stops the run."""
    import pytest
    from shared.doorbell import SemDoorbell
    from shared.ring_layout import DESC
    from shared.resources import OwnerRecord, create_shm, ensure_run_dir, resource_base
    from tools.bench import ceiling
    run = ensure_run_dir(tmp_path / "run")
    base = resource_base(run)
    rec = OwnerRecord(run, "test")
    sems = [(f"/{base}-k0", f"/{base}-c0")]
    rec.add(shm=[f"{base}-ram"], sems=list(sems[0]))
    shm = create_shm(f"{base}-ram", ceiling.layout(1, 64)[2])
    bells = [SemDoorbell(n, create=True) for n in sems[0]]
    try:
        for bad in ("addr", "head", "flags", "len"):
            s = ceiling._Side(f"{base}-ram", sems, 1, 64)
            try:
                vq = s.vqs[0]
                addr, ln, fl, head = s.buf_base, ceiling.HDR_SIZE + 64, 0, 0
                if bad == "addr":
                    addr = s.size - 10
                elif bad == "flags":
                    fl = ceiling.VRING_DESC_F_NEXT
                elif bad == "len":
                    ln = 10
                else:
                    head = ceiling.NUM
                ceiling.HDR.pack_into(s.ram, s.buf_base, 3, 2, 1, 2, 64, 1, 5, 0, 0, 0)
                DESC.pack_into(s.ram, vq.desc, addr, ln, fl, 0)
                vq.avail_ring[0] = head
                vq.avail_idx[0] = 1
                with pytest.raises(ceiling.RingError):
                    ceiling._g2h_device(s, 64, 64)
                vq.avail_idx[0] = 0
            finally:
                s.close()
    finally:
        for b in bells:
            b.close()
        shm.close()
        rec.release_all()


class _View:
    def __init__(self, data: bytes, log: list):
        self.data, self.log = memoryview(data), log

    def __len__(self):
        return len(self.data)

    def release(self):
        self.log.append(len(self.data))


class _ViewSock:
    def __init__(self, chunks):
        self.chunks, self.released = list(chunks), []

    def recv_view(self, n):
        c = self.chunks.pop(0) if self.chunks else b""
        assert len(c) <= n
        return _View(c, self.released)


def test_drain_views_counts_and_releases_every_view():
    from tools import bench_apps
    sock = _ViewSock([b"a" * 10, b"b" * 65536, b"c"])
    assert bench_apps.drain_views(sock, 65536) == 65547
    assert sock.released == [10, 65536, 1, 0]                   # the EOF view is released too


def test_recv_view_is_na_without_the_method():
    from tools import bench_apps

    class Plain:
        closed = False

        def close(self):
            self.closed = True

    class Family:
        def create_connection(self, addr, timeout=None):
            self.sock = Plain()
            return self.sock
    fam = Family()
    r = bench_apps._recv_view(fam, {"cid": 2, "port": 5003, "size": 65536, "total": 1 << 20})
    assert r == {"na": bench_apps.NO_RECV_VIEW} and fam.sock.closed


def test_the_plan_puts_packed_rows_next_to_split_and_the_packed_ring_bench_runs(tmp_path):
    """Issue 19: 64 B and 64 KiB both ways and the 64 B rr with --packed, beside the defaults'
    (split) rows of the same run; the ring round trips on a packed ring beside the split ones."""
    from tools.bench.cluster import Features
    from tools.bench.ring import bench_ring
    from tools.bench.scenarios import Options, Plan
    plan = Plan(Options(quick=True), Features(host_services=True, guest_sink=True, packed=True), tmp_path)
    labels = [s.label for s in plan.steps()]
    for d in ("g2h", "h2g"):
        for size in ("64 B", "64 KiB"):
            assert f"in-device {d} {size} writes (packed)" in labels
            assert f"in-device {d} {size} writes (defaults)" in labels
    assert "in-device 64 B request/response (packed)" in labels
    assert "ring round trips, packed, suppression on" in labels and "ring round trips, suppression on" in labels
    assert plan.configs()["packed"].host_args == ["--packed"] == plan.configs()["packed"].guest_args
    old = Plan(Options(quick=True), Features(host_services=True), tmp_path)
    assert "packed" not in old.configs()                       # a build without --packed: n/a rows
    r = bench_ring(0.1, 64, 1, True, packed=True)
    assert r["rt"] > 10 and 0 < r["kicks"] <= 1 and 0 < r["irqs"] <= 1


def test_cpu_seconds_is_finer_than_a_tick_and_counts_exited_threads():
    """The bench's CPU figures (cpu_s_per_gb, the idle pair's % of a core) read another
    process's CPU time: whole clock ticks (10 ms, 0.67 % of a core over the quick idle figure's
    1.5 s) made a 0.6 % idle pair read 0 % or 1.33 %. A thread that spun and exited still counts;
    a process that is gone reads None."""
    from tools.bench.cluster import CLK_TCK, cpu_seconds
    code = ("import threading, time\n"
            "def spin(s):\n"
            "    end = time.thread_time() + s\n"
            "    while time.thread_time() < end: pass\n"
            "t = threading.Thread(target=spin, args=(0.123,)); t.start(); t.join()\n"
            "spin(0.0345)\n"
            "print('ready', flush=True); time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        got = cpu_seconds(p.pid)
        assert 0.1575 <= got < 0.1575 + 0.2                 # both spins, and start-up
        ticks = got * CLK_TCK
        assert round(ticks, 6) != round(ticks)              # not a whole number of ticks
    finally:
        p.kill()
        p.wait()
    assert cpu_seconds(p.pid) is None
