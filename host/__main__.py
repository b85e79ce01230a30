"""python -m host: the vhost backend daemon."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import add_common, add_doorbell, add_programs, check_programs, prog_name, queue_size, run_dir_arg, setup_logging
from shared.constants import RESERVED_CIDS
from shared.net.spec import check_spec, claim_key
from shared.resources import RunDirError, default_run_dir, ensure_run_dir

from host.daemon import Daemon, HostOptions
from host.devices import DEFAULT_MAC, NetKind, VsockKind
from host.vhost_user.runner import serve


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
    add_programs(p, "in every guest's device process (the in-device host endpoint, CID 2)")
    p.add_argument("--vhost-user", action="append", default=[], metavar="SOCKET[,cid=N]",
                   help="serve a QEMU vhost-user-vsock frontend on this Unix socket (like "
                        "vhost-device-vsock); repeatable, one guest each. The CID comes from "
                        "',cid=N' or from the --cid given in the same position")
    p.add_argument("--cid", action="append", type=int, default=[], metavar="N",
                   help="the guest CID of the matching --vhost-user socket (3..0xFFFFFFFE)")
    p.add_argument("--vhost-user-net", action="append", default=[], metavar="SOCKET",
                   help="serve a vhost-user-net frontend (QEMU's -netdev vhost-user, DPDK's "
                        "virtio_user) on this Unix socket with our vhost-net; repeatable, one "
                        "frontend each, paired in order with --net-backend")
    p.add_argument("--net-backend", action="append", default=[], metavar="SPEC",
                   help="where the matching --vhost-user-net socket's frames go: loopback, "
                        "udp:LPORT:RPORT, segment:NAME, tap:IFNAME[,vnet_hdr=on] or packet:IFNAME "
                        "(opened once, kept across frontends)")
    p.add_argument("--packed", action="store_true",
                   help="offer the packed virtqueue layout (VIRTIO_F_RING_PACKED, virtio 1.1) to every "
                        "device, native and vhost-user; a driver that acks it gets packed rings, "
                        "others keep split rings (the default without --packed)")
    add_doorbell(p, "the doorbells native guests may pass: sem (named POSIX semaphores, a thread "
                    "per kick in the device process), eventfd (eventfds over the control socket, "
                    "waited on by the device process's one selector) or any (default)", "any")
    add_common(p, "when host sockets send CREDIT_UPDATE: after every read (the 2016-17 seeds), "
                  "only when free space falls below 64 KiB (Linux 2019) or also once half the "
                  "window was read (half-window)")
    return p


def vhost_user_pairs(p: argparse.ArgumentParser, sockets: list[str], cids: list[int]) -> list[tuple[Path, int]]:
    """--vhost-user S --cid N (paired in order) or --vhost-user S,cid=N -> [(path, cid)]."""
    pairs: list[tuple[Path, int]] = []
    free = list(cids)
    for spec in sockets:
        path, _, rest = spec.partition(",")
        if rest:
            key, _, val = rest.partition("=")
            if key != "cid" or not val.isdigit():
                p.error(f"--vhost-user {spec!r}: expected SOCKET or SOCKET,cid=N")
            cid = int(val)
        elif free:
            cid = free.pop(0)
        else:
            p.error(f"--vhost-user {path}: no CID (add --cid N or ',cid=N')")
        if not path:
            p.error(f"--vhost-user {spec!r}: empty socket path")
        if cid in RESERVED_CIDS or not 2 < cid <= 0xFFFFFFFE:
            p.error(f"CID {cid} is reserved or out of range (a guest CID is 3..0xFFFFFFFE)")
        if any(c == cid for _, c in pairs):
            p.error(f"CID {cid} is given twice")
        if any(q == Path(path) for q, _ in pairs):
            p.error(f"socket {path} is given twice")
        pairs.append((Path(path), cid))
    if free:
        p.error(f"--cid {free[0]} has no --vhost-user socket")
    return pairs


def vhost_user_net_pairs(p: argparse.ArgumentParser, sockets: list[str], specs: list[str],
                         taken: list[Path]) -> list[tuple[Path, str]]:
    """--vhost-user-net S --net-backend SPEC, paired in order -> [(path, spec)]."""
    if len(specs) != len(sockets):
        if len(specs) < len(sockets):
            p.error(f"--vhost-user-net {sockets[len(specs)]}: no --net-backend (one per socket, in order)")
        p.error(f"--net-backend {specs[len(sockets)]} has no --vhost-user-net socket")
    pairs: list[tuple[Path, str]] = []
    keys: set[str] = set()
    for path, spec in zip(sockets, specs):
        if not path:
            p.error("--vhost-user-net: empty socket path")
        try:
            check_spec(spec)
            key = claim_key(spec)
        except ValueError as e:
            p.error(str(e))
        if key and key in keys:
            p.error(f"net backend {key} is given twice")
        keys.add(key)
        if Path(path) in taken or any(q == Path(path) for q, _ in pairs):
            p.error(f"socket {path} is given twice")
        pairs.append((Path(path), spec))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if check_programs("host", args.service, args.run):
        return 2
    pairs = vhost_user_pairs(parser, args.vhost_user, args.cid)
    net_pairs = vhost_user_net_pairs(parser, args.vhost_user_net, args.net_backend,
                                     [q for q, _ in pairs])
    setup_logging("host", args.log_level)
    opts = HostOptions(run_dir=args.run_dir or default_run_dir(), pcap=args.pcap,
                       credit_policy=args.credit_policy, dialect=args.dialect,
                       max_queue_size=args.max_queue_size, poll_us=args.poll_us, doorbell=args.doorbell,
                       buf_size=args.buf_size, services=args.service, run=args.run,
                       packed=args.packed)
    if pairs or net_pairs:
        kinds = [(path, VsockKind(cid, opts, "vhost-user")) for path, cid in pairs] + [
            (path, NetKind(spec, opts, DEFAULT_MAC[:5] + bytes([i + 1]), "vhost-user"))
            for i, (path, spec) in enumerate(net_pairs)]
        try:
            ensure_run_dir(opts.run_dir)
            return serve(kinds, opts)
        except SystemExit as e:
            print(e, file=sys.stderr)
            return 1
        except RunDirError as e:
            print(f"host: {e}", file=sys.stderr)
            return 1
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
