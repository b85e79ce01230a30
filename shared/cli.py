"""Command-line pieces both `python -m host` and `python -m guest` (and the tools) use.

Every check here is an argparse `type=` function: bad input becomes argparse's one-line usage
error and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

CREDIT_POLICIES = ("every-read", "low-space", "half-window")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "WARNING"


def version() -> str:
    """The installed distribution's version, or the source tree's (pyproject) when not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            return dist_version("virtio-emu")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    import tomllib
    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s (virtio-emu) {version()}")


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


# Our default receive window, larger than Linux's 256 KiB (SO_VM_SOCKETS_BUFFER_SIZE) as TCP's
# autotuned windows are (tcp_wmem max 4 MiB): credit is what keeps a bulk stream's pipeline full
# (tools.bench, in-device 1 MiB writes: about 2.2 GB/s at 1 MiB, 3.3-5 GB/s at 4 MiB, same run).
DEFAULT_BUF_SIZE = 4 << 20


def run_dir_arg(text: str) -> Path:
    """argparse type: a run directory path (not empty: '' would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the run directory must not be empty")
    return Path(text)


def seconds(text: str) -> float:
    """argparse type: a finite, non-negative number of seconds."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return v


def add_common(p: argparse.ArgumentParser, credit_help: str) -> None:
    """--credit-policy, --buf-size, --poll-us, --log-level and --version, spelled the same on
    both sides."""
    p.add_argument("--credit-policy", choices=CREDIT_POLICIES, default="half-window",
                   help=credit_help + " (default half-window)")
    p.add_argument("--buf-size", type=buf_size, default=DEFAULT_BUF_SIZE, metavar="BYTES",
                   help="receive buffer of each vsock socket on this side, advertised as buf_alloc "
                        "(SO_VM_SOCKETS_BUFFER_SIZE; default 4194304, Linux's is 262144)")
    p.add_argument("--poll-us", type=poll_us, default=0, metavar="N",
                   help="after work, busy-poll the rings for N microseconds with notifications "
                        "suppressed before sleeping on the doorbell (vhost's busyloop_timeout, "
                        "NAPI); 0 = doorbells only (default 0)")
    add_log_level(p)
    add_version(p)


DOORBELLS = ("sem", "eventfd")


def add_doorbell(p: argparse.ArgumentParser, help_text: str, default: str) -> None:
    p.add_argument("--doorbell", choices=DOORBELLS + (("any",) if default == "any" else ()),
                   default=default, help=help_text)


LOG_LEVEL_ENV = "VIRTIO_EMU_LOG_LEVEL"


def default_log_level() -> str:
    """WARNING, unless $VIRTIO_EMU_LOG_LEVEL names another level (the tools and tests set INFO
    for the processes they start, whose logs they read)."""
    import os
    env = os.environ.get(LOG_LEVEL_ENV, "").upper()
    return env if env in LOG_LEVELS else DEFAULT_LOG_LEVEL


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=default_log_level(), choices=LOG_LEVELS, type=str.upper,
                   help=f"logging level (default {DEFAULT_LOG_LEVEL}, or ${LOG_LEVEL_ENV}; INFO shows "
                        "boot and connection events, DEBUG everything)")


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
                        "thread of its own (repeatable; MODULE is imported and FUNCTION checked "
                        "at start)")


def check_programs(role: str, services, run, net_run=()) -> int:
    """Validate --service (no port twice) and every --run and --net-run spec (module importable,
    function exists and is callable) before starting anything: 0, or a one-line error on stderr
    and 2."""
    from shared.vsock.services import check_function
    seen: dict[int, str] = {}
    for spec in services:
        if spec.port in seen:
            print(f"{role}: --service {spec.name}={spec.port}: port {spec.port} is already "
                  f"taken by --service {seen[spec.port]}={spec.port}", file=sys.stderr)
            return 2
        seen[spec.port] = spec.name
    for flag, specs in (("--run", run), ("--net-run", net_run)):
        for spec in specs:
            why = check_function(spec)
            if why is not None:
                print(f"{role}: {flag} {spec}: {why}", file=sys.stderr)
                return 2
    return 0


def prog_name(module: str) -> str:
    """Usage name: the console script's own name (virtio-emu-host), else `python -m MODULE`."""
    import os
    import sys
    base = os.path.basename(sys.argv[0] if sys.argv else "")
    return base if base.startswith("virtio-emu-") else f"python -m {module}"
