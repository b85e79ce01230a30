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

from tools.fuzz import control, rings, vsock

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


@settings(max_examples=100, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**64 - 1))
def test_control_session_answers_every_message_without_internal_errors(seed):
    control.run_case(random.Random(seed))


@pytest.mark.parametrize("target", ["rings", "vsock", "control"])
def test_fixed_seeds_from_the_cli(target):
    """The CLI's case numbering (python -m tools.fuzz --target T --start I) stays reproducible."""
    from tools.fuzz.__main__ import TARGETS, case_rng
    for i in range(50):
        TARGETS[target](case_rng(0, target, i))
