"""python -m tools.stress: N host/guest groups, seeded workloads and faults, invariants checked.

Exit status: 0 when every invariant holds, 1 on any violation, 2 on bad arguments, 130 when
interrupted (Ctrl-C: every process it started is stopped and cleaned up, the partial table printed).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.measure import Measurement

from shared.cli import add_version
from shared.resources import ours_in_dev_shm, reap, run_tag

from . import display, invariants
from .group import NET_ROLES, Group, GroupError, Interrupted
from .procs import processes_mentioning
from .schedule import Config, parse_faults, round_plan
from tools.launch import ROOT

TRACEBACK = "Traceback (most recent call last)"


def _positive(kind, lo, hi):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range ({lo}..{hi})")
        return v
    return parse


def _faults(text: str) -> tuple:
    try:
        return parse_faults(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.stress", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=_positive(int, 1, 32), default=2, help="host/guest groups (default 2)")
    p.add_argument("--guests-per-host", type=_positive(int, 1, 16), default=2, help="guests per host (default 2)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=_positive(float, 1, 86400), default=None,
                     help="run rounds until this much time has passed (default 20)")
    how.add_argument("--rounds", type=_positive(int, 1, 10**6), default=None, help="run exactly this many rounds per group")
    p.add_argument("--seed", type=int, default=None, help="seed of the schedule (default: random, printed)")
    p.add_argument("--faults", type=_faults, default="all",      # argparse parses a str default
                   help="which faults: all (default), none, or a comma list of "
                        "guest-kill,host-kill,guest-stop,host-stop,rx-stall,hostile,migrate")
    p.add_argument("--fault-rate", type=_positive(float, 0, 1), default=0.5,
                   help="probability that a round has a fault (default 0.5)")
    p.add_argument("--max-size", type=_positive(int, 1, 64 << 20), default=256 * 1024,
                   help="largest stream in bytes (default 262144)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the summary as JSON")
    p.add_argument("--dir", type=Path, default=None, help="where run dirs and logs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep logs and run dirs")
    p.add_argument("--plain", action="store_true", help="no live view (progress lines instead)")
    p.add_argument("--print-schedule", type=_positive(int, 1, 10**4), default=None, metavar="ROUNDS",
                   help="print the plan of the first ROUNDS rounds of every group as JSON and exit")
    add_version(p)
    return p


def net_note() -> str:
    """The header's note on the net guests, counted from the roles a group starts."""
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    n = len(NET_ROLES)
    return (f"net workloads: {words.get(n, n)} net guests per group (one on loopback, one on udp, "
            "two on an l2 segment) carry numbered CRC32 frames; they are not fault targets (a host "
            "kill restarts them)")


def check_dir(path: Path) -> str | None:
    """--dir: a directory (made if missing) holding no earlier run; else a one-line reason."""
    if path.exists() and not path.is_dir():
        return f"stress: --dir {path} is not a directory"
    if path.is_dir() and any(path.glob("g[0-9]*")):
        return f"stress: --dir {path} already holds a run (g0/ ...): give a new or empty directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"stress: cannot make --dir {path}: {e.strerror or e}"
    return None


def print_fit(console: Console, renderable) -> None:
    """On a terminal rich fits the table to its width; into a file or a pipe (no width to fit)
    the table is printed whole, as wide as its widest row, never cut at 80 columns."""
    if console.is_terminal:
        console.print(renderable)
        return
    wide = console.options.update(width=100_000, max_width=100_000)
    need = Measurement.get(console, wide, renderable).maximum
    width = console.width
    console.width = max(width, need)
    try:
        console.print(renderable, crop=False)
    finally:
        console.width = width


def host_supports_services() -> bool:
    """Does `python -m host` have the in-device endpoint (--service)?"""
    try:
        out = subprocess.run([sys.executable, "-m", "host", "--help"], capture_output=True, text=True,
                             cwd=ROOT, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(r"--service\b", out) is not None


def check_writable(path: Path) -> str | None:
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return f"stress: cannot write --json {path}: {e.strerror or e}"
    if not existed:
        path.unlink()
    return None


def scan_tracebacks(groups) -> dict:
    found = {"host": [], "guest": []}
    for g in groups:
        for role, log in g.logs():
            if role == "hostile":
                continue
            try:
                text = log.read_text(errors="replace")
            except FileNotFoundError:
                continue
            n = text.count(TRACEBACK)
            if n:
                found[role].append(f"{log} ({n})")
    return found


def scan_leaks(groups) -> dict:
    shm, files, procs = [], [], []
    now = set(ours_in_dev_shm())
    for g in groups:
        tag = run_tag(g.run_dir)
        shm += [n for n in now if tag in n]
        if g.run_dir.exists():
            files += [str(p.relative_to(g.dir)) for p in g.run_dir.rglob("*") if not p.is_dir()]
        procs += processes_mentioning(str(g.run_dir))
    return {"shm": sorted(shm), "files": sorted(files), "procs": procs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:            # before any process was started: nothing to clean
        print("stress: interrupted", file=sys.stderr)
        return 130


def _main(args) -> int:
    console = Console()
    if args.json is not None:
        err = check_writable(args.json)
        if err:
            print(err, file=sys.stderr)
            return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    indevice = host_supports_services()
    cfg = Config(seed=seed, pairs=args.pairs, guests_per_host=args.guests_per_host, faults=args.faults,
                 max_size=args.max_size, fault_rate=args.fault_rate, indevice=indevice)
    if args.print_schedule:
        plans = [round_plan(cfg, g, r).as_dict() for g in range(cfg.pairs) for r in range(args.print_schedule)]
        print(json.dumps({"seed": seed, "plans": plans}, indent=1))
        return 0
    seconds = args.seconds if args.seconds is not None or args.rounds is not None else 20.0
    notes = []
    if not indevice:
        notes.append("in-device host endpoint: `python -m host --help` has no --service; its workloads "
                      "(indev-echo, indev-sink) were skipped")
    notes.append(net_note())
    if args.dir is not None:
        err = check_dir(args.dir)
        if err:
            print(err, file=sys.stderr)
            return 2
    base = args.dir or Path(tempfile.mkdtemp(prefix="ve-stress-"))
    console.print(f"[bold]virtio-emu stress[/]: seed {seed}, {args.pairs} group(s) x {args.guests_per_host} "
                  f"guest(s), faults {','.join(args.faults) or 'none'}, "
                  + (f"{args.rounds} rounds" if args.rounds else f"{seconds:.0f} s") + f"; logs in {base}")
    for n in notes:
        console.print(f"note: {n}")
    groups = [Group(i, cfg, base) for i in range(args.pairs)]
    threads: list[threading.Thread] = []
    stop = threading.Event()
    rss_series: dict[str, list] = {}
    rss_now: dict[str, int] = {}
    start_errors: list[str] = []
    t_start = time.monotonic()
    try:
        starters = [threading.Thread(target=_start, args=(g, start_errors)) for g in groups]
        threads += starters
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if start_errors:
            for e in start_errors:
                console.print(f"[red]{e}[/]")
            return _finish(console, args, groups, base, seed, cfg, notes, rss_series, start_errors, t_start)
        if args.plain:
            console.print(f"running: {sum(len(g.procs()) for g in groups)} processes started")
        deadline = time.monotonic() + seconds if seconds else None
        runners = [threading.Thread(target=g.run, args=(args.rounds, deadline, stop), name=f"group{g.idx}")
                   for g in groups]
        threads += runners
        for t in runners:
            t.start()

        def sample() -> None:
            rss_now.clear()
            now = time.monotonic() - t_start
            for g in groups:
                for key, v in g.rss_sample():
                    rss_series.setdefault(key, []).append((now, v))
                    rss_now[key] = v

        if args.plain:
            last = 0.0
            while any(t.is_alive() for t in runners):
                time.sleep(1.0)
                sample()
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    print_fit(console, display.progress(groups, time.monotonic() - t_start, rss_now))
        else:
            with Live(display.progress(groups, 0, rss_now), console=console, refresh_per_second=2) as live:
                while any(t.is_alive() for t in runners):
                    time.sleep(1.0)
                    sample()
                    live.update(display.progress(groups, time.monotonic() - t_start, rss_now))
        for t in runners:
            t.join()
    except KeyboardInterrupt:
        return _interrupted(console, args, groups, threads, stop, base, seed, cfg, notes, rss_series,
                            start_errors, t_start)
    return _finish(console, args, groups, base, seed, cfg, notes, rss_series, start_errors, t_start)


def _interrupted(console, args, groups, threads, stop, *rest) -> int:
    """Ctrl-C: not a violation. Nothing starts or restarts from now on (Group.interrupt), the
    group threads end, every process is stopped and its resources removed, the table so far is
    printed marked "interrupted", exit 130. A second Ctrl-C does not cut the clean-up short."""
    _hold_interrupts()
    stop.set()
    for g in groups:
        g.interrupt()
    console.print("[yellow]interrupted: stopping every process of the run ...[/]")
    end = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return _finish(console, args, groups, *rest, interrupted=True)


def _start(g: Group, errors: list) -> None:
    try:
        g.start()
    except Interrupted:
        pass
    except (GroupError, OSError) as e:
        errors.append(str(e))


def sweep(groups) -> None:
    """After the shutdown (and the leak scan that judges it): leave nothing behind. Processes
    that still name a group's run dir on their command line (ours: the run dir is new) are
    SIGKILLed, the shared memory and semaphores of dead owners unlinked (their owner records),
    and the files left in the run dirs removed."""
    import os
    for g in groups:
        for pid in processes_mentioning(str(g.run_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(processes_mentioning(str(g.run_dir)) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    for g in groups:
        if g.run_dir.is_dir():
            reap(g.run_dir)
            for p in sorted(g.run_dir.rglob("*"), reverse=True):
                try:
                    p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
                except OSError:
                    pass


def _hold_interrupts() -> None:
    """From here on Ctrl-C does not cut the clean-up short (it would leave processes behind)."""
    def again(_signum, _frame):
        print("stress: still stopping what it started, please wait", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, again)


def _finish(console, args, groups, base, seed, cfg, notes, rss_series, errors, t_start,
            interrupted: bool = False) -> int:
    _hold_interrupts()
    for g in groups:
        g.shutdown()
    time.sleep(0.5)
    run = {
        "outcomes": [o for g in groups for o in g.outcomes],
        "faults": [f for g in groups for f in g.faults],
        "stalls": [s for g in groups for s in g.stalls],
        "rss": rss_series,
        "leaks": scan_leaks(groups),
        "hung": [h for g in groups for h in g.hung_procs],
        "exceptions": scan_tracebacks(groups),
        "errors": errors + [e for g in groups for e in g.errors],
        "connect_retries": sum(g.connect_retries for g in groups),
        "connect_late_ok": sum(g.connect_late_ok for g in groups),
    }
    sweep(groups)
    rows = invariants.evaluate(run)
    elapsed = time.monotonic() - t_start
    ok = all(r["ok"] for r in rows)
    mark = " (interrupted)" if interrupted else ""
    print_fit(console, display.summary(rows, f"stress summary{mark}: seed {seed}, {len(groups)} group(s), "
                                             f"{sum(g.rounds for g in groups)} rounds, {elapsed:.0f} s"))
    for n in notes:
        console.print(f"note: {n}")
    if args.json is not None:
        doc = {"seed": seed, "pairs": cfg.pairs, "guests_per_host": cfg.guests_per_host,
               "faults": list(cfg.faults), "seconds": round(elapsed, 1),
               "rounds": sum(g.rounds for g in groups), "ok": ok, "interrupted": interrupted,
               "invariants": rows, "notes": notes,
               "fault_log": run["faults"], "stalls": run["stalls"],
               "outcome_counts": _counts(run["outcomes"]), "outcomes": run["outcomes"]}
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    if args.keep or not ok or interrupted:
        console.print(f"logs kept in {base}")
    elif args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    if interrupted:
        bad = sum(1 for r in rows if not r["ok"])
        console.print(f"[bold yellow]stress interrupted[/] after {elapsed:.0f} s: partial results above"
                      + (f"; {bad} row(s) already marked VIOLATED" if bad else "; no violation so far"))
        return 130
    console.print("[bold green]stress OK[/]" if ok else "[bold red]stress FAILED: invariant violated[/]")
    return 0 if ok else 1


def _counts(outs: list[dict]) -> dict:
    c: dict = {}
    for o in outs:
        key = f"{o['kind']}:{o['result']}"
        c[key] = c.get(key, 0) + 1
    return c


if __name__ == "__main__":
    sys.exit(main())
