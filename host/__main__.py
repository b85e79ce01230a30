"""python -m host: the vhost backend daemon."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared.resources import default_run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m host",
        description="virtio-emu host: the vhost backend. Serves any number of guests on a control "
                    "socket in the run directory; each device runs in a process of its own.")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="directory for the control socket, vsock bridge sockets, owner records and "
                        f"stats (default: {default_run_dir()}; created 0700)")
    p.add_argument("--pcap", type=Path, default=None,
                   help="record every vsock packet the host sees in this vsockmon pcap file "
                        "(LINKTYPE_VSOCK 271; tshark/Wireshark decode it)")
    p.add_argument("--credit-policy", choices=("every-read", "low-space"), default="every-read",
                   help="when host sockets send CREDIT_UPDATE: after every read (the 2016-17 "
                        "seeds) or only when free space falls below 64 KiB (Linux 2019)")
    p.add_argument("--dialect", choices=("firecracker", "vhost-device-vsock"), default="firecracker",
                   help="hybrid vsock Unix-socket dialect of the bridge's CONNECT/OK handshake")
    p.add_argument("--max-queue-size", type=int, default=1024, metavar="N",
                   help="largest virtqueue size a guest may configure (power of 2, <= 32768)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="logging level (default INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s host[%(process)d] %(levelname)s %(name)s: %(message)s")
    n = args.max_queue_size
    if n < 1 or n > 32768 or n & (n - 1):
        print(f"host: --max-queue-size {n} is not a power of 2 in 1..32768", file=sys.stderr)
        return 2
    from host.daemon import Daemon, HostOptions
    opts = HostOptions(run_dir=args.run_dir or default_run_dir(), pcap=args.pcap,
                       credit_policy=args.credit_policy, dialect=args.dialect,
                       max_queue_size=args.max_queue_size)
    try:
        d = Daemon(opts)
        d.bind()
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"host: cannot serve {opts.run_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    return d.serve()


if __name__ == "__main__":
    sys.exit(main())
