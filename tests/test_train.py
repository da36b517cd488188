"""Train step, evaluation, checkpoints and exact resume."""

import json

import chex
import jax
import numpy as np
import optax
import pytest

from jcompress import checkpoint, data, models, train


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _model(ds, seed=0):
    config = {"name": "mlp", "input_shape": list(ds.input_shape), "num_classes": 10, "widths": [32], "dropout": 0.2}
    config["seed"] = seed
    return config, models.functional(models.create(**config))


def _fit(ds, out_dir, epochs, seed=0, tx=None):
    config, fn = _model(ds, seed)
    return train.fit(
        fn.apply,
        fn.params,
        fn.extra,
        ds,
        tx=tx or optax.adam(3e-3),
        epochs=epochs,
        batch_size=64,
        seed=seed,
        out_dir=out_dir,
        meta={"model": config},
        progress=False,
    )


def test_training_learns_digits_evaluating_on_validation_only(digits, tmp_path, monkeypatch):
    seen = []
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: seen.append(len(a[3])) or evaluate(*a, **k))
    res = _fit(digits, tmp_path, epochs=8)
    assert seen == [len(digits.x_val)] * 8  # one validation pass per epoch, never the test split
    assert res.history[-1]["val_accuracy"] > 0.85
    assert not any(k.startswith("test_") for row in res.history for k in row)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().strip().splitlines()]
    assert [r["val_accuracy"] for r in lines] == [r["val_accuracy"] for r in res.history] and len(lines) == 8
    final = train.final_metrics(_model(digits)[1].apply, res.params, res.extra, digits, epochs=8, out_dir=tmp_path)
    assert final["val_accuracy"] == res.history[-1]["val_accuracy"]
    assert json.loads((tmp_path / "final.json").read_text()) == final
    assert final["test_examples"] == len(digits.y_test) and 0.85 < final["test_accuracy"] <= 1.0


def test_resume_continues_exactly(digits, tmp_path):
    """4 epochs straight == 2 epochs, stop, then resume to 4 (dropout keys, batch order, Adam state)."""
    straight = _fit(digits, tmp_path / "a", epochs=4)
    _fit(digits, tmp_path / "b", epochs=2)
    resumed = _fit(digits, tmp_path / "b", epochs=4)
    assert int(resumed.state.step) == int(straight.state.step)
    chex.assert_trees_all_equal(resumed.params, straight.params)
    chex.assert_trees_all_equal(resumed.state.opt_state, straight.state.opt_state)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]


def test_load_model_from_training_checkpoint(digits, tmp_path):
    res = _fit(digits, tmp_path, epochs=1)
    model, config, meta = checkpoint.load_model(tmp_path / "ckpt", build=models.from_meta)
    fn = models.functional(model)
    chex.assert_trees_all_equal(fn.params, jax.tree.map(np.asarray, res.params))
    assert config["widths"] == [32] and meta["kind"] == "train"
    acc = train.evaluate(fn.apply, fn.params, fn.extra, digits.x_val, digits.y_val)["accuracy"]
    assert acc == pytest.approx(res.history[-1]["val_accuracy"])


def test_evaluate_pads_last_batch(digits):
    fn = models.functional(models.create("lenet300", input_shape=digits.input_shape, num_classes=10))
    full = train.evaluate(fn.apply, fn.params, fn.extra, digits.x_test, digits.y_test, batch_size=1000)
    small = train.evaluate(fn.apply, fn.params, fn.extra, digits.x_test, digits.y_test, batch_size=100)
    logits, _ = fn.apply(fn.params, fn.extra, digits.x_test)
    want = float(np.mean(np.argmax(logits, -1) == digits.y_test))
    assert full["accuracy"] == pytest.approx(want) and small["accuracy"] == pytest.approx(want)
    assert small["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_data_parallel_step_equals_single_device(digits):
    """The same global batch on a 1-device and an 8-device mesh gives the same update."""
    from jcompress import parallel

    fn = models.functional(models.create("lenet300", input_shape=digits.input_shape, num_classes=10))
    tx = optax.sgd(0.1)
    step = jax.jit(lambda s, b: train.train_step(s, b, apply_fn=fn.apply, tx=tx))
    batch = (digits.x_train[:64], digits.y_train[:64])
    outs = []
    for n in (1, 8):
        mesh = parallel.data_mesh(n)
        state = parallel.replicate(train.init_state(fn.params, fn.extra, tx), mesh)
        new, metrics = step(state, parallel.shard_batch(batch, mesh))
        outs.append((new.params, float(metrics["loss"])))
    chex.assert_trees_all_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-6)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope", build=models.from_meta)


def test_fit_leaves_the_callers_arrays_alive(digits):
    fn = models.functional(models.create("lenet300", input_shape=digits.input_shape, num_classes=10))
    before = jax.tree.map(np.asarray, fn.params)
    train.fit(fn.apply, fn.params, fn.extra, digits, tx=optax.sgd(0.1), epochs=1, batch_size=64, progress=False)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, fn.params), before)  # not deleted, not changed


def test_diverging_optimizer_stops_with_the_last_good_checkpoint_kept(digits, tmp_path):
    """The learning rate turns NaN in epoch 2: a clear error naming the epoch; no NaN params are saved."""
    small = digits._replace(x_train=digits.x_train[:256], y_train=digits.y_train[:256])  # 4 steps an epoch
    tx = optax.chain(optax.adam(3e-3), optax.scale_by_schedule(lambda step: jax.numpy.where(step >= 4, np.nan, 1.0)))
    with pytest.raises(FloatingPointError, match=r"epoch 2: training diverged .*learning rate.*step 4\) in "):
        _fit(small, tmp_path, epochs=3, tx=tx)
    assert checkpoint.latest_step(tmp_path / "ckpt") == 4  # the diverged epoch 2 (step 8) was not saved
    model, _, meta = checkpoint.load_model(tmp_path / "ckpt", build=models.from_meta)
    fn = models.functional(model)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(fn.params))
    # the kept checkpoint is epoch 1's model: its validation accuracy is the one logged for epoch 1
    acc = train.evaluate(fn.apply, fn.params, fn.extra, small.x_val, small.y_val)["accuracy"]
    assert [r["epoch"] for r in meta["history"]] == [1] and acc == pytest.approx(meta["history"][0]["val_accuracy"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(FloatingPointError, match="epoch 1: .*nothing was checkpointed"):
        _fit(small, None, epochs=1, tx=optax.adam(float("nan")))
