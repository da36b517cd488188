"""AWQ and SmoothQuant: scale folding keeps the function, the searches beat their baselines."""

import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcompress import blockwise, lm, parallel, tree
from jcompress.core import grid
from jcompress.models import hf_lm
from jcompress.models.gpt2 import GPT2, GPT2Config
from jcompress.models.llama import Llama, LlamaConfig
from jcompress.nnx import hooks
from jcompress.oneshot.awq import (
    ChannelStats,
    apply_scales,
    awq,
    check_groups,
    clip_ratios,
    clip_search,
    effective_kernel,
    group_output_errors,
    quantize_kernel,
    source_scale,
)
from jcompress.oneshot.calibration import LayerStats
from jcompress.oneshot.smoothquant import act_quantizer, fake_quant_input, smoothing_scales, smoothquant

FIXTURES = Path(__file__).parent / "fixtures" / "lm"


def _block_out(block, params, h, positions):
    gd, _, rest = nnx.split(block, nnx.Param, ...)
    return jax.jit(lambda p, h: nnx.merge(gd, p, rest)(h, positions)[0])(params, h)


def _random_model(build):
    """A model with random parameters, built without running its initialisers (fast)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(0)  # numpy: no XLA compile per shape
    return nnx.merge(
        graphdef, jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape) + 0.1, jnp.float32), state)
    )


@functools.cache
def _blocks():
    llama = _random_model(lambda: Llama(LlamaConfig(50, 32, 1, 4, 4, 48), rngs=nnx.Rngs(0)))  # no GQA: v_proj -> o_proj
    gpt2 = _random_model(lambda: GPT2(GPT2Config(50, 32, 1, 4), rngs=nnx.Rngs(0)))
    return {"llama": llama.layers[0], "gpt2": gpt2.layers[0]}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_folded_scales_leave_the_block_unchanged(name):
    block = _blocks()[name]
    groups = block.scale_groups()
    want = {"llama": ["attn_norm", "attn/v_proj", "mlp_norm", "mlp/up_proj"], "gpt2": ["ln_1", "attn/c_attn", "ln_2"]}[
        name
    ]
    assert [g.source for g in groups] == want
    params = nnx.state(block, nnx.Param)
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    positions = jnp.arange(5)[None]
    scales = {}
    for g in groups:
        width = dict(tree.named_leaves(params))[f"{g.targets[0]}/kernel"].shape[0]
        scales[g.source] = jnp.asarray(np.exp(rng.normal(size=width)), jnp.float32)  # 0.1x .. 10x
    folded = apply_scales(params, groups, scales)
    changed = [n for n, x in tree.named_leaves(folded) if not np.allclose(x, dict(tree.named_leaves(params))[n])]
    assert len(changed) >= 2 * len(groups)
    np.testing.assert_allclose(
        _block_out(block, folded, h, positions), _block_out(block, params, h, positions), atol=2e-5, rtol=1e-5
    )


def _outlier_layer(seed=0, d=64, out=48, n=512):
    """A norm feeding one Linear, inputs with 4 outlier channels 30x the rest."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[:, :4] *= 30.0
    x = jnp.asarray(x, jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, out)) / np.sqrt(d), jnp.float32)
    params = {"norm": {"scale": jnp.ones((d,))}, "fc": {"kernel": kernel}}
    stats = {"fc/kernel": LayerStats(x.T @ x, jnp.float32(n))}
    channels = {"fc/kernel": ChannelStats(jnp.abs(x).mean(0), jnp.abs(x).max(0))}
    return x, params, stats, channels, [("norm", ("fc",))]


def _apply(params, x, hook=None):
    y = (x * params["norm"]["scale"]) @ params["fc"]["kernel"] if hook is None else None
    if hook is not None:
        y = hook("fc", x * params["norm"]["scale"], lambda v: v @ params["fc"]["kernel"])
    return y


def test_awq_beats_rtn_and_keeps_the_function_before_quantization():
    x, params, stats, channels, groups = _outlier_layer()
    y = _apply(params, x)
    new, aux = awq(stats, channels, groups=groups, bits=3)(params)
    rtn, rtn_aux = awq(stats, channels, groups=groups, bits=3, grid=1)(params)  # alpha = 0: s = 1
    assert rtn_aux.alphas["norm"] == 0 and np.allclose(rtn["norm"]["scale"], 1)
    err = lambda p: float(jnp.sum((_apply(p, x) - y) ** 2) / jnp.sum(y**2))
    assert aux.alphas["norm"] > 0 and err(new) < 0.7 * err(rtn)
    np.testing.assert_allclose(aux.errors["fc/kernel"], err(new), rtol=1e-3)
    # the chosen scales folded into the float layer: the same function
    s = aux.scales["fc/kernel"]
    folded = apply_scales(params, groups, {"norm": s})
    np.testing.assert_allclose(_apply(folded, x), y, rtol=1e-4, atol=1e-4)
    assert np.unique(np.asarray(new["fc"]["kernel"][:, 0])).size <= 8  # 3-bit codes


@pytest.mark.parametrize("act_scale", ["token", "tensor"])
def test_smoothquant_w8a8_closer_to_float_than_without_smoothing(act_scale):
    x, params, stats, channels, groups = _outlier_layer()
    y = _apply(params, x)
    err = {}
    for label, gs in (("smooth", groups), ("plain", [])):
        new, aux = smoothquant(stats, channels, groups=gs, alpha=0.5, act_scale=act_scale)(params)
        assert aux.act["fc"].per_token == (act_scale == "token")
        y8 = _apply(new, x, hook=act_quantizer(aux.act))
        err[label] = float(jnp.sum((y8 - y) ** 2) / jnp.sum(y**2))
    assert err["smooth"] < 0.5 * err["plain"], err
    # smoothing alone keeps the float function
    s = smoothing_scales(channels["fc/kernel"].abs_max, [params["fc"]["kernel"]], alpha=0.5)
    np.testing.assert_allclose(_apply(apply_scales(params, groups, {"norm": s}), x), y, rtol=1e-4, atol=1e-4)


def test_fake_quant_input_grids():
    x = jnp.array([[1.0, -0.5, 0.25], [100.0, 1.0, 0.0]])
    q = fake_quant_input(x, bits=8, per_token=True)
    np.testing.assert_allclose(q[1, 0], 100.0) and np.testing.assert_allclose(q[0], [1.0, -0.5, 0.25], atol=1 / 254)
    t = fake_quant_input(x, bits=8, per_token=False, absmax=10.0)
    assert float(t[1, 0]) == 10.0  # clipped at the calibrated max


def test_bad_arguments_are_named():
    _x, params, stats, channels, groups = _outlier_layer(d=8, out=4, n=16)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant(stats, channels, groups=groups, alpha=1.5)
    with pytest.raises(ValueError, match="act_scale"):
        smoothquant(stats, channels, groups=groups, act_scale="row")
    with pytest.raises(ValueError, match="no ChannelStats for fc/kernel"):
        awq(stats, {}, groups=groups)
    with pytest.raises(ValueError, match="group_size"):
        awq(stats, channels, groups=groups, group_size=3)
    with pytest.raises(ValueError, match="grid"):
        awq(stats, channels, groups=groups, grid=0)
    with pytest.raises(ValueError, match="source 'ln'"):
        awq(stats, channels, groups=[("ln", ("fc",))])(params)
    with pytest.raises(ValueError, match="two groups"):
        check_groups([("norm", ("fc",)), ("norm", ("fc",))], params)
    with pytest.raises(TypeError, match="groups=None must be a list"):
        smoothquant(stats, channels, groups=None)
    with pytest.raises(TypeError, match="symmetric='yes' must be True or False"):
        awq(stats, channels, groups=groups, symmetric="yes")
    spoiled = {**params, "fc": {**params["fc"], "kernel": params["fc"]["kernel"].at[0, 0].set(jnp.inf)}}
    for t in (awq(stats, channels, groups=groups), smoothquant(stats, channels, groups=groups)):
        with pytest.raises(ValueError, match="params/fc/kernel contains NaN or Inf"):
            t(spoiled)
    nan_channels = {k: ChannelStats(v.abs_mean, v.abs_max.at[0].set(jnp.nan)) for k, v in channels.items()}
    with pytest.raises(ValueError, match="channels/fc/kernel/abs_max contains NaN"):
        smoothquant(stats, nan_channels, groups=groups)


def test_smoothquant_through_the_driver():
    model, tok, _ = hf_lm.load(FIXTURES / "gpt2")
    ids = lm.sample_windows(lm.corpus_ids(tok, "calibration", limit=60), num=8, seq_len=16, seed=0)
    model, report = blockwise.compress(
        model, ids, blockwise.method("smoothquant", alpha=0.5), mesh=parallel.data_mesh(1)
    )
    assert len(report.act_quant) == 8 and all(a.bits == 8 and a.per_token for a in report.act_quant.values())
    assert all(0 < b.output_error < 0.01 for b in report.blocks)
    assert max(report.layer_errors.values()) < 1e-3  # 8-bit weights per output unit
    w8a8 = blockwise.with_act_quant(model, report.act_quant)
    assert set(report.act_quant) <= set(hooks.layers(w8a8)) and blockwise.with_act_quant(model, {}) is model


# ----------------------------------------------------------------------------- AWQ weight clipping


def _group_errors_np(kernel, new_kernel, h, group_size):
    """``d_g^T H_gg d_g`` per group of inputs and output unit, in float64 numpy."""
    d = np.asarray(new_kernel, np.float64) - np.asarray(kernel, np.float64)
    h = np.asarray(h, np.float64)
    g = group_size or d.shape[0]
    return np.stack(
        [np.einsum("ic,ij,jc->c", d[a : a + g], h[a : a + g, a : a + g], d[a : a + g]) for a in range(0, d.shape[0], g)]
    )


@pytest.mark.parametrize("seed", range(3))
def test_clip_search_never_raises_the_error_it_minimises(seed):
    _x, params, stats, channels, groups = _outlier_layer(seed=seed, d=32, out=12, n=256)
    kernel, h = params["fc"]["kernel"], stats["fc/kernel"].h
    q_of = lambda k: grid.dequantize(quantize_kernel(k, bits=3, group_size=8, symmetric=True))
    clipped, ratio, err = clip_search(kernel, h, bits=3, group_size=8)
    plain = _group_errors_np(kernel, q_of(kernel), h, 8)
    ours = _group_errors_np(kernel, q_of(clipped), h, 8)
    np.testing.assert_allclose(err, ours, rtol=1e-3, atol=1e-6)
    assert np.all(ours <= plain * (1 + 1e-5) + 1e-9) and ours.sum() < plain.sum()
    on_grid = np.float32([1 - i / 20 for i in range(10)])
    assert np.isin(np.asarray(ratio), on_grid).all()
    np.testing.assert_array_equal(
        np.asarray(group_output_errors(kernel, q_of(clipped), h, group_size=8)).shape, (4, 12)
    )
    # through awq, one grid per output unit: the whole output error can only fall
    _, aux = awq(stats, channels, groups=groups, bits=3, clip=True)(params)
    _, aux0 = awq(stats, channels, groups=groups, bits=3)(params)
    assert aux.alphas == aux0.alphas and aux0.clips == {} and aux.clips["fc/kernel"].shape == (1, 12)
    assert float(aux.errors["fc/kernel"]) <= float(aux0.errors["fc/kernel"]) * (1 + 1e-5)
    print(
        f"seed {seed}: group errors {plain.sum():.4g} -> {ours.sum():.4g}; awq error {float(aux0.errors['fc/kernel']):.4g} -> {float(aux.errors['fc/kernel']):.4g}"
    )


def test_clip_search_picks_the_grid_ratio_that_fits_the_weights():
    # two groups of 4 inputs; inputs 0 and 7 are quiet (H = 0.01), their weights are outliers
    kernel = jnp.array(
        [[12, 12, 1], [3, 2.4, 1], [3, -2.4, 1], [3, 2.4, -1], [1, 3, 2.4], [-1, 3, 2.4], [1, 3, -2.4], [1, 12, -12]],
        jnp.float32,
    )
    h = jnp.diag(jnp.array([0.01, 1, 1, 1, 1, 1, 1, 0.01]))
    # 3 bits symmetric: codes -3..3 of max|w| / 3. Clipping 12 to 9 (ratio 0.75) puts 3 on
    # the grid, to 7.2 (0.6) puts 2.4 on it; groups already on their grid keep ratio 1
    want = np.float32([[0.75, 0.6, 1.0], [1.0, 0.75, 0.6]])
    clipped, ratio, _ = clip_search(kernel, h, bits=3, group_size=4)
    np.testing.assert_array_equal(ratio, want)
    assert float(jnp.max(jnp.abs(clipped))) == pytest.approx(9.0)
    params = {"fc": {"kernel": kernel}}
    stats = {"fc/kernel": LayerStats(h, jnp.float32(100))}
    channels = {"fc/kernel": ChannelStats(jnp.ones(8), jnp.ones(8))}
    new, aux = awq(stats, channels, groups=[], bits=3, group_size=4, clip={"fc": True})(params)
    np.testing.assert_array_equal(aux.clips["fc/kernel"], want)
    q = grid.dequantize(quantize_kernel(clipped, bits=3, group_size=4, symmetric=True))
    np.testing.assert_allclose(new["fc"]["kernel"], q)
    np.testing.assert_allclose(new["fc"]["kernel"][1:4, 0], [3, 3, 3], rtol=1e-6)  # plain rounding gives 4
    _, aux_rtn = awq(stats, channels, groups=[], bits=3, group_size=4)(params)
    assert float(aux.errors["fc/kernel"]) < 0.05 * float(aux_rtn.errors["fc/kernel"])
    # a coarser grid: 1, 0.9, 0.8, 0.7
    assert clip_ratios(10, 0.4) == pytest.approx((1.0, 0.9, 0.8, 0.7))
    _, r10, _ = clip_search(kernel, h, bits=3, group_size=4, clip_grid=10, max_shrink=0.4)
    assert np.isin(np.asarray(r10), np.float32([1.0, 0.9, 0.8, 0.7])).all() and float(r10[0, 0]) == np.float32(0.8)


def test_clip_bad_values_are_named():
    _x, params, stats, channels, groups = _outlier_layer(d=8, out=4, n=16)
    with pytest.raises(ValueError, match=r"clip_grid=0 must be in \[1"):
        awq(stats, channels, groups=groups, clip=True, clip_grid=0)
    with pytest.raises(ValueError, match="max_shrink=1.0"):
        awq(stats, channels, groups=groups, clip=True, max_shrink=1.0)
    with pytest.raises(ValueError, match="searches no ratio"):
        clip_ratios(20, 0.04)
    with pytest.raises(TypeError, match="clip='yes' must be True or False"):
        awq(stats, channels, groups=groups, clip="yes")
    with pytest.raises(TypeError, match="its value for fc/kernel"):
        awq(stats, channels, groups=groups, clip={"fc": 1})
    with pytest.raises(ValueError, match="clip"):
        awq(stats, channels, groups=groups, clip={"q_proj": False})
    with pytest.raises(ValueError, match="group_size"):
        clip_search(params["fc"]["kernel"], stats["fc/kernel"].h, bits=4, group_size=3)


# ----------------------------------------------------------------------------- v_proj -> o_proj under GQA


def _gqa_block():
    model = _random_model(
        lambda: Llama(LlamaConfig(50, 32, 1, 4, 2, 48), rngs=nnx.Rngs(0))
    )  # 4 query heads, 2 kv heads
    block = model.layers[0]
    return block, block.scale_groups() + (("attn/v_proj", ("attn/o_proj",), 0, (4, 2)),)


def _attention_statistics(block, params, h, positions):
    """``(stats, channels)`` of the attention projections' inputs when ``block`` runs on ``h``."""
    seen = {}
    names = [n.removesuffix("/kernel") for n, x in tree.named_leaves(params) if n.endswith("/kernel")]
    with hooks.intercept(block, lambda name, x, op: (seen.setdefault(name, x), op(x))[1], names=names):
        block(h, positions)
    xs = {
        f"{n}/kernel": np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        for n, x in seen.items()
        if n.startswith("attn")
    }
    stats = {n: LayerStats(jnp.asarray(x.T @ x, jnp.float32), jnp.float32(len(x))) for n, x in xs.items()}
    channels = {
        n: ChannelStats(jnp.asarray(np.abs(x).mean(0), jnp.float32), jnp.asarray(np.abs(x).max(0), jnp.float32))
        for n, x in xs.items()
    }
    return stats, channels


def test_gqa_value_scales_fold_only_when_shared_by_the_heads_of_a_kv_head():
    block, groups = _gqa_block()
    assert "attn/v_proj" not in [g[0] for g in block.scale_groups()]
    params = nnx.state(block, nnx.Param)
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    positions = jnp.arange(5)[None]
    tied = jnp.asarray(
        np.repeat(np.exp(rng.normal(size=(2, 1, 8))), 2, axis=1).reshape(-1), jnp.float32
    )  # (4 heads * 8,)
    folded = apply_scales(params, groups, {"attn/v_proj": tied})
    np.testing.assert_allclose(
        _block_out(block, folded, h, positions), _block_out(block, params, h, positions), atol=2e-5, rtol=1e-5
    )
    v = dict(tree.named_leaves(folded))["attn/v_proj/kernel"]
    np.testing.assert_allclose(
        v, params["attn"]["v_proj"]["kernel"][...] / source_scale(groups[-1], tied)[None, :], rtol=1e-6
    )
    with pytest.raises(ValueError, match="differ between query heads that share a key/value head"):
        apply_scales(params, groups, {"attn/v_proj": tied.at[0].multiply(2.0)})
    with pytest.raises(ValueError, match=r"give heads=\(num_heads, num_kv_heads\)"):
        check_groups([("attn/v_proj", ("attn/o_proj",))], params)
    with pytest.raises(ValueError, match="a multiple of num_kv_heads"):
        check_groups([("attn/v_proj", ("attn/o_proj",), 0, (4, 3))], params)


def test_awq_under_gqa_searches_a_scale_shared_by_the_heads_of_a_kv_head():
    block, groups = _gqa_block()
    params = nnx.state(block, nnx.Param)
    rng = np.random.default_rng(3)
    h = rng.normal(size=(4, 16, 32))
    h[..., :3] *= 20.0  # outlier channels
    h, positions = jnp.asarray(h, jnp.float32), jnp.arange(16)[None]
    stats, channels = _attention_statistics(block, params, h, positions)
    new, aux = awq(stats, channels, groups=groups, bits=3, group_size=8)(params)
    s = np.asarray(aux.scales["attn/o_proj/kernel"]).reshape(2, 2, 8)
    np.testing.assert_array_equal(s[:, 0], s[:, 1])
    assert "attn/v_proj" in aux.alphas
    _, rtn = awq(stats, channels, groups=groups, bits=3, group_size=8, grid=1)(params)
    assert float(aux.errors["attn/o_proj/kernel"]) <= float(rtn.errors["attn/o_proj/kernel"]) * (1 + 1e-5)
    assert sorted(aux.errors) == sorted(stats)  # the MLP was not calibrated: left alone
    # v_proj's output channels were divided by one entry of the tied scale each: undoing the
    # folding (inputs / norm scale, outputs * value scale) gives v_proj back up to 3-bit rounding
    by_source = {g[0]: aux.scales[f"{g[1][0]}/kernel"] for g in groups if f"{g[1][0]}/kernel" in aux.scales}
    v_old = params["attn"]["v_proj"]["kernel"][...]
    v_eff = effective_kernel(
        new["attn"]["v_proj"]["kernel"][...], "attn/v_proj/kernel", check_groups(groups, params), by_source
    )
    d, v, hv = (np.asarray(a, np.float64) for a in (v_eff - v_old, v_old, stats["attn/v_proj/kernel"].h))
    err_v = np.trace(d.T @ hv @ d) / np.trace(v.T @ hv @ v)
    print(
        f"v_proj output error {err_v:.4g}, o_proj {float(aux.errors['attn/o_proj/kernel']):.4g} (rtn {float(rtn.errors['attn/o_proj/kernel']):.4g})"
    )
    assert err_v == pytest.approx(float(aux.errors["attn/v_proj/kernel"]), rel=1e-3) and err_v < 0.1


def test_smoothquant_under_gqa_ties_the_value_scale_and_keeps_the_float_block():
    block, groups = _gqa_block()
    params = nnx.state(block, nnx.Param)
    rng = np.random.default_rng(4)
    h = rng.normal(size=(2, 8, 32))
    h[..., :2] *= 15.0
    h, positions = jnp.asarray(h, jnp.float32), jnp.arange(8)[None]
    stats, channels = _attention_statistics(block, params, h, positions)
    _, aux = smoothquant(stats, channels, groups=groups, alpha=0.5)(params)
    s = np.asarray(aux.scales["attn/o_proj/kernel"]).reshape(2, 2, 8)
    np.testing.assert_array_equal(s[:, 0], s[:, 1])  # one scale per value channel
    # the tied scale is computed from the maxima over the two query heads of each kv head
    x_max = np.asarray(channels["attn/o_proj/kernel"].abs_max).reshape(2, 2, 8).max(1)
    w_max = np.abs(np.asarray(params["attn"]["o_proj"]["kernel"][...])).max(1).reshape(2, 2, 8).max(1)
    np.testing.assert_allclose(s[:, 0], np.sqrt(x_max) / np.sqrt(w_max), rtol=1e-5)
    # folded into v_proj and o_proj, the float block computes the same function
    folded = apply_scales(
        params, groups, {g[0]: aux.scales[f"{g[1][0]}/kernel"] for g in groups if f"{g[1][0]}/kernel" in aux.scales}
    )
    np.testing.assert_allclose(
        _block_out(block, folded, h, positions), _block_out(block, params, h, positions), atol=5e-5, rtol=1e-4
    )


@pytest.mark.parametrize("method", ["awq", "awq-clip", "smoothquant-tensor"])
def test_awq_and_smoothquant_under_jit_equal_eager(method):
    _, params, stats, channels, groups = _outlier_layer()
    t = {
        "awq": lambda: awq(stats, channels, groups=groups, bits=3),
        "awq-clip": lambda: awq(stats, channels, groups=groups, bits=3, clip=True),
        "smoothquant-tensor": lambda: smoothquant(stats, channels, groups=groups, alpha=0.5, act_scale="tensor"),
    }[method]()
    eager, aux = t(params)
    jitted, aux_j = jax.jit(t)(params)
    chex.assert_trees_all_close(eager, jitted, atol=1e-6)
    chex.assert_trees_all_close(aux.scales, aux_j.scales, rtol=1e-6)
    if method.startswith("awq"):
        assert float(aux.alphas["norm"]) == float(aux_j.alphas["norm"]) > 0
    else:  # the static parts of the activation grid stay Python values under jit
        a, a_j = aux.act["fc"], aux_j.act["fc"]
        assert (a_j.bits, a_j.per_token) == (8, False) and isinstance(a_j.bits, int)
        np.testing.assert_allclose(float(a_j.absmax), float(a.absmax), rtol=1e-6)
        assert float(a.absmax) > 0
