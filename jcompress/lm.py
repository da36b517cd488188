"""Evaluate decoder language models: sliding-window perplexity, greedy generation, token streams.

Works with any model called as ``model(tokens, cache=None, positions=None) -> (logits,
cache)`` with ``init_cache(batch, max_len)`` (:class:`~jcompress.models.llama.Llama`,
:class:`~jcompress.models.gpt2.GPT2`, or a compressed copy of either).

**Perplexity** of a long token stream is computed the standard way with a window of
``seq_len`` tokens moved by ``stride`` (:func:`windows` gives the plan):

* window ``k`` covers tokens ``[k * stride, k * stride + seq_len)`` (the last one is cut
  at the end of the stream, and no window starts after one that reached the end);
* each window scores only the tokens no earlier window scored, each predicted from the
  tokens before it inside the window. With ``stride < seq_len`` every token after the
  first is scored exactly once, with at least ``seq_len - stride`` tokens of context
  (except in the first window); with ``stride == seq_len`` the windows are disjoint and
  the first token of each window, having no context, is not scored;
* perplexity is ``exp(sum of negative log-likelihoods / number of scored tokens)``.

Windows are run in batches of ``batch_size`` under ``jax.jit``, compiled once per window
shape (the full windows, and a shorter last one).

Example:
  >>> model, tok, cfg = hf_lm.load('path/to/llama')
  >>> ids = corpus_ids(tok, 'evaluation')
  >>> perplexity(model, ids, seq_len=128, stride=64, batch_size=8).perplexity
  >>> generate(model, 'The return statement', max_new_tokens=20, tokenizer=tok)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import textdata

__all__ = ["Perplexity", "Window", "corpus_ids", "generate", "perplexity", "sample_windows", "windows"]


class Window(NamedTuple):
    """One evaluation window: tokens ``[begin, end)``, of which ``[first, end)`` are scored."""

    begin: int
    end: int
    first: int


class Perplexity(NamedTuple):
    """The result of :func:`perplexity`.

    Attributes:
      perplexity: ``exp(nll_sum / num_scored)``.
      nll_sum: summed negative log-likelihood (nats) of the scored tokens.
      num_scored: how many tokens were scored.
      num_windows: how many windows were run.
    """

    perplexity: float
    nll_sum: float
    num_scored: int
    num_windows: int


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


def _token_array(token_ids, name: str = "token_ids") -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got shape {ids.shape} {ids.dtype}")
    return ids.astype(np.int32)


def windows(num_tokens: int, *, seq_len: int, stride: int) -> list[Window]:
    """The sliding-window plan over a stream of ``num_tokens`` tokens (see the module docstring).

    Example:
      >>> [w.first for w in windows(10, seq_len=4, stride=2)]    # scores 1-3, 4-5, 6-7, 8-9
      [1, 4, 6, 8]
    """
    num_tokens = _positive_int(num_tokens, "num_tokens", 2)
    seq_len = _positive_int(seq_len, "seq_len", 2)
    stride = _positive_int(stride, "stride")
    if stride > seq_len:
        raise ValueError(f"stride={stride} exceeds seq_len={seq_len}; tokens between windows would never be scored")
    plan, scored_up_to = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        plan.append(Window(begin, end, max(scored_up_to, begin + 1)))
        scored_up_to = end
        if end == num_tokens:
            break
    return plan


_NLL_FNS: dict = {}


def _nll_fn(graphdef):
    """``(state, ids (B, L), scored (B, L - 1)) -> (B,)`` summed NLL per row, jitted."""
    if graphdef not in _NLL_FNS:

        @jax.jit
        def nll(state, ids, scored):
            logits, _ = nnx.merge(graphdef, state)(ids)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return -(target * scored).sum(axis=1)

        _NLL_FNS[graphdef] = nll
    return _NLL_FNS[graphdef]


def perplexity(model: nnx.Module, token_ids, *, seq_len: int, stride: int, batch_size: int) -> Perplexity:
    """Sliding-window perplexity of a token stream (see the module docstring).

    Args:
      model: a decoder (Llama, GPT-2 or compatible).
      token_ids: 1-D integer token ids, at least 2.
      seq_len: window length (at most the model's context).
      stride: how far each window moves, ``1 <= stride <= seq_len``.
      batch_size: windows per forward pass (the last batch is padded with unscored rows).

    Returns:
      A :class:`Perplexity`; sums are accumulated in float64 on the host.

    Raises:
      ValueError: bad ``token_ids``, ``seq_len``, ``stride`` or ``batch_size``.
    """
    ids = _token_array(token_ids)
    batch_size = _positive_int(batch_size, "batch_size")
    plan = windows(len(ids), seq_len=seq_len, stride=stride)
    graphdef, state = nnx.split(model)
    nll = _nll_fn(graphdef)
    by_length: dict[int, list[Window]] = {}
    for w in plan:
        by_length.setdefault(w.end - w.begin, []).append(w)
    total, count = 0.0, 0
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            rows = np.zeros((batch_size, length), np.int32)
            scored = np.zeros((batch_size, length - 1), np.float32)
            for r, w in enumerate(chunk):
                rows[r] = ids[w.begin : w.end]
                scored[r, w.first - w.begin - 1 :] = 1.0  # target at window offset j sits in column j - 1
            total += float(np.asarray(nll(state, rows, scored), np.float64).sum())
            count += int(scored.sum())
    return Perplexity(math.exp(total / count), total, count, len(plan))


_STEP_FNS: dict = {}


def _step_fn(graphdef):
    """``(state, tokens (B, T), cache) -> (greedy next token (B,), cache)``, jitted (once per ``T``)."""
    if graphdef not in _STEP_FNS:

        @jax.jit
        def step(state, tokens, cache):
            logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        _STEP_FNS[graphdef] = step
    return _STEP_FNS[graphdef]


def generate(model: nnx.Module, prompt, *, max_new_tokens: int, tokenizer=None):
    """Greedy decoding with the key/value cache.

    The prompt is run once (prefill), then one token at a time, each step attending to
    the cached keys and values; the cache holds ``prompt length + max_new_tokens``
    positions.

    Args:
      model: a decoder with ``init_cache``.
      prompt: a string (needs ``tokenizer``), or integer ids ``(seq,)`` or ``(batch, seq)``.
      max_new_tokens: how many tokens to append (no early stop).
      tokenizer: a ``tokenizers.Tokenizer``, for a string prompt.

    Returns:
      For a string prompt, the decoded text of prompt and continuation; for ids, an
      int32 array ``(batch, seq + max_new_tokens)`` (``(seq + max_new_tokens,)`` for 1-D ids).

    Raises:
      ValueError: a string prompt without ``tokenizer``, an empty prompt, or more
        positions than the model's ``max_position``.
    """
    max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a string prompt needs tokenizer=")
        ids = np.asarray([tokenizer.encode(prompt).ids], np.int32)
    else:
        ids = np.asarray(prompt)
        if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt must be a string or (seq,) / (batch, seq) integer ids, got shape {ids.shape}")
        ids = np.atleast_2d(ids).astype(np.int32)
    batch, length = ids.shape
    if length == 0:
        raise ValueError("the prompt is empty")
    total = length + max_new_tokens
    if total > model.cfg.max_position:
        raise ValueError(
            f"prompt length {length} + max_new_tokens={max_new_tokens} exceeds the model's max_position={model.cfg.max_position}"
        )
    graphdef, state = nnx.split(model)
    step = _step_fn(graphdef)
    cache = model.init_cache(batch, total)
    token, cache = step(state, ids, cache)
    new = [token]
    for _ in range(max_new_tokens - 1):
        token, cache = step(state, token[:, None], cache)
        new.append(token)
    out = np.concatenate([ids, np.stack([np.asarray(t) for t in new], axis=1)], axis=1)
    if isinstance(prompt, str):
        return tokenizer.decode(out[0].tolist())
    return out if np.ndim(prompt) == 2 else out[0]


def sample_windows(token_ids, *, num: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``num`` calibration sequences ``(num, seq_len)`` int32 cut from a token stream at random offsets.

    Offsets are uniform over ``[0, len(token_ids) - seq_len]`` (drawn with
    ``numpy.random.default_rng(seed)``), as one-shot compression papers sample their
    calibration sets from a text corpus.

    Raises:
      ValueError: the stream is shorter than ``seq_len`` (give more text or a shorter
        ``seq_len``), or ``num`` / ``seq_len`` is not a positive int.
    """
    ids = _token_array(token_ids)
    num, seq_len = _positive_int(num, "num"), _positive_int(seq_len, "seq_len")
    if len(ids) < seq_len:
        raise ValueError(
            f"the calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}; give more text or a shorter seq_len"
        )
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=num)
    return np.stack([ids[s : s + seq_len] for s in starts])


def corpus_ids(tokenizer, split: str, *, limit: int | None = None) -> np.ndarray:
    """The sentences of :func:`jcompress.textdata.sentences` joined by spaces and tokenized: ``(n,)`` int32.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.
      split: ``'calibration'`` or ``'evaluation'`` (disjoint topics of Python's documentation).
      limit: use only the first ``limit`` sentences.
    """
    text = " ".join(textdata.sentences(split, limit=limit))
    return np.asarray(tokenizer.encode(text).ids, np.int32)
