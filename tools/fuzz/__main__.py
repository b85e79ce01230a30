"""python -m tools.fuzz: run the device-side fuzz targets for N cases, report cases per second.

Case i of a target is generated from random.Random(f"{seed}/{target}/{i}"), so a failure is
reproduced with `--seed S --target T --start I --cases 1`. The seed is random unless given, and
always printed. Exit 0 when every case passed, 1 on the first oracle mismatch, exception or hang
(a case over CASE_DEADLINE seconds), 2 on bad flags, 130 on Ctrl-C (after the partial counts).
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import traceback

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.cli import add_version

from . import CASE_DEADLINE, control, packed, rings, vsock

TARGETS = {"rings": rings.run_case, "vsock": vsock.run_case, "control": control.run_case,
           "packed": packed.run_case}


def case_rng(seed: int, target: str, i: int) -> random.Random:
    return random.Random(f"{seed}/{target}/{i}")


def _count(lo: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"{n} is below {lo}")
        return n
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=_count(1), default=10_000, help="cases per target (default 10000)")
    p.add_argument("--target", choices=[*TARGETS, "all"], default="all", help="which target (default all)")
    p.add_argument("--seed", type=int, default=None, help="seed of every case (default: random, printed)")
    p.add_argument("--start", type=_count(0), default=0, help="first case index (to reproduce one case)")
    add_version(p)
    return p


class Tally:
    """What one target has done so far (printed whole or, on Ctrl-C, partial)."""

    def __init__(self, name: str):
        self.name = name
        self.done = 0
        self.totals: dict = {}
        self.t0 = time.perf_counter()
        self.dt = 0.0

    def add(self, stats: dict) -> None:
        self.done += 1
        for k, v in stats.items():
            self.totals[k] = self.totals.get(k, 0) + v

    def line(self) -> str:
        dt = self.dt or time.perf_counter() - self.t0
        return (f"{self.name}: {self.done} cases in {dt:.1f} s = {self.done / max(dt, 1e-9):,.0f} cases/s"
                + "".join(f", {k} {v:,}" for k, v in self.totals.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    out = Console(highlight=False, soft_wrap=True)
    logging.disable(logging.CRITICAL)       # the host logs every NEEDS_RESET it raises
    targets = list(TARGETS) if args.target == "all" else [args.target]
    out.print(f"fuzz: seed {seed}, {args.cases:,} case(s) from {args.start} of {', '.join(targets)}")
    tallies: list[Tally] = []
    failure = None
    progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=out,
                        transient=True, disable=not out.is_terminal)   # lines print above the bars
    try:
        with progress:
            for name in targets:
                failure = _run_target(name, seed, args, progress, tallies, out)
                out.print(tallies[-1].line())
                if failure:
                    break
    except KeyboardInterrupt:
        if tallies and not tallies[-1].dt:
            out.print(tallies[-1].line() + " (interrupted)")
        total = sum(t.done for t in tallies)
        out.print(f"fuzz interrupted after {total:,} case(s) (seed {seed}): no failure so far")
        return 130
    total = sum(t.done for t in tallies)
    if failure:
        out.print(f"fuzz FAILED: {failure} (seed {seed}, {total:,} case(s) passed before it)")
        return 1
    out.print(f"fuzz OK: {total:,} case(s) of {', '.join(targets)} passed (seed {seed})")
    return 0


def _run_target(name: str, seed: int, args, progress: Progress, tallies: list, out: Console) -> str | None:
    """Run one target's cases; the failure as one line (details printed), or None."""
    fn = TARGETS[name]
    tally = Tally(name)
    tallies.append(tally)
    task = progress.add_task(name, total=args.cases, rate="")
    for i in range(args.start, args.start + args.cases):
        c0 = time.perf_counter()
        try:
            stats = fn(case_rng(seed, name, i))
        except Exception as e:  # an oracle mismatch or a crash of the code under test
            out.print(f"{name}: case {i} FAILED: {type(e).__name__}: {e}", markup=False)
            out.print(traceback.format_exc(limit=4), markup=False, end="")
            out.print(f"reproduce: python -m tools.fuzz --target {name} --seed {seed} --start {i} --cases 1")
            tally.dt = time.perf_counter() - tally.t0
            return f"{name} case {i}: {type(e).__name__}"
        if time.perf_counter() - c0 > CASE_DEADLINE:
            out.print(f"{name}: case {i} took {time.perf_counter() - c0:.1f} s (hang?)")
            tally.dt = time.perf_counter() - tally.t0
            return f"{name} case {i}: over {CASE_DEADLINE} s"
        tally.add(stats)
        if tally.done % 50 == 0:
            el = time.perf_counter() - tally.t0
            progress.update(task, completed=tally.done, rate=f"{tally.done / max(el, 1e-9):,.0f}/s")
    tally.dt = time.perf_counter() - tally.t0
    progress.update(task, completed=tally.done)
    return None


if __name__ == "__main__":
    sys.exit(main())
