"""python -m tools.mutants: plant each curated bug in a temporary copy, run its tests, score.

Exit status: 0 when the score reaches --min-score (default 95 %), 1 below it, 2 for bad
arguments, a bad catalog or related tests that fail without any mutant (baseline), 130 on Ctrl-C
(the partial table is printed and the temporary copies are removed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from shared.cli import add_version

from . import DEFAULT_THRESHOLD, __version__
from .runner import (COUNTS_AS_KILLED, EQUIVALENT, INTERRUPTED, KILLED, STALE, SURVIVED, TIMEOUT,
                     CatalogError, Result, Runner, load_catalog, score)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STYLE = {KILLED: "green", TIMEOUT: "green", SURVIVED: "bold red", STALE: "yellow",
         EQUIVALENT: "dim", INTERRUPTED: "dim", "error": "red"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.mutants", description=__doc__.splitlines()[0])
    p.add_argument("--only", metavar="ID,...", help="run only these mutants (comma-separated ids)")
    p.add_argument("--list", action="store_true", help="list the catalog and exit")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="mutants run at once, each in its own copy of the tree (default 1)")
    p.add_argument("--timeout", type=float, default=180.0, metavar="S",
                   help="seconds for one mutant's tests; past it the run is killed and the mutant "
                        "counts as killed by timeout (default 180)")
    p.add_argument("--min-score", type=float, default=DEFAULT_THRESHOLD, metavar="PCT",
                   help=f"exit 1 below this score (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the check that the related tests pass without any mutant")
    p.add_argument("--catalog", default=None, metavar="FILE",
                   help="the mutant list (default: tools/mutants/catalog.toml)")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="the tree to copy and mutate (default: this checkout; never written)")
    add_version(p)
    args = p.parse_args(argv)
    args.catalog = args.catalog or str(HERE / "catalog.toml")
    args.root = args.root or str(ROOT)
    if args.jobs < 1 or args.timeout <= 0:
        p.error("--jobs must be at least 1 and --timeout positive")
    return args


def fail(msg: str) -> int:
    print(f"mutants: {msg}", file=sys.stderr)
    return 2


def render(results: list[Result], mutants, elapsed: float, threshold: float, console) -> float:
    from rich.table import Table
    order = {m.id: i for i, m in enumerate(mutants)}
    table = Table(title="mutants", show_lines=False)
    for col in ("id", "file", "status", "s", "killed by / why"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "file", "status", "s"))
    for r in sorted(results, key=lambda r: order.get(r.id, 0)):
        status = r.status + (" (killed)" if r.status == TIMEOUT else "")
        detail = r.detail if r.status != SURVIVED else f"{r.note}"
        table.add_row(r.id, r.file, f"[{STYLE.get(r.status, '')}]{status}[/]",
                      f"{r.seconds:.1f}" if r.seconds else "", detail)
    console.print(table)
    pct, counts = score(results)
    counted = sum(v for k, v in counts.items() if k not in (EQUIVALENT, INTERRUPTED))
    killed = sum(counts.get(k, 0) for k in COUNTS_AS_KILLED)
    parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    colour = "green" if pct >= threshold else "bold red"
    console.print(f"score: [{colour}]{pct:.1f} %[/] ({killed} of {counted} counted mutants killed; "
                  f"{parts}) in {elapsed:.0f} s; threshold {threshold:g} %")
    return pct


def list_catalog(mutants, console) -> None:
    from rich.table import Table
    table = Table(title=f"{len(mutants)} mutants")
    for col in ("id", "file", "tests", "note"):
        table.add_column(col, overflow="fold")
    for m in mutants:
        note = m.note + (f" [dim](equivalent: {m.equivalent})[/]" if m.equivalent else "")
        table.add_row(m.id, m.file, "\n".join(m.tests), note)
    console.print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)        # a log file or a pipe: room for the node ids
    try:
        mutants = load_catalog(Path(args.catalog))
    except CatalogError as e:
        return fail(str(e))
    root = Path(args.root)
    if not root.is_dir():
        return fail(f"--root {root} is not a directory")
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        known = {m.id for m in mutants}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            return fail(f"unknown mutant id(s): {', '.join(unknown)} (see --list)")
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        list_catalog(mutants, console)
        return 0

    t0 = time.monotonic()
    results: list[Result] = []
    runner = None
    interrupted = False
    try:
        runner = Runner(root, jobs=args.jobs, timeout=args.timeout)
        if not args.no_baseline:
            tests = sorted({t for m in mutants if not m.equivalent and runner.occurrences(m) == 1
                            for t in m.tests})
            if tests:
                console.print(f"[dim]baseline: {len(tests)} related test ids without any mutant...[/]")
                ok, tail = runner.baseline(tests, max(args.timeout, 600.0))
                if not ok:
                    print(tail, file=sys.stderr)
                    return fail("the related tests fail without any mutant: fix them first "
                                "(or see --no-baseline)")
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        futures: dict = {}
        try:
            # submitting inside the try: a Ctrl-C that lands while the first mutant already
            # runs must stop it before the pool's shutdown waits for it
            futures = {pool.submit(runner.run_mutant, m): m for m in mutants}
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                console.print(f"[dim]{len(results)}/{len(mutants)}[/] {r.id}: "
                              f"[{STYLE.get(r.status, '')}]{r.status}[/] {r.seconds:.1f} s")
        except KeyboardInterrupt:
            interrupted = True
            runner.stop()
            for f in futures:
                f.cancel()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for f in futures:               # the runs Ctrl-C cut short end as "interrupted"
            if f.done() and not f.cancelled() and f.exception() is None and f.result() not in results:
                results.append(f.result())
    except KeyboardInterrupt:
        interrupted = True
        if runner is not None:
            runner.stop()
    finally:
        if runner is not None:
            runner.close()
    elapsed = time.monotonic() - t0
    if not results and interrupted:
        console.print("interrupted before any mutant ran")
        return 130
    pct = render(results, mutants, elapsed, args.min_score, console)
    if args.json:
        counts = score(results)[1]
        doc = {"version": __version__, "score": round(pct, 2), "threshold": args.min_score,
               "passed": pct >= args.min_score, "interrupted": interrupted,
               "elapsed_s": round(elapsed, 1), "counts": counts,
               "results": [r.as_dict() for r in results]}
        try:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as e:
            return fail(f"cannot write {args.json}: {e}")
    if interrupted:
        return 130
    return 0 if pct >= args.min_score else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:           # Ctrl-C outside the run loop (e.g. while copying)
        sys.exit(130)
