"""Test-wide setup: 8 forced host devices so multi-device code runs on CPU, and one XLA
compilation cache for the session.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it happens here,
at conftest import time.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the whole session, in a fresh directory: both pytest-xdist
# workers and the subprocesses tests start inherit it from this (the controlling) process, so
# a program one test compiled is read back by any later test that builds the same program
# (the same training step of the same model, a fresh closure of the same function) instead
# of being compiled again. Compiled programs are the same either way; only the compile time
# goes. A JAX_COMPILATION_CACHE_DIR set by the caller is used as it is and kept.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="jcompress-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest
from hypothesis import settings

# No example database: hypothesis would otherwise write .hypothesis/ into the working directory
# (the repository). The property tests choose their examples with their own settings.
settings.register_profile("jcompress-tests", database=None)
settings.load_profile("jcompress-tests")


def pytest_sessionfinish(session):
    if _XLA_CACHE is not None:  # the process that made the directory removes it, after the workers
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist5k():
    from jcompress import data

    return data.load("mnist5k")
