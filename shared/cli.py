"""Command-line pieces both `python -m host` and `python -m guest` use."""
from __future__ import annotations

import argparse
import logging
import sys

CREDIT_POLICIES = ("every-read", "low-space")


def queue_size(text: str) -> int:
    """argparse type: a virtqueue size, a power of 2 in 1..32768 (spec 2.7)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"queue size {text!r} is not a number") from None
    if n < 1 or n > 32768 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"queue size {n} is not a power of 2 in 1..32768")
    return n


def poll_us(text: str) -> int:
    """argparse type: a busy-poll window in microseconds, 0..1000000."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--poll-us {text!r} is not a whole number of microseconds") from None
    if not 0 <= n <= 1_000_000:
        raise argparse.ArgumentTypeError(f"--poll-us {n} is out of range (0..1000000)")
    return n


def buf_size(text: str) -> int:
    """argparse type: a vsock socket receive buffer (SO_VM_SOCKETS_BUFFER_SIZE) in bytes."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buf-size {text!r} is not a number of bytes") from None
    if not 128 <= n <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"--buf-size {n} is out of range (128..4294967295)")
    return n


DEFAULT_BUF_SIZE = 1 << 20


def add_common(p: argparse.ArgumentParser, credit_help: str) -> None:
    """--credit-policy, --poll-us and --log-level, spelled the same on both sides."""
    p.add_argument("--credit-policy", choices=CREDIT_POLICIES, default="low-space",
                   help=credit_help + " (default low-space)")
    p.add_argument("--buf-size", type=buf_size, default=DEFAULT_BUF_SIZE, metavar="BYTES",
                   help="receive buffer of each vsock socket on this side, advertised as buf_alloc "
                        "(SO_VM_SOCKETS_BUFFER_SIZE; default 1048576, Linux's is 262144)")
    p.add_argument("--poll-us", type=poll_us, default=0, metavar="N",
                   help="after work, busy-poll the rings for N microseconds with notifications "
                        "suppressed before sleeping on the doorbell (vhost's busyloop_timeout, "
                        "NAPI); 0 = doorbells only (default 0)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="logging level (default INFO)")


def setup_logging(role: str, level: str) -> None:
    logging.basicConfig(level=level,
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")


def service_spec(text: str):
    """argparse type: a built-in vsock service, KIND=PORT (shared/vsock/services.py)."""
    from shared.vsock.services import parse_service
    try:
        return parse_service(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_programs(p: argparse.ArgumentParser, where: str) -> None:
    """--service and --run, spelled the same on both sides."""
    p.add_argument("--service", type=service_spec, action="append", default=[], metavar="KIND=PORT",
                   help=f"run a built-in vsock service {where}: echo=PORT, discard=PORT, "
                        "chargen=PORT, sink=PORT (count bytes until EOF, answer the count) or "
                        "source=PORT (answer a line '<n> <write_size>' with n bytes) (repeatable)")
    p.add_argument("--run", action="append", default=[], metavar="MODULE:FUNCTION",
                   help=f"run FUNCTION(vsock) from MODULE {where} with the vsock socket API, in a "
                        "thread of its own (repeatable)")


def check_programs(role: str, services, run) -> int:
    """Validate --service (no port twice) and every --run spec (module importable, function
    exists and is callable) before starting anything: 0, or a one-line error on stderr and 2."""
    from shared.vsock.services import check_function
    seen: dict[int, str] = {}
    for spec in services:
        if spec.port in seen:
            print(f"{role}: --service {spec.name}={spec.port}: port {spec.port} is already "
                  f"taken by --service {seen[spec.port]}={spec.port}", file=sys.stderr)
            return 2
        seen[spec.port] = spec.name
    for spec in run:
        why = check_function(spec)
        if why is not None:
            print(f"{role}: --run {spec}: {why}", file=sys.stderr)
            return 2
    return 0
