"""python -m tools.fuzz: run the device-side fuzz targets for N cases, report cases per second.

Case i of a target is generated from random.Random(f"{seed}/{target}/{i}"), so a failure is
reproduced with `--seed S --target T --start I --cases 1`. Exit 1 on the first oracle mismatch,
exception or hang (a case over CASE_DEADLINE seconds).
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import traceback

from . import CASE_DEADLINE, control, rings, vsock

TARGETS = {"rings": rings.run_case, "vsock": vsock.run_case, "control": control.run_case}


def case_rng(seed: int, target: str, i: int) -> random.Random:
    return random.Random(f"{seed}/{target}/{i}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000, help="cases per target (default 10000)")
    p.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first case index (to reproduce one case)")
    args = p.parse_args(argv)
    if args.cases < 1 or args.start < 0:
        print("fuzz: --cases must be positive and --start not negative", file=sys.stderr)
        return 2
    logging.disable(logging.CRITICAL)       # the host logs every NEEDS_RESET it raises
    targets = list(TARGETS) if args.target == "all" else [args.target]
    failed = False
    for name in targets:
        fn = TARGETS[name]
        totals: dict = {}
        t0 = time.perf_counter()
        done = 0
        for i in range(args.start, args.start + args.cases):
            c0 = time.perf_counter()
            try:
                stats = fn(case_rng(args.seed, name, i))
            except Exception as e:
                print(f"{name}: case {i} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(limit=4)
                print(f"reproduce: python -m tools.fuzz --target {name} --seed {args.seed} --start {i} --cases 1")
                failed = True
                break
            if time.perf_counter() - c0 > CASE_DEADLINE:
                print(f"{name}: case {i} took {time.perf_counter() - c0:.1f} s (hang?)")
                failed = True
                break
            done += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
        dt = time.perf_counter() - t0
        print(f"{name}: {done} cases in {dt:.1f} s = {done / dt:,.0f} cases/s; "
              + ", ".join(f"{k} {v:,}" for k, v in totals.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
