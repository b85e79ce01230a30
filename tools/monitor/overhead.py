"""python -m tools.monitor.overhead: what a running monitor costs the data path.

One host and one guest (discard service on port 9). Rounds of a host->guest vsock stream
(W-byte writes, B bytes, as the host->guest phase of tools.bench) alternate between no monitor,
a monitor on the queues view, one on the ring view (which also maps the guest RAM and decodes
every ring four times a second), and one on the queues view at normal priority ("queues-nice0";
the monitor lowers its own priority by 10 by default). Each monitor runs live in a 100x50
pseudo-terminal (a real terminal: rich refreshes only there) whose output `cat` drains into
/dev/null. The same run measures all modes, interleaved, so machine noise spreads over all of
them. The monitors start once, before the rounds, and are stopped (SIGSTOP) outside their own
rounds, so start-up is not measured. Figures: the median MB/s per mode, the difference to "none"
(of medians, and the median of per-round ratios), the monitor's own CPU use and that use as a
share of the CPU the host and guest processes spend on the stream (machine noise moves it less).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import signal
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from tools.bench_vhost_user import host_to_guest
from tools.launch import ROOT, start, stop_all, wait_for_log
from shared.cli import add_version

MODES = ("none", "queues", "ring", "queues-nice0")


def stream(run_dir: Path, size: int, total: int) -> float:
    """MB/s of `total` bytes in `size` writes to guest 3's discard service, through the bridge."""
    return host_to_guest(run_dir, 3, size, total)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and its descendants (the host daemon forks one device process per guest)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for root in pids:
        for p in tree(root):
            try:
                total += cpu_seconds(p)
            except (OSError, IndexError, ValueError):
                pass
    return total


class Monitor:
    """`python -m tools.monitor` live in a 100x50 pseudo-terminal, output drained."""

    def __init__(self, run_dir: Path, mode: str):
        view, _, nice = mode.partition("-nice")
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 100, 0, 0))
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TERM="xterm-256color", COLUMNS="100", LINES="50")
        self.p = subprocess.Popen([sys.executable, "-m", "tools.monitor", "--run-dir", str(run_dir),
                                   "--view", view, "--guest", "3", "--no-keys",
                                   *(["--nice", nice] if nice else [])],
                                  stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                  start_new_session=True)
        os.close(slave)
        # The terminal's output is drained by another process (cat), not a thread of ours: this
        # process also drives the stream, and a drain thread would compete with it for the GIL.
        self.drain = subprocess.Popen(["cat"], stdin=master, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        self.master = master
        self.cpu = 0.0                    # CPU seconds and wall seconds while measured
        self.wall = 0.0
        # Let it import and draw, then stop it until its rounds: a monitor that is already
        # running pays no start-up, so the rounds must not either.
        time.sleep(3.0)
        os.kill(self.p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        self.cpu0, self.t0 = cpu_seconds(self.p.pid), time.monotonic()
        os.kill(self.p.pid, signal.SIGCONT)
        time.sleep(0.5)                   # back in its loop before the stream starts

    def pause(self) -> None:
        os.kill(self.p.pid, signal.SIGSTOP)
        self.cpu += cpu_seconds(self.p.pid) - self.cpu0
        self.wall += time.monotonic() - self.t0

    def stop(self) -> float:
        """Stop it; returns its CPU share (cores) while it was running."""
        share = self.cpu / max(1e-9, self.wall)
        os.kill(self.p.pid, signal.SIGCONT)
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        os.close(self.master)
        try:
            self.drain.wait(5)            # EOF (EIO) once the terminal's last user is gone
        except subprocess.TimeoutExpired:
            self.drain.kill()
            self.drain.wait()
        return share


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.monitor.overhead", description=__doc__.splitlines()[0])
    add_version(p)
    p.add_argument("--rounds", type=int, default=4, help="rounds per mode (default 4)")
    p.add_argument("--write", type=int, default=65536, help="bytes per write (default 65536)")
    p.add_argument("--bytes", type=int, default=64 << 20, help="bytes per round (default 64 MiB)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.write < 1 or args.bytes < args.write:
        print("overhead: need --rounds >= 1 and --bytes >= --write >= 1", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ve-monbench-"))
    run_dir = tmp / "run"
    procs = []
    results: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES if m != "none"}
    path_cpu: dict[str, list[float]] = {m: [] for m in MODES}     # host + guest processes
    try:
        procs.append(start(["-m", "host", "--run-dir", str(run_dir)], tmp / "host.log"))
        if not wait_for_log(tmp / "host.log", "host listening", 20):
            print("overhead: the host did not start", file=sys.stderr)
            return 1
        procs.append(start(["-m", "guest", "--run-dir", str(run_dir), "--cid", "3", "--mem", "64M",
                            "--service", "discard=9"], tmp / "guest.log"))
        if not wait_for_log(tmp / "guest.log", "vsock device ready", 30):
            print("overhead: the guest did not boot", file=sys.stderr)
            return 1
        stream(run_dir, args.write, args.bytes // 4)          # warm up
        monitors = {m: Monitor(run_dir, m) for m in MODES if m != "none"}
        try:
            for r in range(args.rounds):
                order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                for mode in order:
                    mon = monitors.get(mode)
                    if mon is not None:
                        mon.resume()
                    try:
                        c0, t0 = tree_cpu([p.pid for p in procs]), time.monotonic()
                        results[mode].append(stream(run_dir, args.write, args.bytes))
                        path_cpu[mode].append((tree_cpu([p.pid for p in procs]) - c0) / (time.monotonic() - t0))
                    finally:
                        if mon is not None:
                            mon.pause()
                    print(f"round {r + 1}/{args.rounds} {mode:12s} {results[mode][-1]:7.1f} MB/s", flush=True)
        finally:
            for mode, mon in monitors.items():
                cpu[mode].append(mon.stop())
    except KeyboardInterrupt:
        print("overhead: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all(procs, 20)
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(results["none"])
    out = []
    for mode in MODES:
        med = statistics.median(results[mode])
        row = {"mode": mode, "median MB/s": round(med, 1), "rounds": [round(x, 1) for x in results[mode]],
               "vs none %": round(100 * (med - base) / base, 1),
               "monitor CPU (cores)": round(statistics.mean(cpu[mode]), 3) if mode in cpu else 0.0,
               "host+guest CPU (cores)": round(statistics.mean(path_cpu[mode]), 3)}
        row["monitor CPU / host+guest CPU %"] = round(100 * row["monitor CPU (cores)"]
                                                      / max(1e-9, row["host+guest CPU (cores)"]), 1)
        # each round measured every mode back to back: the median of the per-round ratios
        # cancels slow drifts of the machine's load better than a ratio of medians
        row["paired vs none %"] = round(100 * (statistics.median(
            x / n for x, n in zip(results[mode], results["none"])) - 1), 1)
        out.append(row)
        print(f"{mode:12s} median {med:6.1f} MB/s {row['vs none %']:+6.1f} % (paired {row['paired vs none %']:+6.1f} %)"
              f"  rounds {row['rounds']}  "
              f"monitor {row['monitor CPU (cores)']:.3f} cores = {row['monitor CPU / host+guest CPU %']:.1f} % "
              f"of host+guest ({row['host+guest CPU (cores)']:.2f} cores)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
