"""The tfds extra: it installs every module TFDS imports, and an unprepared dataset fails at once.

TensorFlow must not load into the test process next to jaxlib, so whatever imports TFDS
for real runs in a subprocess.
"""

import importlib.abc
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from jcompress import data

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_tfds_extra_declares_importlib_resources():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in extras["tfds"]}
    # tensorflow-datasets imports importlib_resources without declaring it (Python >= 3.9)
    assert {"tensorflow-datasets", "importlib_resources"} <= names


def test_tfds_download_path_imports():
    """The modules TFDS's download and prepare path imports, including its lazy ones, are installed."""
    proc = _child(
        """
        import importlib_resources
        import tensorflow_datasets.core.download
        from tensorflow_datasets.core import dataset_builder

        assert dataset_builder.importlib_resources.abc.Traversable  # resolves the lazy import
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


NO_NETWORK_CHILD = """
    import json, socket, sys, time

    import tensorflow_datasets as tfds
    from jcompress import data

    calls = []

    def refuse(what):
        def fn(*args, **kwargs):
            calls.append(what)
            raise OSError(f"network disabled in this test ({what})")
        return fn

    socket.socket.connect = refuse("socket.connect")
    socket.getaddrinfo = refuse("socket.getaddrinfo")
    tfds.core.DatasetBuilder.download_and_prepare = refuse("download_and_prepare")
    tfds.download.DownloadManager.download = refuse("DownloadManager.download")

    t0 = time.perf_counter()
    try:
        data.load("tfds:mnist", data_dir=sys.argv[1])
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"error": error, "calls": calls, "seconds": time.perf_counter() - t0}))
"""


def test_unprepared_tfds_dataset_is_refused_without_a_download(tmp_path):
    proc = _child(NO_NETWORK_CHILD, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["calls"] == []  # neither the download path nor a socket was reached
    error = out["error"]
    assert error.startswith("RuntimeError: TFDS dataset 'mnist' is not prepared in ")
    assert str(tmp_path) in error and "never downloads" in error
    assert "tfds build mnist --data_dir DIR" in error and "offline dataset: mnist5k" in error


class _BrokenTfds(importlib.abc.MetaPathFinder):
    """Makes ``import tensorflow_datasets`` fail as it does without one of its undeclared dependencies."""

    def __init__(self, missing: str):
        self.missing = missing

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow_datasets":
            raise ModuleNotFoundError(f"No module named {self.missing!r}", name=self.missing)


@pytest.mark.parametrize(
    "missing, message",
    [
        ("tensorflow_datasets", "needs tensorflow-datasets: pip install 'jcompress[tfds]'"),
        ("importlib_resources", "tensorflow-datasets is installed but cannot import 'importlib_resources'"),
    ],
)
def test_import_errors_say_what_is_missing(missing, message, monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow_datasets", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTfds(missing), *sys.meta_path])
    with pytest.raises(ImportError) as e:
        data.load("tfds:mnist")
    assert message in str(e.value) and "mnist5k" in str(e.value)
