"""Training with sparsity: mask-keeping optax, L1/L2, schedules, Zhu-Gupta, soft filter
pruning, RigL/SET, lottery tickets and iterative pruning with undo."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jcompress import data, models, train
from jcompress import tree as jtree
from jcompress.core import topk
from jcompress.core.patterns import Units
from jcompress.core.spec import selection_tree
from jcompress.pruning import dynamic, iterative, lottery, optim, schedules, scores
from jcompress.pruning import masks as masks_lib


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _model(widths=(32, 16), seed=0):
    return models.create("mlp", input_shape=(8, 8, 1), num_classes=10, widths=list(widths), seed=seed)


def _params(kind: str, widths=(32, 16), seed=0):
    """Params of a small MLP as a pure dict or as an NNX State."""
    model = _model(widths, seed)
    if kind == "dict":
        return models.functional(model).params
    _, state, _ = nnx.split(model, nnx.Param, ...)
    return state


def _noise(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def _stepper(tx, jit: bool):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step) if jit else step


def _flat(tree):
    return {n: np.asarray(x) for n, x in jtree.named_leaves(tree)}


# ----------------------------------------------------------------------------- keep_masked


def test_keep_masked_keeps_zeros_through_adamw_training_on_digits(digits):
    fn = models.functional(_model((64, 32)))
    masks = masks_lib.make_masks(scores.magnitude_scores(fn.params), sparsity=0.8, scope="global")
    params = masks_lib.apply_masks(fn.params, masks)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=1e-2), optim.keep_masked(masks))
    state = train.init_state(params, fn.extra, tx)
    step = jax.jit(functools.partial(train.train_step, apply_fn=fn.apply, tx=tx))
    losses, n = [], 0
    for epoch in range(4):
        for xb, yb in data.batches(digits.x_train, digits.y_train, batch_size=64, seed=0, epoch=epoch):
            state, m = step(state, (xb, yb))
            losses.append(float(m["loss"]))
            n += 1
    assert n >= 50
    before, after, mk = _flat(params), _flat(state.params), _flat(masks)
    for name in mk:
        assert np.all(after[name][~mk[name]] == 0.0), name  # exactly zero, not just small
        if mk[name].size > 100:
            kept = mk[name]
            assert np.mean(after[name][kept] != before[name][kept]) > 0.9, name  # the rest trained
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    acc = train.evaluate(fn.apply, state.params, state.extra, digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.8


@pytest.mark.parametrize("kind", ["dict", "state"])
@pytest.mark.parametrize("jit", [False, True])
def test_keep_masked_zeroes_updates_exactly(kind, jit):
    params = _params(kind)
    masks = masks_lib.make_masks(scores.random_scores(params, key=jax.random.key(0)), sparsity=0.5)
    tx = optim.keep_masked(jtree.to_pure_dict(masks))  # a pure dict is accepted for a State
    state = tx.init(params)
    grads = _noise(params, 1)
    update = jax.jit(tx.update) if jit else tx.update
    out, state2 = update(grads, state, params)
    assert type(out) is type(params)
    want = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, masks)
    chex.assert_trees_all_equal(out, want)
    chex.assert_trees_all_equal(optim.find_masks(state2), masks)


def test_keep_masked_rejects_bad_masks():
    params = _params("dict")
    bad = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), jnp.float32), params)
    with pytest.raises(ValueError, match="fc1/bias.*bool"):
        optim.keep_masked(bad).init(params)
    wrong = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
    wrong["fc1"]["kernel"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match="fc1/kernel.*shape"):
        optim.keep_masked(wrong).init(params)
    with pytest.raises(ValueError, match="structure"):
        optim.keep_masked({"fc1": {"kernel": jnp.ones((64, 32), bool)}}).init(params)
    with pytest.raises(ValueError, match="no masks"):
        optim.find_masks(optax.adam(1e-3).init(params))


# ----------------------------------------------------------------------------- L1 / L2


@pytest.mark.parametrize("kind", ["dict", "state"])
@pytest.mark.parametrize("jit", [False, True])
def test_l1_l2_add_the_penalty_gradient_to_selected_leaves(kind, jit):
    params = _noise(_params(kind), 2)
    params = jtree.map_with_names(lambda n, x: x.at[0].set(0.0) if n == "fc1/kernel" else x, params)
    grads = _noise(params, 3)
    cases = (
        (optim.l1(0.3), lambda w: 0.3 * np.sign(w), {"fc1/kernel", "fc2/kernel", "fc3/kernel"}),
        (optax.masked(optim.l2(0.3), selection_tree(r"fc1/")), lambda w: 0.3 * w, {"fc1/kernel"}),
        (
            optax.masked(optim.l2(0.3), selection_tree(r"fc[23]/kernel")),
            lambda w: 0.3 * w,
            {"fc2/kernel", "fc3/kernel"},
        ),
    )
    for tx, penalty_grad, picked in cases:
        update = jax.jit(tx.update) if jit else tx.update
        out, _ = update(grads, tx.init(params), params)
        assert type(out) is type(params)
        got, g, w = _flat(out), _flat(grads), _flat(params)
        for name in got:
            want = g[name] + penalty_grad(w[name]) if name in picked else g[name]
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
    # the subgradient of |w| at 0 is taken as 0: a pruned weight gets no push
    out, _ = optim.l1(0.3).update(jax.tree.map(jnp.zeros_like, grads), optax.EmptyState(), params)
    assert np.all(_flat(out)["fc1/kernel"][0] == 0.0)


def test_regularisers_reject_bad_input():
    with pytest.raises(ValueError, match="strength"):
        optim.l1(-1.0)
    params = _params("dict")
    with pytest.raises(ValueError, match="params"):
        optim.l2(0.1).update(params, optax.EmptyState())
    with pytest.raises(ValueError, match="match none of the leaves"):
        optax.masked(optim.l2(0.1), selection_tree("nothing_here")).init(params)


# ----------------------------------------------------------------------------- schedules


def test_cubic_schedule_exact_values():
    s = schedules.cubic(final_sparsity=0.9, initial_sparsity=0.1, begin_step=100, end_step=1100, frequency=100)
    for t in range(0, 1500, 7):
        if t < 100:
            want = 0.0
        else:
            last = 100 + (min(t, 1100) - 100) // 100 * 100
            want = 0.9 + (0.1 - 0.9) * (1 - (last - 100) / 1000) ** 3
        assert float(s(t)) == pytest.approx(want, abs=1e-6), t
    # hand values: half way, s = 0.9 - 0.8 / 8 = 0.8
    assert float(s(600)) == pytest.approx(0.8, abs=1e-7)
    assert float(s(699)) == float(s(600))  # staircase between pruning steps
    assert float(s(5000)) == pytest.approx(0.9)
    assert isinstance(s(600), float)  # concrete steps: float64, the values gradual_pruning counts with
    assert float(jax.jit(s)(jnp.int32(600))) == pytest.approx(s(600), abs=1e-6)  # traced: float32
    np.testing.assert_allclose(jax.vmap(s)(jnp.arange(0, 1500, 7)), [s(t) for t in range(0, 1500, 7)], atol=1e-6)


def test_other_schedules():
    lin = schedules.linear(final_sparsity=0.5, begin_step=10, end_step=20, frequency=5)
    assert [round(float(lin(t)), 6) for t in (0, 9, 10, 14, 15, 20, 99)] == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.5]
    assert schedules.constant(0.3)(0) == 0.3
    assert float(jax.jit(schedules.constant(0.3))(jnp.int32(5))) == pytest.approx(0.3)
    assert float(jax.jit(schedules.one_shot(0.7, step=50))(jnp.int32(49))) == 0.0
    assert float(schedules.constant(0.3)(10**6)) == pytest.approx(0.3)
    one = schedules.one_shot(0.7, step=50)
    assert float(one(49)) == 0.0 and float(one(50)) == pytest.approx(0.7)
    assert schedules.pruning_steps(begin_step=2, end_step=10, frequency=4) == [2, 6, 10]
    with pytest.raises(ValueError, match="multiple of frequency"):
        schedules.cubic(final_sparsity=0.5, begin_step=0, end_step=10, frequency=3)
    with pytest.raises(ValueError, match="final_sparsity"):
        schedules.cubic(final_sparsity=1.0, begin_step=0, end_step=10)
    with pytest.raises(ValueError, match="frequency"):
        schedules.cubic(final_sparsity=0.5, begin_step=0, end_step=10, frequency=0)


# ----------------------------------------------------------------------------- Zhu-Gupta


GP = {"final_sparsity": 0.85, "initial_sparsity": 0.05, "begin_step": 3, "end_step": 15, "frequency": 4}


def _run_gradual(params, steps, jit):
    tx = optax.chain(optax.adamw(1e-2, weight_decay=1e-3), optim.gradual_pruning(**GP))
    state, step, trace = tx.init(params), _stepper(tx, jit), []
    for t in range(steps):
        before = params
        params, state = step(params, state, _noise(params, 100 + t))
        trace.append((before, params, optim.find_masks(state)))
    return trace


@pytest.mark.parametrize("kind", ["dict", "state"])
def test_gradual_pruning_exact_counts_every_step(kind):
    sched = schedules.cubic(**GP)
    trace = _run_gradual(_noise(_params(kind), 4), 20, jit=True)
    prev = None
    for t, (before, after, masks) in enumerate(trace):
        m, p = _flat(masks), _flat(after)
        for n in ("fc1/kernel", "fc2/kernel", "fc3/kernel"):
            want = topk.pruned_count(sched(t), m[n].size)
            assert int(np.sum(~m[n])) == want, (t, n)
            assert np.all(p[n][~m[n]] == 0.0), (t, n)
            assert int(np.sum(p[n] == 0)) == want, (t, n)  # survivors are nonzero
        assert m["fc1/bias"].all()  # biases are never pruned
        if kind == "dict" and t in (7, 15):  # pruning steps: magnitude masks of the weights before the step
            ref = masks_lib.make_masks(scores.magnitude_scores(before), sparsity=sched(t), existing=prev)
            chex.assert_trees_all_equal(_flat(ref), m)
        prev = masks
    assert sched(19) == pytest.approx(0.85)


@pytest.mark.parametrize("kind", ["dict", "state"])
def test_gradual_pruning_under_optax_masked_prunes_only_the_selection(kind):
    params = _noise(_params(kind), 4)
    tx = optax.chain(optax.sgd(1e-2), optax.masked(optim.gradual_pruning(**GP), selection_tree(r"fc2/kernel")))
    state, step = tx.init(params), _stepper(tx, jit=True)
    for t in range(16):
        params, state = step(params, state, _noise(params, 100 + t))
    p, m = _flat(params), _flat(optim.find_masks(state))
    assert set(m) == {"fc2/kernel"}  # the masked-out leaves are hidden from the pruning
    assert int(np.sum(~m["fc2/kernel"])) == topk.pruned_count(0.85, m["fc2/kernel"].size)
    assert np.all(p["fc2/kernel"][~m["fc2/kernel"]] == 0.0)
    assert np.all(p["fc1/kernel"] != 0.0) and np.all(p["fc3/kernel"] != 0.0)


def test_gradual_pruning_eager_equals_jit():
    params = _noise(_params("state"), 4)
    eager, jitted = _run_gradual(params, 5, jit=False), _run_gradual(params, 5, jit=True)
    chex.assert_trees_all_close(eager[-1][1], jitted[-1][1], atol=1e-6)
    chex.assert_trees_all_equal(eager[-1][2], jitted[-1][2])
    assert int(np.sum(~_flat(eager[-1][2])["fc1/kernel"])) == topk.pruned_count(schedules.cubic(**GP)(4), 64 * 32)


def test_gradual_pruning_global_scope_counts():
    params = _noise(_params("dict"), 5)
    tx = optim.gradual_pruning(final_sparsity=0.6, begin_step=0, end_step=4, frequency=2, scope="global")
    state = tx.init(params)
    step = _stepper(tx, True)
    sched = schedules.cubic(final_sparsity=0.6, begin_step=0, end_step=4, frequency=2)
    total = 64 * 32 + 32 * 16 + 16 * 10
    prev = None
    for t in range(6):
        before = params
        params, state = step(params, state, jax.tree.map(jnp.zeros_like, params))
        masks = optim.find_masks(state)
        pruned = sum(int(np.sum(~m)) for n, m in _flat(masks).items() if n.endswith("kernel"))
        assert pruned == topk.pruned_count(sched(t), total)
        if t == 4:
            ref = masks_lib.make_masks(scores.magnitude_scores(before), sparsity=0.6, scope="global", existing=prev)
            chex.assert_trees_all_equal(ref, masks)
        prev = masks


def test_soft_filter_pruning_lets_filters_regrow():
    params = _noise(_params("dict"), 6)
    tx = optax.chain(optax.sgd(1.0), optim.soft_filter_pruning(sparsity=0.25, frequency=3, end_step=9))
    state = tx.init(params)
    step = _stepper(tx, True)
    zero_cols = lambda w: np.flatnonzero(np.all(w == 0, axis=0))

    def push_zero_filters(p):  # a gradient that grows every all-zero filter by 1 per step
        return jax.tree.map(
            lambda w: -1.0 * (jnp.all(w == 0, axis=0, keepdims=True) & (w.ndim == 2)) * jnp.ones_like(w), p
        )

    seen = []
    for t in range(13):
        params, state = step(params, state, push_zero_filters(params))
        w = _flat(params)["fc1/kernel"]
        masks = _flat(optim.find_masks(state))
        if t in (0, 3, 6, 9):  # pruning steps: exactly 25% of the filters are zero
            assert len(zero_cols(w)) == 8 and np.all(masks["fc1/kernel"] == np.any(w != 0, axis=0)), t
            assert len(zero_cols(_flat(params)["fc3/kernel"])) == topk.pruned_count(0.25, 10)
            seen.append(set(zero_cols(w)))
        elif t < 9:  # in between, pruned filters are updated again
            assert len(zero_cols(w)) == 0, t
        else:  # after the last pruning step the masks are hard: the gradient cannot revive them
            assert set(zero_cols(w)) == seen[-1], t
    # regrown filters (norm 2 * sqrt(64) = 16) beat the originals, so other filters go next time
    assert seen[0].isdisjoint(seen[1])


def test_gradual_pruning_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of frequency"):
        optim.gradual_pruning(final_sparsity=0.5, begin_step=0, end_step=10, frequency=3)
    with pytest.raises(ValueError, match="scope"):
        optim.gradual_pruning(final_sparsity=0.5, begin_step=0, end_step=10, frequency=5, scope="model")
    with pytest.raises(ValueError, match="Units"):
        optim.gradual_pruning(
            final_sparsity=0.5, begin_step=0, end_step=10, frequency=5, scope="global", pattern=Units()
        )
    with pytest.raises(TypeError, match="pattern"):
        optim.gradual_pruning(final_sparsity=0.5, begin_step=0, end_step=10, frequency=5, pattern="structured")
    tx = optim.gradual_pruning(final_sparsity=0.5, begin_step=0, end_step=10, frequency=5)
    params = _params("dict")
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    nan = jtree.map_with_names(lambda n, x: x.at[0].set(jnp.nan) if n == "fc2/kernel" else x, params)
    with pytest.raises(ValueError, match="fc2/kernel.*NaN"):
        tx.init(nan)


# ----------------------------------------------------------------------------- RigL / SET


def _rigl_reference(w, g, mask, frac):
    """Numpy RigL step on one leaf: drop the k smallest |w| among active, grow the top-k |g| among the rest."""
    w, g, mask = (np.asarray(a).ravel() for a in (w, g, mask))
    n_active = int(mask.sum())
    k = math.floor(frac * n_active)
    active = np.flatnonzero(mask)
    dropped = active[np.argsort(np.abs(w[active]), kind="stable")[:k]]
    remaining = mask.copy()
    remaining[dropped] = False
    cand = np.flatnonzero(~remaining)
    grown = cand[np.argsort(-np.abs(g[cand]), kind="stable")[:k]]
    new = remaining.copy()
    new[grown] = True
    return new


@pytest.mark.parametrize(
    "kind, jit, method",
    [("dict", True, "rigl"), ("state", True, "rigl"), ("state", True, "set"), ("dict", False, "set")],
)
def test_dynamic_sparse_training_keeps_counts_and_rewires(kind, jit, method):
    params = _noise(_params(kind), 7)
    masks = masks_lib.make_masks(scores.random_scores(params, key=jax.random.key(1)), sparsity=0.8, distribution="erk")
    params = masks_lib.apply_masks(params, masks)
    common = {"masks": masks, "delta_t": 3, "end_step": 12, "drop_fraction": 0.5}
    if method == "rigl":
        tx = dynamic.rigl(optax.adam(1e-2), **common)
    else:
        tx = dynamic.sparse_evolutionary(optax.adam(1e-2), key=jax.random.key(3), **common)
    state = tx.init(params)
    step = _stepper(tx, jit)
    counts = {n: int(m.sum()) for n, m in _flat(masks).items()}
    changed, steps = 0, 16 if jit else 4
    for t in range(steps):
        old_masks, old_params = _flat(optim.find_masks(state)), _flat(params)
        grads = _noise(params, 300 + t)
        params, state = step(params, state, grads)
        new_masks, p = _flat(optim.find_masks(state)), _flat(params)
        mu = _flat(state.inner_state[0].mu)
        for n, count in counts.items():
            assert int(new_masks[n].sum()) == count, (t, n)  # exactly constant per layer
            assert np.all(p[n][~new_masks[n]] == 0.0), (t, n)  # inactive (incl. dropped) weights are 0
            assert np.all(mu[n][~new_masks[n]] == 0.0), (t, n)  # their Adam moments too
            grown = new_masks[n] & ~old_masks[n]
            assert np.all(p[n][grown] == 0.0), (t, n)  # grown weights start at zero
            changed += int(grown.sum())
        is_update = t > 0 and t % 3 == 0 and t < 12
        if not is_update:
            chex.assert_trees_all_equal(new_masks, old_masks)
        elif method == "rigl":
            frac = float(dynamic.update_fraction(t, drop_fraction=0.5, end_step=12))
            g = _flat(grads)
            for n in ("fc1/kernel", "fc2/kernel"):
                want = _rigl_reference(old_params[n], g[n], old_masks[n], frac).reshape(old_masks[n].shape)
                np.testing.assert_array_equal(new_masks[n], want, err_msg=f"{t} {n}")
    assert changed > 100  # connectivity really changed


def test_update_fraction_is_cosine_decay():
    f = lambda t: float(dynamic.update_fraction(t, drop_fraction=0.3, end_step=100))
    assert f(0) == pytest.approx(0.3)
    assert f(50) == pytest.approx(0.15)
    assert f(100) == 0.0 and f(150) == 0.0
    with pytest.raises(ValueError, match="drop_fraction"):
        dynamic.rigl(optax.sgd(0.1), masks={}, end_step=10, drop_fraction=1.5)
    with pytest.raises(TypeError, match="key"):
        dynamic.sparse_evolutionary(optax.sgd(0.1), masks={}, key=0, end_step=10)


# ----------------------------------------------------------------------------- lottery


@pytest.mark.parametrize("kind", ["dict", "state"])
def test_prune_round_counts_and_output_rate(kind):
    params = _noise(_params(kind), 8)
    masks = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
    for r in range(3):
        alive = {n: int(m.sum()) for n, m in _flat(masks).items()}
        t = lottery.prune_round(masks, rate=0.2, output_rate=0.1, output_layer="fc3")
        pruned, aux = t(params)
        new = aux.masks
        chex.assert_trees_all_equal(jtree.to_pure_dict(jax.jit(t)(params)[1].masks), jtree.to_pure_dict(new))
        chex.assert_trees_all_equal(jtree.to_pure_dict(pruned), jtree.to_pure_dict(masks_lib.apply_masks(params, new)))
        got = _flat(new)
        for n, m in got.items():
            if not n.endswith("kernel"):
                assert m.all()
                continue
            rate = 0.1 if n == "fc3/kernel" else 0.2
            assert int(m.sum()) == alive[n] - topk.pruned_count(rate, alive[n]), (r, n)
            assert not np.any(m & ~_flat(masks)[n])  # pruned stay pruned
            # the survivors are the largest |w| among the previous survivors
            w = np.abs(_flat(params)[n])
            assert w[m].min() >= w[_flat(masks)[n] & ~m].max()
        masks = new


def test_rewind_restores_snapshot_values_exactly():
    init = _noise(_params("state"), 9)
    snap = lottery.snapshot(init)
    trained = _noise(init, 10)
    _, aux = lottery.prune_round(jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), init), rate=0.5)(trained)
    masks = aux.masks
    ticket = lottery.rewind(snap, masks)
    t, s, m = _flat(ticket), _flat(init), _flat(masks)
    for n in t:
        np.testing.assert_array_equal(t[n][m[n]], s[n][m[n]])
        assert np.all(t[n][~m[n]] == 0.0)


def test_find_ticket_rounds_rewinding_and_controls():
    init = _noise(_params("dict"), 11)
    calls = []

    def train_fn(params, masks):
        calls.append((params, masks))
        # "training": a fixed, deterministic move of every weight that keeps pruned ones at 0
        moved = jax.tree.map(lambda p, d: p + 0.5 * d, params, _noise(params, 12))
        out = masks_lib.apply_masks(moved, masks)
        if len(calls) == 1:  # late rewinding: hand back the weights "after k steps"
            return out, jax.tree.map(lambda p: p + 1.0, params)
        return out

    history_eval = lambda p, m: {"nonzeros": int(sum(np.count_nonzero(x) for x in jax.tree.leaves(p)))}
    res = lottery.find_ticket(
        train_fn, init, rounds=3, rate=0.2, output_rate=0.1, output_layer="fc3/kernel", eval_fn=history_eval
    )
    assert len(calls) == 4 and [h["round"] for h in res.history] == [0, 1, 2, 3]
    late = jax.tree.map(lambda p: p + 1.0, init)
    chex.assert_trees_all_equal(res.rewind_params, late)
    # every retraining run starts from the late snapshot masked by that round's masks
    for params, masks in calls[1:]:
        chex.assert_trees_all_equal(params, masks_lib.apply_masks(late, masks))
    fc1 = res.history[-1]["density"]["fc1/kernel"]
    alive = 64 * 32
    for _ in range(3):
        alive -= topk.pruned_count(0.2, alive)
    assert fc1 == pytest.approx(alive / (64 * 32))
    chex.assert_trees_all_equal(res.ticket, masks_lib.apply_masks(late, res.masks))
    assert res.history[0]["sparsity"] == 0.0 and res.history[3]["sparsity"] > 0.45
    # controls keep the per-layer counts
    rnd = lottery.random_masks_like(res.masks, key=jax.random.key(0))
    for n, m in _flat(res.masks).items():
        assert int(_flat(rnd)[n].sum()) == int(m.sum())
    assert not np.array_equal(_flat(rnd)["fc1/kernel"], _flat(res.masks)["fc1/kernel"])
    re = lottery.random_reinit(
        lambda k: _noise(init, int(jax.random.randint(k, (), 0, 1000))), res.masks, key=jax.random.key(4)
    )
    for n, m in _flat(res.masks).items():
        assert np.all(_flat(re)[n][~m] == 0.0)
    with pytest.raises(ValueError, match="output_layer"):
        lottery.find_ticket(train_fn, init, rounds=1, output_layer="fc9")
    with pytest.raises(ValueError, match="rounds"):
        lottery.find_ticket(train_fn, init, rounds=0)


def test_snapshot_survives_donation(digits):
    fn = models.functional(_model())
    snap = lottery.snapshot(fn.params)
    cb = lottery.snapshot_callback(epoch=1)
    res = train.fit(
        fn.apply,
        fn.params,
        fn.extra,
        digits,
        tx=optax.sgd(0.1),
        epochs=2,
        batch_size=64,
        progress=False,
        callback=cb.callback,
    )
    after_epoch1 = cb.get()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(snap))
    assert not np.array_equal(_flat(after_epoch1)["fc1/kernel"], _flat(snap)["fc1/kernel"])
    assert not np.array_equal(_flat(after_epoch1)["fc1/kernel"], _flat(res.params)["fc1/kernel"])
    with pytest.raises(ValueError, match="epoch 5"):
        lottery.snapshot_callback(epoch=5).get()


# ----------------------------------------------------------------------------- iterative


def _sparsity(params):
    ks = [np.asarray(x) for n, x in jtree.named_leaves(params) if n.endswith("kernel")]
    return sum(int(np.sum(k == 0)) for k in ks) / sum(k.size for k in ks)


def test_iterative_pruning_undoes_bad_steps():
    params = _noise(_params("state"), 13)
    seen = []

    def eval_fn(p):  # scripted: accuracy 0.9 up to 45% sparsity, then it collapses
        s = _sparsity(p)
        seen.append(s)
        return {"accuracy": 0.9 if s <= 0.45 else 0.5}

    res = iterative.iterative_pruning(
        params, eval_fn=eval_fn, target_sparsity=0.8, step=0.2, tolerance=0.01, min_step=0.04
    )
    tried = [(round(h["sparsity"], 6), h["accepted"]) for h in res.history]
    # 0.2 ok, 0.4 ok, 0.6 undone (step 0.1), 0.5 undone (step 0.05), 0.45 ok, 0.5 undone (step 0.025 < min)
    assert tried == [(0.2, True), (0.4, True), (0.6, False), (0.5, False), (0.45, True), (0.5, False)]
    assert res.sparsity == pytest.approx(0.45) and not res.reached_target and res.baseline == 0.9
    assert _sparsity(res.params) == pytest.approx(0.45, abs=0.01)
    for n, m in _flat(res.masks).items():
        assert np.all(_flat(res.params)[n][~m] == 0.0)


def test_iterative_pruning_with_finetuning_keeps_masks():
    params = _noise(_params("dict"), 13)
    calls = []

    def finetune(p, masks):
        calls.append(masks)
        return jax.tree.map(lambda x: x + 0.01, p)  # would un-prune; the loop re-applies the masks

    res2 = iterative.iterative_pruning(
        params, eval_fn=lambda p: 1.0, target_sparsity=0.5, step=0.25, finetune_fn=finetune
    )
    assert res2.reached_target and len(calls) == 2 and res2.sparsity == 0.5
    for n, m in _flat(res2.masks).items():
        assert np.all(_flat(res2.params)[n][~m] == 0.0)
        if n.endswith("kernel"):
            assert int(np.sum(~m)) == topk.pruned_count(0.5, m.size)


def test_iterative_pruning_rejects_bad_input():
    params = _params("dict")
    with pytest.raises(ValueError, match="target_sparsity"):
        iterative.iterative_pruning(params, eval_fn=lambda p: 1.0, target_sparsity=1.2)
    with pytest.raises(ValueError, match="NaN"):
        iterative.iterative_pruning(params, eval_fn=lambda p: float("nan"), target_sparsity=0.5)
    with pytest.raises(ValueError, match="metric"):
        iterative.iterative_pruning(params, eval_fn=lambda p: {"acc": 1.0}, target_sparsity=0.5)
