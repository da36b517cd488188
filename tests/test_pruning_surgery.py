"""Hard pruning: the smaller model computes what the masked model computes, for every model type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcompress import checkpoint, models, report
from jcompress import tree as jtree
from jcompress.core import topk
from jcompress.pruning import optim, scores, surgery
from jcompress.pruning import masks as masks_lib

CONFIGS = {
    "lenet300": {"name": "lenet300", "input_shape": [8, 8, 1], "num_classes": 10},
    "mlp": {"name": "mlp", "input_shape": [8, 8, 1], "num_classes": 10, "widths": [24, 16, 12]},
    "lenet5": {"name": "lenet5", "input_shape": [16, 16, 1], "num_classes": 10, "channels": [6, 8], "hidden": 20},
    "cnn1d": {"name": "cnn1d", "input_shape": [40], "num_classes": 10, "channels": [8, 6, 8]},
    "resnet": {"name": "resnet", "input_shape": [8, 8, 1], "num_classes": 10, "widths": [4, 8]},
}
# Models whose removable units feed a padded convolution: a nonzero constant cannot be folded.
PADDED = {"cnn1d", "resnet"}


def _model(key: str, seed: int = 1):
    """A model with random weights, biases and BatchNorm parameters/statistics (so eval mode matters).

    Built from shapes only (``nnx.eval_shape``) and filled with numpy values, so that no
    initialiser has to be compiled.
    """
    abstract = nnx.eval_shape(lambda: models.create(**CONFIGS[key]))
    fn = models.functional(abstract)
    rng = np.random.default_rng(seed)

    def fill(name, x):
        if name.endswith("/var"):
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32)
        if name.endswith("/kernel"):
            return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1])), jnp.float32)
        return jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32)

    return models.merge(abstract, jtree.map_with_names(fill, fn.params), jtree.map_with_names(fill, fn.extra))


_X = {  # one input batch per model class (all configs of a class share the input shape)
    cls: jnp.asarray(np.random.default_rng(2).normal(size=(6, *CONFIGS[key]["input_shape"])), jnp.float32)
    for cls, key in (("MLP", "mlp"), ("LeNet5", "lenet5"), ("CNN1D", "cnn1d"), ("ResNet", "resnet"))
}


def _structured(model, sparsity=0.5):
    fn = models.functional(model)
    return masks_lib.make_masks(scores.magnitude(fn.params), sparsity=sparsity, pattern="structured", norm="l2")


def _forward(model, params=None):
    fn = models.functional(model)
    out, _ = jax.jit(fn.apply)(fn.params if params is None else params, fn.extra, _X[type(model).__name__])
    return np.asarray(out)


def _assert_equivalent(model, masks, result):
    fn = models.functional(model)
    want = _forward(model, masks_lib.apply_masks(fn.params, optim.as_mask_tree(fn.params, masks)))
    got = _forward(result.model)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert jtree.tree_size(models.functional(result.model).params) < jtree.tree_size(fn.params)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_structured_masks_equivalence(key):
    model = _model(key)
    masks = _structured(model)
    if key in PADDED:  # kernel-only masks leave nonzero constants before a padded conv: refused
        with pytest.raises(ValueError, match="constant.*padded"):
            surgery.hard_prune(model, masks, config=CONFIGS[key])
        masks = surgery.complete_masks(model, masks)
    res = surgery.hard_prune(model, masks, config=CONFIGS[key])
    _assert_equivalent(model, masks, res)
    # every removable layer lost exactly half its units (the structured masks' count)
    for layer, kept in res.keep.items():
        width = jtree.get_by_name(models.functional(model).params, f"{layer}/kernel").shape[-1]
        assert len(kept) == width - topk.pruned_count(0.5, width), layer


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_keep_lists_remove_units_entirely(key):
    model = _model(key)
    plan = surgery.removable_layers(model)
    fn = models.functional(model)
    keep = {}
    for i, r in enumerate(plan):
        width = jtree.get_by_name(fn.params, f"{r.layer}/kernel").shape[-1]
        keep[r.layer if i % 2 else f"{r.layer}/kernel"] = list(range(width))[i % 2 :: 3]
    res = surgery.hard_prune(model, keep=keep, config=CONFIGS[key])
    _assert_equivalent(model, surgery.unit_masks(model, keep), res)
    widths = {k.removesuffix("/kernel"): len(v) for k, v in keep.items()}
    assert {k: len(v) for k, v in res.keep.items()} == widths


def test_folding_is_exercised_for_mlp_and_lenet5():
    """Kernel-only masks keep the removed units' biases: the constants must be folded, not dropped."""
    for key in ("mlp", "lenet5"):
        model = _model(key)
        masks = _structured(model)
        res = surgery.hard_prune(model, masks, config=CONFIGS[key])
        _assert_equivalent(model, masks, res)
        # without folding the result would differ: removing the units entirely gives other outputs
        fn = models.functional(model)
        full_removal = surgery.complete_masks(model, masks)
        a = _forward(model, masks_lib.apply_masks(fn.params, masks))
        b = _forward(model, masks_lib.apply_masks(fn.params, full_removal))
        assert np.max(np.abs(a - b)) > 1e-2


def test_resnet_bn_in_eval_mode_and_residual_stream_untouched():
    model = _model("resnet")
    masks = surgery.complete_masks(model, _structured(model, 0.25))
    res = surgery.hard_prune(model, masks, config=CONFIGS["resnet"])
    _assert_equivalent(model, masks, res)
    assert res.config["widths"] == [4, 8] and res.config["mids"] == [3, 6]
    small = res.model
    assert small.blocks[0].bn1.mean.get_value().shape == (3,)
    np.testing.assert_array_equal(
        small.blocks[1].bn1.var.get_value(), np.asarray(model.blocks[1].bn1.var.get_value())[res.keep["blocks/1/conv1"]]
    )
    assert small.stem.kernel.get_value().shape == model.stem.kernel.get_value().shape


def test_saved_and_loaded_pruned_model_gives_the_same_outputs(tmp_path):
    model = _model("lenet5")
    res = surgery.hard_prune(model, _structured(model), config=dict(CONFIGS["lenet5"], seed=3))
    fn = models.functional(res.model)
    checkpoint.save_model(tmp_path / "small", res.config, fn.params, fn.extra)
    loaded, config, _ = checkpoint.load_model(tmp_path / "small")
    assert config == res.config and config["channels"] == [3, 4] and config["hidden"] == 10
    np.testing.assert_array_equal(_forward(loaded), _forward(res.model))


def test_mlp_config_inferred_and_nnx_state_masks():
    model = _model("lenet300")
    _, state, _ = nnx.split(model, nnx.Param, ...)
    masks = masks_lib.make_masks(
        scores.magnitude(state), sparsity=0.5, pattern="structured", selection=r"fc[12]/kernel"
    )
    res = surgery.hard_prune(model, masks)  # config inferred from the MLP's layers
    assert res.config == {"name": "mlp", "input_shape": [64], "num_classes": 10, "widths": [150, 50]}
    _assert_equivalent(model, masks, res)


def test_hard_prune_errors():
    model = _model("lenet300")
    masks = _structured(model)
    with pytest.raises(ValueError, match="exactly one"):
        surgery.hard_prune(model, masks, keep={"fc1": [0]})
    with pytest.raises(ValueError, match="exactly one"):
        surgery.hard_prune(model)
    with pytest.raises(ValueError, match="empty"):
        surgery.hard_prune(model, keep={"fc1": []})
    with pytest.raises(ValueError, match="distinct indices"):
        surgery.hard_prune(model, keep={"fc1": [0, 300]})
    with pytest.raises(ValueError, match="not a removable layer.*fc1"):
        surgery.hard_prune(model, keep={"fc3": [0]})
    fn = models.functional(model)
    all_gone = jtree.map_with_names(lambda n, m: jnp.zeros_like(m) if n == "fc2/kernel" else m, masks)
    with pytest.raises(ValueError, match="every unit of fc2"):
        surgery.hard_prune(model, all_gone)
    with pytest.raises(ValueError, match="config="):
        surgery.hard_prune(_model("lenet5"), keep={"fc1": [0, 1]})
    with pytest.raises(ValueError, match="shape"):
        surgery.hard_prune(
            _model("lenet5"), keep={"fc1": [0, 1]}, config=dict(CONFIGS["lenet5"], input_shape=[20, 20, 1])
        )
    with pytest.raises(TypeError, match="MLP, LeNet5"):
        surgery.removable_layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    assert fn.params  # untouched input
    np.testing.assert_array_equal(np.asarray(model.fc1.kernel.get_value()), np.asarray(fn.params["fc1"]["kernel"]))


def test_hard_prune_report_counts():
    model = _model("lenet300")
    res = surgery.hard_prune(model, keep={"fc1": list(range(100)), "fc2": list(range(50))})
    rep = surgery.hard_prune_report(model, res.model, (8, 8, 1), batch_size=32, repeats=3)
    assert rep["before"]["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert rep["after"]["params"] == 64 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10
    assert rep["before"]["flops"] == sum(report.layer_flops(model, (8, 8, 1)).values())
    assert rep["flops_ratio"] == pytest.approx((64 * 300 + 300 * 100 + 100 * 10) / (64 * 100 + 100 * 50 + 50 * 10))
    assert rep["before"]["latency_s"] > 0 and rep["after"]["latency_s"] > 0


def test_b6_quick_fields_and_correctness():
    from jcompress.bench import b6_speedups

    rows = b6_speedups.run(quick=True)
    assert len(rows) == 2
    for row in rows:
        assert {"name", "ratio", "target", "met"} <= set(row)
        assert isinstance(row["met"], bool)
    hard = rows[0]
    assert hard["widths_pruned"] == [512, 512]
    assert hard["max_abs_logit_diff_vs_masked"] <= 1e-5 * max(1.0, hard["max_abs_logit"])
    dense_flops = 784 * 1024 + 1024 * 1024 + 1024 * 10
    assert hard["flops_ratio"] == pytest.approx(dense_flops / (784 * 512 + 512 * 512 + 512 * 10))
    assert hard["file_size_ratio"] > 2.0
