"""OBS with OBC's global allocation: exact total, uneven per-row counts, never worse than per-row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import oneshot
from jcompress.oneshot.calibration import LayerStats
from jcompress.oneshot.obs import global_counts, prune_matrix


def _problem(n_in, n_out, seed, col_scale=None, tokens=96):
    """Kernel (in, out) and correlated, unevenly scaled inputs X (tokens, in)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, n_in)) @ (rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)) + 0.1 * rng.normal(size=(tokens, n_in))
    x *= rng.uniform(0.3, 3.0, size=(1, n_in))
    kernel = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
    if col_scale is not None:
        kernel *= np.asarray(col_scale)[None, :]
    return kernel.astype(np.float32), x.astype(np.float32)


def _run(kernel, x, allocation, sparsity=0.5):
    h = jnp.asarray(x.T @ x)
    new, keep, losses = prune_matrix(jnp.asarray(kernel), h, sparsity=sparsity, damp=0.0, allocation=allocation)
    return np.asarray(new, np.float64), np.asarray(keep), np.asarray(losses)


def _output_error(kernel, new, x):
    x = x.astype(np.float64)
    return float(np.sum((x @ (new - kernel)) ** 2))


def test_global_counts_take_prefixes_of_the_smallest_steps():
    # row 0's second step (5) waits for nothing smaller; row 1's drop from 4 to 0.5 comes after its 4
    losses = jnp.array([[1.0, 5.0, 6.0], [2.0, 4.0, 0.5], [3.0, 3.5, 9.0]])
    assert global_counts(losses, total=0).tolist() == [0, 0, 0]
    assert global_counts(losses, total=3).tolist() == [1, 1, 1]
    assert global_counts(losses, total=4).tolist() == [1, 1, 2]  # ranks: 1 5 6 | 2 4 4 | 3 3.5 9
    assert global_counts(losses, total=5).tolist() == [1, 2, 2]
    assert global_counts(losses, total=6).tolist() == [1, 3, 2]  # 0.5 comes with the 4 before it
    assert global_counts(losses, total=9).tolist() == [3, 3, 3]
    assert global_counts(losses.at[0, 1].set(jnp.nan), total=7).tolist() == [1, 3, 3]  # a NaN step (and the rest of its row) last
    with pytest.raises(ValueError, match="total=10"):
        global_counts(losses, total=10)


def test_exact_total_and_uneven_counts():
    scale = [0.05, 0.2, 0.5, 1.0, 1.0, 2.0, 5.0, 20.0]
    kernel, x = _problem(12, 8, seed=0, col_scale=scale)
    _, keep, _ = _run(kernel, x, "global", sparsity=0.45)
    counts = (~keep).sum(axis=0)
    assert counts.sum() == round(0.45 * 96) == 43
    assert counts[0] > counts[-1] and counts[0] == counts.max() and counts[-1] == counts.min()
    assert len(set(counts.tolist())) > 2
    # the transform: the same exact total, default 'row' still removes round(sparsity * in) per output
    params = {"fc": {"kernel": jnp.asarray(kernel)}}
    stats = {"fc/kernel": LayerStats(jnp.asarray(x.T @ x), jnp.float32(x.shape[0]))}
    _, aux = oneshot.obs(stats, sparsity=0.45, allocation="global")(params)
    assert int((~aux.masks["fc"]["kernel"]).sum()) == 43
    _, aux_row = oneshot.obs(stats, sparsity=0.5)(params)
    assert (~np.asarray(aux_row.masks["fc"]["kernel"])).sum(axis=0).tolist() == [6] * 8


@pytest.mark.parametrize("seed", range(4))
def test_global_never_worse_than_row_and_rows_are_least_squares(seed):
    kernel, x = _problem(12, 8, seed=seed, col_scale=np.exp(np.random.default_rng(seed + 10).normal(size=8)))
    errs = {}
    for allocation in ("row", "global"):
        new, keep, losses = _run(kernel, x, allocation)
        assert (~keep).sum() == 48
        errs[allocation] = _output_error(kernel, new, x)
        # 2 * summed step losses = output error (exact greedy steps)
        assert 2 * losses.sum() == pytest.approx(errs[allocation], rel=2e-3)
    print(f"seed {seed}: output error row {errs['row']:.5g} global {errs['global']:.5g}")
    assert errs["global"] <= errs["row"] * (1 + 1e-5)
    # every row is the least-squares reconstruction for its own mask (numpy, float64)
    h = (x.T @ x).astype(np.float64)
    for r in range(kernel.shape[1]):
        w = kernel[:, r].astype(np.float64)
        pruned, kept = np.flatnonzero(~keep[:, r]), np.flatnonzero(keep[:, r])
        best = np.zeros_like(w)
        best[kept] = w[kept] + np.linalg.solve(h[np.ix_(kept, kept)], h[np.ix_(kept, pruned)] @ w[pruned])
        np.testing.assert_allclose(new[:, r], best, atol=1e-4)


def test_invariant_under_jit_and_bad_allocation():
    kernel, x = _problem(12, 8, seed=3, col_scale=[0.1, 0.3, 1, 1, 1, 1, 3, 10])
    params = {"fc": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(8)}}
    stats = {"fc/kernel": LayerStats(jnp.asarray(x.T @ x), jnp.float32(x.shape[0]))}
    t = oneshot.obs(stats, sparsity=0.5, allocation="global")
    eager, aux = t(params)
    jitted, aux_j = jax.jit(t)(params)
    np.testing.assert_array_equal(aux.masks["fc"]["kernel"], aux_j.masks["fc"]["kernel"])
    np.testing.assert_allclose(eager["fc"]["kernel"], jitted["fc"]["kernel"], atol=1e-5)
    np.testing.assert_allclose(aux.errors["fc/kernel"], aux_j.errors["fc/kernel"], rtol=1e-4)
    assert int((~aux.masks["fc"]["kernel"]).sum()) == 48
    with pytest.raises(ValueError, match="allocation='layer' must be one of"):
        oneshot.obs(stats, sparsity=0.5, allocation="layer")
    with pytest.raises(ValueError, match="allocation=None"):
        prune_matrix(jnp.asarray(kernel), stats["fc/kernel"].h, sparsity=0.5, allocation=None)
