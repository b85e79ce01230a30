"""python -m tools.monitor: a live picture of the virtqueues, the vsock credit and the devices of a run.

Data first: every guest and host device process writes a stats snapshot into the run dir
(shared.stats); `model.build_frame` merges two of them into one JSON-ready frame with rates. The
ring picture reads each queue from the guest's RAM itself, attached read-only (`ram.ReadOnlyRAM`)
and decoded by the pure `ring.decode_ring`. Then one pure function per panel (`panels`) turns a
frame into a rich renderable, and a Live loop of a few lines at the edge (`run_live`) refreshes it
four times a second, with a small key reader (`keys`) where stdin is a terminal.

    --view queues|ring|conns|net   what to show (keys q r c n switch, g cycles the guest, a all)
    --guest CID                    one guest (the ring view needs one: default the first)
    --once [--json]                one frame (rates over --interval) for scripts, then exit

Figures a process does not publish yet are shown as "–" (and null in JSON). Keys documented in
docs/monitor.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console, Group
from rich.segment import Segments
from rich.text import Text

from shared.cli import add_version
from shared.resources import default_run_dir
from shared.stats import read_all

from .model import History, build_frame, ring_sources
from .panels import (VIEWS, conns_parts, decode_all, guests_panel, guests_summary, header, legend,
                     migration_lines, net_panel, problem_lines, queues_parts, ring_parts)
from .ring import ring_legend
from .ring_packed import packed_legend
from .ram import RamError, ReadOnlyRAM

RATE_PERIOD = 1.0       # rates are taken over at least this many seconds of snapshots
# `--once --json`: what the document is and which version of its layout (docs/monitor.md, "JSON").
# Bump FRAME_VERSION when a key is removed or changes meaning; adding keys keeps it.
FRAME_SCHEMA = "virtio-emu/monitor-frame"
FRAME_VERSION = 1


def view_parts(frame: dict, view: str, width: int, guest: int | None, rings, ring_error: str) -> list:
    """The view's own parts, the one that matters most first (its rows: queues, connections,
    net devices, ring pictures), then the rest (second tables, broken queues, the ring legend)."""
    if view == "queues":
        return queues_parts(frame, width, guest)
    if view == "conns":
        return conns_parts(frame, width, guest)
    if view == "net":
        return [net_panel(frame, width, guest)]
    name = next((g["name"] for g in frame["guests"] if g["cid"] == guest), f"guest {guest}")
    packed = [packed_legend()] if any(getattr(r["picture"], "packed", False) for r in rings or []) else []
    return ring_parts(rings, name, width, ring_error) + [ring_legend()] + packed


def render_view(frame: dict, view: str = "queues", width: int = 100, guest: int | None = None,
                history: History | None = None, rings: list[dict] | None = None,
                ring_error: str = "", keys: bool = False, memo=None, height: int | None = None,
                console: Console | None = None):
    """The whole screen for one view: header, the guests tables, the view's panel, the legend.

    With `height` (a live terminal's rows) the screen fits it: when the whole does not, the
    guests tables fold into a summary line, the view's rows come right after the header (cut,
    saying how many lines are below, only if they alone overflow), and the view's second table
    and the legends follow only as far as they fit whole.

    `memo(key, make)` may return a cached rendering of `make()` for an unchanged key (the live
    loop's ring view redraws four times a second while the snapshots change twice)."""
    memo = memo or (lambda key, make: make())
    head = header(frame, view, guest, keys)
    guests = memo(("guests", frame.get("stamp"), width), lambda: guests_panel(frame, width, history))
    mig = migration_lines(frame)
    if mig:
        guests = Group(guests, *mig)
    own = view_parts(frame, view, width, guest, rings, ring_error)
    leg = memo(("legend", view, width), lambda: legend(view))
    if height is None:
        return Group(head, guests, *own, leg)
    return fit_height(console or _measuring_console(width), width, height, head, guests, own, leg,
                      [guests_summary(frame, guest), *mig, *problem_lines(frame, guest)],
                      legend(view, with_guests=False))


def _measuring_console(width: int) -> Console:
    import io
    return Console(width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor",
                   legacy_windows=False)


def fit_height(console: Console, width: int, height: int, head, guests, own: list, leg,
               summary: list, short_legend) -> Segments:
    """Lay the parts out in `height` rows (see render_view); each part is rendered once."""
    from rich.segment import Segment
    opts = console.options.update(width=width, max_width=width, height=None)

    def lines(r) -> list:
        return console.render_lines(r, opts, pad=False, new_lines=False)

    full = [lines(p) for p in (head, guests, *own, leg)]
    if sum(len(x) for x in full) <= height:
        chosen = [ln for part in full for ln in part]
    else:
        chosen = lines(head) + [ln for s in summary for ln in lines(s)]
        room = height - len(chosen)
        main = lines(own[0]) if own else []
        if len(main) > room:
            keep = max(0, room - 1)
            hidden = len(main) - keep
            main = main[:keep] + lines(Text(f"  … {hidden} more line{'s' if hidden > 1 else ''} below: "
                                            "a taller terminal, or g for one guest at a time", "dim"))
        chosen += main[:max(0, room)]
        for extra in [*own[1:], short_legend]:
            got = lines(extra)
            if len(chosen) + len(got) <= height:
                chosen += got
    out: list = []
    for i, ln in enumerate(chosen):
        if i:
            out.append(Segment.line())
        out.extend(ln)
    return Segments(out)


class SegmentMemo:
    """Rendered segments of the parts of a screen that did not change (see render_view)."""

    def __init__(self, console: Console):
        self.console = console
        self.cache: dict = {}

    def __call__(self, key, make):
        """key = (part, what it shows, width); the rendering is cached while the key holds."""
        got = self.cache.get(key)
        if got is None:
            got = Segments(list(self.console.render(make(), self.console.options.update(width=key[-1]))))
            if len(self.cache) > 16:
                self.cache.clear()
            self.cache[key] = got
        return got


def render(snapshot: list[dict], prev: list[dict] | None = None, dt: float = 0.0, run_dir: str = "",
           view: str = "queues", width: int | None = None, height: int | None = None):
    """Raw snapshots in, the screen out (what tools.demo shows; `height`: fit a terminal's rows)."""
    width = width or shutil.get_terminal_size((100, 40)).columns
    return render_view(build_frame(snapshot, prev, dt, run_dir=run_dir), view, width, height=height)


class RingReader:
    """Attachments of guest RAM, kept between frames, dropped when their guest goes away."""

    def __init__(self):
        self.rams: dict[str, ReadOnlyRAM] = {}

    def pictures(self, raw: list[dict], cid: int | None) -> tuple[list[dict], str]:
        if cid is None:
            return [], "no guest to draw"
        src = ring_sources(raw, cid)
        if src is None:
            self.close_except(set())
            return [], f"guest {cid} publishes no RAM table (yet)"
        ram = self.rams.get(src["shm"])
        try:
            if ram is None:
                ram = self.rams[src["shm"]] = ReadOnlyRAM(src["shm"], src["table"])
            self.close_except({src["shm"]})
            return decode_all(ram.read, src), ""
        except RamError as e:
            self.close_except(set())
            return [], str(e)

    def close_except(self, keep: set[str]) -> None:
        for name in [n for n in self.rams if n not in keep]:
            self.rams.pop(name).close()


def ring_json(rings: list[dict]) -> list[dict]:
    out = []
    for r in rings:
        p = r["picture"]
        out.append({"q": r["q"], "title": r["title"], "num": p.num, "avail_idx": p.avail_idx,
                    "used_idx": p.used_idx, "last_avail": p.last_avail, "last_used": p.last_used,
                    "used_event": p.used_event, "avail_event": p.avail_event, "counts": p.counts(),
                    "desc": "".join(p.desc), "ring": "".join(p.ring), "problems": p.problems})
    return out


def once(run_dir: Path, args, width: int) -> int:
    first = read_all(run_dir)
    time.sleep(args.interval)
    raw = read_all(run_dir)
    frame = build_frame(raw, first, args.interval, run_dir=str(run_dir))
    reader = RingReader()
    try:
        if args.json:
            frame["rings"] = []
            for g in frame["guests"]:
                if args.guest is not None and g["cid"] != args.guest:
                    continue
                rings, err = reader.pictures(raw, g["cid"])
                frame["rings"].append({"cid": g["cid"], "name": g["name"], "error": err,
                                       "queues": ring_json(rings)})
            from shared.cli import version
            doc = {"schema": FRAME_SCHEMA, "version": FRAME_VERSION, "virtio_emu": version(), **frame}
            json.dump(doc, sys.stdout, indent=1, default=str)
            sys.stdout.write("\n")
            return 0
        guest = args.guest
        rings, err = [], ""
        if args.view == "ring":
            guest = guest if guest is not None else next((g["cid"] for g in frame["guests"]), None)
            rings, err = reader.pictures(raw, guest)
        Console(width=width, soft_wrap=False).print(
            render_view(frame, args.view, width, guest, None, rings, err))
        return 0
    finally:
        reader.close_except(set())


def run_live(run_dir: Path, args, console: Console) -> int:
    from rich.live import Live

    from .keys import KeyReader, apply_key
    if args.nice:
        # An observer yields to what it observes: on a machine with few cores the data path's
        # wake-ups must not wait behind a redraw (measured: docs/monitor.md, "Cost").
        try:
            os.nice(args.nice)
        except OSError:
            pass
    view, guest = args.view, args.guest
    history = History()
    reader = RingReader()
    samples: list[tuple[float, list[dict]]] = [(time.monotonic(), read_all(run_dir))]
    end = None if args.duration is None else time.monotonic() + args.duration
    use_keys = KeyReader.available() and not args.no_keys

    last_key = [None]
    last_stamp = [None]
    memo = SegmentMemo(console)

    def stamp(raw):
        return tuple(sorted((d.get("pid"), d.get("time")) for d in raw))

    def frame_now():
        nonlocal guest
        now = time.monotonic()
        raw = read_all(run_dir)
        key = (stamp(raw), view, guest)
        if view != "ring" and key == last_key[0]:
            return None, None            # no process wrote a new snapshot: nothing to redraw
        last_key[0] = key
        samples.append((now, raw))
        while len(samples) > 2 and samples[1][0] <= now - RATE_PERIOD:
            samples.pop(0)
        t0, prev = samples[0]
        frame = build_frame(raw, prev, now - t0, run_dir=str(run_dir))
        # The tables change when a snapshot does; in the ring view, which redraws four times a
        # second, they are redrawn at most once a second (rates are over a second anyway).
        frame["stamp"] = key[0] if view != "ring" else int(now / RATE_PERIOD)
        if frame["stamp"] != last_stamp[0]:
            history.add_frame(frame)
            last_stamp[0] = frame["stamp"]
        cids = [g["cid"] for g in frame["guests"]]
        if view == "ring" and guest is None and cids:
            guest = cids[0]
        rings, err = reader.pictures(raw, guest) if view == "ring" else ([], "")
        width = args.width or console.width
        height = args.height or console.height
        return render_view(frame, view, width, guest, history, rings, err, keys=use_keys, memo=memo,
                           height=height, console=console), cids

    def loop(keys) -> None:
        nonlocal view, guest
        screen, cids = frame_now()
        # Tables redraw once a second (and only when a snapshot changed); the ring view reads the
        # RAM itself and redraws four times a second (unless --interval says otherwise).
        with Live(screen, console=console, refresh_per_second=8, auto_refresh=False,
                  screen=args.screen) as live:
            while end is None or time.monotonic() < end:
                interval = args.interval or (0.25 if view == "ring" else 1.0)
                deadline = time.monotonic() + interval
                if keys is None:
                    time.sleep(interval)
                while keys is not None and time.monotonic() < deadline:
                    k = keys.get()
                    if k is None:
                        time.sleep(0.05)
                        continue
                    got = apply_key(k, view, guest, cids)
                    if got == "quit":
                        return
                    if got is None:
                        continue
                    view, guest = got
                    break
                new, new_cids = frame_now()
                if new is not None:
                    screen, cids = new, new_cids
                    live.update(screen, refresh=True)

    try:
        if use_keys:
            with KeyReader() as keys:
                loop(keys)
        else:
            loop(None)
    except KeyboardInterrupt:
        return 130                   # Ctrl-C, like every entry point (x and Esc quit with 0)
    finally:
        reader.close_except(set())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.monitor",
                                description="Live view of the virtqueues, vsock connections and devices of a run dir.")
    p.add_argument("--run-dir", type=Path, default=None, help=f"run directory (default {default_run_dir()})")
    p.add_argument("--view", choices=VIEWS, default="queues", help="what to show (default queues)")
    p.add_argument("--guest", type=int, default=None, metavar="CID", help="show this guest only")
    p.add_argument("--interval", type=float, default=None,
                   help="refresh period in seconds (default 1, ring view 0.25); --once measures "
                        "rates over it (default 1.0)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--json", action="store_true", help="with --once: the frame as JSON (same figures)")
    p.add_argument("--width", type=int, default=None, help="columns to fit (default: the terminal's, "
                   "or 160 when output is not a terminal)")
    p.add_argument("--height", type=int, default=None,
                   help="rows to fit in the live view (default: the terminal's); when the whole "
                        "screen does not fit, the guests tables fold into a summary line and the "
                        "view's rows come first")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--screen", action="store_true", help="use the alternate screen")
    p.add_argument("--no-keys", action="store_true", help="do not read keys from the terminal")
    p.add_argument("--nice", type=int, default=10, metavar="N",
                   help="lower the live monitor's CPU priority by N (default 10; 0 keeps it)")
    add_version(p)
    args = p.parse_args(argv)
    run_dir = args.run_dir or default_run_dir()
    if not Path(run_dir).is_dir():
        print(f"monitor: no run directory {run_dir}", file=sys.stderr)
        return 1
    if args.interval is not None and args.interval <= 0:
        print("monitor: --interval must be positive", file=sys.stderr)
        return 2
    if args.json and not args.once:
        print("monitor: --json needs --once", file=sys.stderr)
        return 2
    if not 0 <= args.nice <= 19:
        print("monitor: --nice must be in 0..19", file=sys.stderr)
        return 2
    if args.height is not None and args.height < 10:
        print("monitor: --height must be at least 10", file=sys.stderr)
        return 2
    if args.width is not None and args.width < 40:
        print("monitor: --width must be at least 40", file=sys.stderr)
        return 2
    if args.once:
        args.interval = args.interval or 1.0     # two snapshots of every writer (0.5 s period)
        width = args.width or (shutil.get_terminal_size((160, 40)).columns if sys.stdout.isatty() else 160)
        try:
            return once(Path(run_dir), args, width)
        except KeyboardInterrupt:
            return 130
    console = Console(width=args.width) if args.width else Console()
    return run_live(Path(run_dir), args, console)
