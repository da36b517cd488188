"""Hard pruning: the smaller model computes what the masked model computes, for the model zoo
and for models the library has never seen (coupling found by tracing)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcompress import checkpoint, models
from jcompress import tree as jtree
from jcompress.core import base, topk
from jcompress.nnx import surgery
from jcompress.nnx.coupling import coupling

CONFIGS = {
    "lenet300": {"name": "lenet300", "input_shape": [8, 8, 1], "num_classes": 10},
    "mlp": {"name": "mlp", "input_shape": [8, 8, 1], "num_classes": 10, "widths": [24, 16, 12]},
    "lenet5": {"name": "lenet5", "input_shape": [16, 16, 1], "num_classes": 10, "channels": [6, 8], "hidden": 20},
    "cnn1d": {"name": "cnn1d", "input_shape": [40], "num_classes": 10, "channels": [8, 6, 8]},
    "resnet": {"name": "resnet", "input_shape": [8, 8, 1], "num_classes": 10, "widths": [4, 8]},
}
# the hidden layers of each model (the output layer's units are the logits)
HIDDEN = {
    "lenet300": r"fc[12]/kernel",
    "mlp": r"fc[123]/kernel",
    "lenet5": r"(conv[12]|fc1)/kernel",
    "cnn1d": r"conv\d/kernel",
    "resnet": r"blocks/\d/conv1/kernel",
}
# Models whose removable units feed a padded convolution: a nonzero constant cannot be folded.
PADDED = {"cnn1d", "resnet"}


def _fill(abstract, seed):
    """Random weights, biases and norm parameters/statistics (so eval mode matters)."""
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(name, x):
        if name.endswith("/var"):
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32)
        if name.endswith("/kernel"):
            return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1])), jnp.float32)
        return jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32)

    values = jtree.map_with_names(fill, nnx.to_pure_dict(state))
    return nnx.merge(graphdef, jtree.from_pure_dict(state, values))


def _model(key: str, seed: int = 1):
    """A zoo model built from shapes only (``nnx.eval_shape``): no initialiser is compiled."""
    return _fill(nnx.eval_shape(lambda: models.create(**CONFIGS[key])), seed)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _units(model, pattern, sparsity=0.5):
    """Structured masks: the ``sparsity`` fraction of each matched kernel's columns with the smallest l2 norm."""

    def one(name, w):
        if not re.fullmatch(pattern, name):
            return jnp.ones(w.shape, bool)
        norms = jnp.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0)
        keep = topk.keep_largest(norms, w.shape[-1] - topk.pruned_count(sparsity, w.shape[-1]))
        return jnp.broadcast_to(keep, w.shape)

    return jtree.map_with_names(one, _params(model))


def _forward(model, x):
    """The model's outputs in eval mode (norms use their statistics, no dropout), under jit."""
    graphdef, state = nnx.split(model)

    def forward(s, inp):
        m = nnx.merge(graphdef, s)
        m.eval()
        return m(inp)

    return np.asarray(jax.jit(forward)(state, x))


def _masked(model, masks):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    new = jax.tree.map(
        lambda p, m: jnp.where(m, p, 0),
        nnx.to_pure_dict(params),
        nnx.to_pure_dict(masks) if isinstance(masks, nnx.State) else masks,
    )
    return nnx.merge(graphdef, jtree.from_pure_dict(params, new), rest)


def _x(shape, n=6):
    return jnp.asarray(np.random.default_rng(2).normal(size=(n, *shape)), jnp.float32)


def _assert_equivalent(model, masks, small, input_shape):
    """The pruned model (run under jit) equals the masked model, and is smaller."""
    x = _x(input_shape)
    want = _forward(_masked(model, masks), x)
    got = _forward(small, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert jtree.tree_size(_params(small)) < jtree.tree_size(_params(model))


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_structured_masks_equivalence(key):
    model = _model(key)
    shape = CONFIGS[key]["input_shape"]
    masks = _units(model, HIDDEN[key])
    if key in PADDED:  # kernel-only masks leave nonzero constants before a padded conv: refused
        with pytest.raises(ValueError, match="constant.*padded"):
            surgery.hard_prune(masks, input_shape=shape)(model)
        masks = surgery.complete_masks(model, masks, input_shape=shape)
    small, aux = surgery.hard_prune(masks, input_shape=shape)(model)
    assert isinstance(aux, base.UnitsAux) and type(small) is type(model)
    _assert_equivalent(model, masks, small, shape)
    # every hidden layer lost exactly half its units (the structured masks' count)
    params = _params(model)
    assert len(aux.kept) == len([n for n, _ in jtree.named_leaves(params) if re.fullmatch(HIDDEN[key], n)])
    for layer, kept in aux.kept.items():
        width = jtree.get_by_name(params, f"{layer}/kernel").shape[-1]
        assert len(kept) == width - topk.pruned_count(0.5, width), layer
    assert aux.params_before == jtree.tree_size(params)
    assert aux.params_after == jtree.tree_size(_params(small))


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_keep_lists_remove_units_entirely(key):
    model = _model(key)
    shape = CONFIGS[key]["input_shape"]
    params = _params(model)
    hidden = [n for n, _ in jtree.named_leaves(params) if re.fullmatch(HIDDEN[key], n)]
    keep = {}
    for i, name in enumerate(hidden):
        width = jtree.get_by_name(params, name).shape[-1]
        keep[name.removesuffix("/kernel") if i % 2 else name] = list(range(width))[i % 2 :: 3]
    masks = surgery.unit_masks(model, keep, input_shape=shape)
    small, aux = surgery.hard_prune(masks, input_shape=shape)(model)
    _assert_equivalent(model, masks, small, shape)
    widths = {k.removesuffix("/kernel"): len(v) for k, v in keep.items()}
    assert {k: len(v) for k, v in aux.kept.items()} == widths


def test_folding_is_exercised_for_mlp_and_lenet5():
    """Kernel-only masks keep the removed units' biases: the constants must be folded, not dropped."""
    for key in ("mlp", "lenet5"):
        model = _model(key)
        shape = CONFIGS[key]["input_shape"]
        masks = _units(model, HIDDEN[key])
        small, _ = surgery.hard_prune(masks, input_shape=shape)(model)
        _assert_equivalent(model, masks, small, shape)
        # without folding the result would differ: removing the units entirely gives other outputs
        full_removal = surgery.complete_masks(model, masks, input_shape=shape)
        a = _forward(_masked(model, masks), _x(shape))
        b = _forward(_masked(model, full_removal), _x(shape))
        assert np.max(np.abs(a - b)) > 1e-2


def test_resnet_bn_in_eval_mode_and_residual_stream():
    model = _model("resnet")
    shape = CONFIGS["resnet"]["input_shape"]
    masks = surgery.complete_masks(model, _units(model, HIDDEN["resnet"], 0.25), input_shape=shape)
    small, aux = surgery.hard_prune(masks, input_shape=shape)(model)
    _assert_equivalent(model, masks, small, shape)
    assert small.blocks[0].bn1.mean.get_value().shape == (3,) and small.blocks[0].bn1.num_features == 3
    assert small.blocks[1].conv2.in_features == 6
    np.testing.assert_array_equal(
        small.blocks[1].bn1.var.get_value(), np.asarray(model.blocks[1].bn1.var.get_value())[aux.kept["blocks/1/conv1"]]
    )
    assert small.stem.kernel.get_value().shape == model.stem.kernel.get_value().shape
    # the first stage's stream (stem and blocks/0/conv2, added together) is one group
    groups = {g.layer: g for g in coupling(model, input_shape=shape)}
    stream = next(g for g in groups.values() if "stem/kernel" in g.producers)
    assert set(stream.producers) == {"stem/kernel", "blocks/0/conv2/kernel"} and stream.reason is None
    assert {m[0] for m in stream.members} >= {"stem_bn/mean", "blocks/0/bn2/scale", "blocks/1/proj/kernel"}
    # removing a unit from one writer of the stream only removes nothing
    one_writer = jtree.map_with_names(
        lambda n, m: m.at[..., 1].set(False) if n == "stem/kernel" else m,
        jax.tree.map(lambda w: jnp.ones(w.shape, bool), _params(model)),
    )
    _, aux = surgery.hard_prune(one_writer, input_shape=shape)(model)
    assert aux.kept == {} and aux.params_after == aux.params_before
    # removing it from both removes the channel everywhere on the stream
    both = jtree.map_with_names(
        lambda n, m: m.at[..., 1].set(False) if n in ("stem/kernel", "blocks/0/conv2/kernel") else m, one_writer
    )
    both = surgery.complete_masks(model, both, input_shape=shape)
    small, aux = surgery.hard_prune(both, input_shape=shape)(model)
    _assert_equivalent(model, both, small, shape)
    assert list(aux.kept["stem"]) == [0, 2, 3] and list(aux.kept["blocks/0/conv2"]) == [0, 2, 3]
    assert small.blocks[1].proj.kernel.get_value().shape == (1, 1, 3, 8)
    assert small.blocks[1].conv1.kernel.get_value().shape == (3, 3, 3, 8)


def test_saved_and_loaded_pruned_model_gives_the_same_outputs(tmp_path):
    config = dict(CONFIGS["lenet5"], seed=3)
    model = _model("lenet5")
    small, _ = surgery.hard_prune(_units(model, HIDDEN["lenet5"]), input_shape=config["input_shape"])(model)
    _, params, extra = nnx.split(small, nnx.Param, ...)
    checkpoint.save_model(
        tmp_path / "small",
        config,
        nnx.to_pure_dict(params),
        nnx.to_pure_dict(extra),
        meta={"shapes": surgery.leaf_shapes(small)},
    )
    loaded, cfg, _ = checkpoint.load_model(
        tmp_path / "small", build=lambda meta: surgery.resize(models.create(**meta["model"]), meta["shapes"])
    )
    assert cfg == config and loaded.conv1.out_features == 3 and loaded.fc1.out_features == 10
    x = _x(config["input_shape"])
    np.testing.assert_array_equal(_forward(loaded, x), _forward(small, x))


def test_nnx_state_masks_and_chain():
    model = _model("lenet300")
    state = nnx.state(model, nnx.Param)
    masks = jtree.map_with_names(
        lambda n, w: (
            jnp.broadcast_to(jnp.arange(w.shape[-1]) % 2 == 0, w.shape)
            if n in ("fc1/kernel", "fc2/kernel")
            else jnp.ones(w.shape, bool)
        ),
        state,
    )
    assert isinstance(masks, nnx.State)
    small, aux = base.chain(surgery.hard_prune(masks, input_shape=(8, 8, 1)))(model)
    assert aux[0].params_after == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    _assert_equivalent(model, masks, small, (8, 8, 1))


def test_masked_selects_the_groups():
    model = _model("mlp")
    masks = _units(model, HIDDEN["mlp"])
    small, aux = base.masked(surgery.hard_prune(masks, input_shape=(8, 8, 1)), "fc2/kernel")(model)
    assert set(aux.kept) == {"fc2"} and small.fc1.kernel.get_value().shape == (64, 24)
    _assert_equivalent(model, masks, small, (8, 8, 1))


def test_zero_columns_without_masks():
    model = _model("mlp")
    masks = surgery.unit_masks(model, {"fc1": [0, 5, 7], "fc3": list(range(6))}, input_shape=(8, 8, 1))
    zeroed = _masked(model, masks)
    small, aux = surgery.hard_prune(input_shape=(8, 8, 1))(zeroed)
    assert {k: len(v) for k, v in aux.kept.items()} == {"fc1": 3, "fc3": 6}
    assert aux.params_after == 64 * 3 + 3 + 3 * 16 + 16 + 16 * 6 + 6 + 6 * 10 + 10
    _assert_equivalent(zeroed, jax.tree.map(lambda w: jnp.ones(w.shape, bool), _params(model)), small, (8, 8, 1))


def test_hard_prune_errors():
    model = _model("lenet300")
    shape = (8, 8, 1)
    before = np.asarray(model.fc1.kernel.get_value()).copy()
    masks = _units(model, HIDDEN["lenet300"])
    with pytest.raises(ValueError, match="structure of the model's nnx.Param"):
        surgery.hard_prune({"fc1": masks["fc1"]}, input_shape=shape)(model)
    with pytest.raises(ValueError, match="empty"):
        surgery.unit_masks(model, {"fc1": []}, input_shape=shape)
    with pytest.raises(ValueError, match="distinct indices"):
        surgery.unit_masks(model, {"fc1": [0, 300]}, input_shape=shape)
    with pytest.raises(ValueError, match="not a layer with a kernel.*fc1"):
        surgery.unit_masks(model, {"fc9": [0]}, input_shape=shape)
    all_gone = jtree.map_with_names(lambda n, m: jnp.zeros_like(m) if n == "fc2/kernel" else m, masks)
    with pytest.raises(ValueError, match="every unit of fc2"):
        surgery.hard_prune(all_gone, input_shape=shape)(model)
    small, aux = surgery.hard_prune(all_gone, input_shape=shape, allow_empty=True)(model)
    assert small.fc3.kernel.get_value().shape == (0, 10) and len(aux.kept["fc2"]) == 0
    head = jtree.map_with_names(lambda n, m: m.at[..., 0].set(False) if n == "fc3/kernel" else m, masks)
    with pytest.raises(ValueError, match="cannot remove units of fc3.*model's output"):
        surgery.hard_prune(head, input_shape=shape)(model)
    with pytest.raises(ValueError, match="tracing the model"):
        surgery.hard_prune(masks, input_shape=(7, 7))(model)
    with pytest.raises(TypeError, match="input_shape=64 must be one example's shape"):
        surgery.hard_prune(masks, input_shape=64)
    with pytest.raises(ValueError, match="input_shape=0"):
        surgery.hard_prune(masks, input_shape=(0, 8))
    with pytest.raises(TypeError, match="model transform"):
        surgery.hard_prune(masks, input_shape=shape)(_params(model))
    np.testing.assert_array_equal(np.asarray(model.fc1.kernel.get_value()), before)  # untouched input


def test_hard_prune_report_counts():
    model = _model("lenet300")
    masks = surgery.unit_masks(model, {"fc1": list(range(100)), "fc2": list(range(50))}, input_shape=(8, 8, 1))
    small, _ = surgery.hard_prune(masks, input_shape=(8, 8, 1))(model)
    rep = surgery.hard_prune_report(model, small, (8, 8, 1), batch_size=32, repeats=3)
    assert rep["before"]["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert rep["after"]["params"] == 64 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10
    assert rep["before"]["flops"] == 2 * (64 * 300 + 300 * 100 + 100 * 10)
    assert rep["flops_ratio"] == pytest.approx((64 * 300 + 300 * 100 + 100 * 10) / (64 * 100 + 100 * 50 + 50 * 10))
    assert rep["before"]["latency_s"] > 0 and rep["after"]["latency_s"] > 0
    conv = surgery.forward_flops(_model("lenet5"), (16, 16, 1))
    assert conv["conv1/kernel"] == 2 * 5 * 5 * 1 * 6 * 12 * 12 and conv["fc1/kernel"] == 2 * 8 * 20


# ---------------------------------------------------------------------------------------
# Models the library has never seen
# ---------------------------------------------------------------------------------------


class ResLNNet(nnx.Module):
    """A conv stem, a residual block whose inner channels are prunable, a LayerNorm over the stream."""

    def __init__(self, *, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
        self.conv1 = nnx.Conv(8, 12, (3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(12, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(12, 8, (1, 1), rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8 * 4 * 4, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        y = self.conv2(nnx.gelu(self.bn(self.conv1(h))))
        h = self.norm(h + y)
        h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
        return self.head(h.reshape(h.shape[0], -1))


class GatedTokens(nnx.Module):
    """Per-token Dense layers on (N, T, D) inputs, a gated unit (two producers, one group) and a mean over tokens."""

    def __init__(self, *, rngs):
        self.up = nnx.Linear(6, 16, rngs=rngs)
        self.gate = nnx.Linear(6, 16, rngs=rngs)
        self.down = nnx.Linear(16, 10, use_bias=False, rngs=rngs)
        self.mix = nnx.Linear(10, 10, rngs=rngs)
        self.out = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
        h = self.up(x) * jax.nn.sigmoid(self.gate(x))
        h = jnp.swapaxes(self.down(h), 1, 2)  # (N, D, T): the units move to axis 1
        h = jnp.swapaxes(h, 1, 2)
        h = jnp.tanh(self.mix(h))
        return self.out(h.mean(axis=1))


def _user(cls, seed=0):
    return _fill(nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0))), seed)


def test_user_conv_net_with_residual_and_layernorm():
    model = _user(ResLNNet)
    shape = (8, 8, 3)
    groups = {g.layer: g for g in coupling(model, input_shape=shape)}
    assert groups["conv1"].reason is None and groups["conv1"].size == 12
    assert {m[0] for m in groups["conv1"].members} == {
        "conv1/kernel",
        "conv1/bias",
        "bn/scale",
        "bn/bias",
        "bn/mean",
        "bn/var",
        "conv2/kernel",
    }
    stream = groups["conv2"] if "conv2" in groups else groups["stem"]
    assert set(stream.producers) == {"stem/kernel", "conv2/kernel"} and "reduce" in stream.reason
    keep = [0, 2, 3, 7, 11]
    masks = surgery.unit_masks(model, {"conv1": keep}, input_shape=shape)
    small, aux = surgery.hard_prune(masks, input_shape=shape)(model)
    _assert_equivalent(model, masks, small, shape)
    assert list(aux.kept["conv1"]) == keep and small.bn.num_features == 5
    assert aux.params_before - aux.params_after == 7 * (3 * 3 * 8 + 1 + 2 + 8)
    # the stream feeds a LayerNorm over its channels: removing one of them is refused, naming the layer
    stream_cut = jtree.map_with_names(
        lambda n, m: m.at[..., 0].set(False) if n in ("stem/kernel", "conv2/kernel") else m, masks
    )
    with pytest.raises(ValueError, match=r"cannot remove units of (stem|conv2).*reduced over by reduce_sum"):
        surgery.hard_prune(stream_cut, input_shape=shape)(model)


def test_user_gated_token_model():
    model = _user(GatedTokens)
    shape = (7, 6)
    groups = {g.layer: g for g in coupling(model, input_shape=shape)}
    gated = next(g for g in groups.values() if "up/kernel" in g.producers)
    assert set(gated.producers) == {"up/kernel", "gate/kernel"} and gated.reason is None
    assert groups["down"].reason is None and groups["out"].reason is not None
    params = _params(model)
    ones = jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)
    cols = lambda w, idx: w.at[..., jnp.asarray(idx)].set(False)
    masks = jtree.map_with_names(
        lambda n, m: (
            cols(m, [1, 4, 9]) if n in ("up/kernel", "gate/kernel") else cols(m, [0, 3]) if n == "down/kernel" else m
        ),
        ones,
    )
    masks = surgery.complete_masks(model, masks, input_shape=shape)
    small, aux = surgery.hard_prune(masks, input_shape=shape)(model)
    _assert_equivalent(model, masks, small, shape)
    assert small.up.kernel.get_value().shape == (6, 13) and small.mix.kernel.get_value().shape == (8, 10)
    assert aux.params_after == 2 * (6 * 13 + 13) + 13 * 8 + 8 * 10 + 10 + 10 * 3 + 3
    # only one of the two producers pruned: the unit still computes up * sigmoid(gate), it stays
    half = jtree.map_with_names(lambda n, m: cols(m, [2]) if n == "up/kernel" else m, ones)
    _, aux = surgery.hard_prune(half, input_shape=shape)(model)
    assert aux.kept == {}


class TinyTransformer(nnx.Module):
    """Embedding, attention, LayerNorm, an MLP with dropout, a depthwise conv and a GroupNorm."""

    def __init__(self, *, rngs):
        self.embed = nnx.Embed(20, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = nnx.Linear(32, 16, rngs=rngs)
        self.dw = nnx.Conv(16, 16, (3,), feature_group_count=16, padding="SAME", rngs=rngs)
        self.gn = nnx.GroupNorm(16, num_groups=4, rngs=rngs)
        self.head = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, tokens):
        x = self.ln(self.embed(tokens) + self.attn(self.embed(tokens)))
        x = x + self.fc2(self.drop(nnx.gelu(self.fc1(x))))
        return self.head(self.gn(self.dw(x)).mean(axis=1))


def test_user_attention_model():
    model = TinyTransformer(rngs=nnx.Rngs(0))
    groups = {g.layer: g for g in coupling(model, input_shape=(7,), dtype=jnp.int32)}
    # query and key are contracted together: one group of head_dim units
    assert set(groups["attn/key"].producers) == {"attn/key/kernel", "attn/query/kernel"}
    assert groups["attn/key"].size == 8 and groups["attn/key"].reason is None
    assert groups["fc1"].reason is None and groups["attn/value"].reason is None
    stream = groups["attn/out"]  # the residual stream: attention output, fc2 and the depthwise conv
    assert set(stream.producers) == {"attn/out/kernel", "fc2/kernel", "dw/kernel"} and "gather" in stream.reason
    masks = surgery.unit_masks(model, {"fc1": list(range(0, 32, 2))}, input_shape=(7,), dtype=jnp.int32)
    small, aux = surgery.hard_prune(masks, input_shape=(7,), dtype=jnp.int32)(model)
    assert {k: len(v) for k, v in aux.kept.items()} == {"fc1": 16}
    assert small.fc1.out_features == 16 and small.fc2.in_features == 16
    tokens = jax.random.randint(jax.random.key(0), (3, 7), 0, 20)
    want = _forward(_masked(model, masks), tokens)
    np.testing.assert_allclose(_forward(small, tokens), want, atol=1e-5, rtol=1e-5)
    # the attention code reads the head size (a size check, a 1 / sqrt(head size) scale), which no op shows:
    # the result is checked against the masked model and refused
    uneven = surgery.unit_masks(model, {"attn/value": [0, 3, 5]}, input_shape=(7,), dtype=jnp.int32)
    with pytest.raises(ValueError, match="pruned model does not run.*equal key and value head sizes"):
        surgery.hard_prune(uneven, input_shape=(7,), dtype=jnp.int32)(model)
    keep = {"attn/value": [0, 3, 5, 6, 7], "attn/key": [1, 2, 3, 4, 6]}
    even = surgery.unit_masks(model, keep, input_shape=(7,), dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"computes something else.*1 / sqrt\(head size\)"):
        surgery.hard_prune(even, input_shape=(7,), dtype=jnp.int32)(model)


class Branches(nnx.Module):
    """Two conv branches concatenated along the channels (as in Inception or DenseNet)."""

    def __init__(self, *, rngs):
        self.a = nnx.Conv(3, 4, (1, 1), rngs=rngs)
        self.b = nnx.Conv(3, 6, (3, 3), padding="SAME", rngs=rngs)
        self.c = nnx.Conv(10, 5, (3, 3), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(jnp.concatenate([self.a(x), self.b(x)], axis=-1))
        return self.head(nnx.relu(self.c(h)).mean(axis=(1, 2)))


def test_user_model_with_concatenation():
    model = _user(Branches)
    shape = (6, 6, 3)
    groups = {g.layer: g for g in coupling(model, input_shape=shape)}
    assert groups["a"].reason is None and groups["b"].reason is None
    rows = {leaf: list(unit_of) for leaf, axis, unit_of in groups["b"].members if leaf == "c/kernel" and axis == 2}
    assert rows == {"c/kernel": [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]}
    masks = surgery.unit_masks(model, {"a": [1, 3], "b": [0, 2, 5]}, input_shape=shape)
    small, aux = surgery.hard_prune(masks, input_shape=shape)(model)
    assert small.c.kernel.get_value().shape == (3, 3, 5, 5) and small.c.in_features == 5
    assert aux.params_after == aux.params_before - 2 * (3 + 1) - 3 * (27 + 1) - 5 * 9 * 5
    _assert_equivalent(model, masks, small, shape)
    # without the bias masked, a's removed units are relu(bias): a VALID conv folds them
    kernel_only = jtree.map_with_names(
        lambda n, m: m.at[..., 0].set(False) if n == "a/kernel" else jnp.ones(m.shape, bool), masks
    )
    small, _ = surgery.hard_prune(kernel_only, input_shape=shape)(model)
    _assert_equivalent(model, kernel_only, small, shape)


class CumsumNet(nnx.Module):
    def __init__(self, *, rngs):
        self.fc1 = nnx.Linear(4, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.cumsum(self.fc1(x), axis=-1))


class CallbackNet(CumsumNet):
    """An activation the tracer cannot see into (a host callback), declared elementwise by the module."""

    def __call__(self, x):
        h = self.fc1(x)
        h = jax.pure_callback(lambda a: np.tanh(a).astype(a.dtype), jax.ShapeDtypeStruct(h.shape, h.dtype), h)
        return self.fc2(h)

    def coupled_units(self):
        return [{"fc1/kernel": -1, "fc1/bias": 0, "fc2/kernel": 0}]


def test_undecidable_op_gives_a_clear_error_and_declaration_is_the_fallback():
    model = _user(CumsumNet)
    groups = {g.layer: g for g in coupling(model, input_shape=(4,))}
    assert "cumsum" in groups["fc1"].reason
    masks = surgery.complete_masks(
        model,
        jtree.map_with_names(lambda n, w: jnp.ones(w.shape, bool).at[..., 1].set(n != "fc1/kernel"), _params(model)),
        input_shape=(4,),
    )
    with pytest.raises(
        ValueError,
        match=r"cannot remove units of fc1 \(fc1/kernel\): they are accumulated over by cumsum.*coupled_units",
    ):
        surgery.hard_prune(masks, input_shape=(4,))(model)

    model = _user(CallbackNet)
    assert {g.layer: g.reason for g in coupling(model, input_shape=(4,))}["fc1"] is None
    masks = jtree.map_with_names(
        lambda n, w: jnp.ones(w.shape, bool).at[..., 1].set(False) if n.startswith("fc1") else jnp.ones(w.shape, bool),
        _params(model),
    )
    small, aux = surgery.hard_prune(masks, input_shape=(4,))(model)
    assert small.fc2.kernel.get_value().shape == (5, 3) and list(aux.kept["fc1"]) == [0, 2, 3, 4, 5]
    _assert_equivalent(model, masks, small, (4,))


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


def test_chain_units_pruning_then_hard_prune():
    """Pruning whole units zeroes kernel columns; hard_prune() after it in a chain removes them."""
    from jcompress.core.patterns import Units
    from jcompress.pruning import masks as masks_lib

    model = _model("mlp")
    t = base.chain(
        base.masked(masks_lib.magnitude(sparsity=0.5, pattern=Units()), HIDDEN["mlp"]),
        surgery.hard_prune(input_shape=(8, 8, 1)),
    )
    small, aux = t(model)
    _assert_equivalent(model, aux[0].masks, small, (8, 8, 1))
    assert {k: len(v) for k, v in aux[1].kept.items()} == {"fc1": 12, "fc2": 8, "fc3": 6}
    assert aux[1].params_after == 64 * 12 + 12 + 12 * 8 + 8 + 8 * 6 + 6 + 6 * 10 + 10
