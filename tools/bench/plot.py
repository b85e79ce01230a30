"""--plot FILE.png: throughput against write size and against pairs (needs matplotlib)."""
from __future__ import annotations

from tools.bench.model import value

NEED = "--plot needs matplotlib: pip install matplotlib (or pip install 'virtio-emu[plot]')"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [f for f in results.get("figures", []) if value(f) is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list] = {}
    for f in figs:
        if f["kind"] == "stream":
            name = f["path"] if f.get("dir") is None else f"{f['path']} {f['dir']} ({f['mode']})"
            series.setdefault(name, []).append((f["size"], value(f)))
    for name, pts in series.items():
        pts.sort()
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
               linestyle="--" if name in ("socketpair", "pipe") else "-", label=name)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("bytes per write")
    a.set_ylabel("MB/s")
    a.set_title("one stream: throughput against write size")
    a.legend(fontsize=7)
    by_path: dict[str, list] = {}
    for f in figs:
        if f["kind"] == "pairs":
            by_path.setdefault(f["path"], []).append((f["pairs"], value(f)))
    for name, pts in by_path.items():
        pts.sort()
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
               linestyle="--" if name == "socketpair" else "-")
    b.set_xlabel("pairs at once")
    b.set_ylabel("aggregate MB/s")
    b.set_title("N pairs (64 KiB writes, guest→host)")
    b.legend(fontsize=7)
    m = results.get("machine", {})
    fig.suptitle(f"virtio-emu bench — {m.get('cpu', '?')}, {m.get('cores', '?')} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
