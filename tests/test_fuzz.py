"""The device-side fuzz targets (tools/fuzz) as hypothesis properties, with a bounded number of
examples so the default suite stays fast. Long runs: python -m tools.fuzz --cases N.

Each example is a seed; the target builds a structure-aware case from it (rings, vsock packets,
control messages) and checks the host against the spec's rules (see tools/fuzz/__init__.py).
"""
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.fuzz import control, packed, rings, vsock

SETTINGS = settings(max_examples=150, deadline=2000, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.CRITICAL)     # every NEEDS_RESET is logged as a warning
    yield
    logging.disable(logging.NOTSET)


@SETTINGS
@given(st.integers(0, 2**64 - 1))
def test_ring_chains_follow_the_spec(seed):
    rings.run_case(random.Random(seed))


@SETTINGS
@given(st.integers(0, 2**64 - 1))
def test_vsock_device_consumes_valid_packets_and_resets_on_malformed(seed):
    vsock.run_case(random.Random(seed))


@settings(max_examples=400, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**64 - 1))
def test_packed_ring_chains_and_used_descriptors_follow_the_spec(seed):
    packed.run_case(random.Random(seed))


@settings(max_examples=100, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**64 - 1))
def test_control_session_answers_every_message_without_internal_errors(seed):
    control.run_case(random.Random(seed))


@pytest.mark.parametrize("target", ["rings", "vsock", "control", "packed"])
def test_fixed_seeds_from_the_cli(target):
    """The CLI's case numbering (python -m tools.fuzz --target T --start I) stays reproducible."""
    from tools.fuzz.__main__ import TARGETS, case_rng
    for i in range(50):
        TARGETS[target](case_rng(0, target, i))


# --- issue 20 item 2: the CLI prints its seed, a verdict, and ends a Ctrl-C with partial counts --
def _fuzz(*args, timeout=120):
    import subprocess
    import sys

    from tests.procs import ROOT
    return subprocess.run([sys.executable, "-m", "tools.fuzz", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_prints_the_seed_and_a_verdict():
    r = _fuzz("--cases", "5", "--seed", "77")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert "seed 77" in lines[0]
    assert lines[-1] == "fuzz OK: 20 case(s) of rings, vsock, control, packed passed (seed 77)", lines
    r = _fuzz("--cases", "2", "--target", "rings")          # no --seed: a random one, printed
    import re
    m = re.search(r"seed (\d+)", r.stdout)
    assert r.returncode == 0 and m, r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("fuzz OK") and f"seed {m.group(1)}" in r.stdout.splitlines()[-1]
    r = _fuzz("--cases", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--cases" in r.stderr.splitlines()[-1]


def test_cli_ctrl_c_prints_partial_counts_and_exits_130():
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.procs import ROOT
    p = subprocess.Popen([sys.executable, "-m", "tools.fuzz", "--cases", "10000000", "--seed", "5"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    import threading
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(p.stdout), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + 30
        while not got and time.monotonic() < end:       # the seed line: cases are running
            time.sleep(0.05)
        assert got and "seed 5" in got[0], ("no seed line within 30 s", got)
        time.sleep(1.0)                 # Ctrl-C a while into the run (the thing under test)
        os.killpg(p.pid, signal.SIGINT)
        p.wait(60)
        reader.join(10)
        out, err = "".join(got), p.stderr.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err
    lines = out.strip().splitlines()
    assert lines[-2].startswith("rings: ") and "cases in" in lines[-2] and lines[-2].endswith("(interrupted)"), lines
    n = int(lines[-2].split()[1])
    assert n > 0
    assert lines[-1] == f"fuzz interrupted after {n:,} case(s) (seed 5): no failure so far", lines
