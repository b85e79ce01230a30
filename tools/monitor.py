"""python -m tools.monitor: a live view of a run dir's host devices and guests.

Data first (shared.stats snapshots every process writes), then pure functions that turn a snapshot
into rich renderables (one per panel: `devices_table`, `guests_table`, `render`), then a Live loop
of a few lines at the edge. Rates are computed between two snapshots.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shared.resources import default_run_dir
from shared.stats import read_all

STATUS_BITS = [(0x80, "FAILED"), (0x40, "NEEDS_RESET"), (0x04, "DRIVER_OK"), (0x08, "FEATURES_OK"),
               (0x02, "DRIVER"), (0x01, "ACK")]


def status_text(status) -> Text:
    if not isinstance(status, int):
        return Text("?")
    if status == 0:
        return Text("RESET", style="dim")
    for mask, name in STATUS_BITS:
        if status & mask:
            style = {"FAILED": "bold red", "NEEDS_RESET": "bold red", "DRIVER_OK": "green"}.get(name, "yellow")
            return Text(name, style=style)
    return Text(hex(status))


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def _get(d: dict, *keys, default=0):
    for k in keys:
        if k in d:
            return d[k]
    return default


def _rate(cur: dict, prev: dict | None, key: str, dt: float) -> float:
    if not prev or dt <= 0:
        return 0.0
    a, b = cur.get(key, 0), prev.get(key, 0)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return 0.0
    return max(0.0, (a - b) / dt)


def devices_table(devices: list[dict], prev: dict[int, dict], dt: float) -> Table:
    t = Table(title="host devices", expand=True)
    for col in ("guest", "cid", "pid", "status", "kicks", "irqs", "tx pkts", "rx pkts", "tx B/s",
                "rx B/s", "errors", "conns"):
        t.add_column(col, justify="right" if col not in ("guest", "status") else "left")
    for d in sorted(devices, key=lambda d: (str(d.get("guest")), d.get("pid", 0))):
        s = d.get("stats", {}) or {}
        p = (prev.get(d.get("pid")) or {}).get("stats")
        t.add_row(str(d.get("guest", "?")), str(d.get("cid", "-")), str(d.get("pid")),
                  status_text(d.get("status")),
                  human(_get(s, "kicks")), human(_get(s, "interrupts", "irqs")),
                  human(_get(s, "tx_packets", "tx_pkts")), human(_get(s, "rx_packets", "rx_pkts")),
                  human(_rate(s, p, "tx_bytes", dt), "B"), human(_rate(s, p, "rx_bytes", dt), "B"),
                  Text(str(_get(s, "errors", "vq_errors")),
                       style="bold red" if _get(s, "errors", "vq_errors") else ""),
                  str(_get(s, "connections", "conns", default="-")))
    if not devices:
        t.add_row("(no devices)", *[""] * 11)
    return t


def guests_table(guests: list[dict]) -> Table:
    t = Table(title="guests", expand=True)
    for col in ("guest", "cid", "pid", "host link", "sockets", "rx bufs", "queued replies", "tx queued",
                "RAM in use"):
        t.add_column(col, justify="left" if col in ("guest", "host link") else "right")
    for g in sorted(guests, key=lambda g: str(g.get("name"))):
        s = g.get("stats", {}) or {}
        link = Text("connected", style="green") if g.get("connected") else Text("reconnecting", style="bold yellow")
        t.add_row(str(g.get("name", "?")), str(g.get("cid", "-")), str(g.get("pid")), link,
                  str(_get(s, "sockets", default="-")), str(_get(s, "rx_buf_nr", default="-")),
                  str(_get(s, "queued_replies", default="-")), str(_get(s, "send_pkt_list", default="-")),
                  f"{human(g.get('mem_in_use', 0), 'B')}/{human(g.get('mem_total', 0), 'B')}")
    if not guests:
        t.add_row("(no guests)", *[""] * 8)
    return t


def render(snapshot: list[dict], prev: list[dict] | None = None, dt: float = 0.0, run_dir: str = "") -> Group:
    devices = [d for d in snapshot if d.get("role") == "device"]
    guests = [d for d in snapshot if d.get("role") == "guest"]
    prev_by_pid = {d.get("pid"): d for d in (prev or [])}
    header = Text(f"virtio-emu monitor  {run_dir}  {time.strftime('%H:%M:%S')}", style="bold")
    return Group(header, devices_table(devices, prev_by_pid, dt), guests_table(guests))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.monitor",
                                description="Live view of the host devices and guests of a run dir.")
    p.add_argument("--run-dir", type=Path, default=None, help=f"run directory (default {default_run_dir()})")
    p.add_argument("--interval", type=float, default=0.5, help="refresh period in seconds (default 0.5)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    args = p.parse_args(argv)
    run_dir = args.run_dir or default_run_dir()
    if not Path(run_dir).is_dir():
        print(f"monitor: no run directory {run_dir}", file=sys.stderr)
        return 1
    if args.interval <= 0:
        print("monitor: --interval must be positive", file=sys.stderr)
        return 2
    prev, t_prev = read_all(run_dir), time.monotonic()
    if args.once:
        from rich.console import Console
        Console().print(render(prev, None, 0.0, str(run_dir)))
        return 0
    end = None if args.duration is None else time.monotonic() + args.duration
    try:
        with Live(render(prev, None, 0.0, str(run_dir)), refresh_per_second=4) as live:
            while end is None or time.monotonic() < end:
                time.sleep(args.interval)
                cur, now = read_all(run_dir), time.monotonic()
                live.update(render(cur, prev, now - t_prev, str(run_dir)))
                prev, t_prev = cur, now
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
