"""Figures: what the bench measured, as plain dicts (what --json writes and the report reads).

A figure is one quantity measured `repeats` times under one scenario:

    {"kind": "stream" | "rr" | "pairs" | "ring" | "idle" | "threads",
     "path": "socketpair" | "pipe" | "ceiling" | "in-device" | "bridge" | "ring" | "guest" | "device",
     "dir": "g2h" | "h2g" | None, "size": bytes per write, "pairs": N, "mode": "defaults" | ...,
     "metric": "MB/s" | "median µs" | "p99 µs" | "mean µs" | "% core" | "threads",
     "samples": [...], "min", "median", "max",          # absent when n/a
     "na": None | "why it could not be measured",
     "per_packet": {"kicks", "interrupts", "wakeups", "packets"} | absent,
     "cpu_s_per_gb": {"guest", "device", "external", "writer", "reader"} | absent}

Lower is better for µs and % core, higher for MB/s.
"""
from __future__ import annotations

import statistics

LOWER_IS_BETTER = {"median µs", "p99 µs", "mean µs", "% core", "threads"}


def figure(kind: str, path: str, metric: str, *, dir: str | None = None, size: int | None = None,
           pairs: int | None = None, mode: str = "defaults", samples=None, na: str | None = None, **extra) -> dict:
    f = {"kind": kind, "path": path, "dir": dir, "size": size, "pairs": pairs, "mode": mode,
         "metric": metric, "na": na, **extra}
    if na is None:
        s = [float(x) for x in samples or []]
        if not s:
            f["na"] = "no samples"
        else:
            f.update(samples=s, min=min(s), median=statistics.median(s), max=max(s))
    return f


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, round(q / 100 * len(v) + 0.5) - 1))
    return v[k]


def find(figs: list[dict], **want) -> dict | None:
    """The first measured-or-n/a figure whose fields equal `want`."""
    for f in figs:
        if all(f.get(k) == v for k, v in want.items()):
            return f
    return None


def value(f: dict | None) -> float | None:
    return None if f is None or f.get("na") else f.get("median")


def baseline_of(figs: list[dict], f: dict, path: str = "socketpair") -> dict | None:
    """The same measurement between two OS processes (`path` socketpair or pipe), or through the
    bare ring (`path` "ceiling": the same direction and write size; the ceiling's round trip)."""
    if path == "ceiling":
        if f["kind"] == "stream" and f.get("dir"):
            return find(figs, kind="stream", path="ceiling", dir=f["dir"], size=f["size"])
        if f["kind"] == "rr":
            return find(figs, kind="rr", path="ceiling", metric=f["metric"])
        return None
    if f["kind"] == "stream":
        return find(figs, kind="stream", path=path, size=f["size"])
    if f["kind"] == "rr":
        return find(figs, kind="rr", path=path, metric=f["metric"])
    if f["kind"] == "pairs":
        return find(figs, kind="pairs", path=path, pairs=f["pairs"])
    if f["kind"] == "ring":
        return find(figs, kind="rr", path=path, metric="mean µs")
    return None


def ratio(figs: list[dict], f: dict, path: str = "socketpair") -> float | None:
    """f's median over its baseline's median (× the baseline)."""
    b = baseline_of(figs, f, path)
    v, bv = value(f), value(b)
    if v is None or not bv or b is f:
        return None
    return v / bv
