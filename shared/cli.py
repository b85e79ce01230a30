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


def add_common(p: argparse.ArgumentParser, credit_help: str) -> None:
    """--credit-policy and --log-level, spelled the same on both sides."""
    p.add_argument("--credit-policy", choices=CREDIT_POLICIES, default="every-read", help=credit_help)
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
