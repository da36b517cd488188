"""Test-wide setup: 8 forced host devices so multi-device code runs on CPU.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it happens here,
at conftest import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mnist5k():
    from jcompress import data

    return data.load("mnist5k")
