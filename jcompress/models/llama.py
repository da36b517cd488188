"""A Llama-architecture decoder in Flax NNX, with a key/value cache for incremental decoding.

The architecture is the one Hugging Face's ``LlamaForCausalLM`` computes, so a checkpoint
loads into it unchanged (:mod:`jcompress.models.hf_lm` does the loading):

* token embedding, no position embedding;
* ``num_layers`` pre-norm decoder blocks: RMSNorm -> causal self-attention with rotary
  position embeddings and grouped-query attention (``num_kv_heads`` key/value heads
  shared by ``num_heads // num_kv_heads`` query heads each) -> residual; RMSNorm ->
  SwiGLU MLP (``down(silu(gate(x)) * up(x))``) -> residual;
* a final RMSNorm and the output projection ``lm_head``, or the transposed token
  embedding when ``tie_embeddings`` is set.

Rotary frequencies follow the config's ``rope_theta`` and ``rope_scaling``
(:class:`RopeScaling`: ``'default'``, ``'linear'`` or ``'llama3'``).

Parameter names (slash-joined, as :mod:`jcompress.tree` shows them)::

  embed/embedding                                   (vocab, d)
  layers/<i>/attn_norm/scale                        (d,)
  layers/<i>/attn/{q_proj,k_proj,v_proj}/kernel     (d, heads * head_dim), (d, kv_heads * head_dim) x 2
  layers/<i>/attn/o_proj/kernel                     (heads * head_dim, d)
  layers/<i>/mlp_norm/scale                         (d,)
  layers/<i>/mlp/{gate_proj,up_proj}/kernel         (d, ff)
  layers/<i>/mlp/down_proj/kernel                   (ff, d)
  norm/scale                                        (d,)
  lm_head/kernel                                    (d, vocab), absent when tied

Every matrix that multiplies activations is a plain ``nnx.Linear`` (kernel ``(in, out)``,
with ``bias`` only when ``attention_bias`` / ``mlp_bias`` is set), so the default
selection of the jcompress transforms (names ending in ``kernel``) and one-shot
calibration find all 7 per block.

Calling conventions, shared with :mod:`jcompress.models.gpt2`:

* ``model(tokens, cache=None, positions=None) -> (logits, cache)``: ``tokens`` is
  ``(batch, seq)`` int, ``logits`` ``(batch, seq, vocab)`` float32.
* The pieces, for block-by-block work: ``h = model.embed_inputs(tokens, positions)``;
  ``h, _ = block(h, positions)`` for each ``block`` in ``model.layers``;
  ``logits = model.logits(h)``.
* Incremental decoding: ``cache = model.init_cache(batch, max_len)`` holds one
  :class:`LayerCache` per block; each call writes the new keys and values after the
  ones already held and returns the updated cache. Without ``positions`` the new
  tokens take the positions that follow the cached ones.

Example:
  >>> cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
  ...                   num_kv_heads=2, intermediate_size=64)
  >>> model = Llama(cfg, rngs=nnx.Rngs(0))
  >>> tokens = jnp.ones((1, 5), jnp.int32)
  >>> logits, _ = model(tokens)                      # (1, 5, 100)
  >>> cache = model.init_cache(1, 8)
  >>> logits, cache = model(tokens, cache=cache)     # prefill 5 positions
  >>> step, cache = model(tokens[:, :1], cache=cache)  # position 5
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ROPE_TYPES",
    "Decoder",
    "LayerCache",
    "Llama",
    "LlamaBlock",
    "LlamaConfig",
    "RopeScaling",
    "ScaleGroup",
    "attend",
    "check_positions",
    "rope_frequencies",
]

ROPE_TYPES = ("default", "linear", "llama3")


class RopeScaling(NamedTuple):
    """How rotary frequencies are stretched for long contexts (Hugging Face ``rope_scaling``).

    ``kind='default'``: the plain frequencies ``theta ** (-2i / head_dim)``.
    ``kind='linear'``: every frequency divided by ``factor`` (positions interpolated).
    ``kind='llama3'``: wavelengths longer than ``original_max_position / low_freq_factor``
    divided by ``factor``, shorter than ``original_max_position / high_freq_factor``
    kept, and a linear blend in between (Llama 3.1).
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


class LlamaConfig(NamedTuple):
    """Sizes of a Llama decoder (the fields of a Hugging Face ``config.json`` it needs).

    ``head_dim`` defaults to ``hidden_size // num_heads``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    max_position: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotary angular frequencies ``(head_dim // 2,)`` float32: position ``p`` rotates pair ``i`` by ``p * f[i]``.

    Raises:
      ValueError: ``scaling.kind`` is not one of :data:`ROPE_TYPES`, or ``head_dim`` is odd.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    scaling = scaling or RopeScaling()
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling.kind == "default":
        pass
    elif scaling.kind == "linear":
        freq = freq / scaling.factor
    elif scaling.kind == "llama3":
        wavelength = 2 * math.pi / freq
        long_wave = scaling.original_max_position / scaling.low_freq_factor
        short_wave = scaling.original_max_position / scaling.high_freq_factor
        # 0 at the long-wavelength edge (fully divided by factor), 1 at the short edge (kept)
        blend = (scaling.original_max_position / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - blend) * freq / scaling.factor + blend * freq
        freq = np.where(wavelength > long_wave, freq / scaling.factor, np.where(wavelength < short_wave, freq, blended))
    else:
        raise ValueError(f"rope_scaling kind={scaling.kind!r} is not supported; use one of {ROPE_TYPES}")
    return freq.astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, freq: np.ndarray) -> jax.Array:
    """Rotate ``x (batch, seq, heads, head_dim)`` by ``positions (batch, seq)``.

    Pairs are ``(x[..., i], x[..., i + head_dim // 2])`` (the Hugging Face layout).
    """
    angles = positions[..., None].astype(jnp.float32) * freq  # (batch, seq, head_dim // 2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class ScaleGroup(NamedTuple):
    """Layers of a block whose inputs are per-channel outputs of one source, as plain data.

    The input channels of every ``targets`` layer are output channels ``[offset, offset +
    n)`` of ``source`` with nothing between them that mixes channels or is nonlinear (a
    norm's affine scale, or a linear layer whose output feeds the targets only through
    linear, per-channel paths such as attention over values). Scaling those source outputs
    by ``1 / s`` and the targets' kernel rows by ``s`` therefore leaves the block's function
    unchanged, which activation-aware quantization (AWQ, SmoothQuant) uses.

    Attributes:
      source: module path in the block (``'attn_norm'``, ``'mlp/up_proj'``): a norm with
        ``scale`` (and ``bias``), or a Linear with ``kernel`` (and ``bias``).
      targets: module paths of the Linears fed by the source.
      offset: first output channel of the source that feeds the targets (GPT-2's values
        are the last third of the fused ``c_attn``).
    """

    source: str
    targets: tuple[str, ...]
    offset: int = 0


class LayerCache(NamedTuple):
    """One block's key/value cache.

    Attributes:
      k, v: ``(batch, max_len, kv_heads, head_dim)``; slots ``[0, length)`` are filled.
      length: ``()`` int32, the number of filled slots.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> LayerCache:
        zeros = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
    """Causal scaled dot-product attention with grouped key/value heads and an optional cache.

    Args:
      q: ``(batch, seq, heads, head_dim)`` queries.
      k, v: ``(batch, seq, kv_heads, head_dim)`` new keys and values; ``heads`` must be a
        multiple of ``kv_heads`` (query head ``h`` reads key/value head ``h // (heads // kv_heads)``).
      cache: keys and values of earlier tokens, or ``None``. The new ones are written at
        slots ``[cache.length, cache.length + seq)``; the caller sizes the cache so that
        they fit (a write past ``max_len`` is clipped by ``dynamic_update_slice``).

    Returns:
      ``(out, cache)``: ``out (batch, seq, heads, head_dim)`` and the updated cache
      (``None`` without one). Query ``i`` sees slots up to its own; softmax in float32.
    """
    b, t, heads, hd = q.shape
    kv_heads = k.shape[2]
    if cache is None:
        keys, values, start, new_cache = k, v, 0, None
    else:
        start = cache.length
        keys = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
        new_cache = LayerCache(keys, values, cache.length + t)
    q = q.reshape(b, t, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys).astype(jnp.float32) / math.sqrt(hd)
    visible = jnp.arange(keys.shape[1])[None, :] <= (start + jnp.arange(t))[:, None]  # (t, slots)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values)
    return out.reshape(b, t, heads, hd).astype(q.dtype), new_cache


def check_positions(tokens: jax.Array, cache, positions: jax.Array | None) -> jax.Array:
    """``(batch, seq)`` int32 positions: ``positions`` broadcast, or the ones after the cache.

    Raises:
      ValueError: ``tokens`` is not ``(batch, seq)`` or ``positions`` does not fit it.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq) integers, got shape {tokens.shape}")
    b, t = tokens.shape
    if positions is None:
        start = 0 if cache is None else cache[0].length
        return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(f"positions shape {positions.shape} must be (seq,) or (batch, seq) = {(b, t)}")
    return jnp.broadcast_to(positions, (b, t))


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.dim_per_head
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.cfg = cfg
        rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)  # validates the scaling now, not at the first call
        bias = cfg.attention_bias
        self.q_proj = nnx.Linear(d, cfg.num_heads * hd, use_bias=bias, rngs=rngs)
        self.k_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=bias, rngs=rngs)
        self.v_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=bias, rngs=rngs)
        self.o_proj = nnx.Linear(cfg.num_heads * hd, d, use_bias=bias, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None):
        b, t, _ = x.shape
        hd = self.head_dim
        freq = rope_frequencies(hd, self.cfg.rope_theta, self.cfg.rope_scaling)
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, hd), positions, freq)
        k = apply_rotary(self.k_proj(x).reshape(b, t, self.num_kv_heads, hd), positions, freq)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, hd)
        out, cache = attend(q, k, v, cache)
        return self.o_proj(out.reshape(b, t, self.num_heads * hd)), cache


class SwiGLU(nnx.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, d: int, ff: int, *, bias: bool, rngs: nnx.Rngs):
        self.gate_proj = nnx.Linear(d, ff, use_bias=bias, rngs=rngs)
        self.up_proj = nnx.Linear(d, ff, use_bias=bias, rngs=rngs)
        self.down_proj = nnx.Linear(ff, d, use_bias=bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    """One pre-norm decoder block: ``h + attn(attn_norm(h))``, then ``h + mlp(mlp_norm(h))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.attn_norm = nnx.RMSNorm(d, epsilon=cfg.rms_norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d, epsilon=cfg.rms_norm_eps, rngs=rngs)
        self.mlp = SwiGLU(d, cfg.intermediate_size, bias=cfg.mlp_bias, rngs=rngs)

    def __call__(
        self, h: jax.Array, positions: jax.Array, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        """``h (batch, seq, d)`` and ``positions (batch, seq)`` -> ``(h, cache)``."""
        a, cache = self.attn(self.attn_norm(h), positions, cache)
        h = h + a
        return h + self.mlp(self.mlp_norm(h)), cache

    def scale_groups(self) -> tuple[ScaleGroup, ...]:
        """Norm -> projections and linear -> linear pairs whose channels can be rescaled.

        ``v_proj -> o_proj`` is listed only without grouped-query attention: with shared
        key/value heads one value channel feeds several ``o_proj`` inputs.
        """
        attn = self.attn
        groups = [ScaleGroup("attn_norm", ("attn/q_proj", "attn/k_proj", "attn/v_proj"))]
        if attn.num_heads == attn.num_kv_heads:
            groups.append(ScaleGroup("attn/v_proj", ("attn/o_proj",)))
        groups += [ScaleGroup("mlp_norm", ("mlp/gate_proj", "mlp/up_proj")), ScaleGroup("mlp/up_proj", ("mlp/down_proj",))]
        return tuple(groups)


class Decoder(nnx.Module):
    """The calls shared by :class:`Llama` and :class:`~jcompress.models.gpt2.GPT2`.

    A subclass holds ``cfg`` (with ``num_layers``), the token embedding ``embed`` (an
    ``nnx.Embed``), ``layers`` (blocks called as ``block(h, positions, cache) -> (h,
    cache)``; ``positions`` may also be ``(1, seq)``) and defines ``embed_inputs``,
    ``logits`` and ``kv_shape``.
    """

    def init_cache(self, batch: int, max_len: int, dtype=None) -> tuple[LayerCache, ...]:
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (``dtype``: the embedding's)."""
        dtype = dtype or self.embed.embedding.dtype
        return tuple(LayerCache.empty(batch, max_len, *self.kv_shape(), dtype) for _ in range(self.cfg.num_layers))

    def __call__(
        self, tokens: jax.Array, cache: tuple[LayerCache, ...] | None = None, positions: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[LayerCache, ...] | None]:
        """Logits ``(batch, seq, vocab)`` float32 and the updated cache (``None`` without one).

        Args:
          tokens: ``(batch, seq)`` integer token ids.
          cache: from :meth:`init_cache` or a previous call, or ``None`` for a plain forward.
          positions: ``(seq,)`` or ``(batch, seq)`` positions; by default the ``seq``
            positions after the cached ones.
        """
        positions = check_positions(tokens, cache, positions)
        h = self.embed_inputs(tokens, positions)
        new_cache = []
        for i, block in enumerate(self.layers):
            h, layer_cache = block(h, positions, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self.logits(h), None if cache is None else tuple(new_cache)


class Llama(Decoder):
    """The Llama decoder; see the module docstring for the layout, names and calls.

    Args:
      cfg: the sizes.
      rngs: initialisation keys (a checkpoint loader overwrites every parameter).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([LlamaBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.rms_norm_eps, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs)

    def embed_inputs(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """``(batch, seq)`` token ids -> ``(batch, seq, d)`` hidden states (positions enter in attention)."""
        return self.embed(tokens)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and output projection: ``(batch, seq, d)`` -> ``(batch, seq, vocab)`` float32."""
        h = self.norm(h)
        out = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return out.astype(jnp.float32)

    def kv_shape(self) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of the cache."""
        return self.cfg.num_kv_heads, self.cfg.dim_per_head
