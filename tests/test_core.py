"""The protocol every technique is built on: specs, masked, chain, patterns, the error measure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jcompress as jc
from jcompress import models
from jcompress.core import base, spec
from jcompress.core.patterns import NM, Block, Units

NAMES = ["fc1/kernel", "fc2/kernel", "fc3/kernel"]


def params3():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        f"fc{i + 1}": {"kernel": jax.random.normal(k[i], (8, 8)), "bias": jnp.zeros(8)} for i in range(3)
    }


def test_resolve_plain_mapping_and_pairs_first_match_wins():
    assert spec.resolve(0.5, NAMES, arg="s") == dict.fromkeys(NAMES, 0.5)
    assert spec.resolve({"fc3": 0.1, "fc": 0.9}, NAMES, arg="s") == {
        "fc1/kernel": 0.9, "fc2/kernel": 0.9, "fc3/kernel": 0.1,
    }  # fmt: skip
    # order matters: the catch-all first shadows the later pattern, which is then unused: an error
    with pytest.raises(ValueError, match=r"the patterns \['fc3'\] match none"):
        spec.resolve([(".*", 0.9), ("fc3", 0.1)], NAMES, arg="s")
    assert spec.resolve([("fc2", 4)], NAMES, arg="bits", default=8) == {"fc1/kernel": 8, "fc2/kernel": 4, "fc3/kernel": 8}


def test_resolve_names_uncovered_leaves_and_unused_patterns():
    with pytest.raises(ValueError) as e:
        spec.resolve({"fc1": 1, "conv": 2}, NAMES, arg="k")
    msg = str(e.value)
    assert msg.startswith("k: ") and "fc2/kernel" in msg and "fc3/kernel" in msg and "['conv']" in msg
    with pytest.raises(ValueError, match="does not compile"):
        spec.resolve({"fc1[": 1}, NAMES, arg="k")
    with pytest.raises(TypeError, match="regexes"):
        spec.resolve({1: 2}, NAMES, arg="k")


def test_check_value_accepts_numpy_and_jax_scalars_and_names_the_argument():
    assert spec.check_value(np.float32(0.5), arg="sparsity", kind=float, lo=0, hi=1) == 0.5
    assert spec.check_value(jnp.int32(3), arg="k", kind=int, lo=1) == 3
    with pytest.raises(ValueError, match="sparsity=nan must be finite"):
        spec.check_value(float("nan"), arg="sparsity", kind=float)
    with pytest.raises(ValueError, match=r"k=0 must be in \[1, inf\]"):
        spec.check_value(0, arg="k", kind=int, lo=1)
    with pytest.raises(TypeError, match="k=True must be a number"):
        spec.check_value(True, arg="k", kind=int)


def test_masked_restricts_any_transform_and_intersects_when_nested():
    p = params3()
    t = jc.pruning.magnitude(sparsity=0.5)
    new, aux = jc.masked(t, [("fc3", False), ("kernel", True)])(p)
    assert int(jnp.sum(new["fc1"]["kernel"] == 0)) == 32 and int(jnp.sum(new["fc2"]["kernel"] == 0)) == 32
    np.testing.assert_array_equal(new["fc3"]["kernel"], p["fc3"]["kernel"])
    assert bool(jnp.all(aux.masks["fc3"]["kernel"]))  # untouched leaves: all True, params-shaped
    assert jax.tree.structure(aux.masks) == jax.tree.structure(p)
    inner = jc.masked(t, ["fc1", "fc2"])
    assert jc.masked(inner, "fc2|fc3").leaves(p) == ["fc2/bias", "fc2/kernel"]
    # a bias is a leaf like any other once selected
    new_b, _ = jc.masked(t, "fc1/bias")(jax.tree.map(lambda x: x + 1.0, p))
    assert int(jnp.sum(new_b["fc1"]["bias"] == 0)) == 4
    with pytest.raises(TypeError, match="masked needs a transform"):
        jc.masked(lambda params, *, key=None: (params, None), "fc1")


def test_chain_reports_every_stage_under_jit_and_splits_the_key():
    p = params3()
    t = jc.chain(jc.pruning.random(sparsity=0.25), jc.pruning.magnitude(sparsity=0.5))
    out1, aux1 = jax.jit(t)(p, key=jax.random.key(1))
    out2, aux2 = t(p, key=jax.random.key(1))
    assert aux1.names == ("random", "magnitude") and isinstance(aux1, base.ChainAux) and len(aux1) == 2
    jax.tree.map(np.testing.assert_array_equal, out1, out2)
    assert [type(a) for a in base.all_auxes(aux1)] == [base.MaskAux, base.MaskAux]
    out3, _ = t(p, key=jax.random.key(2))
    assert not np.array_equal(out1["fc1"]["kernel"] == 0, out3["fc1"]["kernel"] == 0)
    with pytest.raises(ValueError, match="pass key="):
        t(p)
    seen = []
    t(p, key=jax.random.key(1), callback=lambda name, x, aux: seen.append((name, len(aux))))
    assert seen == [("random", 1), ("magnitude", 2)]


def test_chain_on_a_model_mixes_params_and_model_transforms():
    model = models.create("mlp", input_shape=(16,), num_classes=4, widths=[12])
    t = jc.chain(
        jc.masked(jc.pruning.magnitude(sparsity=0.5, pattern=Units()), r"fc1/kernel"),
        jc.nnx.surgery.hard_prune(input_shape=(16,)),
    )
    small, aux = t(model)
    assert isinstance(small, nnx.Module) and isinstance(aux[1], base.UnitsAux)
    assert nnx.state(small, nnx.Param)["fc1"]["kernel"][...].shape == (16, 6)
    assert nnx.state(model, nnx.Param)["fc1"]["kernel"][...].shape == (16, 12)  # input untouched
    with pytest.raises(TypeError, match="call the chain on the NNX model"):
        t(nnx.state(model, nnx.Param))


def test_relative_error_is_the_output_error_with_h_and_the_weight_error_without():
    w = jax.random.normal(jax.random.key(0), (6, 3))
    x = jax.random.normal(jax.random.key(1), (50, 6))
    new = w.at[0].set(0.0)
    want = float(jnp.sum((x @ w - x @ new) ** 2) / jnp.sum((x @ w) ** 2))
    assert float(base.relative_error(w, new, x.T @ x)) == pytest.approx(want, rel=1e-5)
    assert float(base.relative_error(w, new)) == pytest.approx(float(jnp.sum(w[0] ** 2) / jnp.sum(w**2)), rel=1e-6)
    assert float(base.relative_error(jnp.zeros((2, 2)), jnp.zeros((2, 2)))) == 0.0


def test_patterns_are_validated_values():
    assert NM(2, 4).sparsity == 0.5 and NM(np.int64(1), 4).n == 1
    for bad in [(0, 4), (4, 4), (2, 1)]:
        with pytest.raises(ValueError, match=r"NM[.(]"):
            NM(*bad)
    with pytest.raises(ValueError, match="Block.cols=0"):
        Block(1, 0)
    with pytest.raises(ValueError, match="Units.norm"):
        Units(norm="l3")
    with pytest.raises(TypeError, match="pattern value"):
        jc.pruning.magnitude(sparsity=0.5, pattern="nm")(params3())
