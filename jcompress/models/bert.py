"""A BERT / MiniLM encoder in Flax NNX, with mean pooling for sentence embeddings.

The architecture is the original BERT encoder (Devlin et al. 2019) as Hugging Face's
``BertModel`` computes it, so a pretrained checkpoint loads into it unchanged
(:mod:`jcompress.models.hf` does the loading):

* embeddings: word + position + token type, then LayerNorm;
* ``num_layers`` post-norm transformer layers: multi-head self-attention (``query``,
  ``key``, ``value``, output projection ``attention_out``) with a residual and
  ``attention_norm``; a feed-forward block ``intermediate`` (exact erf GELU) ->
  ``output`` with a residual and ``output_norm``;
* padding positions are masked out of attention (``attention_mask`` 1 for real tokens,
  0 for padding);
* :meth:`BertEncoder.embed` gives sentence embeddings as sentence-transformers does for
  all-MiniLM-L6-v2: the mean of the last hidden states over real tokens, L2-normalised.

Parameter names (slash-joined, as :mod:`jcompress.tree` shows them)::

  embeddings/word/embedding          (vocab, d)
  embeddings/position/embedding      (max_position, d)
  embeddings/token_type/embedding    (type_vocab, d)
  embeddings/norm/{scale,bias}       (d,)
  layers/<i>/{query,key,value,attention_out}/{kernel (d, d), bias (d,)}
  layers/<i>/attention_norm/{scale,bias}
  layers/<i>/intermediate/{kernel (d, ff), bias (ff,)}
  layers/<i>/output/{kernel (ff, d), bias (d,)}
  layers/<i>/output_norm/{scale,bias}

Every matrix that multiplies activations is an ``nnx.Linear`` with a Flax kernel of
shape ``(in, out)``, so the one-shot compressors (:mod:`jcompress.oneshot`) find all 6 per
layer by calibration and the default selection (names ending in ``kernel``).

Example:
  >>> cfg = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
  ...                  intermediate_size=64)
  >>> model = BertEncoder(cfg, rngs=nnx.Rngs(0))
  >>> ids = jnp.ones((2, 7), jnp.int32); mask = jnp.ones((2, 7), jnp.int32)
  >>> model.embed(ids, mask).shape
  (2, 32)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["BertConfig", "BertEncoder", "BertLayer", "layer_groups", "mean_pool"]


class BertConfig(NamedTuple):
    """Sizes of a BERT encoder (the fields of a Hugging Face ``config.json`` it needs)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings followed by LayerNorm."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.word = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position, d, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.norm(x)


class BertLayer(nnx.Module):
    """One post-norm transformer layer: self-attention block then feed-forward block."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d, ff = cfg.hidden_size, cfg.intermediate_size
        if d % cfg.num_heads:
            raise ValueError(f"hidden_size={d} is not divisible by num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.attention_out = nnx.Linear(d, d, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.intermediate = nnx.Linear(d, ff, rngs=rngs)
        self.output = nnx.Linear(ff, d, rngs=rngs)
        self.output_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads

        def heads(y):  # (b, t, d) -> (b, h, t, d / h)
            return y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bhqc,bhkc->bhqk", q, k) / jnp.sqrt(jnp.float32(d // h))
        keep = attention_mask[:, None, None, :].astype(bool)
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
        context = jnp.einsum("bhqk,bhkc->bhqc", jax.nn.softmax(scores, axis=-1), v)
        context = context.transpose(0, 2, 1, 3).reshape(b, t, d)
        x = self.attention_norm(x + self.attention_out(context))
        y = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
        return self.output_norm(x + y)


class BertEncoder(nnx.Module):
    """The BERT encoder; see the module docstring for the layout and parameter names.

    Args:
      cfg: the sizes.
      rngs: initialisation keys (a checkpoint loader overwrites every parameter).
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        """Last hidden states.

        Args:
          input_ids: ``(batch, seq)`` integer token ids.
          attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding.
          token_type_ids: ``(batch, seq)`` segment ids; zeros when omitted.

        Returns:
          ``(batch, seq, hidden_size)`` float32.
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be (batch, seq)"
            )
        if input_ids.shape[1] > self.cfg.max_position:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position={self.cfg.max_position}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Sentence embeddings ``(batch, hidden_size)``: masked mean pooling, then L2 norm."""
        return mean_pool(self(input_ids, attention_mask), attention_mask)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of ``hidden (batch, seq, d)`` over real tokens, L2-normalised to unit length."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def layer_groups(cfg: BertConfig) -> list[str]:
    """Regexes, one per transformer layer in order, for sequential (layer by layer) calibration."""
    return [rf"^layers/{i}/" for i in range(cfg.num_layers)]
