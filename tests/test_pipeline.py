"""The fine-tune stage of a chain (jcompress.pipeline.finetune) and the Deep Compression recipe."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress import compressed, data, export, models, pipeline, train, tree
from jcompress.core.base import ChainAux, CodebookAux, MaskAux, Transform, chain
from jcompress.sharing import kmeans


def _params():
    rng = np.random.default_rng(0)
    return {
        "fc1": {"kernel": jnp.asarray(rng.standard_normal((30, 20)), jnp.float32), "bias": jnp.zeros(20)},
        "fc2": {"kernel": jnp.asarray(rng.standard_normal((20, 5)), jnp.float32), "bias": jnp.zeros(5)},
    }


def _prune(fraction):
    """Zero the ``fraction`` of each kernel with the smallest |w| (a MaskAux transform)."""

    def apply(params, names, key):
        def mask(name, w):
            if name not in names:
                return jnp.ones(w.shape, bool)
            return jnp.abs(w) > jnp.quantile(jnp.abs(w), fraction)

        masks = tree.map_with_names(mask, params)
        return jax.tree.map(lambda w, m: jnp.where(m, w, 0), params, masks), MaskAux(masks)

    return Transform(apply, "prune")


def test_chain_threads_params_and_collects_aux():
    params = _params()
    seen = []
    out, auxes = chain(_prune(0.5), kmeans(k=3))(params, callback=lambda name, p, a: seen.append((name, len(a))))
    assert isinstance(auxes, ChainAux) and isinstance(auxes[0], MaskAux) and isinstance(auxes[1], CodebookAux)
    assert seen == [("prune", 1), ("kmeans", 2)]
    # same as applying the transforms by hand
    p1, _ = _prune(0.5)(params)
    p2, _ = kmeans(k=3)(p1)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out, p2)
    assert int(np.count_nonzero(np.asarray(out["fc1"]["kernel"]))) == 300


def _grad_train_fn(steps=5):
    """A tiny training function: SGD on a quadratic pulling every weight towards 1."""

    def train_fn(params, wrap):
        tx = wrap(optax.sgd(0.005))  # small: a centroid gets the summed gradient of its cluster
        state = tx.init(params)
        for _ in range(steps):
            grads = jax.tree.map(lambda w: w - 1.0, params)
            upd, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, upd)
        return params

    return train_fn


def test_finetune_keeps_masks_then_trains_centroids():
    params = _params()
    pipe = chain(
        _prune(0.7),
        pipeline.finetune(_grad_train_fn(), name="ft masks"),
        kmeans(k=4),
        pipeline.finetune(_grad_train_fn(), name="ft centroids"),
    )
    out, (paux, faux, saux, saux2) = pipe(params)
    assert pipe.names == ("prune", "ft masks", "kmeans", "ft centroids")
    assert isinstance(faux, MaskAux) and faux.masks is paux.masks
    assert isinstance(saux2, CodebookAux) and saux2.indices is saux.indices
    for name in ("fc1/kernel", "fc2/kernel"):
        mask = np.asarray(tree.get_by_name(paux.masks, name))
        w = np.asarray(tree.get_by_name(out, name))
        np.testing.assert_array_equal(w != 0, mask)  # zeros stayed zero through both fine-tunings
        cb_old = np.asarray(saux.codebooks[name])
        cb_new = np.asarray(saux2.codebooks[name])
        idx = np.asarray(saux2.indices[name][name])
        np.testing.assert_array_equal(w, cb_new[idx])  # tied to the new codebook
        assert cb_new[0] == 0 and np.all(np.abs(cb_new[1:] - 1) < np.abs(cb_old[1:] - 1))  # centroids moved towards 1
    # biases have no mask and are trained freely
    assert float(out["fc1"]["bias"][0]) > 0


def test_finetune_refuses_a_train_fn_that_ignores_wrap():
    def bad(params, wrap):
        return jax.tree.map(lambda w: w + 0.01 * jnp.arange(w.size).reshape(w.shape), params)

    pipe = chain(kmeans(k=3), pipeline.finetune(bad))
    with pytest.raises(ValueError, match="no longer tied.*wrap"):
        pipe(_params())


def test_finetune_alone_and_after_a_nested_chain():
    params = _params()
    out, aux = pipeline.finetune(_grad_train_fn())(params)  # nothing before it: trains freely
    assert aux is None and float(out["fc1"]["kernel"][0, 0]) != float(params["fc1"]["kernel"][0, 0])
    # the stages before it may be a chain themselves: their auxes are looked into
    out, auxes = chain(chain(_prune(0.5)), pipeline.finetune(_grad_train_fn()))(params)
    mask = np.asarray(auxes[0][0].masks["fc1"]["kernel"])
    np.testing.assert_array_equal(np.asarray(out["fc1"]["kernel"]) != 0, mask)
    with pytest.raises(TypeError, match="train_fn"):
        pipeline.finetune(3)


def test_deep_compression_on_digits(tmp_path):
    ds = data.load("digits")
    model = models.create("mlp", input_shape=ds.input_shape, num_classes=10, widths=(64, 32))
    fn = models.functional(model)
    res = train.fit(fn.apply, fn.params, fn.extra, ds, tx=optax.adam(3e-3), epochs=5, batch_size=64, progress=False)

    def train_fn(params, wrap):
        return train.fit(
            fn.apply, params, res.extra, ds, tx=wrap(optax.adam(1e-3)), epochs=1, batch_size=64, progress=False
        ).params

    def eval_fn(params):
        return train.evaluate(fn.apply, params, res.extra, ds.x_test, ds.y_test)

    run = pipeline.deep_compression(
        sparsity=0.75,
        bits={"kernel": 4},
        index_bits={"fc": 4},
        finetune_fn=train_fn,
        eval_fn=eval_fn,
        out_dir=tmp_path,
        meta={"model": "mlp"},
    )
    out = run(res.params)
    stages = [r["stage"] for r in out.rows]
    assert stages == [
        "dense (float32)",
        "pruned",
        "pruned + fine-tuned",
        "clustered (fixed-width)",
        "centroids fine-tuned (fixed-width)",
        "huffman (file read back)",
    ]
    files = {
        "dense (float32)": "dense.jcz",
        "pruned": "pruned.jcz",
        "pruned + fine-tuned": "pruned_fine-tuned.jcz",
        "clustered (fixed-width)": "clustered.jcz",
        "centroids fine-tuned (fixed-width)": "centroids_fine-tuned.jcz",
        "huffman (file read back)": "deep_compression.jcz",
    }
    n_params = tree.tree_size(res.params)
    for r in out.rows:
        assert r["bytes"] == os.path.getsize(tmp_path / files[r["stage"]])  # real file sizes
        assert r["bits_per_weight"] == pytest.approx(8 * r["bytes"] / n_params, abs=1e-3)
        assert 0.0 <= r["accuracy"] <= 1.0 and "loss" in r
    kept = sum(n - round(0.75 * n) for n in (64 * 64, 64 * 32, 32 * 10))  # exact per-layer counts
    biases = sum(int(np.count_nonzero(np.asarray(res.params[f"fc{i}"]["bias"]))) for i in (1, 2, 3))
    assert out.rows[1]["nonzeros"] == kept + biases
    sizes = [r["bytes"] for r in out.rows]
    assert sizes[0] > sizes[1] > sizes[3]  # pruning and sharing really shrink the file
    # Huffman coding shrinks the payloads (on a model this small the header can eat the gain)
    fixed = compressed.compress(out.params, out.auxes, index_bits=4, huffman=False)
    assert compressed.total_bits(out.compressed) < compressed.total_bits(fixed)
    assert out.rows[-1]["accuracy"] > 0.8
    assert out.rows[-1]["accuracy"] >= out.rows[1]["accuracy"] - 0.05
    # the final file holds exactly the final params, with 15 centroids + the zero per layer
    loaded = export.load_params(out.path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, out.params)
    _, meta = export.read(out.path)
    assert meta["model"] == "mlp" and meta["bits"] == {"kernel": 4}
    for name in ("fc1/kernel", "fc2/kernel", "fc3/kernel"):
        assert len(np.unique(np.asarray(tree.get_by_name(loaded, name)))) <= 16
    conv_and_fc = {"c": {"kernel": jnp.ones((3, 3, 2, 2))}, "fc": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match=r"bits=17 must be in \[1, 16\] \(leaf 'c/kernel'\)"):
        pipeline.deep_compression(sparsity=0.5, bits={"c/": 17})(conv_and_fc)
    with pytest.raises(ValueError, match=r"index_bits: the patterns \['conv'\] match none"):
        pipeline.deep_compression(sparsity=0.5, index_bits={"conv": 4})(conv_and_fc)
    with pytest.raises(ValueError, match=r"leaves: the patterns \['head'\] match none"):
        pipeline.deep_compression(sparsity=0.5, leaves="head")(conv_and_fc)


def test_deep_compression_defaults_to_the_paper_widths_and_takes_one_bit(tmp_path):
    rng = np.random.default_rng(1)
    params = {
        "conv": {"kernel": jnp.asarray(rng.standard_normal((5, 5, 16, 8)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.standard_normal((72, 10)), jnp.float32), "bias": jnp.zeros(10)},
    }
    out = pipeline.deep_compression(sparsity=0.5, out_dir=tmp_path)(params)
    leaves = dict(tree.named_leaves(out.compressed, is_leaf=compressed.is_compressed))
    assert leaves["conv/kernel"].index_bits == 8 and leaves["fc/kernel"].index_bits == 5
    assert leaves["conv/kernel"].k == 255 and leaves["fc/kernel"].k == 31
    _, meta = export.read(out.path)
    assert meta["bits"] == {"conv": 8, "fc": 5} and meta["index_bits"] == {"conv": 8, "fc": 5}
    # bits=1: one centroid per layer (k = 1) plus the zero
    out = pipeline.deep_compression(sparsity=0.5, bits=1, leaves="fc/kernel", out_dir=tmp_path)(params)
    w = np.asarray(out.params["fc"]["kernel"])
    assert len(np.unique(w)) == 2 and np.count_nonzero(w) == 360
    np.testing.assert_array_equal(out.params["conv"]["kernel"], params["conv"]["kernel"])
