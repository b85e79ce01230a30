"""Round trips per second through one split ring between two processes, next to OS baselines.

A thin CLI over tools.bench.ring (also the "ring" scenario of `python -m tools.bench`). The bench
process plays the guest (it creates the guest RAM and the kick/call semaphores, as a
VMM does); a forked child plays the vhost backend. The guest posts a 64-byte buffer, the host
pops it, reads it and returns it on the used ring, the guest waits for the used entry and posts
again. `--depth` buffers are kept in flight (1 = strict ping-pong).

  suppression on   EVENT_IDX; guest: kick_prepare, disable_cb / get_buf / enable_cb;
                   host: disable_notify / get_vq_desc / enable_notify, signal()
  suppression off  no EVENT_IDX, no flags: the guest kicks every buffer, the host interrupts
                   for every buffer

Baselines in the same run: a socketpair ping-pong and a multiprocessing.Pipe ping-pong of
64-byte messages. Every waiter sleeps in doorbell.wait(timeout) in a loop so it notices
shutdown. Resources get names from resource_base() under a temporary run dir, are recorded in
an owner record before creation, and are unlinked at the end.

    python -m tools.bench_ring --seconds 2 --ring-size 256 --depth 16
"""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from shared.cli import add_version
from tools.bench import baselines
from tools.bench.ring import PAYLOAD, bench_ring


def bench_socketpair(seconds: float) -> dict:
    lat = baselines.rr("socketpair", PAYLOAD, seconds)
    return {"rt_s": len(lat) / (sum(lat) / 1e6), "rt": len(lat)}


def bench_pipe(seconds: float) -> dict:
    lat = baselines.rr("pipe", PAYLOAD, seconds)
    return {"rt_s": len(lat) / (sum(lat) / 1e6), "rt": len(lat)}


def ring_depths(depth: int, ring_size: int) -> tuple[list[int], str]:
    """The depths the ring rows run at (and are labelled with): 1, and --depth as far as the ring
    allows (no more buffers than descriptors can be in flight), with a note when it was cut."""
    used = min(depth, ring_size)
    note = (f"--depth {depth} is more than a ring of {ring_size} descriptors holds: "
            f"depth {used} used" if used < depth else "")
    return ([1] if used == 1 else [1, used]), note


# --- report ---------------------------------------------------------------------------------------
def render(rows: list[tuple[str, dict]], sock: float, pipe: float) -> Table:
    t = Table(title=f"split ring round trips ({PAYLOAD}-byte buffers) vs OS ping-pong")
    for col in ("scenario", "round trips/s", "µs/rt", "kicks/buf", "irqs/buf", "× socketpair",
                "× Pipe"):
        t.add_column(col, justify="left" if col == "scenario" else "right", no_wrap=True)
    for name, r in rows:
        t.add_row(name, f"{r['rt_s']:,.0f}", f"{1e6 / r['rt_s']:.1f}" if r["rt_s"] else "-",
                  f"{r['kicks']:.3f}" if "kicks" in r else "-",
                  f"{r['irqs']:.3f}" if "irqs" in r else "-",
                  f"{r['rt_s'] / sock:.2f}", f"{r['rt_s'] / pipe:.2f}")
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_ring", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Scenarios: ring with notification suppression on/off at "
                                       "depth 1 and at --depth, socketpair and Pipe ping-pong.")
    add_version(p)
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per scenario (default 2)")
    p.add_argument("--ring-size", type=int, default=256, help="queue size N, a power of 2 (default 256)")
    p.add_argument("--depth", type=int, default=16,
                   help="buffers in flight for the pipelined ring rows (default 16; 1 = ping-pong only)")
    args = p.parse_args(argv)
    from shared.ring_layout import check_num
    try:
        check_num(args.ring_size)
    except ValueError as exc:
        p.error(str(exc))
    if args.seconds <= 0 or args.depth < 1:
        p.error("--seconds must be positive and --depth at least 1")
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 110))
    sock = bench_socketpair(args.seconds)
    pipe = bench_pipe(args.seconds)
    rows = [("socketpair ping-pong", sock), ("multiprocessing.Pipe ping-pong", pipe)]
    depths, note = ring_depths(args.depth, args.ring_size)
    if note:
        console.print(f"note: {note}")
    for depth in depths:
        for suppress in (True, False):
            r = bench_ring(args.seconds, args.ring_size, depth, suppress)
            rows.append((f"ring, depth {depth}, suppression {'on' if suppress else 'off'}", r))
    console.print(render(rows, sock["rt_s"], pipe["rt_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
