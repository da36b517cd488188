"""The OBS column loop (jcompress.core.obs_loop) against a plain float64 numpy loop.

The reference visits the columns one by one and pushes each column's error onto all
later columns at once (no blocks, no sub-blocks, no lazy updates), choosing the masks
where the module docstring says: the unstructured mask from the weights at each block's
start, an N:M group's mask when the loop reaches it, GPTQ's regrid at block starts.
Shapes are chosen so that the column count is not a multiple of the block, the block not
a multiple of the sub-block (padding), and the last block is narrower.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress.core import grid, obs_loop
from jcompress.core.obs_loop import block_prune_counts, inverse_hessian_factor, obs_column_loop

ROWS, COLS, BLOCK = 70, 200, 56  # blocks of 56, 56, 56, 32; 56 = 3 sub-blocks of 16 + 8 padded


def _stable_smallest(score, count):
    """Bool mask of the ``count`` smallest entries of a 1-D array, lower index first among ties."""
    mask = np.zeros(score.size, bool)
    mask[np.argsort(score, kind="stable")[:count]] = True
    return mask


def reference_loop(
    w, u, *, block, counts=None, n_m=None, fixed=None, quant=None, scale=None, zero_point=None, regrid=None
):
    """The column loop in float64 numpy, one column at a time: ``(new_w, pruned, scale, zero_point)``."""
    w, u = np.array(w, np.float64), np.asarray(u, np.float64)
    rows, cols = w.shape
    d = np.diag(u)
    pruned = np.zeros(w.shape, bool) if fixed is None else np.array(fixed)
    if quant is not None:
        qmin, qmax = grid.code_range(*quant)
        scale = np.zeros(w.shape, np.float32) if scale is None else np.array(scale)
        zero_point = np.zeros(w.shape, np.int32) if zero_point is None else np.array(zero_point)
    for b, b0 in enumerate(range(0, cols, block)):
        b1 = min(b0 + block, cols)
        if counts is not None:
            score = (w[:, b0:b1] ** 2 / d[b0:b1] ** 2).ravel()
            pruned[:, b0:b1] |= _stable_smallest(score, counts[b]).reshape(rows, b1 - b0)
        if regrid is not None:
            for g0 in range(-(-b0 // regrid) * regrid, b1, regrid):
                s, z = grid.range_grid(
                    w[:, g0 : g0 + regrid].astype(np.float32), axis=1, bits=quant[0], symmetric=quant[1]
                )
                scale[:, g0 : g0 + regrid], zero_point[:, g0 : g0 + regrid] = s, z
        for i in range(b0, b1):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                group = w[:, i : i + m] ** 2 / d[i : i + m] ** 2
                for r in range(rows):
                    pruned[r, i : i + m] |= _stable_smallest(group[r], m - n)
            q = w[:, i].copy()
            if quant is not None:
                codes = np.clip(np.round(q / scale[:, i]) + zero_point[:, i], qmin, qmax)
                q = (codes - zero_point[:, i]) * scale[:, i].astype(np.float64)
            q[pruned[:, i]] = 0.0
            err = (w[:, i] - q) / d[i]
            w[:, i:] -= np.outer(err, u[i, i:])
            w[:, i] = q
    return w, pruned, scale, zero_point


@pytest.fixture(scope="module")
def problem():
    """``(w, u)``: ``(70, 200)`` weights and the factor of a correlated ``H``, float32."""
    rng = np.random.default_rng(7)
    mix = np.eye(COLS) + 0.3 * rng.standard_normal((COLS, COLS))
    x = (rng.standard_normal((3 * COLS, COLS)) @ mix).astype(np.float32)
    u, _ = inverse_hessian_factor(jnp.asarray(x.T @ x), damp=0.01)
    return jnp.asarray(rng.standard_normal((ROWS, COLS)).astype(np.float32)), u


def _grid(w, bits, symmetric):
    """``{"quant", "scale", "zero_point"}``: one min-max grid per row of ``w`` (per output), ``(1, rows)``."""
    s, z = grid.range_grid(w, axis=1, bits=bits, symmetric=symmetric)
    return {"quant": (bits, symmetric), "scale": s.T, "zero_point": z.T}


def _group_grids(w, bits, symmetric, g):
    """Static grids of contiguous groups of ``g`` inputs, visited in a shuffled order:
    ``scale``/``zero_point`` ``(cols // g, rows)`` and ``group_of`` of each visited input."""
    rows, cols = w.shape
    s, z = grid.range_grid(w.reshape(rows, cols // g, g), axis=2, bits=bits, symmetric=symmetric)
    order = np.random.default_rng(5).permutation(cols)
    return {
        "quant": (bits, symmetric),
        "scale": s[..., 0].T,
        "zero_point": z[..., 0].T,
        "group_of": jnp.asarray(order // g, jnp.int32),
    }


CASES = {  # the cases with a fixed mask and a 3-bit grid share one compiled program
    "unstructured 50%": lambda w: {"counts": block_prune_counts(ROWS, COLS, BLOCK, 0.5)},
    "2:4 and a fixed mask": lambda w: {"n_m": (2, 4), "fixed": jnp.abs(w) < 0.3},
    "fixed mask, 3-bit grid": lambda w: {"fixed": jnp.abs(w) < 0.2, **_grid(w, 3, False)},
    "fixed mask, 3-bit, 4 static groups in shuffled order": lambda w: {
        "fixed": jnp.abs(w) < 0.2,
        **_group_grids(w, 3, False, 50),
    },
    "fixed mask, 3-bit, regrid 32": lambda w: {"fixed": jnp.abs(w) < 0.2, "quant": (3, False), "regrid": 32},
    "fixed mask, 3-bit, regrid 100 (groups across blocks)": lambda w: {
        "fixed": jnp.abs(w) < 0.2,
        "quant": (3, False),
        "regrid": 100,
    },
    "unstructured 30%, 4-bit grid": lambda w: {
        "counts": block_prune_counts(ROWS, COLS, BLOCK, 0.3),
        **_grid(w, 4, True),
    },
}


def _per_column(kw):
    """The reference's arguments: ``fixed`` and the grids per weight ``(rows, cols)``."""
    ref = {k: v for k, v in kw.items() if k != "group_of"}
    if "scale" in kw:
        group_of = kw.get("group_of", jnp.zeros(COLS, jnp.int32))
        ref["scale"], ref["zero_point"] = kw["scale"][group_of].T, kw["zero_point"][group_of].T
    return ref


@pytest.mark.parametrize("case", CASES)
def test_equals_float64_reference(problem, case):
    """Equal masks and grid codes, weights within 1e-4 (float32 rounding of ~200 updates).
    The loop works on the kernel ``W.T``; the reference on ``W``."""
    w, u = problem
    kw = CASES[case](w)
    loop_kw = {**kw, "fixed": kw["fixed"].T} if "fixed" in kw else kw
    new_k, pruned_k, scale, zp = obs_column_loop(w.T, u, block=BLOCK, **loop_kw)
    new_w, pruned = np.asarray(new_k).T, np.asarray(pruned_k).T
    ref_w, ref_pruned, ref_scale, ref_zp = reference_loop(w, u, block=BLOCK, **_per_column(kw))
    np.testing.assert_array_equal(pruned, ref_pruned)
    np.testing.assert_allclose(new_w, ref_w, rtol=0, atol=1e-4 * np.abs(ref_w).max())
    assert np.all(new_w[ref_pruned] == 0)
    if "counts" in kw:
        assert int(pruned.sum()) == sum(kw["counts"])
    if "quant" in kw:
        group_of = kw.get("group_of", jnp.arange(COLS) // kw["regrid"] if "regrid" in kw else jnp.zeros(COLS, int))
        scale_cols, zp_cols = np.asarray(scale)[group_of].T, np.asarray(zp)[group_of].T
        np.testing.assert_allclose(scale_cols, ref_scale, rtol=1e-5)
        np.testing.assert_array_equal(zp_cols, ref_zp)
        codes = grid.round_codes(new_w, scale_cols, zp_cols, bits=kw["quant"][0], symmetric=kw["quant"][1])
        np.testing.assert_allclose((codes - zp_cols) * scale_cols, new_w, rtol=0, atol=1e-6)  # on the grid


def test_tiles_cover_each_column_once_eager_and_jitted(monkeypatch):
    """With 24-column tiles and 50-column blocks the lazy updates' tails (100 and 50
    columns) end in a clipped tile that overlaps its neighbour: every column is still
    updated exactly once (equal to the reference), eagerly and under ``jax.jit`` alike, and
    the caller's array is neither donated nor changed. (A shape no other test uses, so the
    small tile compiles into programs of its own.)"""
    monkeypatch.setattr(obs_loop, "_TILE", 24)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 150)).astype(np.float32)
    u, _ = inverse_hessian_factor(jnp.asarray(x.T @ x), damp=0.01)
    w = jnp.asarray(rng.standard_normal((9, 150)).astype(np.float32))
    w_before = np.asarray(w).copy()
    counts = block_prune_counts(9, 150, 50, 0.4)
    new_k, pruned, _, _ = obs_column_loop(w.T, u, block=50, counts=counts)
    ref_w, ref_pruned, _, _ = reference_loop(w, u, block=50, counts=counts)
    np.testing.assert_array_equal(np.asarray(pruned).T, ref_pruned)
    np.testing.assert_allclose(np.asarray(new_k).T, ref_w, rtol=0, atol=1e-4 * np.abs(ref_w).max())
    jit_k, jit_pruned, _, _ = jax.jit(lambda k, u: obs_column_loop(k, u, block=50, counts=counts))(w.T, u)
    np.testing.assert_array_equal(np.asarray(jit_pruned).T, ref_pruned)
    np.testing.assert_allclose(np.asarray(jit_k), np.asarray(new_k), rtol=0, atol=1e-5 * np.abs(ref_w).max())
    kernel = jnp.asarray(np.asarray(w).T)  # the caller's kernel, passed as it is
    obs_column_loop(kernel, u, block=50, counts=counts)
    assert not kernel.is_deleted()
    np.testing.assert_array_equal(np.asarray(kernel), w_before.T)


@pytest.mark.parametrize("leaf", [512, 40])
def test_inverse_hessian_factor_equals_float64(monkeypatch, leaf):
    """``U`` is upper triangular and equals the upper Cholesky factor of the dampened
    ``H^-1`` computed in float64, whether the triangular inverse is one solve (leaf 512)
    or goes by halves down to blocks of 40 (300 -> 150 -> 75 -> 37/38); dead inputs get
    ``H_ii = 1``."""
    monkeypatch.setattr(obs_loop, "_INVERSE_LEAF", leaf)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((900, 300)) @ (np.eye(300) + 0.2 * rng.standard_normal((300, 300)))
    x[:, 7] = 0.0  # a dead input
    h = x.T @ x
    u, dead = jax.jit(lambda h: inverse_hessian_factor(h, damp=0.01))(jnp.asarray(h, jnp.float32))
    assert np.flatnonzero(np.asarray(dead)).tolist() == [7]
    hd = h.copy()
    hd[7, 7] = 1.0
    hd += 0.01 * np.mean(np.diag(hd)) * np.eye(300)
    ref = np.linalg.cholesky(np.linalg.inv(hd)).T  # upper: ref.T @ ref = hd^-1
    u = np.asarray(u, np.float64)
    assert np.all(np.tril(u, -1) == 0)
    np.testing.assert_allclose(u, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
