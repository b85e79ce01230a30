"""python -m guest: boot a VM with a virtio-vsock and/or a virtio-net device against a running host."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from shared.cli import (add_common, add_doorbell, add_programs, check_programs, prog_name, queue_size, run_dir_arg,
                        seconds, setup_logging)
from shared.constants import RESERVED_CIDS
from shared.net.hdr import parse_ip, parse_mac
from shared.net.spec import check_spec
from shared.signals import on_stop_signals

from guest.vm import VM, BootError, GuestOptions
from shared.resources import default_run_dir

SIZE_RE = re.compile(r"^(\d+)([KMG]?)$", re.I)


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64M, 512K or 1G")
    n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
    if n < 1 << 20 or n > 4 << 30 or n % 8192:
        raise argparse.ArgumentTypeError(f"guest RAM must be 1M..4G and a multiple of 8K, not {text}")
    return n


def parse_cid(text: str) -> int:
    try:
        cid = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"CID {text!r} is not a number") from None
    if cid in RESERVED_CIDS or cid < 0 or cid > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"CID {cid} is reserved or out of range (use 3..4294967294)")
    return cid


def parse_name(text: str) -> str:
    """argparse type: a guest name as the host and the monitor show it: not empty, one line of
    printable characters, at most 64 of them."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the guest name must not be empty")
    if not text.isprintable() or len(text) > 64:
        raise argparse.ArgumentTypeError(f"guest name {text!r} must be at most 64 printable characters")
    return text


def parse_net(text: str) -> str:
    try:
        check_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_ip_arg(text: str):
    try:
        return parse_ip(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_mac_arg(text: str) -> bytes:
    try:
        return parse_mac(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("guest"),
        description="virtio-emu guest: a VM whose kernel owns its RAM (shared memory) and drives a "
                    "virtio-vsock device served by `python -m host` over split virtqueues.")
    p.add_argument("--run-dir", type=run_dir_arg, default=None,
                   help=f"the host's run directory (default: {default_run_dir()})")
    p.add_argument("--cid", type=parse_cid, default=None,
                   help="the guest's vsock context ID (3 or more): gives the guest a virtio-vsock device")
    p.add_argument("--net", type=parse_net, default=None, metavar="SPEC",
                   help="give the guest a virtio-net device on this host backend: loopback, "
                        "udp:LPORT:RPORT, segment:NAME, tap:IFNAME[,vnet_hdr=on], packet:IFNAME")
    p.add_argument("--ip", type=parse_ip_arg, default=None, metavar="A.B.C.D/N",
                   help="the net device's link-local IPv4 address (ARP, ping and UDP echo answered)")
    p.add_argument("--mac", type=parse_mac_arg, default=None, metavar="XX:XX:XX:XX:XX:XX",
                   help="the net device's MAC address (default: 52:54:00 and the guest's pid)")
    p.add_argument("--net-run", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="run FUNCTION(netdev) from MODULE inside the guest (frame API, ping, udp_echo; "
                        "repeatable; MODULE is imported and FUNCTION checked at start)")
    p.add_argument("--name", type=parse_name, default=None, help="guest name shown by the host and monitor (default: guest-CID)")
    p.add_argument("--mem", type=parse_size, default="64M", metavar="SIZE",      # parsed by argparse
                   help="guest RAM size, e.g. 64M (default 64M)")
    p.add_argument("--incoming", default=None, metavar="unix:PATH",
                   help="wait on PATH for a live migration (QEMU's -incoming) instead of booting "
                        "devices; start it with the source guest's other options")
    p.add_argument("--monitor-socket", type=Path, default=None, metavar="PATH",
                   help="serve the guest monitor on this Unix socket (migrate, query-migrate; "
                        "python -m tools.migrate talks to it)")
    add_programs(p, "inside the guest")
    p.add_argument("--pcap", type=Path, default=None,
                   help="record every vsock packet the guest sends or receives (vsockmon pcap)")
    p.add_argument("--queue-size", type=queue_size, default=128, metavar="N",
                   help="rx and tx virtqueue size (power of 2; default 128)")
    p.add_argument("--rx-buf-size", type=int, default=64 * 1024, metavar="BYTES",
                   help="payload bytes of each posted rx buffer (default 65536; the 2016-17 seeds "
                        "post 4096)")
    p.add_argument("--connect-timeout", type=seconds, default=5.0, metavar="SECONDS",
                   help="how long to wait at boot for a host to serve the run directory, and for "
                        "each control reply (default 5)")
    p.add_argument("--packed", action="store_true",
                   help="ask every device for the packed virtqueue layout (VIRTIO_F_RING_PACKED, "
                        "virtio 1.1); used when the host offers it (host --packed), split rings "
                        "otherwise (the default)")
    add_doorbell(p, "kick, call and err doorbells: sem (named POSIX semaphores, the default) or "
                    "eventfd (eventfds passed over the control socket with SCM_RIGHTS, as vhost-user "
                    "does; the host's device process then waits on one selector)", "sem")
    add_common(p, "CREDIT_UPDATE after every read (2016-17 seeds), when free space < 64 KiB (Linux 2019) "
                  "or also once half the window was read (half-window)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.net is None and (args.ip or args.mac or args.net_run):
        parser.error("--ip, --mac and --net-run need --net")
    if args.cid is None and args.net is None:
        parser.error("give the guest a device: --cid N (vsock) and/or --net SPEC")
    if args.cid is None and (args.service or args.run or args.pcap):
        parser.error("--service, --run and --pcap need a vsock device (--cid)")
    if args.queue_size < 2:
        print("guest: --queue-size must be at least 2 (an rx buffer takes two descriptors)", file=sys.stderr)
        return 2
    if not 64 <= args.rx_buf_size <= 64 * 1024:
        print(f"guest: --rx-buf-size {args.rx_buf_size} is out of range (64..65536)", file=sys.stderr)
        return 2
    if check_programs("guest", args.service, args.run, args.net_run):
        return 2
    if args.incoming is not None:
        from guest.migration.stream import parse_uri
        try:
            parse_uri(args.incoming)
        except ValueError as e:
            print(f"guest: --incoming: {e}", file=sys.stderr)
            return 2
    from guest.monitor import stale_socket
    if args.monitor_socket is not None and args.monitor_socket.exists() and not stale_socket(args.monitor_socket):
        print(f"guest: --monitor-socket {args.monitor_socket} already exists", file=sys.stderr)
        return 2
    setup_logging("guest", args.log_level)
    opts = GuestOptions(run_dir=args.run_dir or default_run_dir(), cid=args.cid,
                        name=args.name or (f"guest-{args.cid}" if args.cid is not None else f"guest-net-{os.getpid()}"), mem=args.mem, services=args.service,
                        run=args.run, pcap=args.pcap, queue_size=args.queue_size,
                        credit_policy=args.credit_policy, buf_size=args.buf_size,
                        rx_buf_size=args.rx_buf_size, poll_us=args.poll_us, doorbell=args.doorbell,
                        connect_timeout=args.connect_timeout, net=args.net, ip=args.ip, mac=args.mac,
                        net_run=args.net_run, packed=args.packed, incoming=args.incoming,
                        monitor=args.monitor_socket)
    vm = VM(opts)
    on_stop_signals(lambda _signum: vm.stop_event.set())   # during boot too: it still shuts down cleanly
    try:
        vm.boot()
    except BootError as e:
        print(f"guest: {e}", file=sys.stderr)
        _quiet_shutdown(vm)
        return 1
    except KeyboardInterrupt:
        _quiet_shutdown(vm)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback at DEBUG
        logging.getLogger("guest").debug("boot failed", exc_info=True)
        print(f"guest: boot failed: {type(e).__name__}: {e}", file=sys.stderr)
        _quiet_shutdown(vm)
        return 1
    return vm.run()


def _quiet_shutdown(vm) -> None:
    try:
        vm.shutdown()
    except Exception as e:  # noqa: BLE001
        logging.getLogger("guest").debug("shutdown after a failed boot", exc_info=True)
        print(f"guest: shutdown incomplete: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
