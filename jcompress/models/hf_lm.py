"""Load a Hugging Face decoder folder (Llama or GPT-2) onto a device mesh, offline.

A folder holds ``config.json``, the weights as ``model.safetensors`` or as shards
``model-0000x-of-0000y.safetensors`` listed in ``model.safetensors.index.json``, and
``tokenizer.json``. PyTorch and ``transformers`` are never imported and nothing is
downloaded: tensors are read with ``safetensors.safe_open`` and the tokenizer with the
``tokenizers`` package.

Memory: the model is first built abstractly (shapes only). Each tensor is then read on
its own and handed to ``jax.make_array_from_callback``, which asks for one block per
device of its ``NamedSharding``; each block is read from the file as a slice, so the
host never holds a second full copy of the model, nor of a sharded tensor. The
sharding is FSDP-style: the largest dimension divisible by the size of mesh axis
``axis`` is split along it, and a tensor with no such dimension is replicated. The
mesh's axes are taken as ``AxisType.Auto`` for this placement (``jax.make_mesh`` makes
``Explicit`` ones by default), so that under ``jax.jit`` the compiler inserts the
all-gathers of the sharded weights and the model's code needs no sharding annotations.

Name mapping (torch ``Linear.weight`` is ``(out, in)`` and becomes the transposed Flax
kernel ``(in, out)``; GPT-2's ``Conv1D.weight`` is ``(in, out)`` already)::

  Llama                                          jcompress.models.llama.Llama
  model.embed_tokens.weight                      embed/embedding
  model.layers.i.input_layernorm.weight          layers/i/attn_norm/scale
  model.layers.i.self_attn.{q,k,v,o}_proj.*      layers/i/attn/{q,k,v,o}_proj/{kernel,bias}
  model.layers.i.post_attention_layernorm.weight layers/i/mlp_norm/scale
  model.layers.i.mlp.{gate,up,down}_proj.*       layers/i/mlp/{gate,up,down}_proj/{kernel,bias}
  model.norm.weight                              norm/scale
  lm_head.weight                                 lm_head/kernel (ignored when tied)

  GPT-2 (``transformer.`` prefix optional)       jcompress.models.gpt2.GPT2
  wte.weight, wpe.weight                         embed/embedding, pos_embed/embedding
  h.i.ln_1.*, h.i.ln_2.*                         layers/i/ln_1/*, layers/i/ln_2/* (weight -> scale)
  h.i.attn.c_attn.*, h.i.attn.c_proj.*           layers/i/attn/c_attn/*, layers/i/attn/c_proj/*
  h.i.mlp.c_fc.*, h.i.mlp.c_proj.*               layers/i/mlp/c_fc/*, layers/i/mlp/c_proj/*
  ln_f.*                                         norm/*
  lm_head.weight                                 ignored (tied to wte)

Buffers that older checkpoints store (``rotary_emb.inv_freq``, GPT-2's ``attn.bias`` and
``attn.masked_bias`` masks) are skipped; any other unknown tensor, a missing tensor or a
shape that does not fit the config is an error.

Example:
  >>> mesh = jax.make_mesh((8,), ('fsdp',))
  >>> model, tokenizer, cfg = load('path/to/llama', mesh=mesh)
  >>> ids = jnp.asarray([tokenizer.encode('Hello').ids])
  >>> logits, _ = model(ids)                      # (1, seq, vocab) float32
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jcompress.models.gpt2 import ACTIVATIONS, GPT2, GPT2Config
from jcompress.models.llama import ROPE_TYPES, Llama, LlamaConfig, RopeScaling

__all__ = ["ARCHITECTURES", "checkpoint_files", "load", "load_tokenizer", "param_sharding", "read_config"]

# model_type -> the architectures entry transformers writes for it
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _fields(raw: dict, path: Path, *names: str) -> list:
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    return [raw[n] for n in names]


def _rope(raw: dict, path: Path) -> tuple[float, RopeScaling]:
    """``rope_theta`` and ``rope_scaling`` (transformers 4), or ``rope_parameters`` (transformers 5)."""
    theta = raw.get("rope_theta", 10000.0)
    scaling = raw.get("rope_scaling")
    field = "rope_scaling"
    if raw.get("rope_parameters"):
        scaling, field = raw["rope_parameters"], "rope_parameters"
        theta = scaling.get("rope_theta", theta)
    if not scaling:
        return float(theta), RopeScaling()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{path}: {field}.rope_type={kind!r} is not supported; use one of {ROPE_TYPES}")
    if kind == "default":
        return float(theta), RopeScaling()
    if kind == "linear":
        return float(theta), RopeScaling("linear", factor=float(_fields(scaling, path, "factor")[0]))
    factor, low, high, original = _fields(
        scaling, path, "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
    )
    return float(theta), RopeScaling("llama3", float(factor), float(low), float(high), int(original))


def read_config(folder: str | Path) -> LlamaConfig | GPT2Config:
    """The model config of a Hugging Face folder's ``config.json``.

    The architecture comes from ``model_type`` (or, without it, the first entry of
    ``architectures``); ``'llama'`` gives a :class:`LlamaConfig`, ``'gpt2'`` a
    :class:`GPT2Config`.

    Raises:
      FileNotFoundError: no ``config.json``.
      ValueError: another architecture (the message names the field and its value), an
        unsupported ``rope_scaling`` type or activation, or a missing field.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a Hugging Face model folder needs config.json")
    raw = json.loads(path.read_text())
    model_type, field = raw.get("model_type"), "model_type"
    if model_type is None:
        archs = {v: k for k, v in ARCHITECTURES.items()}
        first = (raw.get("architectures") or [None])[0]
        model_type, field = archs.get(first, first), "architectures"
    if model_type not in ARCHITECTURES:
        value = raw.get(field)
        raise ValueError(
            f"{path}: {field}={value!r} is not supported; hf_lm loads model_type "
            f"{' or '.join(map(repr, ARCHITECTURES))} ({', '.join(ARCHITECTURES.values())})"
        )
    if model_type == "llama":
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{path}: hidden_act={act!r}; the Llama MLP is SwiGLU ('silu')")
        vocab, d, layers, heads, ff = _fields(
            raw, path, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"
        )
        theta, scaling = _rope(raw, path)
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            intermediate_size=ff,
            head_dim=raw.get("head_dim"),
            max_position=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
        )
    act = raw.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"{path}: activation_function={act!r}; supported: {sorted(ACTIVATIONS)}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(flag):
            raise ValueError(f"{path}: {flag}=true is not supported")
    if raw.get("scale_attn_weights") is False:
        raise ValueError(f"{path}: scale_attn_weights=false is not supported")
    vocab, d, layers, heads = _fields(raw, path, "vocab_size", "n_embd", "n_layer", "n_head")
    return GPT2Config(
        vocab_size=vocab,
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=raw.get("n_inner"),
        max_position=raw.get("n_positions", 1024),
        layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        activation=act,
    )


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Which file holds each tensor: ``{tensor name: path}``.

    ``model.safetensors.index.json`` (its ``weight_map``) when present, else every
    tensor of ``model.safetensors``.

    Raises:
      FileNotFoundError: neither file exists, or a shard the index lists is missing (the
        message names the shard).
    """
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) {missing} that are not in {folder}")
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="numpy") as f:
        return dict.fromkeys(f.keys(), single)


_SKIP = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def _llama_target(name: str, cfg: LlamaConfig) -> tuple[tuple, bool] | None:
    """``(params path, transpose)`` for a Llama tensor name, ``None`` to skip it."""
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else (("lm_head", "kernel"), True)
    name = name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return ("embed", "embedding"), False
    if name == "norm.weight":
        return ("norm", "scale"), False
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        return "unknown"
    i, module, kind = int(m[1]), m[2], m[3]
    norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    if module in norms and kind == "weight":
        return ("layers", i, norms[module], "scale"), False
    sub = re.fullmatch(r"(self_attn|mlp)\.(\w+_proj)", module)
    if sub:
        group = "attn" if sub[1] == "self_attn" else "mlp"
        return ("layers", i, group, sub[2], "kernel" if kind == "weight" else "bias"), kind == "weight"
    return "unknown"


def _gpt2_target(name: str, cfg: GPT2Config) -> tuple[tuple, bool] | None:
    if name == "lm_head.weight":
        return None
    name = name.removeprefix("transformer.")
    leaf = {"weight": "scale", "bias": "bias"}
    if name in ("wte.weight", "wpe.weight"):
        return ("embed" if name[1] == "t" else "pos_embed", "embedding"), False
    m = re.fullmatch(r"ln_f\.(weight|bias)", name)
    if m:
        return ("norm", leaf[m[1]]), False
    m = re.fullmatch(r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", name)
    if not m:
        return "unknown"
    parts = m[2].split(".")
    kind = (leaf if parts[0].startswith("ln") else {"weight": "kernel", "bias": "bias"})[m[3]]
    return ("layers", int(m[1]), *parts, kind), False


def param_sharding(shape: tuple[int, ...], mesh: Mesh, axis: str) -> NamedSharding:
    """FSDP-style placement: the largest dimension divisible by ``mesh.shape[axis]`` is split, else replicated.

    The sharding is on ``mesh`` with every axis made ``AxisType.Auto`` (see the module docstring).
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    n = mesh.shape[axis]
    dims = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
    spec = [None] * len(shape)
    if n > 1 and dims:
        spec[max(dims, key=lambda i: shape[i])] = axis
    return NamedSharding(mesh, PartitionSpec(*spec))


def _place(tensor, shape: tuple[int, ...], transpose: bool, dtype, sharding: NamedSharding | None) -> jax.Array:
    """One tensor onto its devices, reading only the block each device holds."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        block = tensor[index[::-1]].T if transpose else tensor[index]
        return np.asarray(block, dtype)

    if sharding is None:
        return jnp.asarray(read(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, sharding, read)


def load_tokenizer(folder: str | Path, vocab_size: int | None = None):
    """The ``tokenizers.Tokenizer`` of ``tokenizer.json``.

    Raises:
      FileNotFoundError: no ``tokenizer.json``.
      ValueError: the tokenizer (added tokens included) has more ids than ``vocab_size``,
        so some of its ids would index past the embedding table.
    """
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; save the tokenizer beside the model (tokenizer.json)")
    tok = Tokenizer.from_file(str(path))
    size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise ValueError(
            f"{path} has {size} token ids but config.json vocab_size={vocab_size}; "
            "the tokenizer does not belong to this model"
        )
    return tok


def load(folder: str | Path, *, mesh: Mesh | None = None, axis: str = "fsdp", dtype=jnp.float32):
    """A Llama or GPT-2 model with a checkpoint's weights, its tokenizer and its config.

    Args:
      folder: a Hugging Face model folder (see the module docstring).
      mesh: the device mesh to place the parameters on (FSDP-style along ``axis``, see
        :func:`param_sharding`); ``None`` puts them on the default device.
      axis: the mesh axis that shards the parameters.
      dtype: the parameters' dtype (checkpoint values are cast to it).

    Returns:
      ``(model, tokenizer, config)``: a :class:`~jcompress.models.llama.Llama` or
      :class:`~jcompress.models.gpt2.GPT2`, a ``tokenizers.Tokenizer`` and the
      model's config.

    Raises:
      ValueError: an unsupported architecture, an unknown tensor, a tensor whose shape
        does not fit the config, a mesh without ``axis``, or a tokenizer larger than the
        vocabulary.
      FileNotFoundError: ``config.json``, the weights, a shard or ``tokenizer.json`` is missing.
      KeyError: the checkpoint lacks a tensor the model needs.
    """
    from safetensors import safe_open

    folder = Path(folder)
    cfg = read_config(folder)
    if mesh is not None and axis not in mesh.axis_names:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    tokenizer = load_tokenizer(folder, cfg.vocab_size)
    files = checkpoint_files(folder)
    build, target = (Llama, _llama_target) if isinstance(cfg, LlamaConfig) else (GPT2, _gpt2_target)
    abstract = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = dict(_flat(nnx.to_pure_dict(state)))

    loaded: dict[tuple, jax.Array] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with safe_open(str(path), framework="numpy") as f:
            for name in names:
                if _SKIP.search(name):
                    continue
                dest = target(name, cfg)
                if dest is None:
                    continue
                if dest == "unknown" or dest[0] not in expected:
                    raise ValueError(f"{path.name}: tensor {name!r} has no place in {build.__name__}({cfg})")
                key, transpose = dest
                tensor = f.get_slice(name)
                shape = tuple(tensor.get_shape())
                shape = shape[::-1] if transpose else shape
                want = expected[key].shape
                if shape != want:
                    raise ValueError(f"{path.name}: tensor {name!r} gives shape {shape} but {'/'.join(map(str, key))} needs {want}")
                sharding = None if mesh is None else param_sharding(shape, mesh, axis)
                loaded[key] = _place(tensor, shape, transpose, dtype, sharding)
    missing = sorted("/".join(map(str, k)) for k in expected.keys() - loaded.keys())
    if missing:
        raise KeyError(f"{folder}: the checkpoint lacks tensors for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    params: dict = {}
    for key, value in loaded.items():
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), tokenizer, cfg


def _flat(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v
