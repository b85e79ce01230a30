"""python -m tools.bench: every figure of the data path next to its OS baselines, in one run.

    python -m tools.bench --quick --json before.json --plot before.png

See tools/bench/__init__.py for what is measured. Ctrl-C prints what was measured so far and
exits 130 after stopping every process it started.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tools.bench import plot as plotting
from tools.bench.model import figure, value
from tools.bench.report import num, render, targets
from tools.bench.scenarios import NA, PAIRS, Options, Plan
from tools.launch import ROOT
from shared.cli import add_version


def _pairs(text: str) -> list[int]:
    try:
        v = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2,4,8") from None
    if not v or any(not 1 <= n <= 16 for n in v):
        raise argparse.ArgumentTypeError(f"pairs must be 1..16, not {text!r}")
    return sorted(set(v))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    add_version(p)
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 2 repeats of ~0.2 s, the seeds' mode on the main path only")
    p.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 5; 2 with --quick)")
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds per transfer or round-trip run (default 1; 0.2 with --quick)")
    p.add_argument("--poll-us", type=int, default=50, metavar="N",
                   help="the adaptive-poll window passed as --poll-us N to host and guest (default 50)")
    p.add_argument("--pairs", type=_pairs, default=PAIRS, metavar="LIST",
                   help="pair counts for the aggregate figures (default 1,2,4,8)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the machine, the command and every figure as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="plot throughput against write size and against pairs (needs matplotlib)")
    p.add_argument("--keep-logs", action="store_true", help="keep the run dirs and process logs")
    return p


def _writable(path: Path) -> str | None:
    """Why `path` cannot be written, or None."""
    if path.is_dir():
        return f"{path} is a directory"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import posix_ipc
        pv = getattr(posix_ipc, "VERSION", None) or getattr(posix_ipc, "__version__", None)
    except ImportError:
        pv = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "posix_ipc": pv, "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg()),
            "commit": commit}


def _summary(figs: list[dict]) -> str:
    out = []
    for f in figs:
        if f.get("na"):
            out.append("n/a")
        else:
            out.append(f"{num(value(f))} {f['metric']}")
    return ", ".join(out)


def run(args, console: Console, err: Console) -> tuple[dict, int]:
    quick = args.quick
    opts = Options(quick=quick, repeats=args.repeats or (2 if quick else 5),
                   target_s=args.seconds or (0.2 if quick else 1.0), idle_s=1.5 if quick else 5.0,
                   poll_us=args.poll_us, pairs=args.pairs)
    from tools.bench.cluster import Features
    results = {"machine": machine(), "command": [sys.executable, "-m", "tools.bench", *sys.argv[1:]],
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": opts.__dict__,
               "figures": [], "interrupted": False}
    tmp = Path(tempfile.mkdtemp(prefix="ve-bench-"))
    plan = None
    failed = 0
    t0 = time.monotonic()
    try:
        err.print("checking what this build supports…")
        feats = Features.detect()
        results["features"] = feats.as_dict()
        plan = Plan(opts, feats, tmp)
        steps = plan.steps()
        results["modes"] = plan.modes
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as prog:
            task = prog.add_task("bench", total=len(steps))
            for i, step in enumerate(steps, 1):
                prog.update(task, description=step.label)
                try:
                    figs = step.run()
                except NA as e:
                    figs = [figure(na=str(e), **t) for t in step.templates]
                except Exception as e:   # one scenario failing never stops the others
                    failed += 1
                    figs = [figure(na=f"failed: {type(e).__name__}: {e}", **t) for t in step.templates]
                results["figures"] += figs
                prog.console.print(f"[dim]{i:>3}/{len(steps)}[/] {step.label}: {_summary(figs)}")
                prog.advance(task)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)      # a second Ctrl-C must not cut the cleanup
        results["interrupted"] = True
        err.print("[yellow]interrupted: stopping every process the bench started…[/]")
    finally:
        if plan is not None:
            plan.close()
        results["elapsed_s"] = round(time.monotonic() - t0, 1)
        from shared.resources import ours_in_dev_shm, run_tag
        tags = [run_tag(d / "run") for d in tmp.iterdir() if d.is_dir()] if tmp.exists() else []
        results["leaked"] = [n for n in ours_in_dev_shm() if any(t in n for t in tags)]
        if args.keep_logs:
            err.print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["targets"] = targets(results["figures"])
    return results, failed


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    problems = []
    if args.repeats is not None and args.repeats < 1:
        problems.append("--repeats must be at least 1")
    if args.seconds is not None and not 0 < args.seconds <= 60:
        problems.append("--seconds must be in (0, 60]")
    if args.poll_us < 1:
        problems.append("--poll-us must be at least 1 (0 is the pure-semaphore mode, always measured)")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and (why := _writable(path)):
            problems.append(f"{opt}: cannot write {path}: {why}")
    if args.plot is not None and not plotting.available():
        problems.append(plotting.NEED)
    if problems:
        print(f"tools.bench: {problems[0]}", file=sys.stderr)
        return 2
    console, err = Console(), Console(stderr=True)
    prev_term = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        results, failed = run(args, console, err)
    finally:
        signal.signal(signal.SIGTERM, prev_term)
    render(console, results)
    m = results["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, posix_ipc {m['posix_ipc']}, "
                  f"load {', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])} at start; "
                  f"{results['elapsed_s']} s")
    if results["leaked"]:
        console.print(f"[red]left in /dev/shm[/]: {results['leaked']}")
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))
            console.print(f"figures written to {args.json}")
        except OSError as e:
            print(f"tools.bench: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 1
    if args.plot is not None:
        plotting.plot(results, args.plot)
        console.print(f"plot written to {args.plot}")
    if results["interrupted"]:
        return 130
    return 1 if failed or results["leaked"] else 0


if __name__ == "__main__":
    sys.exit(main())
