"""The distillation step (1 vs 8 devices, jit vs shard_map, cached teacher) and the resumable driver."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jcompress import checkpoint, models, parallel
from jcompress.distill import losses, run
from jcompress.distill.step import (
    DistillConfig,
    distill_step,
    init_state,
    make_step,
    teacher_logits,
)


@pytest.fixture(scope="module")
def digits():
    from jcompress import data

    return data.load("digits")


def _mlp(widths, seed, **kw):
    return models.create("mlp", input_shape=(8, 8, 1), num_classes=10, widths=widths, seed=seed, **kw)


def _copy(tree):
    return jax.tree.map(jnp.array, tree)


def _rel_err(a, b):
    """Largest |a - b| over a leaf relative to the leaf's largest magnitude, maximised over leaves."""

    def err(x, y):
        x, y = np.asarray(x), np.asarray(y)
        return float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), np.max(np.abs(y)), 1e-30))

    return max(jax.tree.leaves(jax.tree.map(err, a, b)))


def _run_steps(student, teacher, batch, *, n_devices, tx, config, shard_map=False, steps=3, params=None):
    s_fn, t_fn = models.functional(student), models.functional(teacher)
    mesh = parallel.data_mesh(n_devices)
    state = parallel.replicate(
        init_state(_copy(s_fn.params if params is None else params), s_fn.extra, tx, seed=3), mesh
    )
    t_arrays = parallel.replicate((t_fn.params, t_fn.extra), mesh)
    step = make_step(
        student_apply=s_fn.apply, teacher_apply=t_fn.apply, tx=tx, config=config, mesh=mesh, shard_map=shard_map
    )
    history = []
    for _ in range(steps):
        state, m = step(state, parallel.shard_batch(batch, mesh), *t_arrays)
        history.append({k: float(v) for k, v in m.items()})
    return jax.device_get(state), history


# --- data parallelism ---------------------------------------------------------------------------


@pytest.mark.parametrize("shard_map", [False, True], ids=["jit", "shard_map"])
def test_eight_devices_equal_one_device(digits, shard_map):
    assert len(jax.devices()) == 8
    # jit: dropout in the student, since random bits do not depend on the sharding;
    # shard_map draws per-device masks, so its student has no dropout.
    student = _mlp((32,), 1, dropout=0.0 if shard_map else 0.3)
    teacher = _mlp((64, 64), 2, dropout=0.5)
    batch = (digits.x_train[:64], digits.y_train[:64])
    config = DistillConfig(temperature=4.0, alpha=0.7)
    one, h1 = _run_steps(student, teacher, batch, n_devices=1, tx=optax.sgd(0.3), config=config)
    eight, h8 = _run_steps(student, teacher, batch, n_devices=8, tx=optax.sgd(0.3), config=config, shard_map=shard_map)
    assert _rel_err(one.params, eight.params) < 1e-6
    for a, b in zip(h1, h8):
        assert set(a) == set(b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        for k in a:  # the KL is a difference of logs: compare its parts absolutely
            assert b[k] == pytest.approx(a[k], abs=1e-6), k
    assert int(eight.step) == 3
    # the params moved: equality is not the trivial one of an untouched state
    assert _rel_err(models.functional(student).params, one.params) > 1e-3


def test_eight_devices_equal_one_device_with_adam_and_nnx_state(digits):
    student, teacher = _mlp((32,), 1), _mlp((64,), 2)
    _, p_state = nnx.split(student, nnx.Param)
    batch = (digits.x_train[64:128], digits.y_train[64:128])
    config = DistillConfig(temperature=20.0, alpha=0.9)
    one, _ = _run_steps(student, teacher, batch, n_devices=1, tx=optax.adam(1e-2), config=config, params=p_state)
    eight, _ = _run_steps(student, teacher, batch, n_devices=8, tx=optax.adam(1e-2), config=config)
    assert isinstance(one.params, nnx.State)
    assert _rel_err(nnx.to_pure_dict(one.params), eight.params) < 1e-6


def test_params_are_replicated_and_batch_is_sharded(digits):
    s_fn, t_fn = models.functional(_mlp((16,), 1)), models.functional(_mlp((16,), 2))
    mesh = parallel.data_mesh(8)
    state = parallel.replicate(init_state(_copy(s_fn.params), s_fn.extra, optax.sgd(0.1)), mesh)
    step = make_step(
        student_apply=s_fn.apply, teacher_apply=t_fn.apply, tx=optax.sgd(0.1), config=DistillConfig(), mesh=mesh
    )
    batch = parallel.shard_batch((digits.x_train[:32], digits.y_train[:32]), mesh)
    assert batch[0].sharding.spec == jax.sharding.PartitionSpec("data")
    state, metrics = step(state, batch, t_fn.params, t_fn.extra)
    for leaf in jax.tree.leaves((state, metrics)):
        assert leaf.sharding.is_fully_replicated


# --- the loss and the frozen teacher ---------------------------------------------------------------


def test_step_gradient_equals_reference_gradient(digits):
    """With SGD at lr 1, new params = params - grad of (1 - a) CE + a T^2 KL, computed independently."""
    s_fn, t_fn = models.functional(_mlp((16,), 1)), models.functional(_mlp((32,), 2))
    x, y = digits.x_train[:20], digits.y_train[:20]
    T, alpha = 5.0, 0.6
    config = DistillConfig(temperature=T, alpha=alpha)
    step = jax.jit(
        lambda st, b: distill_step(
            st, b, teacher_params=t_fn.params, teacher_extra=t_fn.extra, student_apply=s_fn.apply,
            teacher_apply=t_fn.apply, tx=optax.sgd(1.0), config=config,
        )
    )  # fmt: skip
    state, metrics = step(init_state(_copy(s_fn.params), s_fn.extra, optax.sgd(1.0)), (x, y))
    t_logits, _ = t_fn.apply(t_fn.params, t_fn.extra, x)

    def ref_loss(p):
        s_logits, _ = s_fn.apply(p, s_fn.extra, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(s_logits, y).mean()
        pt, log_qs = jax.nn.softmax(t_logits / T), jax.nn.log_softmax(s_logits / T)
        kl = jnp.mean(jnp.sum(pt * (jnp.log(pt) - log_qs), -1))
        return (1 - alpha) * ce + alpha * T**2 * kl

    loss, grads = jax.value_and_grad(ref_loss)(s_fn.params)
    chex.assert_trees_all_close(
        state.params, jax.tree.map(lambda p, g: p - g, s_fn.params, grads), rtol=1e-5, atol=1e-6
    )
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)


def test_teacher_is_frozen_and_not_in_the_state(digits):
    s_fn, t_fn = models.functional(_mlp((16,), 1)), models.functional(_mlp((32,), 2))
    before = jax.device_get(t_fn.params)
    tx = optax.adam(1e-2)
    state = init_state(_copy(s_fn.params), s_fn.extra, tx)
    step = make_step(student_apply=s_fn.apply, teacher_apply=t_fn.apply, tx=tx, config=DistillConfig())
    for i in range(3):
        state, _ = step(
            state,
            (digits.x_train[i * 16 : (i + 1) * 16], digits.y_train[i * 16 : (i + 1) * 16]),
            t_fn.params,
            t_fn.extra,
        )
    chex.assert_trees_all_equal(jax.device_get(t_fn.params), before)  # not updated, not donated
    # optimizer state covers the student only
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(s_fn.params))
    assert state.hint_params == {}


def test_cached_teacher_logits_give_the_same_step(digits):
    s_fn, t_fn = models.functional(_mlp((16,), 1)), models.functional(_mlp((32,), 2, dropout=0.5))
    x, y = digits.x_train[:40], digits.y_train[:40]
    cached = teacher_logits(
        t_fn.apply, t_fn.params, t_fn.extra, digits.x_train[:97], batch_size=32
    )  # padded last batch
    assert cached.shape == (97, 10) and cached.dtype == np.float32
    direct, _ = t_fn.apply(t_fn.params, t_fn.extra, digits.x_train[:97])
    np.testing.assert_allclose(cached, np.asarray(direct), rtol=1e-5, atol=1e-6)
    config = DistillConfig(temperature=3.0, alpha=0.8)
    tx = optax.sgd(0.5)
    live = make_step(student_apply=s_fn.apply, teacher_apply=t_fn.apply, tx=tx, config=config)
    from_cache = make_step(student_apply=s_fn.apply, teacher_apply=None, tx=tx, config=config)
    a, ma = live(init_state(_copy(s_fn.params), s_fn.extra, tx), (x, y), t_fn.params, t_fn.extra)
    b, mb = from_cache(init_state(_copy(s_fn.params), s_fn.extra, tx), (x, y, cached[:40]), None, None)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-7)
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-5)


def test_different_architectures_with_hints_attention_and_mse():
    """A LeNet-5 teacher teaches a narrower LeNet-5: attention on conv1, a hint conv2 -> conv2."""
    shape = (16, 16, 1)
    teacher = models.create("lenet5", input_shape=shape, num_classes=10, seed=0, channels=(8, 16), hidden=32)
    student = models.create("lenet5", input_shape=shape, num_classes=10, seed=1, channels=(4, 6), hidden=16)
    assert models.feature_shapes(student, shape)["conv2"] == (2, 2, 6)
    config = DistillConfig(
        temperature=4.0, alpha=0.5, logit_loss="mse", hints=[("conv2", "conv2")], hint_weight=0.1,
        attention=[("conv1", "conv1")], attention_weight=10.0,
    )  # fmt: skip
    s_apply, t_apply = (
        models.functional(student, features=["conv1", "conv2"]).apply,
        models.functional(teacher, features=["conv1", "conv2"]).apply,
    )
    s_fn, t_fn = models.functional(student), models.functional(teacher)
    x = jax.random.uniform(jax.random.key(0), (16, *shape))
    y = jnp.arange(16, dtype=jnp.int32) % 10
    (_, s_feats), _ = jax.jit(s_apply)(s_fn.params, s_fn.extra, x)
    (t_logits, t_feats), _ = jax.jit(t_apply)(t_fn.params, t_fn.extra, x)
    reg = losses.init_hint_regressor(jax.random.key(0), s_feats, t_feats, hints=config.hints)
    tx = optax.sgd(0.05)
    state = init_state(_copy(s_fn.params), s_fn.extra, tx, hint_params=_copy(reg))
    step = make_step(student_apply=s_apply, teacher_apply=t_apply, tx=tx, config=config)
    new, m = step(state, (x, y), t_fn.params, t_fn.extra)
    # the reported loss is the configured sum of the separately computed terms
    s_logits, _ = jax.jit(s_fn.apply)(s_fn.params, s_fn.extra, x)
    ce = float(optax.softmax_cross_entropy_with_integer_labels(s_logits, y).mean())
    mse = float(losses.logit_mse(s_logits, t_logits))
    hint = float(losses.hint_loss(reg, s_feats, t_feats, hints=config.hints))
    att = float(losses.attention_transfer_loss(s_feats, t_feats, pairs=config.attention))
    assert m["hint_loss"] == pytest.approx(hint, rel=1e-5)
    assert m["attention_loss"] == pytest.approx(att, rel=1e-5)
    assert m["loss"] == pytest.approx(0.5 * ce + 0.5 * mse + 0.1 * hint + 10.0 * att, rel=1e-5)
    # the regressor is trained with the student
    assert float(jnp.abs(new.hint_params["conv2"]["kernel"] - reg["conv2"]["kernel"]).max()) > 0


def test_param_distance_pulls_a_same_shape_student(digits):
    teacher = _mlp((16,), 2)
    s_fn, t_fn = models.functional(_mlp((16,), 1)), models.functional(teacher)
    tx = optax.sgd(0.1)
    config = DistillConfig(temperature=2.0, alpha=0.5, param_weight=1e-3)
    step = make_step(student_apply=s_fn.apply, teacher_apply=t_fn.apply, tx=tx, config=config)
    _state, m = step(
        init_state(_copy(s_fn.params), s_fn.extra, tx),
        (digits.x_train[:16], digits.y_train[:16]),
        t_fn.params,
        t_fn.extra,
    )
    expected = float(losses.param_distance(s_fn.params, t_fn.params, weight=1.0))
    assert m["param_loss"] == pytest.approx(expected, rel=1e-5)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 2.0}, "alpha"),
        ({"logit_loss": "ce"}, "logit_loss"),
        ({"hint_weight": 1.0}, "hint"),
        ({"hints": [("a", "b")]}, "hint"),
        ({"attention_weight": -1.0}, "attention_weight"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_step_errors(digits):
    s_fn = models.functional(_mlp((16,), 1))
    tx = optax.sgd(0.1)
    state = init_state(s_fn.params, s_fn.extra, tx)
    x, y = digits.x_train[:8], digits.y_train[:8]
    kw = {"teacher_params": None, "teacher_extra": None, "student_apply": s_fn.apply, "tx": tx}
    with pytest.raises(ValueError, match="cached teacher logits"):
        distill_step(state, (x, y), teacher_apply=None, config=DistillConfig(), **kw)
    hints = DistillConfig(hints=[("fc1", "fc1")], hint_weight=1.0)
    with pytest.raises(ValueError, match="cached logits"):
        distill_step(state, (x, y, np.zeros((8, 10), np.float32)), teacher_apply=None, config=hints, **kw)
    with pytest.raises(ValueError, match="features="):
        distill_step(state, (x, y), teacher_apply=s_fn.apply, config=hints, **{**kw, "teacher_params": s_fn.params})
    with pytest.raises(KeyError, match="fc7"):
        models.functional(_mlp((16,), 1), features=["fc7"]).apply(s_fn.params, s_fn.extra, x)
    with pytest.raises(ValueError, match="mesh"):
        make_step(student_apply=s_fn.apply, teacher_apply=None, tx=tx, config=DistillConfig(), shard_map=True)


# --- the driver -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, digits):
    import optax as _optax

    from jcompress import train

    config = {"name": "mlp", "input_shape": [8, 8, 1], "num_classes": 10, "widths": [64], "dropout": 0.2, "seed": 5}
    fn = models.functional(models.create(**config))
    fit = train.fit(
        fn.apply, _copy(fn.params), fn.extra, digits, tx=_optax.adam(3e-3), epochs=5, batch_size=64, progress=False
    )
    d = tmp_path_factory.mktemp("teacher")
    checkpoint.save_model(d, config, fit.params, fit.extra)
    return d


def test_distill_resumes_exactly_and_saves_a_loadable_student(teacher_dir, digits, tmp_path):
    kw = {"epochs": 3, "batch_size": 64, "temperature": 4.0, "alpha": 0.9, "lr": 3e-3, "seed": 1, "progress": False}
    student = {"name": "mlp", "widths": [16], "dropout": 0.1}
    full = run.distill(teacher_dir, student, digits, out_dir=tmp_path / "full", **kw)
    part = run.distill(teacher_dir, student, digits, out_dir=tmp_path / "part", **{**kw, "epochs": 1})
    assert len(part.history) == 1
    resumed = run.distill(teacher_dir, student, digits, out_dir=tmp_path / "part", **kw)
    chex.assert_trees_all_equal(jax.device_get(full.params), jax.device_get(resumed.params))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    lines = [json.loads(s) for s in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], rel=1e-6)
    # every epoch is evaluated on validation; test is measured once, on the final student
    assert not any(k.startswith("test_") for r in lines for k in r)
    assert full.val_accuracy == full.history[-1]["val_accuracy"] > 0.5
    assert json.loads((tmp_path / "full" / "final.json").read_text())["test_accuracy"] == full.test_accuracy
    # the distilled student learned from the teacher and reloads as an NNX model
    assert full.history[-1]["train_agreement"] > full.history[0]["train_agreement"]
    model, config, meta = checkpoint.load_model(tmp_path / "full" / "ckpt", build=models.from_meta)
    assert config["widths"] == [16] and meta["kind"] == "distill" and meta["distill"]["temperature"] == 4.0
    correct = int(jnp.sum(jnp.argmax(model(digits.x_test), -1) == digits.y_test))
    assert correct == round(full.test_accuracy * len(digits.y_test))


def test_cli_distill(teacher_dir, tmp_path, capsys):
    import argparse

    from jcompress.cli import distill as distill_command

    parser = argparse.ArgumentParser()
    distill_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["distill", "--teacher", str(teacher_dir), "--student", "mlp", "--widths", "12", "--data", "digits",
         "--epochs", "1", "--batch-size", "64", "--temperature", "3", "--alpha", "0.5", "--out", str(tmp_path)]
    )  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    printed, final = json.loads(out[0]), json.loads((tmp_path / "final.json").read_text())
    assert printed["epoch"] == 1 and 0.0 < printed["val_accuracy"] <= 1.0 and "test_accuracy" not in printed
    assert final["val_accuracy"] == printed["val_accuracy"] and 0.0 < final["test_accuracy"] <= 1.0
    assert f"test accuracy {final['test_accuracy']:.4f}" in out[1] and "validation" in out[1]
    _, config, meta = checkpoint.load_model(tmp_path / "ckpt", build=models.from_meta)
    assert config["widths"] == [12] and meta["distill"]["alpha"] == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--teacher", "x", "--widths", "a,b", "--out", "y"])


def test_driver_rejects_bad_student_config(teacher_dir, digits):
    with pytest.raises(ValueError, match="name"):
        run.distill(teacher_dir, {"widths": [8]}, digits, epochs=1, progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        run.distill(teacher_dir, {"name": "mlp", "num_classes": 3}, digits, epochs=1, progress=False)


def test_demo_stage_row(teacher_dir, digits):
    teacher, _, _ = checkpoint.load_model(teacher_dir, build=models.from_meta)
    row = run.demo_stage(teacher, digits, epochs=3, student_widths=(16,), batch_size=64, lr=1e-2)
    assert row["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert row["teacher_params"] == 64 * 64 + 64 + 64 * 10 + 10
    assert row["compression"] == pytest.approx(row["teacher_params"] / row["params"])
    assert row["gain"] == pytest.approx(row["accuracy"] - row["student_alone_accuracy"])
    assert 0.5 < row["accuracy"] <= 1.0 and 0.5 < row["student_alone_accuracy"] <= 1.0
    assert 0.5 < row["val_accuracy"] <= 1.0 and 0.5 < row["student_alone_val_accuracy"] <= 1.0
    # the returned params are the distilled student's: rebuilt, it has the reported accuracy
    student = models.merge(models.create(**row["student_config"]), row["student_params"])
    correct = int(jnp.sum(jnp.argmax(student(digits.x_test), -1) == digits.y_test))
    assert correct == round(row["accuracy"] * len(digits.y_test))
