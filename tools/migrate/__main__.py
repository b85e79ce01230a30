"""python -m tools.migrate --monitor SOCK --to unix:PATH: live-migrate the guest whose monitor
socket is SOCK to the guest waiting with --incoming unix:PATH; prints each round and a summary.
Exit 0 when the destination resumed, 1 when the migration failed (the source runs on), 2 on bad
arguments, 130 on Ctrl-C (the migration itself goes on in the guest)."""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import msgpack

from shared.cli import add_version, prog_name


class MonitorError(Exception):
    pass


class Monitor:
    def __init__(self, path: Path, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as e:
            self.sock.close()
            raise MonitorError(f"cannot reach the guest monitor at {path}: {e.strerror or e}") from None
        self.unp = msgpack.Unpacker(raw=False)

    def execute(self, cmd: str, **args) -> dict:
        self.sock.sendall(msgpack.packb({"execute": cmd, "arguments": args}, use_bin_type=True))
        while True:
            for rep in self.unp:
                if "error" in rep:
                    raise MonitorError(rep["error"].get("desc", "error"))
                return rep.get("return", {})
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise MonitorError(f"monitor: {e}") from None
            if not data:
                raise MonitorError("the guest monitor closed the connection")
            self.unp.feed(data)


def positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog_name("tools.migrate"), description=__doc__.split("\n\n")[0])
    p.add_argument("--monitor", type=Path, required=True, help="the source guest's --monitor-socket")
    p.add_argument("--to", required=True, metavar="unix:PATH", help="the destination's --incoming")
    p.add_argument("--downtime-ms", type=positive, default=300.0,
                   help="stop and copy once the rest fits in this (default 300)")
    p.add_argument("--max-rounds", type=int, default=30, help="stop and copy after this many rounds (default 30)")
    p.add_argument("--json", action="store_true", help="print the final query-migrate as JSON")
    add_version(p)
    args = p.parse_args(argv)
    if args.max_rounds < 1:
        p.error("--max-rounds must be at least 1")
    try:
        mon = Monitor(args.monitor)
        mon.execute("migrate", uri=args.to, downtime_ms=args.downtime_ms, max_rounds=args.max_rounds)
        seen = 0
        while True:
            time.sleep(0.1)
            info = mon.execute("query-migrate")
            for r in info.get("rounds", [])[seen:]:
                print(f"round {r['round']}: sent {r['sent']} pages in {r['ms']} ms "
                      f"(dirtied before it: guest {r['guest']}, device {r['device']})")
            seen = len(info.get("rounds", []))
            if info.get("status") in ("completed", "failed"):
                break
    except MonitorError as e:
        print(f"migrate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if info["status"] == "failed":
        print(f"migrate: failed: {info.get('error')}; the source guest runs on", file=sys.stderr)
        return 1
    print(f"completed: total {info['total_ms']} ms, downtime {info['downtime_ms']} ms, "
          f"{info['round']} rounds, {info['pages_sent']} pages sent, dirtied by the guest "
          f"{info['dirty_guest']} and by the device {info['dirty_device']}")
    if args.json:
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
