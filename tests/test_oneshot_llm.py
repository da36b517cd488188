"""The oneshot_llm experiment: disjoint text splits, a deterministic tokenizer, resumable
training and the saved Hugging Face folder. The papers' ordering in the quick run is checked
by tests/test_experiments.py (``CHECKS``), on the quick run it makes of every experiment."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import oneshot_llm
from jcompress import lm
from jcompress.models import hf_lm
from jcompress.models.llama import Llama, LlamaConfig


def test_documents_split_into_disjoint_train_validation_and_test():
    docs = oneshot_llm.documents("pydoc-topics")
    parts = oneshot_llm.split_documents(docs)
    assert sum(len(p) for p in parts.values()) == len(docs)
    texts = [set(parts[s]) for s in oneshot_llm.SPLITS]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert all(len(p) > 5 for p in parts.values())
    shuffled = oneshot_llm.split_documents(dict(reversed(list(docs.items()))))
    assert all(sorted(parts[s]) == sorted(shuffled[s]) for s in parts)  # by name, not by position
    with pytest.raises(ValueError, match="data='wikitext'.*python-docs"):
        oneshot_llm.documents("wikitext")


def test_tokenizer_is_deterministic_and_round_trips():
    texts = oneshot_llm.split_documents(oneshot_llm.documents("pydoc-topics"))["train"][:20]
    a, b = (oneshot_llm.train_tokenizer(texts, 400) for _ in range(2))
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 400 and a.token_to_id("<|endoftext|>") == 0
    sentence = "The return statement leaves the current function call."
    assert a.decode(a.encode(sentence).ids) == sentence  # byte level: nothing is lost


VOCAB = 300  # the byte-level tokenizer alone has 257 ids


def _save_tokenizer(folder):
    oneshot_llm.train_tokenizer(["a tiny text"], VOCAB).save(str(folder / "tokenizer.json"))


def _tiny(**fields):
    config = oneshot_llm.get_config("quick")
    config.update({"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32,
                   "train_seq_len": 8, "batch_size": 2, "steps": 4, "warmup_steps": 1, "checkpoint_every": 2, **fields})  # fmt: skip
    return config


def test_saved_folder_loads_back_with_the_same_logits(tmp_path):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=24)
    model = Llama(cfg, rngs=nnx.Rngs(3))
    oneshot_llm._save_hf(tmp_path, model, cfg)
    _save_tokenizer(tmp_path)
    loaded, _, loaded_cfg = hf_lm.load(tmp_path)
    assert loaded_cfg == cfg
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 7)), jnp.int32)
    logits = nnx.jit(lambda m, x: m(x)[0])  # one compilation for both (same structure), not one per op
    np.testing.assert_array_equal(np.asarray(logits(loaded, ids)), np.asarray(logits(model, ids)))


def test_a_killed_training_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    config = _tiny()
    cfg = oneshot_llm._llama_config(config, VOCAB)
    ids = np.random.default_rng(0).integers(0, VOCAB, 500).astype(np.int32)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir(), resumed.mkdir()
    oneshot_llm._train(config, cfg, ids, whole)
    assert not (whole / "train_state.npz").exists()  # the finished folder keeps only the model

    real_save = oneshot_llm._save_hf

    def killed_before_saving(*args):  # after step 4, so the last checkpoint (step 2) is two steps behind
        raise KeyboardInterrupt

    monkeypatch.setattr(oneshot_llm, "_save_hf", killed_before_saving)
    with pytest.raises(KeyboardInterrupt):
        oneshot_llm._train(config, cfg, ids, resumed)
    with np.load(resumed / "train_state.npz") as state:
        assert int(state["step"]) == 2
    assert not (resumed / "config.json").exists()
    monkeypatch.setattr(oneshot_llm, "_save_hf", real_save)
    log = oneshot_llm._train(config, cfg, ids, resumed)
    assert log["steps"] == 4 and not (resumed / "train_state.npz").exists()
    for folder in (whole, resumed):
        _save_tokenizer(folder)
    a, b = (nnx.state(hf_lm.load(f)[0], nnx.Param) for f in (whole, resumed))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(a), nnx.to_pure_dict(b))


def test_short_evaluation_text_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="eval_seq_len=64"):
        oneshot_llm._whole_windows(np.arange(40), 0, 64, 32)
    got = oneshot_llm._whole_windows(np.arange(1000), 300, 64, 32)
    assert len(got) == 288  # 64 + 7 * 32: every window full


def _planted_pair(channels=3, scale=20.0):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
    model, planted = Llama(cfg, rngs=nnx.Rngs(5)), Llama(cfg, rngs=nnx.Rngs(5))
    where = oneshot_llm.plant_outliers(planted, channels=channels, scale=scale, seed=0)
    return model, planted, where


def test_planted_outliers_keep_the_function_and_scale_the_chosen_channels():
    model, planted, where = _planted_pair()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 9)), jnp.int32)
    logits = nnx.jit(lambda m, x: m(x)[0])
    np.testing.assert_allclose(np.asarray(logits(planted, ids)), np.asarray(logits(model, ids)), atol=2e-5, rtol=1e-5)
    hidden = np.asarray(where["hidden"])
    assert len(hidden) == 3 and len(where["intermediate"]) == 2
    for i, (a, b) in enumerate(zip(model.layers, planted.layers, strict=True)):
        ratio = np.asarray(b.attn_norm.scale[...]) / np.asarray(a.attn_norm.scale[...])
        expect = np.ones(32, np.float32)
        expect[hidden] = 20.0
        np.testing.assert_allclose(ratio, expect, rtol=1e-6)
        rows = np.asarray(b.attn.q_proj.kernel[...]) / np.asarray(a.attn.q_proj.kernel[...])
        np.testing.assert_allclose(rows[:, 0], 1.0 / expect, rtol=1e-6)
        inner = np.asarray(where["intermediate"][i])
        down = np.asarray(b.mlp.down_proj.kernel[...]) / np.asarray(a.mlp.down_proj.kernel[...])
        np.testing.assert_allclose(down[inner, 0], 1 / 20.0, rtol=1e-6)
        assert np.sum(np.abs(down[:, 0] - 1) > 1e-6) == 3
    with pytest.raises(ValueError, match="outlier_scale"):
        oneshot_llm.plant_outliers(model, channels=3, scale=1.0, seed=0)
    with pytest.raises(ValueError, match="outlier_channels"):
        oneshot_llm.plant_outliers(model, channels=33, scale=20.0, seed=0)


def test_wanda_ignores_planted_outliers_and_magnitude_prunes_their_inputs():
    """The mechanism behind Wanda's gain: its scores |W| ||x|| do not change under the exact
    rescale, so its masks stay (up to float rounding of near-ties); magnitude pruning removes
    the planted inputs, whose weights the rescale made small."""
    from jcompress import blockwise

    model, planted, where = _planted_pair()
    calib = np.random.default_rng(2).integers(0, VOCAB, (8, 16))
    wanda = {}
    for name, m in (("model", model), ("planted", planted)):
        pruned, _ = blockwise.compress(nnx.clone(m), calib, blockwise.method("wanda", sparsity=0.5), batch_size=8)
        wanda[name] = np.stack([np.asarray(b.attn.q_proj.kernel[...]) == 0 for b in pruned.layers])
    assert wanda["model"].mean() == pytest.approx(0.5)
    assert np.mean(wanda["model"] != wanda["planted"]) < 2e-3
    hidden = np.asarray(where["hidden"])
    for m, most in ((planted, 0.99), (model, 0.8)):  # below each layer's median |W|: what 50% magnitude prunes
        small = [np.abs(k) <= np.median(np.abs(k)) for k in (np.asarray(b.attn.q_proj.kernel[...]) for b in m.layers)]
        frac = np.stack(small)[:, hidden, :].mean()
        assert frac > most if m is planted else frac < most


_logits = nnx.jit(lambda m, x: m(x)[0])  # compiled once per model structure


def test_planting_given_hidden_dims_keeps_the_function_and_the_seeds_mlp_dims():
    model, _, where = _planted_pair()
    given = Llama(model.cfg, rngs=nnx.Rngs(5))
    chosen = oneshot_llm.plant_outliers(given, channels=3, scale=20.0, seed=0, hidden=[30, 1, 7])
    assert chosen["hidden"] == [1, 7, 30] and chosen["hidden_select"] == "given" and where["hidden_select"] == "random"
    assert chosen["intermediate"] == where["intermediate"]  # the same random MLP dims as a random planting
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 9)), jnp.int32)
    np.testing.assert_allclose(np.asarray(_logits(given, ids)), np.asarray(_logits(model, ids)), atol=2e-5, rtol=1e-5)
    ratio = np.asarray(given.layers[1].mlp_norm.scale[...]) / np.asarray(model.layers[1].mlp_norm.scale[...])
    assert np.flatnonzero(np.abs(ratio - 1) > 1e-6).tolist() == [1, 7, 30]
    for bad in ([1, 7], [1, 1, 7], [1, 7, 32], [-1, 7, 30]):
        with pytest.raises(ValueError, match="hidden=.*3 distinct dimensions in \\[0, 32\\)"):
            oneshot_llm.plant_outliers(nnx.clone(model), channels=3, scale=20.0, seed=0, hidden=bad)


def _zeroed_loss(model, windows, dim):
    """The plain way: a copy with entry ``dim`` of both norms of every block set to 0, and its loss."""
    copy = nnx.clone(model)
    for block in copy.layers:
        for norm in (block.attn_norm, block.mlp_norm):
            scale = np.array(norm.scale[...])
            scale[dim] = 0.0
            norm.scale[...] = jnp.asarray(scale)
    logits = np.asarray(_logits(copy, jnp.asarray(windows[:, :-1])), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()


def test_ablation_selection_plants_the_dims_whose_zeroing_hurts_most(tmp_path):
    config = _tiny(outlier_scale=20.0, outlier_channels=3, outlier_select="ablation", calib_seq_len=16)
    cfg = oneshot_llm._llama_config(config, VOCAB)
    trained = tmp_path / "abc"
    trained.mkdir()
    oneshot_llm._save_hf(trained, Llama(cfg, rngs=nnx.Rngs(4)), cfg)
    _save_tokenizer(trained)
    train_ids = np.random.default_rng(0).integers(0, VOCAB, 400).astype(np.int32)
    folder = oneshot_llm._planted(trained, config, train_ids)
    assert folder.name == "abc-outliers3x20-ablation"
    planted = json.loads((folder / "planted.json").read_text())

    model = hf_lm.load(trained)[0]
    windows = lm.sample_windows(train_ids, num=oneshot_llm.ABLATION_WINDOWS, seq_len=16, seed=10_000 + config.seed)
    base = _zeroed_loss(model, windows, [])
    plain = np.array([_zeroed_loss(model, windows, d) for d in range(16)]) - base
    base_jit, increases = oneshot_llm.ablation_losses(model, windows)
    assert base_jit == pytest.approx(base, abs=1e-5)
    np.testing.assert_allclose(increases, plain, atol=2e-5)
    top = sorted(np.argsort(-plain)[:3].tolist())
    assert np.sort(plain)[-3] - np.sort(plain)[-4] > 1e-4  # no near-tie at the cut
    assert planted["hidden"] == top and planted["select"] == "ablation" and planted["hidden_select"] == "given"
    got = {int(d): v for d, v in planted["ablation"]["loss_increase"].items()}
    assert sorted(got) == top and all(got[d] == pytest.approx(plain[d], abs=2e-5) for d in top)
    assert min(got.values()) >= max(np.delete(plain, top)) - 2e-5  # every other dim hurts less

    ids = jnp.asarray(windows[:2])
    np.testing.assert_allclose(
        np.asarray(_logits(hf_lm.load(folder)[0], ids)), np.asarray(_logits(model, ids)), atol=2e-5, rtol=1e-5
    )
    config.outlier_select = "random"  # today's folder name and random dims
    random = oneshot_llm._planted(trained, config, train_ids)
    assert random.name == "abc-outliers3x20"
    random_dims = json.loads((random / "planted.json").read_text())
    assert random_dims["hidden_select"] == "random" and random_dims["intermediate"] == planted["intermediate"]


def test_unknown_methods_or_outlier_select_is_an_error_naming_the_field(tmp_path):
    for field, value, allowed in (("methods", "prune", "pruning"), ("outlier_select", "salient", "ablation")):
        config = _tiny(**{field: value})
        with pytest.raises(ValueError, match=f"{field}='{value}'.*{allowed}"):
            oneshot_llm.run(config, tmp_path)  # before any text is read or model trained
    assert list(tmp_path.iterdir()) == []
    config = _tiny(methods="pruning")
    rows = oneshot_llm._selected_methods(config)
    assert [(m, s) for m, s, _ in rows] == [(m, s) for s in ("50%", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]
    claims = oneshot_llm._comparisons([{"method": m, "setting": s} for m, s, _ in rows])
    assert [c["name"] for c in claims] == [
        f"{b} - magnitude at {s}" for s in ("50%", "2:4") for b in ("sparsegpt", "wanda")
    ]
