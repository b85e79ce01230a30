"""Stats snapshots in the run dir: each process writes `<run-dir>/stats/<role>-<pid>.json`.

Writers replace their file atomically every half second; readers (the monitor) list the directory,
skip files whose process is gone and never block a writer. The format is one JSON object:
{"role": "device"|"guest", "pid": int, "time": float, ...role-specific counters}.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .resources import proc_starttime


def stats_dir(run_dir) -> Path:
    d = Path(run_dir) / "stats"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def write_stats(run_dir, role: str, data: dict) -> None:
    d = stats_dir(run_dir)
    pid = os.getpid()
    path = d / f"{role}-{pid}.json"
    tmp = d / f".{role}-{pid}.tmp"
    tmp.write_text(json.dumps({"role": role, "pid": pid, "time": time.time(), **data}, default=str))
    os.replace(tmp, path)


def remove_stats(run_dir, role: str) -> None:
    try:
        (Path(run_dir) / "stats" / f"{role}-{os.getpid()}.json").unlink()
    except OSError:            # not there, or the run dir was never usable
        pass


def read_all(run_dir) -> list[dict]:
    """Every live process's snapshot; files of dead processes are removed on the way."""
    d = Path(run_dir) / "stats"
    out = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        pid = data.get("pid")
        if not isinstance(pid, int) or proc_starttime(pid) is None:
            try:
                p.unlink()
            except OSError:
                pass
            continue
        out.append(data)
    return out


def prune(run_dir) -> None:
    """Remove the snapshots of dead processes (a SIGKILLed process cannot remove its own), and
    their half-written `.role-pid.tmp` files."""
    read_all(run_dir)
    for tmp in (Path(run_dir) / "stats").glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if proc_starttime(pid) is None:
            tmp.unlink(missing_ok=True)
