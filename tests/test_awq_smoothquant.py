"""AWQ and SmoothQuant: scale folding keeps the function, the searches beat their baselines."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcompress import blockwise, lm, parallel, tree
from jcompress.models import hf_lm
from jcompress.models.gpt2 import GPT2, GPT2Config
from jcompress.models.llama import Llama, LlamaConfig
from jcompress.nnx import hooks
from jcompress.oneshot.awq import ChannelStats, apply_scales, awq, check_groups
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
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape) + 0.1, jnp.float32), state))


@functools.cache
def _blocks():
    llama = _random_model(lambda: Llama(LlamaConfig(50, 32, 1, 4, 4, 48), rngs=nnx.Rngs(0)))  # no GQA: v_proj -> o_proj
    gpt2 = _random_model(lambda: GPT2(GPT2Config(50, 32, 1, 4), rngs=nnx.Rngs(0)))
    return {"llama": llama.layers[0], "gpt2": gpt2.layers[0]}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_folded_scales_leave_the_block_unchanged(name):
    block = _blocks()[name]
    groups = block.scale_groups()
    want = {"llama": ["attn_norm", "attn/v_proj", "mlp_norm", "mlp/up_proj"], "gpt2": ["ln_1", "attn/c_attn", "ln_2"]}[name]
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
    np.testing.assert_allclose(_block_out(block, folded, h, positions), _block_out(block, params, h, positions), atol=2e-5, rtol=1e-5)


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
    model, report = blockwise.compress(model, ids, blockwise.method("smoothquant", alpha=0.5), mesh=parallel.data_mesh(1))
    assert len(report.act_quant) == 8 and all(a.bits == 8 and a.per_token for a in report.act_quant.values())
    assert all(0 < b.output_error < 0.01 for b in report.blocks)
    assert max(report.layer_errors.values()) < 1e-3  # 8-bit weights per output unit
    w8a8 = blockwise.with_act_quant(model, report.act_quant)
    assert set(report.act_quant) <= set(hooks.layers(w8a8)) and blockwise.with_act_quant(model, {}) is model
