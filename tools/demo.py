"""python -m tools.demo: a host, several guests, traffic through their virtqueues, the live monitor.

Starts `python -m host` and N `python -m guest` processes (each with echo, discard and chargen
services) in a fresh run directory, then drives traffic from host programs through the hybrid
Unix-socket bridge: echo streams whose SHA-256 is checked, a discard stream and a chargen reader,
while the monitor's live view shows every device and guest. At the end it prints what was moved and
verified, stops everything and checks that no shared memory or semaphore of the run is left.
Exit status 0 only if every byte came back intact and nothing leaked.
"""
from __future__ import annotations

import argparse
import json
import hashlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from host.vsock.api import VsockHost
from shared.resources import ours_in_dev_shm, run_tag
from shared.stats import read_all
from shared.cli import add_version
from tools.launch import last_lines, start, stop_all, wait_ready
from tools.monitor import render


class Traffic:
    def __init__(self):
        self.lock = threading.Lock()
        self.echoed = {}      # cid -> bytes verified
        self.errors = []

    def add(self, cid: int, n: int) -> None:
        with self.lock:
            self.echoed[cid] = self.echoed.get(cid, 0) + n


def _send_quietly(s, data: bytes) -> None:
    """The sending half of an echo stream: a reset (Ctrl-C stopping the guest) ends it quietly;
    the receiving half reports the stream."""
    try:
        s.sendall(data)
    except OSError:
        pass


def echo_loop(run_dir: Path, cid: int, stop: threading.Event, traffic: Traffic, chunk: int) -> None:
    vh = VsockHost(run_dir)
    try:
        s = vh.connect(cid, 7, timeout=10)
        s.settimeout(30)
        while not stop.is_set():
            data = os.urandom(chunk)
            sender = threading.Thread(target=_send_quietly, args=(s, data))
            sender.start()
            h, got = hashlib.sha256(), 0
            while got < chunk:
                b = s.recv(65536)
                if not b:
                    raise ConnectionError("echo closed early")
                h.update(b)
                got += len(b)
            sender.join()
            if h.digest() != hashlib.sha256(data).digest():
                traffic.errors.append(f"cid {cid}: echo data corrupted")
                return
            traffic.add(cid, chunk)
        s.close()
    except Exception as e:  # reported in the summary
        traffic.errors.append(f"cid {cid}: {e}")


def chargen_check(run_dir: Path, cid: int, traffic: Traffic) -> None:
    from guest.vsock.services import chargen_pattern
    try:
        s = VsockHost(run_dir).connect(cid, 19, timeout=10)
        s.settimeout(30)
        want = chargen_pattern(200)
        got = b""
        while len(got) < len(want):
            b = s.recv(65536)
            if not b:
                break
            got += b
        s.close()
        if got[:len(want)] != want:
            traffic.errors.append(f"cid {cid}: chargen pattern wrong")
    except Exception as e:
        traffic.errors.append(f"cid {cid}: chargen: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    p.add_argument("--guests", type=int, default=3, help="number of guests (default 3)")
    p.add_argument("--seconds", type=float, default=8.0, help="how long traffic runs (default 8)")
    p.add_argument("--streams", type=int, default=2, help="echo streams per guest (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the run directory and logs (they are "
                   "always kept when the demo fails)")
    p.add_argument("--guest-flags", default="", metavar="FLAGS",
                   help="extra flags for every `python -m guest`, e.g. \"--queue-size 256\"")
    add_version(p)
    args = p.parse_args(argv)
    if not 1 <= args.guests <= 50 or args.seconds <= 0 or not 1 <= args.streams <= 32:
        print("demo: --guests must be 1..50, --streams 1..32, --seconds positive", file=sys.stderr)
        return 2
    try:
        guest_flags = shlex.split(args.guest_flags)
    except ValueError as e:
        print(f"demo: --guest-flags: {e}", file=sys.stderr)
        return 2
    console = Console()
    run_dir = Path(tempfile.mkdtemp(prefix="ve-demo-")) / "run"
    logs = run_dir.parent
    procs: list = []
    traffic = Traffic()
    stop = threading.Event()
    ok, interrupted, failure = False, False, ""
    try:
        ok, failure = run_demo(console, args, guest_flags, run_dir, logs, procs, traffic, stop)
    except KeyboardInterrupt:
        interrupted, failure = True, "interrupted"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C must not stop the cleanup
        stop.set()
        stop_all(procs)
        leaked = [n for n in ours_in_dev_shm() if run_tag(run_dir) in n]
        if leaked:
            console.print(f"[red]leaked[/]: {leaked}")
            ok = False
        else:
            console.print("all processes stopped; nothing of this run is left in /dev/shm")
        if args.keep or not ok:
            console.print(f"logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    if interrupted:
        console.print("[bold red]demo interrupted[/]")
        return 130
    console.print("[bold green]demo OK[/]" if ok else f"[bold red]demo FAILED[/]{': ' + failure if failure else ''}")
    return 0 if ok else 1


def _failed(console: Console, what: str, why: str, log: Path) -> str:
    console.print(f"[red]{what} {why}[/]; its log: {log}")
    tail = last_lines(log)
    if tail:
        console.print(tail, markup=False, highlight=False)
    return f"{what} {why}"


def run_demo(console, args, guest_flags, run_dir, logs, procs, traffic, stop) -> tuple[bool, str]:
    console.print(f"[bold]virtio-emu demo[/]: run dir {run_dir}")
    host = start(["-m", "host", "--run-dir", str(run_dir)], logs / "host.log")
    procs.append(host)
    why = wait_ready(host, logs / "host.log", "host listening", 20)
    if why:
        return False, _failed(console, "the host", why, logs / "host.log")
    cids = list(range(3, 3 + args.guests))
    guests = {}
    for cid in cids:
        guests[cid] = start(["-m", "guest", "--run-dir", str(run_dir), "--cid", str(cid), "--mem", "32M",
                             "--service", "echo=7", "--service", "discard=9", "--service", "chargen=19",
                             *guest_flags], logs / f"guest-{cid}.log")
        procs.append(guests[cid])
    for cid in cids:
        why = wait_ready(guests[cid], logs / f"guest-{cid}.log", "vsock device ready", 30)
        if why:
            return False, _failed(console, f"guest {cid}", why, logs / f"guest-{cid}.log")
    # two more guests with a virtio-net device each, on one L2 segment: b pings a, then UDP echo
    ping_out = logs / "ping.json"
    for name, ip, extra, env in (
            ("net-a", "169.254.10.1/24", [], {}),
            ("net-b", "169.254.10.2/24", ["--net-run", "tools.bench_apps:ping_peer"],
             {"VE_APP_OUT": str(ping_out), "VE_APP_PEER": "169.254.10.1", "VE_APP_COUNT": "5"})):
        g = start(["-m", "guest", "--run-dir", str(run_dir), "--name", name, "--mem", "16M",
                   "--net", "segment:demo", "--ip", ip, *extra], logs / f"{name}.log", **env)
        procs.append(g)
        guests[name] = g
        why = wait_ready(g, logs / f"{name}.log", "virtio-net:", 30)
        if why:
            return False, _failed(console, f"guest {name}", why, logs / f"{name}.log")
    console.print(f"host, {len(cids)} vsock guests and 2 net guests up; traffic for {args.seconds:g} s")
    workers = [threading.Thread(target=echo_loop, args=(run_dir, cid, stop, traffic, 256 * 1024), daemon=True)
               for cid in cids for _ in range(args.streams)]
    workers += [threading.Thread(target=chargen_check, args=(run_dir, cid, traffic), daemon=True) for cid in cids]
    for t in workers:
        t.start()
    prev, t_prev = read_all(run_dir), time.monotonic()
    end = time.monotonic() + args.seconds
    rows = console.height if console.is_terminal else None        # a terminal: fit its rows too
    with Live(render(prev, None, 0, str(run_dir), height=rows), console=console, refresh_per_second=4) as live:
        while time.monotonic() < end:
            time.sleep(0.5)
            cur, now = read_all(run_dir), time.monotonic()
            live.update(render(cur, prev, now - t_prev, str(run_dir), height=rows))
            prev, t_prev = cur, now
            dead = [f"guest {c}" for c, g in guests.items() if g.poll() is not None]
            if host.poll() is not None:
                dead.insert(0, "the host")
            if dead:
                traffic.errors.append(f"{', '.join(dead)} exited during the traffic (logs in {logs})")
                break
    stop.set()
    for t in workers:
        t.join(60)
    console.print(traffic_table(cids, traffic, args.seconds))
    for e in traffic.errors:
        console.print(f"[red]error[/]: {e}", markup=True, highlight=False)
    ping = {}
    end = time.monotonic() + 10
    while time.monotonic() < end and not ping:
        try:
            ping = json.loads(ping_out.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.2)
    console.print(f"net-b -> net-a over segment 'demo': ping {ping.get('replies', 0)}/"
                  f"{ping.get('count', 5)} replies, rtt ms {ping.get('rtt_ms', [])}, "
                  f"UDP echo {'ok' if ping.get('udp_echo_ok') else 'FAILED'}", highlight=False)
    ok = not traffic.errors and all(traffic.echoed.get(c, 0) > 0 for c in cids)
    if not ok:
        return False, traffic.errors[0] if traffic.errors else "a guest echoed nothing"
    if not (ping and ping.get("replies") == ping.get("count") and ping.get("udp_echo_ok")):
        return False, f"the net guests' ping/UDP echo over the segment failed: {ping or 'no result'}"
    return True, ""


def traffic_table(cids, traffic: Traffic, seconds: float) -> Table:
    """Names and numbers are never cut: columns fold, the title wraps (80 columns, or a file)."""
    table = Table(title="traffic through the virtqueues: host program -> bridge -> guest echo -> back",
                  title_justify="left")
    rows = [(str(c), f"{traffic.echoed.get(c, 0):,}", f"{traffic.echoed.get(c, 0) / seconds / 1e6:.1f}")
            for c in cids]
    for i, head in enumerate(("guest cid", "bytes echoed, SHA-256 verified", "MB/s")):
        widest = max((len(r[i]) for r in rows), default=1)
        table.add_column(head, justify="right", no_wrap=False, overflow="fold", min_width=max(widest, 4))
    for r in rows:
        table.add_row(*r)
    return table


if __name__ == "__main__":
    sys.exit(main())
