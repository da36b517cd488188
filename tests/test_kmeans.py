"""k-means weight sharing (jcompress.sharing.kmeans) and centroid fine-tuning (finetune)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jcompress import data, models, train, tree
from jcompress.core.base import CodebookAux, masked
from jcompress.sharing import (
    CentroidState,
    centroid_finetune,
    centroid_gradients,
    codebook_aux,
    kmeans,
    kmeans_1d,
    reconstruct,
)


def lloyd_reference(x, init, iters):
    """Plain O(n k) Lloyd in float64 with scikit-learn's empty-cluster relocation (one empty at most)."""
    x = np.asarray(x, np.float64)
    c = np.asarray(init, np.float64).copy()
    for _ in range(iters):
        labels = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        new = c.copy()
        for j in range(len(c)):
            if np.any(labels == j):
                new[j] = x[labels == j].mean()
        if np.array_equal(new, c):
            break
        c = new
    return np.sort(c)


def test_kmeans_1d_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 4000).astype(np.float32)
    res = kmeans_1d(x, k=8, iters=50)
    ref = lloyd_reference(x, np.linspace(x.min(), x.max(), 8), 50)
    np.testing.assert_allclose(np.asarray(res.centroids), ref, atol=2e-6)
    # labels are the nearest centroids
    c = np.asarray(res.centroids)
    np.testing.assert_array_equal(np.asarray(res.labels), np.argmin(np.abs(x[:, None] - c[None]), axis=1))
    np.testing.assert_allclose(float(res.inertia), ((x - c[np.asarray(res.labels)]) ** 2).sum(), rtol=1e-5)
    jres = jax.jit(lambda v: kmeans_1d(v, k=8, iters=50))(x)
    np.testing.assert_array_equal(jres.labels, res.labels)
    np.testing.assert_allclose(jres.centroids, res.centroids, rtol=1e-6)


def test_kmeans_1d_no_worse_than_sklearn_with_empty_clusters():
    from sklearn.cluster import KMeans

    # heavy tails: with the linear init the outer clusters start empty and are relocated
    x = (np.random.default_rng(1).standard_normal(4000) ** 3 * 0.05).astype(np.float32)
    init = np.linspace(x.min(), x.max(), 8)
    km = KMeans(8, init=init[:, None], n_init=1, max_iter=50, tol=0, algorithm="lloyd").fit(
        x[:, None].astype(np.float64)
    )
    res = kmeans_1d(x, k=8, iters=50)
    c = np.asarray(res.centroids, np.float64)
    ours = ((x.astype(np.float64) - c[np.asarray(res.labels)]) ** 2).sum()
    assert ours <= km.inertia_ * (1 + 1e-6)
    np.testing.assert_allclose(c, np.sort(km.cluster_centers_[:, 0]), rtol=1e-5, atol=1e-7)
    assert int(res.iterations) == km.n_iter_


@pytest.mark.parametrize("init", ["linear", "density", "random", "kmeans++"])
def test_inertia_never_increases(init):
    x = (np.random.default_rng(2).standard_normal(4000) ** 3).astype(np.float32)
    res = kmeans_1d(x, k=8, init=init, iters=50, key=jax.random.key(0), history=True)
    h = np.asarray(res.history, np.float64)
    assert h.shape == (50,)
    assert np.all(np.diff(h) <= 1e-6 * h[0]), np.diff(h).max()
    assert h[-1] == pytest.approx(float(res.inertia), rel=1e-5)


def test_inits():
    x = np.arange(1, 4001, dtype=np.float32)
    c0 = np.linspace(1, 4000, 8)
    lin = kmeans_1d(x, k=8, init="linear", iters=1)
    np.testing.assert_allclose(np.asarray(lin.centroids), lloyd_reference(x, c0, 1), rtol=1e-6)
    same = kmeans_1d(x, k=8, init=jnp.asarray(c0, jnp.float32), iters=1)
    np.testing.assert_array_equal(same.centroids, lin.centroids)
    # density: the sorted data at CDF levels (j + 0.5) / k, i.e. x[250], x[750], ...
    dens = kmeans_1d(x, k=8, init="density", iters=1)
    np.testing.assert_allclose(np.asarray(dens.centroids), lloyd_reference(x, 251 + 500 * np.arange(8), 1), rtol=1e-6)
    for init in ("random", "kmeans++"):
        a = kmeans_1d(x, k=8, init=init, iters=1, key=jax.random.key(3))
        b = kmeans_1d(x, k=8, init=init, iters=1, key=jax.random.key(3))
        c = kmeans_1d(x, k=8, init=init, iters=1, key=jax.random.key(4))
        np.testing.assert_array_equal(a.centroids, b.centroids)  # determined by the key
        assert not np.array_equal(a.centroids, c.centroids)


def test_valid_mask_and_errors():
    x = np.array([0.0, 1.0, 2.0, 0.0, 10.0, 11.0], np.float32)
    res = kmeans_1d(x, k=2, valid=x != 0)
    np.testing.assert_array_equal(np.asarray(res.labels), [-1, 0, 0, -1, 1, 1])
    np.testing.assert_allclose(np.asarray(res.centroids), [1.5, 10.5])
    with pytest.raises(ValueError, match="exceeds the number of distinct"):
        kmeans_1d(x, k=5, valid=x != 0)
    with pytest.raises(ValueError, match=r"k=0 must be in \[1, inf\]"):
        kmeans_1d(x, k=0)
    with pytest.raises(ValueError, match=r"iters=0 must be in \[1, inf\]"):
        kmeans_1d(x, k=2, iters=0)
    with pytest.raises(ValueError, match="init must be one of"):
        kmeans_1d(x, k=2, init="uniform")
    with pytest.raises(ValueError, match="key"):
        kmeans_1d(x, k=2, init="random")
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(np.array([1.0, np.nan, 2.0], np.float32), k=2)
    with pytest.raises(TypeError, match="floating"):
        kmeans_1d(np.arange(5), k=2)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((40, 30)).astype(np.float32)
    w1[np.abs(w1) < 0.8] = 0.0  # pruned
    w2 = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    return {
        "fc1": {"kernel": jnp.asarray(w1), "bias": jnp.ones(30)},
        "conv": {"kernel": jnp.asarray(w2), "bias": jnp.zeros(8)},
    }


def _check_shared(params, new, aux, k):
    for g, members in aux.indices.items():
        cb = np.asarray(aux.codebooks[g])
        assert cb[0] == 0 and cb.shape == (k + 1,) and np.all(np.diff(cb[1:]) >= 0)
        for name, idx in members.items():
            w_old = np.asarray(tree.get_by_name(params, name))
            w_new = np.asarray(tree.get_by_name(new, name))
            np.testing.assert_array_equal(w_new, cb[np.asarray(idx)])
            np.testing.assert_array_equal(w_new == 0, w_old == 0)  # zeros stay zeros, nothing else becomes 0
            np.testing.assert_array_equal(np.asarray(idx) == 0, w_old == 0)


def test_kmeans_eager_and_jit_dict():
    params = _params()
    new, aux = kmeans(k=7)(params)
    assert isinstance(aux, CodebookAux)
    assert set(aux.codebooks) == {"fc1/kernel", "conv/kernel"}
    _check_shared(params, new, aux, 7)
    assert new["fc1"]["bias"] is params["fc1"]["bias"]
    for name in ("fc1/kernel", "conv/kernel"):
        assert (
            len(np.unique(np.asarray(tree.get_by_name(new, name))[np.asarray(tree.get_by_name(params, name)) != 0]))
            == 7
        )
    for name in ("fc1/kernel", "conv/kernel"):
        w_old, w_new = (np.asarray(tree.get_by_name(p, name), np.float64) for p in (params, new))
        want = np.sum((w_old - w_new) ** 2) / np.sum(w_old**2)
        np.testing.assert_allclose(float(aux.errors[name]), want, rtol=1e-4)
    jnew, jaux = jax.jit(lambda p: kmeans(k=7)(p))(params)
    chex.assert_trees_all_close(jnew, new)
    chex.assert_trees_all_equal(jaux.indices, aux.indices)
    np.testing.assert_array_equal(reconstruct(params, aux)["fc1"]["kernel"], new["fc1"]["kernel"])


def test_kmeans_nnx_state():
    model = models.create("lenet300", input_shape=(8, 8, 1), num_classes=10)
    _, state, _ = nnx.split(model, nnx.Param, ...)
    t = masked(kmeans(k=15), r"fc[12]/kernel")
    new, aux = t(state)
    assert isinstance(new, nnx.State)
    _check_shared(state, new, aux, 15)
    jnew, _ = jax.jit(lambda s: t(s))(state)
    chex.assert_trees_all_close(tree.to_pure_dict(jnew), tree.to_pure_dict(new))
    np.testing.assert_array_equal(np.asarray(new["fc3"]["kernel"][...]), np.asarray(state["fc3"]["kernel"][...]))
    # centroid fine-tuning on the NNX State, eagerly and under jit
    tx = centroid_finetune(optax.adam(1e-2), aux)
    grads = jax.tree.map(lambda w: jnp.sin(jnp.arange(w.size, dtype=jnp.float32)).reshape(w.shape), new)
    for update in (tx.update, jax.jit(tx.update)):
        upd, _ = update(grads, tx.init(new), new)
        stepped = optax.apply_updates(new, upd)
        assert isinstance(stepped, nnx.State)
        aux2 = codebook_aux(stepped, aux)  # raises unless every cluster is still tied
        assert not np.array_equal(aux2.codebooks["fc1/kernel"], aux.codebooks["fc1/kernel"])


def test_shared_codebooks_and_k_per_layer():
    params = _params()
    new, aux = kmeans(k=5, shared=True)(params)
    assert list(aux.codebooks) == ["shared"] and set(aux.indices["shared"]) == {"fc1/kernel", "conv/kernel"}
    _check_shared(params, new, aux, 5)
    values = np.concatenate([np.asarray(new["fc1"]["kernel"]).ravel(), np.asarray(new["conv"]["kernel"]).ravel()])
    assert len(np.unique(values[values != 0])) == 5
    _, aux2 = kmeans(k={"conv": 3, "fc": 6}, shared={r"fc\d": "fc"})(params)
    assert set(aux2.codebooks) == {"fc", "conv/kernel"}
    assert aux2.codebooks["conv/kernel"].shape == (4,) and aux2.codebooks["fc"].shape == (7,)
    with pytest.raises(ValueError, match="different k"):
        kmeans(k={"conv": 3, "fc": 6}, shared=True)(params)
    with pytest.raises(ValueError, match="nothing.*match none of the leaves"):
        masked(kmeans(k=3), "nothing")(params)
    with pytest.raises(ValueError, match=r"shared: the patterns \['nope'\] match none"):
        kmeans(k=3, shared={"nope": "g"})(params)
    with pytest.raises(ValueError, match=r"k: no pattern covers \['fc1/kernel'\]"):
        kmeans(k={"conv": 3})(params)
    bad = {"w": {"kernel": jnp.array([[0.0, 1.0], [1.0, 0.0]])}}
    with pytest.raises(ValueError, match="w/kernel.*k=2 exceeds the number of distinct values.*1"):
        kmeans(k=2)(bad)
    # under jit the values are unknown: surplus centroids repeat, every weight keeps its value
    jnew, jaux = jax.jit(lambda p: kmeans(k=3)(p))(bad)
    np.testing.assert_array_equal(jnew["w"]["kernel"], bad["w"]["kernel"])
    np.testing.assert_array_equal(jaux.codebooks["w/kernel"][jaux.indices["w/kernel"]["w/kernel"]], bad["w"]["kernel"])
    with pytest.raises(ValueError, match="k=0"):
        kmeans(k=0)
    with pytest.raises(TypeError, match="k=2.5"):
        kmeans(k=2.5)
    with pytest.raises(ValueError, match="init"):
        kmeans(k=2, init="forgy")
    with pytest.raises(ValueError, match="key=jax.random.key"):
        kmeans(k=2, init="random")(params)
    with pytest.raises(ValueError, match="fc1/kernel contains NaN"):
        kmeans(k=2)({"fc1": {"kernel": jnp.ones((3, 3)).at[0, 0].set(jnp.nan)}})


def test_k_equal_one_and_random_inits_with_key():
    params = _params()
    new, aux = kmeans(k=np.int32(1))(params)  # one centroid: the mean of the nonzero weights
    _check_shared(params, new, aux, 1)
    w = np.asarray(params["fc1"]["kernel"], np.float64)
    np.testing.assert_allclose(float(aux.codebooks["fc1/kernel"][1]), w[w != 0].mean(), rtol=1e-5)
    jnew, _ = jax.jit(lambda p: kmeans(k=1)(p))(params)
    chex.assert_trees_all_close(jnew, new)
    for init in ("random", "kmeans++"):
        t = kmeans(k=4, init=init)
        a, aux_a = t(params, key=jax.random.key(3))
        b, _ = jax.jit(lambda p, key, t=t: t(p, key=key))(params, jax.random.key(3))
        _check_shared(params, a, aux_a, 4)
        chex.assert_trees_all_close(a, b)


def test_centroid_finetune_hand_computation():
    w = jnp.array([[0.0, 1.0, 1.0], [3.0, 3.0, 0.0]])
    params = {"l": {"kernel": w, "bias": jnp.array([0.5, 0.5, 0.5])}}
    new, aux = kmeans(k=2)(params)
    np.testing.assert_array_equal(np.asarray(aux.codebooks["l/kernel"]), [0.0, 1.0, 3.0])
    grads = {"l": {"kernel": jnp.array([[9.0, 0.1, 0.2], [1.0, -3.0, 7.0]]), "bias": jnp.array([1.0, 2.0, 3.0])}}
    cg = centroid_gradients(grads, aux)["l/kernel"]
    np.testing.assert_allclose(np.asarray(cg), [0.0, 0.3, -2.0], rtol=1e-6)  # zero cluster gets no gradient
    tx = centroid_finetune(optax.sgd(0.5), aux)
    state = tx.init(new)
    for step in [lambda u, s, p: tx.update(u, s, p), jax.jit(tx.update)]:
        upd, s2 = step(grads, state, new)
        out = optax.apply_updates(new, upd)
        np.testing.assert_allclose(np.asarray(s2.centroids["l/kernel"]), [0.0, 1.0 - 0.15, 3.0 + 1.0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out["l"]["kernel"]), [[0.0, 0.85, 0.85], [4.0, 4.0, 0.0]], rtol=1e-6)
        np.testing.assert_array_equal(codebook_aux(out, aux).codebooks["l/kernel"], s2.centroids["l/kernel"])
        np.testing.assert_allclose(np.asarray(out["l"]["bias"]), [0.0, -0.5, -1.0])
    frozen = centroid_finetune(optax.sgd(0.5), aux, train_others=False)
    upd, _ = frozen.update(grads, frozen.init(new), new)
    np.testing.assert_array_equal(np.asarray(upd["l"]["bias"]), 0.0)
    with pytest.raises(ValueError, match="not codebook"):
        tx.init(params | {"l": {"kernel": w + 0.01, "bias": params["l"]["bias"]}})
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)


def test_centroid_finetune_keeps_weights_tied_on_digits():
    ds = data.load("digits")
    model = models.create("mlp", input_shape=ds.input_shape, num_classes=10, widths=(64, 32))
    fn = models.functional(model)
    res = train.fit(fn.apply, fn.params, fn.extra, ds, tx=optax.adam(3e-3), epochs=4, batch_size=64, progress=False)
    # prune half of every kernel by magnitude, then share with 7 centroids + the zero
    pruned = jax.tree.map(
        lambda w: jnp.where(jnp.abs(w) >= jnp.median(jnp.abs(w)), w, 0.0) if w.ndim == 2 else w, res.params
    )
    shared, aux = kmeans(k=7)(pruned)
    acc_shared = train.evaluate(fn.apply, shared, res.extra, ds.x_test, ds.y_test)["accuracy"]
    tx = centroid_finetune(optax.adam(1e-3), aux)
    ft = train.fit(
        fn.apply, jax.tree.map(jnp.copy, shared), res.extra, ds, tx=tx, epochs=3, batch_size=64, progress=False
    )
    aux2 = codebook_aux(ft.params, aux)
    assert isinstance(ft.state.opt_state, CentroidState)
    for g, members in aux2.indices.items():
        cb = np.asarray(aux2.codebooks[g])
        assert cb[0] == 0
        assert not np.array_equal(cb, np.asarray(aux.codebooks[g]))  # the centroids did move
        for name, idx in members.items():
            w = np.asarray(tree.get_by_name(ft.params, name))
            np.testing.assert_array_equal(w, cb[np.asarray(idx)])  # exactly tied
            np.testing.assert_array_equal(w == 0, np.asarray(tree.get_by_name(pruned, name)) == 0)
            assert len(np.unique(w)) <= 8
    acc_ft = train.evaluate(fn.apply, ft.params, res.extra, ds.x_test, ds.y_test)["accuracy"]
    assert acc_ft >= acc_shared - 0.02 and acc_ft > 0.8


def _distributions(n, rng):
    return {
        "normal": rng.standard_normal(n),
        "student_t2": rng.standard_t(2, n),  # heavy tails: outer clusters start empty
        "uniform": rng.uniform(-1, 1, n),
        "int8_ties": rng.integers(-127, 128, n).astype(np.float64),  # 255 distinct values, heavy ties
        "cubed": rng.standard_normal(n) ** 3,
    }


@pytest.mark.parametrize("k", [8, 64])
def test_kmeans_1d_equals_the_numpy_reference_on_several_distributions(k):
    """The host path (concrete CPU input) and the jitted path (traced input) both give the
    numpy reference's iterations, centroids and inertia; the labels are the nearest centroids."""
    from jcompress.bench.b3_kmeans import reference_kmeans_1d

    rng = np.random.default_rng(k)
    traced = jax.jit(lambda v, c: kmeans_1d(v, k=k, init=c, iters=60))
    for name, x in _distributions(20_000, rng).items():
        x = x.astype(np.float32)
        init = np.linspace(x.min(), x.max(), k, dtype=np.float32)
        c_ref, labels_ref, inertia_ref, it_ref = reference_kmeans_1d(x, init, 60)
        for path, res in (("host", kmeans_1d(x, k=k, init=init, iters=60)), ("jit", traced(x, init))):
            where = f"{name}, {path}"
            assert int(res.iterations) == it_ref, where
            np.testing.assert_allclose(np.asarray(res.centroids), c_ref, rtol=1e-5, atol=1e-6, err_msg=where)
            assert float(res.inertia) == pytest.approx(inertia_ref, rel=1e-5), where
            c = np.asarray(res.centroids, np.float64)
            d = np.abs(x[:, None].astype(np.float64) - c[None])
            got = d[np.arange(x.size), np.asarray(res.labels)]
            assert np.all(got <= d.min(axis=1) + 1e-6 * np.abs(c).max()), where
        np.testing.assert_array_equal(np.asarray(kmeans_1d(x, k=k, init=init, iters=60).labels), labels_ref)


def test_kmeans_1d_host_path_with_valid_mask_equals_reference_on_the_valid_values():
    """Half the weights exactly zero (a pruned layer): only the others are clustered."""
    from jcompress.bench.b3_kmeans import reference_kmeans_1d

    rng = np.random.default_rng(5)
    x = np.where(rng.random(10_000) < 0.5, 0.0, rng.standard_normal(10_000)).astype(np.float32)
    nz = x[x != 0]
    init = np.linspace(nz.min(), nz.max(), 15, dtype=np.float32)
    res = kmeans_1d(x, k=15, init=init, iters=100, valid=x != 0)
    c_ref, labels_ref, inertia_ref, it_ref = reference_kmeans_1d(nz, init, 100)
    assert int(res.iterations) == it_ref
    np.testing.assert_allclose(np.asarray(res.centroids), c_ref, rtol=1e-6)
    labels = np.asarray(res.labels)
    assert np.all(labels[x == 0] == -1)
    np.testing.assert_array_equal(labels[x != 0], labels_ref)
    assert float(res.inertia) == pytest.approx(inertia_ref, rel=1e-5)
