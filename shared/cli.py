"""Command-line pieces both `python -m host` and `python -m guest` (and the tools) use.

Every check here is an argparse `type=` function: bad input becomes argparse's one-line usage
error and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

CREDIT_POLICIES = ("every-read", "low-space")
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


def check_run_spec(text: str) -> str:
    """argparse type for --run MODULE:FUNCTION: import MODULE and check FUNCTION is callable.

    Returns the text unchanged (the guest resolves it again when it starts the function)."""
    mod_name, sep, fn_name = text.partition(":")
    if not sep or not mod_name or not fn_name:
        raise argparse.ArgumentTypeError(f"{text!r} must look like MODULE:FUNCTION, e.g. mypkg.mymod:main")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot import module {mod_name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise argparse.ArgumentTypeError(f"{text!r}: importing {mod_name!r} failed: "
                                         f"{type(e).__name__}: {e}") from None
    for part in fn_name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise argparse.ArgumentTypeError(f"{text!r}: module {mod_name!r} has no {fn_name!r}") from None
    if not callable(obj):
        raise argparse.ArgumentTypeError(f"{text!r}: {fn_name!r} is not callable")
    return text


def add_common(p: argparse.ArgumentParser, credit_help: str) -> None:
    """--credit-policy, --log-level and --version, spelled the same on both sides."""
    p.add_argument("--credit-policy", choices=CREDIT_POLICIES, default="every-read", help=credit_help)
    add_log_level(p)
    add_version(p)


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


def prog_name(module: str) -> str:
    """Usage name: the console script's own name (virtio-emu-host), else `python -m MODULE`."""
    import os
    import sys
    base = os.path.basename(sys.argv[0] if sys.argv else "")
    return base if base.startswith("virtio-emu-") else f"python -m {module}"
