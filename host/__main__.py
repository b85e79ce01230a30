"""python -m host: the vhost backend daemon."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import add_common, prog_name, queue_size, run_dir_arg, setup_logging
from shared.resources import RunDirError, default_run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("host"),
        description="virtio-emu host: the vhost backend. Serves any number of guests on a control "
                    "socket in the run directory; each device runs in a process of its own.")
    p.add_argument("--run-dir", type=run_dir_arg, default=None,
                   help="directory for the control socket, vsock bridge sockets, owner records and "
                        f"stats (default: {default_run_dir()}). Created 0700 if missing; an existing "
                        "one must be ours and not writable by others (it is never chmod-ed)")
    p.add_argument("--pcap", type=Path, default=None,
                   help="record every vsock packet the host sees in this vsockmon pcap file "
                        "(LINKTYPE_VSOCK 271; tshark/Wireshark decode it)")
    p.add_argument("--dialect", choices=("firecracker", "vhost-device-vsock"), default="firecracker",
                   help="hybrid vsock Unix-socket dialect of the bridge's CONNECT/OK handshake")
    p.add_argument("--max-queue-size", type=queue_size, default=1024, metavar="N",
                   help="largest virtqueue size a guest may configure (power of 2, <= 32768)")
    add_common(p, "when host sockets send CREDIT_UPDATE: after every read (the 2016-17 seeds) or "
                  "only when free space falls below 64 KiB (Linux 2019)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("host", args.log_level)
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
    except RunDirError as e:
        print(f"host: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"host: cannot serve {opts.run_dir}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return d.serve()


if __name__ == "__main__":
    sys.exit(main())
