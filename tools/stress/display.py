"""The rich live view while a stress run goes, and the summary table at its end (pure rendering)."""
from __future__ import annotations

from rich import box
from rich.table import Table


COLUMNS = ("grp", "rounds", "ok", "reset", "corrupt", "hung", "MB ok", "faults", "stalls", "procs",
           "anon MiB")


def progress(groups, elapsed: float, rss_now: dict[str, int]) -> Table:
    """Fits 80 columns (no edges, one space each side of a column); no header or number is ever
    shortened to "…": every column is at least as wide as its longest header word, and cells
    fold rather than cut should a terminal still be narrower."""
    t = Table(title=f"virtio-emu stress: {elapsed:5.0f} s   (faults: gK/hK guest/host SIGKILL, "
                    f"gS/hS SIGSTOP, rx stall, ho hostile)", title_justify="left",
              box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1), collapse_padding=True)
    for col in COLUMNS:
        t.add_column(col, justify="right" if col not in ("faults",) else "left", overflow="fold",
                     min_width=max(len(w) for w in col.split()))
    for g in groups:
        with g.lock:
            outs = list(g.outcomes)
            faults = list(g.faults)
            nst = len(g.stalls)
        count = {r: sum(1 for o in outs if o["result"] == r) for r in ("ok", "reset", "corrupt", "hung")}
        mb = sum(o["bytes"] for o in outs if o["result"] == "ok") / 1e6
        kinds: dict = {}
        for f in faults:
            k = SHORT.get(f["kind"], f["kind"])
            kinds[k] = kinds.get(k, 0) + 1
        mine = {k: v for k, v in rss_now.items() if k.startswith(f"g{g.idx}/")}
        t.add_row(str(g.idx), str(g.rounds), str(count["ok"]), str(count["reset"]),
                  _red(count["corrupt"]), _red(count["hung"]), f"{mb:.1f}",
                  " ".join(f"{k}:{v}" for k, v in sorted(kinds.items())) or "-", str(nst),
                  str(len(mine)), f"{sum(mine.values()) / 2**20:.0f}")
    return t


SHORT = {"guest-kill": "gK", "host-kill": "hK", "guest-stop": "gS", "host-stop": "hS", "rx-stall": "rx",
         "hostile": "ho"}


def _red(n: int) -> str:
    return f"[bold red]{n}[/]" if n else "0"


def summary(rows: list[dict], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("invariant", overflow="fold")
    t.add_column("count", justify="right", no_wrap=True,
                 min_width=max([5] + [len(f"{r['count']:,}") for r in rows]))
    t.add_column("", justify="center", no_wrap=True, min_width=8)
    t.add_column("detail", overflow="fold")
    for r in rows:
        t.add_row(r["invariant"], f"{r['count']:,}", "[green]ok[/]" if r["ok"] else "[bold red]VIOLATED[/]",
                  r["detail"])
    return t
