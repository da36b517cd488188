"""Decoder LMs: equality with transformers' logits, the KV cache, mesh loading, loader errors, perplexity, generation.

The fixtures in tests/fixtures/lm/ are tiny random-weight checkpoints that
scripts/make_lm_fixtures.py built with transformers, with transformers' float32 logits
for 3 prompts; no PyTorch is needed here.
"""

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jcompress import lm
from jcompress.models import hf_lm
from jcompress.models.gpt2 import GPT2, GPT2Config
from jcompress.models.llama import RopeScaling, rope_frequencies

FIXTURES = Path(__file__).parent / "fixtures" / "lm"
NAMES = ("llama_gqa_sharded", "llama_rope3_tied", "gpt2")


@pytest.fixture(scope="module")
def loaded():
    return {name: hf_lm.load(FIXTURES / name) for name in NAMES}


def _reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    return [(ref[f"ids_{k}"], ref[f"logits_{k}"]) for k in range(3)]


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, cache):
    return nnx.merge(graphdef, state)(ids, cache=cache)


def _forward_cached(model, ids, cache):
    return _apply(*nnx.split(model), ids, cache)


def _forward(model, sequences) -> list[np.ndarray]:
    """Full-forward logits ``(len, vocab)`` of each 1-D id sequence (at most 32 long).

    Sequences run 3 at a time, right-padded to 32 (causal logits of real tokens do not
    see the padding), so each model compiles one shape for all the tests.
    """
    out = []
    for i in range(0, len(sequences), 3):
        chunk = sequences[i : i + 3]
        ids = np.zeros((3, 32), np.int32)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = seq
        logits = np.asarray(_forward_cached(model, jnp.asarray(ids), None)[0])
        out += [logits[row, : len(seq)] for row, seq in enumerate(chunk)]
    return out


def _check_reference_logits(model, name):
    ref = _reference(name)
    for got, (_, want) in zip(_forward(model, [ids for ids, _ in ref]), ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(loaded, name):
    model, tok, cfg = loaded[name]
    _check_reference_logits(model, name)
    assert tok.get_vocab_size() <= cfg.vocab_size


def test_fixture_variants_cover_sharding_gqa_tying_and_rope_scaling(loaded):
    files = hf_lm.checkpoint_files(FIXTURES / "llama_gqa_sharded")
    assert sorted({p.name for p in files.values()}) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    sharded, tied = loaded["llama_gqa_sharded"][2], loaded["llama_rope3_tied"][2]
    assert (sharded.num_heads, sharded.num_kv_heads, tied.num_kv_heads) == (4, 2, 2)
    assert not sharded.tie_embeddings and loaded["llama_gqa_sharded"][0].lm_head is not None
    assert tied.tie_embeddings and loaded["llama_rope3_tied"][0].lm_head is None
    assert tied.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16) and tied.rope_theta == 50000.0


def test_linear_names_are_plain_nnx_linear(loaded):
    model = loaded["llama_gqa_sharded"][0]
    linears = sorted("/".join(map(str, path)) for path, m in nnx.iter_graph(model) if type(m) is nnx.Linear)
    per_block = ["attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj", "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj"]
    assert linears == sorted(["lm_head"] + [f"layers/{i}/{n}" for i in range(2) for n in per_block])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert params["layers"][0]["attn"]["q_proj"]["kernel"].shape == (64, 64)
    assert params["layers"][0]["attn"]["k_proj"]["kernel"].shape == (64, 32)


@pytest.mark.parametrize("name", ["llama_rope3_tied", "gpt2"])
def test_kv_cache_decoding_equals_full_forward(loaded, name):
    model = loaded[name][0]
    ids, want = _reference(name)[2]  # 13 tokens
    full = _forward(model, [ids])[0]
    ids = jnp.asarray(ids)[None]
    cache = model.init_cache(1, ids.shape[1] + 3)  # 3 slots to spare: unfilled slots must stay invisible
    pieces = []
    for a, b in [(0, 5), (5, 9), *((t, t + 1) for t in range(9, ids.shape[1]))]:  # prefill 5, 4 more, then one at a time
        logits, cache = _forward_cached(model, ids[:, a:b], cache)
        pieces.append(logits)
    assert int(cache[0].length) == ids.shape[1]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[0], full, atol=2e-5, rtol=0)
    np.testing.assert_allclose(full, want, atol=1e-4, rtol=0)


def test_blocks_one_at_a_time_equal_the_model(loaded):
    model = loaded["llama_gqa_sharded"][0]
    prompts = [ids for ids, _ in _reference("llama_gqa_sharded")]
    ids = np.zeros((3, 32), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt

    @nnx.jit
    def by_blocks(model, ids):
        positions = jnp.arange(ids.shape[1])[None]
        h = model.embed_inputs(ids, positions)
        for block in model.layers:
            h, cache = block(h, positions)
            assert cache is None
        return model.logits(h)

    np.testing.assert_allclose(by_blocks(model, jnp.asarray(ids)), _forward(model, list(ids)), atol=1e-5, rtol=0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)")
@pytest.mark.parametrize("name", ["llama_gqa_sharded"])
def test_loading_onto_an_8_device_mesh(name):
    mesh = jax.make_mesh((8,), ("fsdp",))
    model, _, _ = hf_lm.load(FIXTURES / name, mesh=mesh, axis="fsdp")
    leaves = jax.tree.leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path, leaf in leaves:
        # every dimension of these models is a multiple of 8: each leaf is split 8 ways along its largest one
        split = int(np.argmax(leaf.shape))
        assert leaf.sharding.spec[split] == "fsdp", (path, leaf.sharding.spec)
        assert len(leaf.addressable_shards) == 8
        shard_shapes = {s.data.shape for s in leaf.addressable_shards}
        assert shard_shapes == {tuple(d // 8 if i == split else d for i, d in enumerate(leaf.shape))}, path
    _check_reference_logits(model, name)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)")
def test_placement_reads_one_shard_at_a_time():
    class Recorder:  # a safetensors slice that records the blocks read from it
        def __init__(self, array):
            self.array, self.reads = array, []

        def __getitem__(self, index):
            self.reads.append(self.array[index].shape)
            return self.array[index]

    weight = np.arange(32 * 64, dtype=np.float32).reshape(32, 64)  # torch layout (out, in)
    tensor = Recorder(weight)
    sharding = hf_lm.param_sharding((64, 32), jax.make_mesh((8,), ("fsdp",)), "fsdp")
    kernel = hf_lm._place(tensor, (64, 32), True, jnp.float32, sharding)
    np.testing.assert_array_equal(kernel, weight.T)
    assert tensor.reads == [(32, 8)] * 8  # 8 blocks of 1/8 of the tensor, never the whole


def test_bfloat16_checkpoint_and_dtype(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    folder = _copy("gpt2", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    model, _, _ = hf_lm.load(folder)
    kernel = nnx.to_pure_dict(nnx.state(model, nnx.Param))["layers"][0]["attn"]["c_attn"]["kernel"]
    want = tensors["transformer.h.0.attn.c_attn.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert kernel.dtype == jnp.float32 and np.array_equal(kernel, want)  # Conv1D weights are (in, out) already
    model, _, _ = hf_lm.load(FIXTURES / "gpt2", dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_param_sharding_rule():
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("fsdp",))
    assert hf_lm.param_sharding((3 * n, 5 * n), mesh, "fsdp").spec == P(None, "fsdp")
    assert hf_lm.param_sharding((5 * n, 3), mesh, "fsdp").spec == P("fsdp", None)
    if n > 1:
        assert hf_lm.param_sharding((n + 1, 3), mesh, "fsdp").spec == P(None, None)
    with pytest.raises(ValueError, match="axis='model' is not an axis"):
        hf_lm.load(FIXTURES / "gpt2", mesh=mesh, axis="model")


def _copy(name, tmp_path) -> Path:
    dest = tmp_path / name
    shutil.copytree(FIXTURES / name, dest)
    return dest


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_is_named(tmp_path):
    folder = _copy("gpt2", tmp_path)
    _edit_config(folder, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match=r"model_type='mistral' is not supported"):
        hf_lm.load(folder)
    _edit_config(folder, model_type=None, architectures=["BertModel"])
    with pytest.raises(ValueError, match=r"architectures=\['BertModel'\] is not supported"):
        hf_lm.load(folder)


def test_missing_shard_is_named(tmp_path):
    folder = _copy("llama_gqa_sharded", tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        hf_lm.load(folder)


def test_tokenizer_larger_than_vocab_is_an_error(tmp_path):
    folder = _copy("gpt2", tmp_path)
    _edit_config(folder, vocab_size=200)
    with pytest.raises(ValueError, match=r"token ids but config.json vocab_size=200"):
        hf_lm.load(folder)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy("gpt2", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(KeyError, match=r"lacks tensors for \['norm/bias'\]"):
        hf_lm.load(folder)


def test_rope_config_formats_and_unknown_rope_type(tmp_path):
    folder = _copy("llama_rope3_tied", tmp_path)
    new_style = hf_lm.read_config(folder)
    params = json.loads((folder / "config.json").read_text())["rope_parameters"]
    theta = params.pop("rope_theta")
    _edit_config(folder, rope_parameters=None, rope_theta=theta, rope_scaling=params)  # the transformers 4 layout
    assert hf_lm.read_config(folder) == new_style
    _edit_config(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type='yarn' is not supported"):
        hf_lm.read_config(folder)


def test_rope_frequencies_scaling_kinds():
    base = rope_frequencies(16, 10000.0)
    np.testing.assert_allclose(base, 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    np.testing.assert_allclose(rope_frequencies(16, 10000.0, RopeScaling("linear", factor=4.0)), base / 4, rtol=1e-6)
    l3 = rope_frequencies(16, 10000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 16))
    wavelength = 2 * np.pi / base
    assert np.array_equal(l3[wavelength < 4], base[wavelength < 4])  # short waves kept
    np.testing.assert_allclose(l3[wavelength > 16], base[wavelength > 16] / 8, rtol=1e-6)  # long waves divided
    mid = (wavelength >= 4) & (wavelength <= 16)
    assert mid.any() and np.all((l3[mid] < base[mid]) & (l3[mid] > base[mid] / 8))
    with pytest.raises(ValueError, match="kind='ntk'"):
        rope_frequencies(16, 10000.0, RopeScaling("ntk"))


def test_windows_plan():
    plan = [tuple(w) for w in lm.windows(10, seq_len=4, stride=2)]
    assert plan == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert [tuple(w) for w in lm.windows(10, seq_len=4, stride=4)] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert [tuple(w) for w in lm.windows(3, seq_len=8, stride=4)] == [(0, 3, 1)]
    with pytest.raises(ValueError, match="stride=5 exceeds seq_len=4"):
        lm.windows(10, seq_len=4, stride=5)


@pytest.mark.parametrize("stride", [16, 6])
def test_perplexity_equals_direct_computation(loaded, stride):
    model, tok, _ = loaded["llama_gqa_sharded"]
    ids = lm.corpus_ids(tok, "evaluation", limit=4)[:46]
    assert len(ids) == 46
    result = lm.perplexity(model, ids, seq_len=16, stride=stride, batch_size=4)
    plan = lm.windows(len(ids), seq_len=16, stride=stride)
    assert [w.end - w.begin for w in plan] == ([16, 16, 14] if stride == 16 else [16] * 6)
    total, count = 0.0, 0
    for (begin, end, first), logits in zip(plan, _forward(model, [ids[w.begin : w.end] for w in plan]), strict=True):
        logits = logits.astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        for t in range(first, end):
            total -= logp[t - begin - 1, ids[t]]
            count += 1
    expected_count = 45 if stride < 16 else 46 - 3  # every token but the first / but each window's first
    assert result.num_scored == count == expected_count
    np.testing.assert_allclose(result.nll_sum, total, rtol=2e-6)
    assert result.perplexity == pytest.approx(np.exp(total / count), rel=2e-6)


def test_calibration_text_shorter_than_seq_len():
    ids = np.arange(50)
    batch = lm.sample_windows(ids, num=4, seq_len=20, seed=1)
    assert batch.shape == (4, 20) and batch.dtype == np.int32
    assert all(np.array_equal(row, np.arange(row[0], row[0] + 20)) for row in batch)
    with pytest.raises(ValueError, match=r"has 50 tokens, fewer than seq_len=64"):
        lm.sample_windows(ids, num=4, seq_len=64)


@pytest.mark.parametrize("name", ["llama_rope3_tied"])
def test_greedy_generation_with_cache_equals_argmax_of_full_forwards(loaded, name):
    model, tok, _ = loaded[name]
    prompt = _reference(name)[2][0]
    out = lm.generate(model, prompt, max_new_tokens=6)
    assert out.shape == (len(prompt) + 6,) and np.array_equal(out[: len(prompt)], prompt)
    # a greedy sequence is its own argmax under one full forward (no cache)
    logits = _forward(model, [out])[0]
    assert np.array_equal(np.argmax(logits[len(prompt) - 1 : -1], axis=-1), out[len(prompt) :])
    text = lm.generate(model, "Names refer to objects", max_new_tokens=6, tokenizer=tok)
    assert text == tok.decode(out.tolist())


def test_generation_errors(loaded):
    model = loaded["gpt2"][0]
    with pytest.raises(ValueError, match="exceeds the model's max_position=128"):
        lm.generate(model, np.zeros(100, np.int32), max_new_tokens=29)
    with pytest.raises(ValueError, match="needs tokenizer="):
        lm.generate(model, "text", max_new_tokens=2)


def test_gpt2_config_checks():
    with pytest.raises(ValueError, match="activation='relu' is not supported"):
        GPT2(GPT2Config(10, 16, 1, 2, activation="relu"), rngs=nnx.Rngs(0))
