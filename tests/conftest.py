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

# Hypothesis keeps its example database and its cache of the constants in the source in a
# directory of the session too, instead of .hypothesis/ in the working directory (the repository).
_HYPOTHESIS_DIR = None
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    _HYPOTHESIS_DIR = tempfile.mkdtemp(prefix="jcompress-tests-hypothesis-")
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = _HYPOTHESIS_DIR

import pytest


def pytest_sessionfinish(session):
    for made in (_XLA_CACHE, _HYPOTHESIS_DIR):  # the process that made a directory removes it, after the workers
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist5k():
    from jcompress import data

    return data.load("mnist5k")
