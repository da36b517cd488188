"""One-shot compression: calibration statistics, OBS, SparseGPT, Wanda, GPTQ."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import compressed, oneshot, quant, textdata
from jcompress.bench.b4_sparsegpt import reference_sparsegpt
from jcompress.core import NM, ChainAux, GridAux, MaskAux, chain, grid, masked, obs_loop, relative_error, topk
from jcompress.core.obs_loop import block_prune_counts
from jcompress.models.bert import BertConfig, BertEncoder, layer_groups
from jcompress.models.mlp import MLP
from jcompress.oneshot import LayerStats
from jcompress.oneshot.gptq import quantize_matrix
from jcompress.oneshot.obs import prune_matrix as obs_matrix
from jcompress.oneshot.sparsegpt import prune_matrix as sparsegpt_matrix


def correlated_problem(n_in=64, n_out=24, tokens=512, seed=0):
    """Kernel (in, out), inputs X (tokens, in) with strongly correlated, unevenly scaled features."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)
    x = rng.normal(size=(tokens, n_in)) @ mix + 0.1 * rng.normal(size=(tokens, n_in))
    x *= rng.uniform(0.2, 3.0, size=(1, n_in))
    kernel = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
    return kernel.astype(np.float32), x.astype(np.float32)


def as_params(kernel):
    return {"fc": {"kernel": jnp.asarray(kernel), "bias": jnp.arange(kernel.shape[1], dtype=jnp.float32)}}


def as_stats(x):
    return {"fc/kernel": LayerStats(jnp.asarray(x.T @ x), jnp.float32(x.shape[0]))}


def output_error(kernel, new_kernel, x):
    x = x.astype(np.float64)
    return float(np.sum((x @ (np.asarray(new_kernel, np.float64) - kernel)) ** 2) / np.sum((x @ kernel) ** 2))


def magnitude_error(kernel, x, *, sparsity=None, n_m=None):
    """The papers' magnitude baseline: |K| compared across the layer (or per N:M group), its output error."""
    score = jnp.abs(jnp.asarray(kernel))
    if n_m is None:
        keep = ~topk.remove_smallest(score, topk.pruned_count(sparsity, kernel.size))
    else:
        keep = topk.nm_keep_mask(score, n=n_m[0], m=n_m[1], axis=0)
    return output_error(kernel, np.where(np.asarray(keep), kernel, 0), x)


# ----------------------------------------------------------------------------- calibration


def test_calibration_h_equals_xtx_for_mlp():
    model = MLP(12, (16,), 5, rngs=nnx.Rngs(0))
    xs = [np.random.default_rng(i).normal(size=(7, 12)).astype(np.float32) for i in range(3)]
    stats = oneshot.calibrate(model, xs)
    x = np.concatenate(xs)
    hidden = np.asarray(jax.nn.relu(model.fc1(jnp.asarray(x))))
    np.testing.assert_allclose(stats["fc1/kernel"].h, x.T @ x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["fc2/kernel"].h, hidden.T @ hidden, rtol=1e-5, atol=1e-4)
    assert float(stats["fc1/kernel"].count) == 21.0
    only = oneshot.calibrate(model, xs, names=["fc2/kernel"])
    assert list(only) == ["fc2/kernel"]
    one = oneshot.calibrate(model, xs[0])  # a single array is one batch
    np.testing.assert_allclose(one["fc1/kernel"].h, xs[0].T @ xs[0], rtol=1e-5, atol=1e-4)


def test_calibration_token_mask_excludes_padding():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    model = BertEncoder(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(3, 8)).astype(np.int32)
    mask = np.ones((3, 8), np.int32)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    batches = [(ids, mask)]
    names = [f"layers/0/{n}/kernel" for n in ("query", "key", "value", "attention_out", "intermediate", "output")]
    stats = oneshot.calibrate(model, batches, forward=lambda m, b: m(b[0], b[1]), names=names, token_mask=lambda b: b[1])
    assert sorted(stats) == sorted(names)
    x = np.asarray(model.embeddings(jnp.asarray(ids), jnp.zeros_like(ids)))
    real = x[mask.astype(bool)]
    np.testing.assert_allclose(stats["layers/0/query/kernel"].h, real.T @ real, rtol=1e-4, atol=1e-4)
    assert float(stats["layers/0/query/kernel"].count) == mask.sum()
    with pytest.raises(ValueError, match="no calibration token reached"):
        oneshot.calibrate(
            model, batches, forward=lambda m, b: m(b[0], b[1]), names=names, token_mask=lambda b: 0 * b[1]
        )


def test_calibration_rejects_bad_names_inputs_and_widths():
    model = MLP(4, (3,), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="inputs is empty"):
        oneshot.calibrate(model, [])
    with pytest.raises(ValueError, match="not kernels of nnx.Linear"):
        oneshot.calibrate(model, [np.ones((2, 4), np.float32)], names=["nope"])
    with pytest.raises(ValueError, match="never called"):
        oneshot.calibrate(model, [np.ones((2, 4), np.float32)], forward=lambda m, x: m.fc1(x))
    with pytest.raises(ValueError, match=r"layer fc1 gets calibration inputs of width 5"):
        oneshot.calibrate(model, [np.ones((2, 5), np.float32)])


def test_sequential_calibrates_on_the_compressed_prefix():
    model = MLP(16, (32,), 8, rngs=nnx.Rngs(3))
    xs = [np.random.default_rng(i).normal(size=(64, 16)).astype(np.float32) for i in range(2)]
    make = lambda stats: oneshot.sparsegpt(stats, sparsity=0.5, block_size=8)
    new_model, aux = oneshot.sequential(model, xs, make, groups=["fc1", "fc2"])
    # the original model is untouched
    assert np.count_nonzero(np.asarray(model.fc1.kernel[...]) == 0) == 0
    # fc1 was pruned on the dense inputs; fc2 on the outputs of the pruned fc1
    dense_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    p1, _ = make(oneshot.calibrate(model, xs, names=["fc1/kernel"]))(dense_params)
    np.testing.assert_allclose(new_model.fc1.kernel[...], p1["fc1"]["kernel"], atol=1e-6)
    half = nnx.merge(*nnx.split(model))
    half.fc1.kernel[...] = p1["fc1"]["kernel"]
    p2, _ = make(oneshot.calibrate(half, xs, names=["fc2/kernel"]))(dense_params)
    np.testing.assert_allclose(new_model.fc2.kernel[...], p2["fc2"]["kernel"], atol=1e-6)
    assert isinstance(aux, MaskAux) and set(aux.errors) == {"fc1/kernel", "fc2/kernel"}
    masks = nnx.to_pure_dict(aux.masks)
    np.testing.assert_array_equal(masks["fc2"]["kernel"], np.asarray(new_model.fc2.kernel[...]) != 0)
    assert masks["fc1"]["bias"].all()
    # default groups: one layer at a time in call order, the same result
    same, _ = oneshot.sequential(model, xs, make)
    np.testing.assert_allclose(same.fc2.kernel[...], new_model.fc2.kernel[...], atol=1e-6)
    with pytest.raises(ValueError, match="match no entry of groups"):
        oneshot.sequential(model, xs, make, groups=["fc1"])


def test_sequential_on_bert_groups_by_layer():
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    model = BertEncoder(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(1, 40, size=(4, 8)).astype(np.int32)
    batches = [(ids, np.ones_like(ids))]
    new_model, aux = oneshot.sequential(
        model, batches, lambda s: oneshot.wanda(s, sparsity=None, pattern=NM(2, 4)), groups=layer_groups(cfg),
        forward=lambda m, b: m(b[0], b[1]), token_mask=lambda b: b[1],
    )  # fmt: skip
    assert len(aux.errors) == 12
    k = np.asarray(new_model.layers[1].intermediate.kernel[...])
    assert np.all((k.reshape(4, 4, 32) != 0).sum(axis=1) <= 2)


def test_relative_error_matches_outputs():
    kernel, x = correlated_problem()
    new = kernel * (np.abs(kernel) > 0.1)
    e = relative_error(jnp.asarray(kernel), jnp.asarray(new), jnp.asarray(x.T @ x))
    assert float(e) == pytest.approx(output_error(kernel, new, x), rel=1e-4)


# ----------------------------------------------------------------------------- OBS


def _best_reconstruction(w, h, pruned):
    """Optimal w' with w'[pruned] = 0 for loss (w - w')^T H (w - w'), and that loss."""
    keep = np.setdiff1d(np.arange(w.size), pruned)
    new = np.zeros_like(w)
    new[keep] = w[keep] + np.linalg.solve(h[np.ix_(keep, keep)], h[np.ix_(keep, pruned)] @ w[pruned])
    d = w - new
    return new, float(d @ h @ d)


@pytest.mark.parametrize("seed", range(5))
def test_obs_matches_brute_force_on_six_inputs(seed):
    kernel, x = correlated_problem(n_in=6, n_out=4, tokens=40, seed=seed)
    h = (x.T @ x).astype(np.float64)
    for k in (1, 2):
        new, keep, losses = obs_matrix(jnp.asarray(kernel), jnp.asarray(h, jnp.float32), sparsity=k / 6, damp=0.0)
        new, keep = np.asarray(new, np.float64), np.asarray(keep)
        for r in range(kernel.shape[1]):
            w = kernel[:, r].astype(np.float64)
            pruned = np.flatnonzero(~keep[:, r])
            assert pruned.size == k
            best_for_mask, loss = _best_reconstruction(w, h, pruned)
            np.testing.assert_allclose(new[:, r], best_for_mask, atol=2e-4 * np.abs(w).max())
            assert 2 * float(np.sum(losses[:, r])) == pytest.approx(loss, rel=2e-3)
            exhaustive = min(_best_reconstruction(w, h, np.array(s))[1] for s in itertools.combinations(range(6), k))
            if k == 1:  # one OBS step is the exact optimum
                assert loss == pytest.approx(exhaustive, rel=1e-3)
            else:  # greedy: never better than the optimum, within a small factor of it here
                assert exhaustive * (1 - 1e-4) <= loss <= 3 * exhaustive + 1e-6


def test_obs_beats_sparsegpt_and_magnitude_on_a_small_layer():
    kernel, x = correlated_problem(n_in=32, n_out=8)
    params, stats = as_params(kernel), as_stats(x)
    _, a_obs = oneshot.obs(stats, sparsity=0.5)(params)
    _, a_sgpt = oneshot.sparsegpt(stats, sparsity=0.5, block_size=8)(params)
    e_obs, e_sgpt = (float(a.errors["fc/kernel"]) for a in (a_obs, a_sgpt))
    assert e_obs < magnitude_error(kernel, x, sparsity=0.5) / 3
    assert e_obs < e_sgpt * 1.05
    assert int((~a_obs.masks["fc"]["kernel"]).sum()) == 16 * 8


# ----------------------------------------------------------------------------- SparseGPT


def test_sparsegpt_equals_numpy_reference():
    kernel, x = correlated_problem(n_in=48, n_out=20)
    h = x.T @ x
    new, keep, _ = sparsegpt_matrix(jnp.asarray(kernel), jnp.asarray(h), sparsity=0.5, block_size=16)
    ref = reference_sparsegpt(kernel.T, h, sparsity=0.5, block=16).T
    np.testing.assert_allclose(new, ref, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(keep), ref != 0)


def test_column_loop_compiles_per_block_width_not_per_block():
    """11 blocks (10 of 16 columns, one of 8) compile one program per block width, so a
    layer's compile time does not grow with its number of blocks."""
    kernel, x = correlated_problem(n_in=168, n_out=7, tokens=400, seed=3)
    h = jnp.asarray(x.T @ x)
    programs = (obs_loop._block_inputs, obs_loop._solve_block, obs_loop._lazy_update)
    before = [p._cache_size() for p in programs]
    new, keep, _ = sparsegpt_matrix(jnp.asarray(kernel), h, sparsity=0.5, block_size=16)
    assert [p._cache_size() - b for p, b in zip(programs, before, strict=True)] == [2, 2, 2]
    ref = reference_sparsegpt(kernel.T, np.asarray(h), sparsity=0.5, block=16).T
    np.testing.assert_allclose(new, ref, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(keep), ref != 0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_sparsegpt_exact_sparsity_and_beats_magnitude(sparsity):
    kernel, x = correlated_problem(n_in=96, n_out=40)
    params, stats = as_params(kernel), as_stats(x)
    new, aux = oneshot.sparsegpt(stats, sparsity=sparsity, block_size=32)(params)
    assert isinstance(aux, MaskAux)
    k = np.asarray(new["fc"]["kernel"])
    assert int((k == 0).sum()) == topk.pruned_count(sparsity, k.size)
    np.testing.assert_array_equal(aux.masks["fc"]["kernel"], k != 0)
    assert aux.masks["fc"]["bias"].all()
    np.testing.assert_array_equal(new["fc"]["bias"], params["fc"]["bias"])
    assert float(aux.errors["fc/kernel"]) < 0.6 * magnitude_error(kernel, x, sparsity=sparsity)
    assert float(aux.errors["fc/kernel"]) == pytest.approx(output_error(kernel, k, x), rel=1e-3)


def test_sparsegpt_n_m_valid_and_better_than_wanda_and_magnitude():
    kernel, x = correlated_problem(n_in=64, n_out=32)
    params, stats = as_params(kernel), as_stats(x)
    new, aux = oneshot.sparsegpt(stats, pattern=NM(2, 4), block_size=16)(params)
    k = np.asarray(new["fc"]["kernel"])
    assert np.all((k.reshape(16, 4, 32) != 0).sum(axis=1) == 2)
    _, wa = oneshot.wanda(stats, pattern=NM(2, 4))(params)
    best_other = min(float(wa.errors["fc/kernel"]), magnitude_error(kernel, x, n_m=(2, 4)))
    assert float(aux.errors["fc/kernel"]) < 0.8 * best_other
    new14, _ = oneshot.sparsegpt(stats, sparsity=None, pattern=NM(1, 4), block_size=16)(params)
    assert np.all((np.asarray(new14["fc"]["kernel"]).reshape(16, 4, 32) != 0).sum(axis=1) == 1)


def test_sparsegpt_joint_quantization_on_grid():
    kernel, x = correlated_problem(n_in=64, n_out=16)
    params, stats = as_params(kernel), as_stats(x)
    new, aux = oneshot.sparsegpt(stats, sparsity=0.5, bits=4, block_size=16)(params)
    assert isinstance(aux, ChainAux) and aux.names == ("prune", "quantize")
    masks, grids = aux
    k = np.asarray(new["fc"]["kernel"])
    qp = grids.grids["fc/kernel"]
    assert qp.codes.dtype == jnp.int32 and qp.scale.shape == (1, 16) and qp.axis == 1
    assert qp.symmetric and int(qp.codes.min()) >= -7 and int(qp.codes.max()) <= 7  # the default grid
    np.testing.assert_array_equal(k, grid.dequantize(qp))
    kept = np.asarray(masks.masks["fc"]["kernel"])
    assert int((~kept).sum()) == k.size // 2 and np.all(k[~kept] == 0)
    _, sparse_only = oneshot.sparsegpt(stats, sparsity=0.5, block_size=16)(params)
    assert float(sparse_only.errors["fc/kernel"]) <= float(masks.errors["fc/kernel"]) < 0.2
    # the result is what compress stores: sparse layout, 4-bit codes
    ctree = compressed.compress(new, aux)
    np.testing.assert_array_equal(ctree["fc"]["kernel"].dequantize(), k)


def test_sparsegpt_zero_sparsity_keeps_weights_and_dead_inputs_are_zeroed():
    kernel, x = correlated_problem(n_in=32, n_out=8)
    x[:, 5] = 0.0
    new, keep, _ = sparsegpt_matrix(jnp.asarray(kernel), jnp.asarray(x.T @ x), sparsity=0.0, block_size=8)
    expected = kernel.copy()
    expected[5] = 0.0
    np.testing.assert_allclose(new, expected, atol=1e-5)
    assert bool(np.all(keep))


# ----------------------------------------------------------------------------- Wanda


def test_wanda_equals_direct_reference():
    kernel, x = correlated_problem(n_in=40, n_out=12)
    params, stats = as_params(kernel), as_stats(x)
    new, aux = oneshot.wanda(stats, sparsity=0.5)(params)
    score = np.abs(kernel) * np.linalg.norm(x, axis=0)[:, None]
    keep = np.ones_like(kernel, bool)
    for col in range(kernel.shape[1]):
        keep[np.argsort(score[:, col])[:20], col] = False
    np.testing.assert_array_equal(aux.masks["fc"]["kernel"], keep)
    np.testing.assert_array_equal(new["fc"]["kernel"], np.where(keep, kernel, 0))


def test_wanda_beats_magnitude_when_input_scales_differ():
    kernel, x = correlated_problem(n_in=64, n_out=32)
    x *= np.geomspace(0.05, 5.0, 64)[None, :].astype(np.float32)
    params, stats = as_params(kernel), as_stats(x)
    _, wa = oneshot.wanda(stats, sparsity=0.5)(params)
    assert float(wa.errors["fc/kernel"]) < 0.5 * magnitude_error(kernel, x, sparsity=0.5)


# ----------------------------------------------------------------------------- GPTQ


def reference_gptq(kernel, h, *, bits, group_size, act_order, damp=0.01, dynamic_block=None):
    """Plain GPTQ in its OBS form (explicit inverse, downdated each column), numpy float64.

    Static groups: every grid from the original weights. ``dynamic_block=B``: as the
    reference code with blocks of ``B`` columns, a group's grid is taken at the start of
    the block it begins in, from the weights updated by all earlier columns.
    """
    w = kernel.T.astype(np.float64).copy()
    rows, cols = w.shape
    maxq = 2**bits - 1
    scale = np.zeros((rows, cols))
    zero = np.zeros((rows, cols))

    def set_grid(src, g0):
        part = src[:, g0 : g0 + group_size]
        lo, hi = np.minimum(part.min(1), 0), np.maximum(part.max(1), 0)
        s = (hi - lo) / maxq
        scale[:, g0 : g0 + group_size] = s[:, None]
        zero[:, g0 : g0 + group_size] = np.round(-lo / s)[:, None]

    if dynamic_block is None:
        for g0 in range(0, cols, group_size):
            set_grid(w, g0)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    hd = h.astype(np.float64) + damp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.inv(hd[np.ix_(order, order)])
    w, scale, zero = w[:, order], scale[:, order], zero[:, order]
    for i in range(cols):
        if dynamic_block is not None:
            if i % dynamic_block == 0:
                block_start = w.copy()
            if i % group_size == 0:
                set_grid(block_start, i)
        q = scale[:, i] * (np.clip(np.round(w[:, i] / scale[:, i]) + zero[:, i], 0, maxq) - zero[:, i])
        e = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= np.outer(e, hinv[i, i:])
        w[:, i] = q
        hinv -= np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    out = np.zeros_like(w)
    out[:, order] = w
    return out.T


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_plain_reference(act_order):
    kernel, x = correlated_problem(n_in=48, n_out=16)
    h = x.T @ x
    values, qp = quantize_matrix(
        jnp.asarray(kernel), jnp.asarray(h), bits=4, group_size=16, act_order=act_order, block_size=16,
        static_groups=True, symmetric=False,
    )  # fmt: skip
    ref = reference_gptq(kernel, h, bits=4, group_size=16, act_order=act_order)
    step = float(np.asarray(qp.scale).max())
    close = np.abs(np.asarray(values) - ref) < 1e-3 * step
    assert close.mean() > 0.98  # float32 vs float64 may flip a rounding tie; those differ by a grid step
    assert output_error(kernel, values, x) == pytest.approx(output_error(kernel, ref, x), rel=0.02)
    np.testing.assert_array_equal(grid.dequantize(qp), values)
    assert qp.codes.dtype == jnp.int32 and int(qp.codes.max()) <= 15 and qp.scale.shape == (3, 16)
    assert qp.zero_point.shape == (3, 16) and qp.group_size == 16 and qp.axis == 1


@pytest.mark.parametrize("group_size", [8, 16, 32])  # inside a block, one per block, across blocks
def test_gptq_dynamic_groups_equal_reference(group_size):
    kernel, x = correlated_problem(n_in=64, n_out=16)
    h = x.T @ x
    values, qp = quantize_matrix(
        jnp.asarray(kernel), jnp.asarray(h), bits=3, group_size=group_size, block_size=16, symmetric=False
    )
    ref = reference_gptq(kernel, h, bits=3, group_size=group_size, act_order=False, dynamic_block=16)
    static, _ = quantize_matrix(
        jnp.asarray(kernel), jnp.asarray(h), bits=3, group_size=group_size, block_size=16, static_groups=True,
        symmetric=False,
    )  # fmt: skip
    step = float(np.asarray(qp.scale).max())
    assert (np.abs(np.asarray(values) - ref) < 1e-3 * step).mean() > 0.98
    assert output_error(kernel, values, x) == pytest.approx(output_error(kernel, ref, x), rel=0.02)
    assert not np.allclose(values, static)  # the grids really were recomputed
    np.testing.assert_array_equal(grid.dequantize(qp), values)
    assert qp.scale.shape == (64 // group_size, 16)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    kernel, x = correlated_problem(n_in=128, n_out=32)
    params, stats = as_params(kernel), as_stats(x)
    rtn, rtn_aux = quant.quantize(bits=bits, symmetric=False)(params)
    rtn_error = float(relative_error(kernel, rtn["fc"]["kernel"], x.T @ x))
    for act_order in (False, True):
        new, aux = oneshot.gptq(stats, bits=bits, act_order=act_order, symmetric=False, block_size=32)(params)
        assert isinstance(aux, GridAux)
        assert float(aux.errors["fc/kernel"]) < 0.7 * rtn_error
        np.testing.assert_array_equal(new["fc"]["bias"], params["fc"]["bias"])
        # the same grid layout as round to nearest: codes, then a float32 scale and an int32 zero point per output
        size = compressed.QuantizedTensor.from_qparams(aux.grids["fc/kernel"]).nbits()
        assert size == compressed.QuantizedTensor.from_qparams(rtn_aux.grids["fc/kernel"]).nbits()
        assert size == 128 * 32 * bits + 32 * (32 + 32)


def test_rtn_is_the_same_grid_rounding():
    kernel, _ = correlated_problem(n_in=16, n_out=4)
    new, _ = quant.quantize(bits=3, group_size=8, symmetric=False)(as_params(kernel))
    w = kernel.T
    for g0 in (0, 8):
        part = w[:, g0 : g0 + 8]
        lo, hi = np.minimum(part.min(1), 0), np.maximum(part.max(1), 0)
        s, z = (hi - lo) / 7, np.round(-lo / ((hi - lo) / 7))
        q = s[:, None] * (np.clip(np.round(part / s[:, None]) + z[:, None], 0, 7) - z[:, None])
        np.testing.assert_allclose(np.asarray(new["fc"]["kernel"]).T[:, g0 : g0 + 8], q, atol=1e-6)
    sym, _ = quant.quantize(bits=4, symmetric=True)(as_params(kernel))
    levels = np.asarray(sym["fc"]["kernel"])[:, 0] / (np.abs(kernel[:, 0]).max() / 7)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


def test_gptq_keeps_zeros_so_sparsegpt_then_gptq_is_sparse_and_quantized():
    kernel, x = correlated_problem(n_in=64, n_out=16)
    params, stats = as_params(kernel), as_stats(x)
    t = chain(oneshot.sparsegpt(stats, sparsity=0.75, block_size=16), oneshot.gptq(stats, bits=4, block_size=16))
    new, aux = t(params)
    k = np.asarray(new["fc"]["kernel"])
    mask_aux, grid_aux = aux
    kept = np.asarray(mask_aux.masks["fc"]["kernel"])
    assert np.all(k[~kept] == 0) and int((k == 0).sum()) >= k.size * 3 // 4
    np.testing.assert_array_equal(grid.dequantize(grid_aux.grids["fc/kernel"]), k)
    sparse_only = float(mask_aux.errors["fc/kernel"])
    assert sparse_only < float(relative_error(kernel, k, x.T @ x)) < sparse_only + 0.1
    ctree = compressed.compress(new, aux)
    leaf = ctree["fc"]["kernel"]
    assert isinstance(leaf, compressed.QuantizedTensor) and leaf.gaps is not None  # sparse layout: the smaller one
    np.testing.assert_array_equal(leaf.dequantize(), k)


# ----------------------------------------------------------------------------- jit, NNX State, bad input


SOLVERS = {
    "sparsegpt": lambda s: oneshot.sparsegpt(s, sparsity=0.5, block_size=16),
    "sparsegpt-2:4-3bit": lambda s: oneshot.sparsegpt(s, pattern=NM(2, 4), block_size=16, bits=3),
    "wanda": lambda s: oneshot.wanda(s, sparsity=0.4),
    "gptq": lambda s: oneshot.gptq(s, bits=4, group_size=16, act_order=True, block_size=16),
    "obs": lambda s: oneshot.obs(s, sparsity=0.25),
}


def _errors(aux):
    return aux[0].errors if isinstance(aux, ChainAux) else aux.errors


@pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=list(SOLVERS))
def test_solvers_jit_and_nnx_state(solver):
    model = MLP(32, (16,), 8, rngs=nnx.Rngs(0))
    xs = [np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)]
    t = solver(oneshot.calibrate(model, xs))
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    eager, aux = t(params)
    jitted, aux_j = jax.jit(t)(params)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)
    chex.assert_trees_all_close(_errors(aux), _errors(aux_j), rtol=1e-4, atol=1e-7)
    from_state, _ = t(state)
    assert isinstance(from_state, nnx.State)
    chex.assert_trees_all_close(nnx.to_pure_dict(from_state), eager)
    assert sorted(_errors(aux)) == ["fc1/kernel", "fc2/kernel"]
    assert all(float(e) < 0.5 for e in _errors(aux).values())
    # masked narrows the calibrated kernels
    only, aux1 = masked(t, "fc2")(params)
    assert sorted(_errors(aux1)) == ["fc2/kernel"] and only["fc1"]["kernel"] is params["fc1"]["kernel"]
    # inputs are not mutated
    chex.assert_trees_all_equal(params, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_per_layer_specs_and_masked():
    model = MLP(32, (16,), 8, rngs=nnx.Rngs(0))
    stats = oneshot.calibrate(model, np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    new, aux = oneshot.wanda(stats, sparsity={"fc1": 0.25, ".*": 0.5})(params)
    assert int((new["fc1"]["kernel"] == 0).sum()) == 8 * 16 and int((new["fc2"]["kernel"] == 0).sum()) == 8 * 8
    only_fc2 = oneshot.sparsegpt(stats, sparsity={"fc2": 0.5}, block_size=16)
    with pytest.raises(ValueError, match="no pattern covers fc1/kernel"):
        only_fc2(params)
    new, aux = masked(only_fc2, "fc2/kernel")(params)
    assert sorted(aux.errors) == ["fc2/kernel"] and int((new["fc2"]["kernel"] == 0).sum()) == 8 * 8
    new, aux = oneshot.gptq(stats, bits={"fc2": 8, ".*": 3})(params)
    assert {n: g.bits for n, g in aux.grids.items()} == {"fc1/kernel": 3, "fc2/kernel": 8}


def test_bad_input_is_rejected_with_clear_errors():
    kernel, x = correlated_problem(n_in=16, n_out=4)
    params, stats = as_params(kernel), as_stats(x)
    with pytest.raises(ValueError, match="sparsity"):
        oneshot.sparsegpt(stats, sparsity=1.0)
    with pytest.raises(ValueError, match="contradicts"):
        oneshot.sparsegpt(stats, sparsity=0.3, pattern=NM(2, 4))
    with pytest.raises(ValueError, match="NM"):
        oneshot.wanda(stats, pattern=NM(0, 4))
    with pytest.raises(ValueError, match="bits"):
        oneshot.gptq(stats, bits=0)
    with pytest.raises(ValueError, match="bits"):
        oneshot.sparsegpt(stats, sparsity=0.5, bits=1, symmetric=True)
    with pytest.raises(ValueError, match=r"group_size=5 must be a positive divisor .* 16 inputs of fc/kernel"):
        oneshot.gptq(stats, bits=4, group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        oneshot.gptq(stats, bits=4, group_size=0)
    with pytest.raises(ValueError, match=r"stats/fc/kernel has shape \(8, 8\)"):
        oneshot.sparsegpt({"fc/kernel": jnp.eye(8)}, sparsity=0.5)(params)
    with pytest.raises(ValueError, match="not leaves of params"):
        oneshot.wanda({"fc2/kernel": jnp.eye(16)}, sparsity=0.5)(params)
    with pytest.raises(ValueError, match="counts 0.0 calibration tokens"):
        oneshot.gptq({"fc/kernel": LayerStats(jnp.eye(16), jnp.float32(0))}, bits=4)
    with pytest.raises(ValueError, match="all zero"):
        oneshot.sparsegpt({"fc/kernel": jnp.zeros((16, 16))}, sparsity=0.5)
    bad = as_params(np.where(np.arange(16)[:, None] == 3, np.nan, kernel).astype(np.float32))
    with pytest.raises(ValueError, match="fc/kernel contains NaN"):
        oneshot.gptq(stats, bits=4)(bad)
    with pytest.raises(TypeError, match="integer|dtype"):
        oneshot.wanda(stats, sparsity=0.5)({"fc": {"kernel": jnp.ones((16, 4), jnp.int32)}})
    with pytest.raises(ValueError, match="match none of the leaves"):
        masked(oneshot.sparsegpt(stats, sparsity=0.5), "nothing_here")(params)
    with pytest.raises(ValueError, match="positive definite"):
        oneshot.sparsegpt({"fc/kernel": -jnp.eye(16)}, sparsity=0.5, damp=0.0)(params)
    with pytest.raises(ValueError, match="multiple of m=4"):
        oneshot.sparsegpt({"fc/kernel": jnp.eye(14)}, pattern=NM(2, 4), block_size=16)(as_params(kernel[:14]))
    with pytest.raises(ValueError, match="axis=-2"):
        oneshot.sparsegpt(stats, pattern=NM(2, 4, axis=-1))


# ----------------------------------------------------------------------------- text data


def test_textdata_splits_are_disjoint_and_deterministic():
    calib, held = textdata.sentences("calibration"), textdata.sentences("evaluation")
    assert len(calib) > 500 and len(held) > 300
    assert not set(calib) & set(held)
    assert textdata.sentences("evaluation", limit=10) == held[:10]
    assert all(6 <= len(s.split()) <= 40 and s[-1] in ".!?" for s in calib + held)
    with pytest.raises(ValueError, match="split"):
        textdata.sentences("train")


# ----------------------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None)
@given(
    groups=st.sampled_from([2, 5]),  # few shapes: every new shape compiles the eager ops again
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
)
def test_wanda_counts_are_exact(groups, sparsity, seed):
    n_in, n_out = 4 * groups, 3
    score = np.abs(np.random.default_rng(seed).normal(size=(n_in, n_out))).astype(np.float32)
    stats = {"fc/kernel": LayerStats(jnp.eye(n_in), jnp.float32(1))}  # H = I: the score is |K|
    _, aux = oneshot.wanda(stats, sparsity=sparsity)(as_params(score))
    per_row = np.asarray(aux.masks["fc"]["kernel"])
    assert np.all((~per_row).sum(axis=0) == topk.pruned_count(sparsity, n_in))
    for c in range(n_out):  # removed entries never outrank kept ones within an output
        if 0 < per_row[:, c].sum() < n_in:
            assert score[~per_row[:, c], c].max() <= score[per_row[:, c], c].min()
    _, aux = oneshot.wanda(stats, pattern=NM(2, 4))(as_params(score))
    nm = np.asarray(aux.masks["fc"]["kernel"]).reshape(groups, 4, n_out)
    assert np.all(nm.sum(axis=1) == 2)
    g = score.reshape(groups, 4, n_out)
    assert np.all(np.where(nm, g, np.inf).min(axis=1) >= np.where(nm, -np.inf, g).max(axis=1))


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 50), cols=st.integers(1, 700), block=st.integers(1, 200), sparsity=st.floats(0.0, 0.99))
def test_block_counts_sum_to_the_layer_count(rows, cols, block, sparsity):
    counts = block_prune_counts(rows, cols, block, sparsity)
    assert len(counts) == -(-cols // block) and sum(counts) == topk.pruned_count(sparsity, rows * cols)
    widths = [min(block, cols - b0) for b0 in range(0, cols, block)]
    assert all(0 <= c <= rows * w for c, w in zip(counts, widths, strict=True))
