"""Property-based fuzz of the transforms that need a model or data (the rest: test_fuzz.py).

Random MLPs (one or two hidden layers of 1 to 6 units) and random hyperparameters inside
and outside their ranges go to the model transforms (hard pruning, factorisation, packing,
activation PTQ) and to the pruning transforms that read data or masks (SNIP, a lottery
round). Each call raises ValueError or TypeError naming the argument or the layer, or
returns a result with the transform's invariant: the same function as the reference
(masked model, truncated kernels, dequantized kernels), exact counts, finite ranges. A
value outside the argument's range must raise. Budgets are fixed (``derandomize=True``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jcompress as jc
from jcompress import lowrank, models
from jcompress.nnx import factorize, packed, surgery
from jcompress.pruning import lottery

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None, max_examples=6)
X = jax.random.normal(jax.random.key(0), (5, 4))
WIDTHS = st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple)


def mostly(arg, good, bad):
    """A valid value about three times in four; ``(value, valid)``.

    Which list the value came from is a hypothesis event (``'bits: invalid value'``), counted
    in TESTING.md. The invalid branch comes first: hypothesis favours early branches.
    """

    def tagged(ok):
        label = f"{arg}: {'valid' if ok else 'invalid'} value"
        return (good if ok else bad).map(lambda v: (event(label), (v, ok))[1])

    return st.sampled_from([False, True, True, True]).flatmap(tagged)


def _mlp(widths):
    return models.create("mlp", input_shape=(4,), num_classes=3, widths=widths, seed=len(widths))


def _forward(model, x=X):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)


def _names(error: Exception, *words: str) -> None:
    event("refused")
    assert any(w in str(error) for w in words), f"{error!r} names none of {words}"


def _hidden(widths):
    """A selection of the hidden layers' kernels (the output layer cannot lose units)."""
    return [(f"fc{len(widths) + 1}/", False), ("kernel", True)]


@FUZZ
@given(
    widths=WIDTHS,
    sparsity=mostly("sparsity", st.sampled_from([0.0, 0.3, 0.5, 0.8, 0.99]), st.sampled_from([-0.2, 1.5, math.nan, math.inf])),
    allow_empty=st.booleans(),
)
def test_hard_prune_gives_the_masked_model_or_a_named_error(widths, sparsity, allow_empty):
    """jc.nnx.surgery.hard_prune (after jc.pruning.magnitude with Units()): the smaller model computes the masked model, or a named error."""
    (s, valid), model = sparsity, _mlp(widths)
    params = nnx.state(model, nnx.Param)
    try:
        prune = jc.pruning.magnitude(sparsity=s, pattern=jc.Units(), allow_empty=allow_empty)
        _, aux = jc.masked(prune, _hidden(widths))(params)
        small, units = surgery.hard_prune(aux.masks, input_shape=(4,), allow_empty=allow_empty)(model)
    except (ValueError, TypeError) as e:
        _names(e, "sparsity", "fc", "allow_empty")
        return
    assert valid, f"sparsity={s} was accepted"
    event("accepted")
    masked = nnx.clone(model)
    nnx.update(masked, jax.tree.map(lambda w, m: jnp.where(m, w, 0), params, aux.masks))
    np.testing.assert_allclose(_forward(small), _forward(masked), rtol=1e-5, atol=1e-5)
    for i, w in enumerate(widths, start=1):
        kept = int(np.asarray(aux.masks[f"fc{i}"]["kernel"]).any(axis=0).sum())
        assert small.__getattribute__(f"fc{i}").kernel.get_value().shape[1] == kept
        assert len(units.kept.get(f"fc{i}", range(w))) == kept


@FUZZ
@given(widths=WIDTHS, rank=mostly("rank", st.integers(1, 3), st.sampled_from([0, -1, 10**6, 1.5, math.nan, "2"])))
def test_factorize_gives_the_truncated_model_or_a_named_error(widths, rank):
    """jc.nnx.factorize.factorize: the factorised model computes the rank-truncated one, or a named error."""
    (r, valid), model = rank, _mlp(widths)
    smallest = min(min(k.shape) for k in jax.tree.leaves(nnx.state(model, nnx.Param)) if k.ndim == 2)
    try:
        small, aux = factorize.factorize(rank=r)(model)
    except (ValueError, TypeError) as e:
        _names(e, "rank")
        assert not valid or r > smallest  # a valid rank is refused only where a layer is thinner
        return
    assert valid and r <= smallest
    event("accepted")
    truncated, _ = lowrank.svd(rank=r)(nnx.state(model, nnx.Param))
    reference = nnx.clone(model)
    nnx.update(reference, truncated)
    np.testing.assert_allclose(_forward(small), _forward(reference), rtol=1e-4, atol=1e-4)
    assert set(aux.ranks.values()) == {r}


@FUZZ
@given(
    widths=WIDTHS,
    bits=mostly("bits", st.integers(2, 8), st.sampled_from([0, 9, 16, 17, 2.5])),
    symmetric=st.booleans(),
)
def test_pack_gives_the_dequantized_model_or_a_named_error(widths, bits, symmetric):
    """jc.nnx.packed.pack (after jc.quant.quantize): the packed model computes the dequantized one, or a named error."""
    (b, valid), model = bits, _mlp(widths)
    params = nnx.state(model, nnx.Param)
    try:
        q_params, aux = jc.quant.quantize(bits=b, symmetric=symmetric)(params)
        small, _ = packed.pack(aux)(model)
    except (ValueError, TypeError) as e:
        _names(e, "bits")
        return
    assert valid, f"bits={b} was packed"
    event("accepted")
    reference = nnx.clone(model)
    nnx.update(reference, q_params)
    np.testing.assert_allclose(_forward(small), _forward(reference), rtol=1e-5, atol=1e-5)
    assert packed.device_bytes(small)["params"] < packed.device_bytes(model)["params"]


@FUZZ
@given(widths=WIDTHS, bits=mostly("bits", st.integers(2, 16), st.sampled_from([0, 17, -3, 2.5, math.nan])))
def test_activation_ptq_gives_finite_ranges_or_a_named_error(widths, bits):
    """jc.quant.activations: finite calibrated ranges for every layer, or a named error."""
    (b, valid), model = bits, _mlp(widths)
    try:
        quantized, aux = jc.quant.activations(X, bits=b)(model)
    except (ValueError, TypeError) as e:
        _names(e, "bits")
        return
    assert valid
    event("accepted")
    assert set(aux.ranges) == {f"fc{i}" for i in range(1, len(widths) + 2)}
    for lo, hi in aux.ranges.values():
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi
    out, ref = _forward(quantized), _forward(model)
    assert out.shape == ref.shape and np.all(np.isfinite(out))
    if b >= 12:  # fine grids change the function by little
        np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05)


@FUZZ
@given(widths=WIDTHS, sparsity=mostly("sparsity", st.sampled_from([0.0, 0.25, 0.5]), st.sampled_from([1.2, -0.5, math.inf])))
def test_snip_prunes_exact_counts_or_names_the_error(widths, sparsity):
    """jc.pruning.snip: exact pruned counts per layer from a loss and a batch, or a named error."""
    (s, valid), model = sparsity, _mlp(widths)
    fn = models.functional(model)
    y = jnp.arange(5) % 3

    def loss_fn(p, batch):
        logits, _ = fn.apply(p, fn.extra, batch[0])
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(5), batch[1]])

    try:
        pruned, aux = jc.pruning.snip(loss_fn, (X, y), sparsity=s)(fn.params)
    except (ValueError, TypeError) as e:
        _names(e, "sparsity", "fc")
        return
    assert valid
    event("accepted")
    masks = dict(jc.named_leaves(aux.masks))
    for name, w in jc.named_leaves(pruned):
        if name.endswith("kernel"):
            kept = int(np.asarray(masks[name]).sum())
            assert kept == w.size - math.floor(s * w.size + 0.5)
            assert not np.any(np.asarray(w)[~np.asarray(masks[name])])  # removed weights are exactly 0


@FUZZ
@given(widths=WIDTHS, rate=mostly("rate", st.sampled_from([0.0, 0.2, 0.5]), st.sampled_from([1.0, -0.1, math.nan, "0.2"])))
def test_lottery_round_prunes_a_fraction_of_the_survivors(widths, rate):
    """jc.pruning.lottery.prune_round: a fraction of the survivors pruned, pruned weights stay pruned, or a named error."""
    (r, valid), model = rate, _mlp(widths)
    params = models.functional(model).params
    first = jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)
    try:
        pruned, aux = lottery.prune_round(first, rate=r)(params)
    except (ValueError, TypeError) as e:
        _names(e, "rate")
        return
    assert valid
    event("accepted")
    masks = dict(jc.named_leaves(aux.masks))
    for name, w in jc.named_leaves(params):
        if name.endswith("kernel"):
            assert int(masks[name].sum()) == w.size - math.floor(r * w.size + 0.5)
    _, again = lottery.prune_round(aux.masks, rate=r)(pruned)
    for name, m in jc.named_leaves(again.masks):
        assert not np.any(np.asarray(m) & ~np.asarray(masks[name]))  # pruned weights stay pruned


def test_the_fuzz_reaches_both_outcomes():
    """The strategies above draw valid and invalid values (a fuzz that only ever refuses proves little)."""
    drawn = []

    @settings(deadline=None, derandomize=True, database=None, max_examples=6)
    @given(v=mostly("v", st.integers(1, 3), st.sampled_from([0, -1])))
    def collect(v):
        drawn.append(v[1])

    collect()
    assert True in drawn and False in drawn
