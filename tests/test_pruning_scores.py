"""Importance scores: formulas, Hessian-diagonal estimators against the exact Hessian."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jcompress as jc
from jcompress import models, pruning, tree
from jcompress.core.patterns import Units
from jcompress.pruning import make_masks, scores


def _tiny_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "fc1": {"kernel": jax.random.normal(k1, (5, 4)) * 0.5, "bias": jnp.zeros((4,))},
        "fc2": {"kernel": jax.random.normal(k2, (4, 3)) * 0.5, "bias": jax.random.normal(k3, (3,)) * 0.1},
    }


def _mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch(n=64, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 5)), jax.random.randint(ky, (n,), 0, 3)


def _exact_hessian_diag(loss_fn, params, batch):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    h = jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)
    return unravel(jnp.diag(h)), h


def test_magnitude_taylor_obd_formulas():
    p = _tiny_params()
    g = jax.tree.map(lambda x: jnp.ones_like(x) * 2.0, p)
    chex.assert_trees_all_close(scores.magnitude_scores(p), jax.tree.map(jnp.abs, p))
    chex.assert_trees_all_close(scores.taylor_scores(p, g), jax.tree.map(lambda w: jnp.abs(2 * w), p))
    chex.assert_trees_all_close(scores.obd_scores(p, g), jax.tree.map(lambda w: w**2, p))
    s = scores.magnitude_scores(p, names=["fc1/kernel"])
    assert float(jnp.sum(s["fc2"]["kernel"])) == 0.0 and float(jnp.sum(s["fc1"]["kernel"])) > 0


def test_scores_on_nnx_state_match_dict():
    model = models.create("lenet300", input_shape=(4, 4, 1), num_classes=3)
    _, state = nnx.split(model, nnx.Param)
    d = tree.to_pure_dict(state)
    out = scores.magnitude_scores(state)
    assert isinstance(out, nnx.State)
    chex.assert_trees_all_close(tree.to_pure_dict(out), scores.magnitude_scores(d))
    r1 = scores.random_scores(state, key=jax.random.key(3))
    r2 = scores.random_scores(d, key=jax.random.key(3))
    chex.assert_trees_all_close(tree.to_pure_dict(r1), r2)


def test_random_is_deterministic_and_per_leaf():
    p = _tiny_params()
    a = scores.random_scores(p, key=jax.random.key(0))
    b = jax.jit(lambda q: scores.random_scores(q, key=jax.random.key(0)))(p)
    chex.assert_trees_all_close(a, b)
    c = scores.random_scores(p, key=jax.random.key(1))
    assert not np.allclose(a["fc1"]["kernel"], c["fc1"]["kernel"])
    assert all(float(x.min()) >= 0 and float(x.max()) < 1 for x in jax.tree.leaves(a))


def test_snip_is_normalised_connection_sensitivity():
    p, batch = _tiny_params(), _batch()
    s = scores.snip_scores(_mlp_loss, p, batch)
    g = jax.grad(_mlp_loss)(p, batch)
    raw = jax.tree.map(lambda w, gg: jnp.abs(w * gg), p, g)
    total = sum(float(jnp.sum(x)) for x in jax.tree.leaves(raw))
    chex.assert_trees_all_close(s, jax.tree.map(lambda x: x / total, raw), rtol=1e-5)
    assert abs(sum(float(jnp.sum(x)) for x in jax.tree.leaves(s)) - 1.0) < 1e-5


def test_fisher_equals_per_example_loop_and_approximates_hessian():
    # Softmax regression with labels drawn from the model itself: E[Fisher] = Hessian.
    key = jax.random.key(0)
    w = {"lin": {"kernel": jax.random.normal(key, (4, 3)) * 0.7}}

    def loss(p, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["lin"]["kernel"], y).mean()

    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (8192, 4))
    y = jax.random.categorical(ky, x @ w["lin"]["kernel"])
    batches = [(x[i : i + 2048], y[i : i + 2048]) for i in range(0, 8192, 2048)]
    fisher = scores.fisher_diagonal(loss, w, batches)
    # exactness of the per-example computation on a few examples
    small = (x[:5], y[:5])
    per = [jax.grad(loss)(w, (x[i : i + 1], y[i : i + 1]))["lin"]["kernel"] ** 2 for i in range(5)]
    np.testing.assert_allclose(scores.fisher_diagonal(loss, w, [small])["lin"]["kernel"], sum(per) / 5, rtol=1e-5)
    hdiag, _ = _exact_hessian_diag(loss, w, (x, y))
    rel = jnp.abs(fisher["lin"]["kernel"] - hdiag["lin"]["kernel"]) / hdiag["lin"]["kernel"]
    assert float(rel.max()) < 0.15, rel


def test_hutchinson_exact_for_diagonal_hessian():
    # A separable loss has a diagonal Hessian: every Rademacher probe gives it exactly.
    p = {"a": {"kernel": jnp.array([[0.3, -1.2], [2.0, 0.5]])}, "b": jnp.array([1.5, -0.7, 0.2])}

    def loss(q, batch):
        return jnp.sum(batch * q["a"]["kernel"] ** 4) + jnp.sum(jnp.cosh(q["b"]))

    batch = jnp.array([[1.0, 2.0], [0.5, 3.0]])
    est = scores.hutchinson_diagonal(loss, p, batch, key=jax.random.key(0), num_samples=3)
    exact, _ = _exact_hessian_diag(loss, p, batch)
    chex.assert_trees_all_close(est, exact, rtol=1e-5)


def test_hutchinson_within_variance_bound_of_exact():
    p, batch = _tiny_params(), _batch()
    s = 2000
    est = jax.jit(lambda q: scores.hutchinson_diagonal(_mlp_loss, q, batch, key=jax.random.key(1), num_samples=s))(p)
    exact, h = _exact_hessian_diag(_mlp_loss, p, batch)
    # Var[z_k (Hz)_k] = sum_{j != k} H_kj^2; allow 5 standard deviations of the mean.
    off = np.asarray(jnp.sum(h**2, axis=1) - jnp.diag(h) ** 2)
    bound = 5 * np.sqrt(off / s) + 1e-6
    err = np.abs(np.asarray(jax.flatten_util.ravel_pytree(est)[0] - jax.flatten_util.ravel_pytree(exact)[0]))
    assert np.all(err <= bound), (err.max(), bound.min())


def test_grad_squared_accumulator_in_optax_chain():
    p = _tiny_params()
    tx = optax.chain(scores.grad_squared_accumulator(), optax.sgd(0.1))
    state = tx.init(p)
    grads = []
    for i in range(3):
        g = jax.grad(_mlp_loss)(p, _batch(seed=10 + i))
        grads.append(g)
        updates, state = jax.jit(tx.update)(g, state, p)
        chex.assert_trees_all_close(updates, jax.tree.map(lambda x: -0.1 * x, g), rtol=1e-6)
    assert int(state[0].count) == 3
    mean = scores.grad_squared_mean(state[0])
    want = jax.tree.map(lambda *gs: sum(x**2 for x in gs) / 3, *grads)
    chex.assert_trees_all_close(mean, want, rtol=1e-5)


def test_neuron_entropy_values_and_unit_scores():
    rng = np.random.default_rng(0)
    n = 4096
    acts = np.stack(
        [np.zeros(n), rng.uniform(0, 1, n), np.where(rng.uniform(size=n) < 0.5, 0.0, 1.0), rng.standard_normal(n)],
        axis=1,
    ).astype(np.float32)
    ent = scores.neuron_entropy([jnp.asarray(acts)], bins=16)[0]
    assert float(ent[0]) == 0.0  # constant neuron carries no information
    assert abs(float(ent[1]) - 4.0) < 0.05  # uniform over 16 bins: log2(16) bits
    assert abs(float(ent[2]) - 1.0) < 0.01  # a fair binary neuron: 1 bit
    counts, _ = np.histogram(acts[:, 3], bins=16, range=(acts[:, 3].min(), acts[:, 3].max()))
    q = counts[counts > 0] / n
    assert abs(float(ent[3]) + float(np.sum(q * np.log2(q)))) < 1e-4  # equals numpy's histogram entropy

    model = models.create("mlp", input_shape=(6,), num_classes=3, widths=(8, 5))
    _, state = nnx.split(model, nnx.Param)
    params = tree.to_pure_dict(state)
    x = jnp.asarray(rng.standard_normal((256, 6)).astype(np.float32))
    hidden = model.hidden(x)
    ents = scores.neuron_entropy(hidden, bins=8)
    assert [e.shape for e in ents] == [(8,), (5,)]
    s = scores.unit_scores(params, {"fc1/kernel": ents[0], "fc2/kernel": ents[1]})
    np.testing.assert_array_equal(np.asarray(s["fc1"]["kernel"]), np.broadcast_to(np.asarray(ents[0]), (6, 8)))
    assert float(jnp.sum(s["fc3"]["kernel"])) == 0.0
    m = make_masks(s, ["fc1/kernel", "fc2/kernel"], sparsity=0.25, pattern=Units())
    dropped = ~np.asarray(m["fc1"]["kernel"]).any(axis=0)
    assert dropped.sum() == 2 and np.all(np.asarray(ents[0])[dropped].max() <= np.asarray(ents[0])[~dropped].min())


def test_score_bad_inputs():
    p = _tiny_params()
    with pytest.raises(TypeError, match="params/fc1/kernel"):
        scores.magnitude_scores({"fc1": {"kernel": jnp.ones((2, 2), jnp.int32)}})
    with pytest.raises(ValueError, match="structure"):
        scores.taylor_scores(p, {"fc1": p["fc1"]})
    with pytest.raises(ValueError, match="bins"):
        scores.neuron_entropy([jnp.ones((4, 2))], bins=1)
    with pytest.raises(ValueError, match="num_samples"):
        scores.hutchinson_diagonal(_mlp_loss, p, _batch(), key=jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match="empty"):
        scores.fisher_diagonal(_mlp_loss, p, [])
    with pytest.raises(ValueError, match="not leaves"):
        scores.unit_scores(p, {"fc9/kernel": jnp.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        scores.unit_scores(p, {"fc1/kernel": jnp.ones(3)})
    with pytest.raises(ValueError, match="not leaves"):
        scores.magnitude_scores(p, names=["fc9/kernel"])
    with pytest.raises(TypeError, match="list of leaf names"):
        scores.magnitude_scores(p, names="fc1/kernel")


def _expected_masks(p, score_tree, sparsity):
    """Reference: per kernel, keep the largest scores (stable ties) with exact counts."""
    out = {}
    for name in ("fc1/kernel", "fc2/kernel"):
        v = np.asarray(tree.get_by_name(score_tree, name), np.float32).ravel()
        k = v.size - int(np.floor(sparsity * v.size + 0.5))
        keep = np.zeros(v.size, bool)
        keep[np.argsort(v, kind="stable")[v.size - k :]] = True
        out[name] = keep.reshape(np.shape(tree.get_by_name(p, name)))
    return out


@pytest.mark.parametrize("kind", ["taylor", "snip", "obd", "by_scores"])
def test_score_transforms_prune_by_their_scores(kind):
    p, batch = _tiny_params(), _batch()
    g = jax.grad(_mlp_loss)(p, batch)
    h = jax.tree.map(lambda x: jnp.abs(x) + 0.5, g)
    t, want_scores = {
        "taylor": (pruning.taylor(g, sparsity=0.5), scores.taylor_scores(p, g)),
        "snip": (pruning.snip(_mlp_loss, batch, sparsity=0.5), scores.snip_scores(_mlp_loss, p, batch)),
        "obd": (pruning.obd(h, sparsity=0.5), scores.obd_scores(p, h)),
        "by_scores": (pruning.by_scores(scores.obd_scores(p, h), sparsity=0.5), scores.obd_scores(p, h)),
    }[kind]
    want = _expected_masks(p, want_scores, 0.5)
    for new, aux in (t(p), jax.jit(t)(p)):
        assert isinstance(aux, jc.core.MaskAux)
        for name, keep in want.items():
            np.testing.assert_array_equal(np.asarray(tree.get_by_name(aux.masks, name)), keep)
            w = np.asarray(tree.get_by_name(p, name))
            np.testing.assert_array_equal(np.asarray(tree.get_by_name(new, name)), np.where(keep, w, 0))
            err = float(np.sum((w * ~keep) ** 2) / np.sum(w**2))
            np.testing.assert_allclose(float(aux.errors[name]), err, rtol=1e-5)
        assert np.asarray(aux.masks["fc1"]["bias"]).all()
        np.testing.assert_array_equal(np.asarray(new["fc1"]["bias"]), np.asarray(p["fc1"]["bias"]))
    with pytest.raises(ValueError, match="structure"):
        pruning.taylor({"fc1": p["fc1"]}, sparsity=0.5)(p)


def test_score_transforms_on_an_nnx_state_take_dict_gradients():
    model = models.create("lenet300", input_shape=(4, 4, 1), num_classes=3)
    _, state = nnx.split(model, nnx.Param)
    grads = jax.tree.map(lambda x: jnp.abs(x) + 1.0, tree.to_pure_dict(state))  # a pure dict
    new, aux = pruning.taylor(grads, sparsity=0.5)(state)
    want_new, want = pruning.taylor(grads, sparsity=0.5)(tree.to_pure_dict(state))
    assert isinstance(new, nnx.State) and isinstance(aux.masks, nnx.State)
    chex.assert_trees_all_equal(tree.to_pure_dict(aux.masks), want.masks)
    chex.assert_trees_all_equal(tree.to_pure_dict(new), want_new)
