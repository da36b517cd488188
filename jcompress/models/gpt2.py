"""GPT-2 in Flax NNX, with the key/value cache and calls of :mod:`jcompress.models.llama`.

The architecture is the one Hugging Face's ``GPT2LMHeadModel`` computes, so a checkpoint
loads into it unchanged (:mod:`jcompress.models.hf_lm` does the loading):

* token embedding plus a learned position embedding;
* ``num_layers`` pre-norm blocks: LayerNorm -> causal multi-head self-attention (one
  fused ``c_attn`` projection to queries, keys and values, then ``c_proj``) ->
  residual; LayerNorm -> MLP ``c_proj(gelu(c_fc(x)))`` -> residual;
* a final LayerNorm and the output projection tied to the token embedding.

``activation`` is Hugging Face's ``activation_function``: ``'gelu_new'`` (GPT-2's tanh
approximation, the default), ``'gelu_pytorch_tanh'`` (the same function) or ``'gelu'``
(exact erf).

Parameter names (slash-joined)::

  embed/embedding                        (vocab, d)
  pos_embed/embedding                    (max_position, d)
  layers/<i>/ln_1/{scale,bias}           (d,)
  layers/<i>/attn/c_attn/{kernel,bias}   (d, 3 d), (3 d,): queries, keys, values in that order
  layers/<i>/attn/c_proj/{kernel,bias}   (d, d), (d,)
  layers/<i>/ln_2/{scale,bias}           (d,)
  layers/<i>/mlp/c_fc/{kernel,bias}      (d, ff), (ff,)
  layers/<i>/mlp/c_proj/{kernel,bias}    (ff, d), (d,)
  norm/{scale,bias}                      (d,)

Every matrix is a plain ``nnx.Linear`` with kernel ``(in, out)``: Hugging Face stores
GPT-2's ``Conv1D`` weights as ``(in, out)`` already, the transpose of a torch
``Linear``, and the loader takes them as they are.

Example:
  >>> cfg = GPT2Config(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4)
  >>> model = GPT2(cfg, rngs=nnx.Rngs(0))
  >>> logits, _ = model(jnp.ones((1, 5), jnp.int32))   # (1, 5, 100)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jcompress.models.llama import Decoder, LayerCache, ScaleGroup, attend

__all__ = ["ACTIVATIONS", "GPT2", "GPT2Block", "GPT2Config"]

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class GPT2Config(NamedTuple):
    """Sizes of a GPT-2 model; ``intermediate_size`` defaults to ``4 * hidden_size``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int | None = None
    max_position: int = 1024
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"


class GPT2Attention(nnx.Module):
    """Causal multi-head self-attention with the fused ``c_attn`` projection."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        if d % cfg.num_heads:
            raise ValueError(f"hidden_size={d} is not divisible by num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.c_attn = nnx.Linear(d, 3 * d, rngs=rngs)
        self.c_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array, cache: LayerCache | None = None):
        b, t, d = x.shape
        q, k, v = (y.reshape(b, t, self.num_heads, d // self.num_heads) for y in jnp.split(self.c_attn(x), 3, axis=-1))
        out, cache = attend(q, k, v, cache)
        return self.c_proj(out.reshape(b, t, d)), cache


class GPT2MLP(nnx.Module):
    """``c_proj(gelu(c_fc(x)))``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        d, ff = cfg.hidden_size, cfg.intermediate_size or 4 * cfg.hidden_size
        self.activation = cfg.activation
        self.c_fc = nnx.Linear(d, ff, rngs=rngs)
        self.c_proj = nnx.Linear(ff, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class GPT2Block(nnx.Module):
    """One pre-norm block: ``h + attn(ln_1(h))``, then ``h + mlp(ln_2(h))``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.ln_1 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.attn = GPT2Attention(cfg, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(
        self, h: jax.Array, positions: jax.Array | None = None, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        """``h (batch, seq, d)`` -> ``(h, cache)``; ``positions`` is unused (they enter at the embedding)."""
        a, cache = self.attn(self.ln_1(h), cache)
        h = h + a
        return h + self.mlp(self.ln_2(h)), cache

    def scale_groups(self) -> tuple[ScaleGroup, ...]:
        """``ln_1 -> c_attn``, the values (last third of ``c_attn``) -> ``attn/c_proj``, ``ln_2 -> c_fc``.

        The MLP's ``c_proj`` has none: the GELU between ``c_fc`` and it is not per-channel linear.
        """
        d = self.attn.c_proj.in_features
        return (
            ScaleGroup("ln_1", ("attn/c_attn",)),
            ScaleGroup("attn/c_attn", ("attn/c_proj",), offset=2 * d),
            ScaleGroup("ln_2", ("mlp/c_fc",)),
        )


class GPT2(Decoder):
    """GPT-2; see the module docstring for the layout and :class:`~jcompress.models.llama.Decoder` for the calls.

    Args:
      cfg: the sizes.
      rngs: initialisation keys (a checkpoint loader overwrites every parameter).
    """

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"activation={cfg.activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.max_position, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([GPT2Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def embed_inputs(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token plus position embeddings: ``(batch, seq)`` ids and positions -> ``(batch, seq, d)``.

        Raises:
          ValueError: the sequence is longer than ``max_position`` (the learned table has
            no rows beyond it).
        """
        if tokens.shape[-1] > self.cfg.max_position:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds max_position={self.cfg.max_position}")
        return self.embed(tokens) + self.pos_embed(positions)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and the tied output projection: ``(batch, seq, d)`` -> ``(batch, seq, vocab)`` float32."""
        return self.embed.attend(self.norm(h)).astype(jnp.float32)

    def kv_shape(self) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of the cache."""
        return self.cfg.num_heads, self.cfg.hidden_size // self.cfg.num_heads
