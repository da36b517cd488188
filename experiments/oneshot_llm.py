"""One-shot compression of a decoder language model, block by block, measured by perplexity.

Command: ``jcompress run oneshot_llm [--quick]`` (``--config.model=DIR`` runs the same
table on a Hugging Face Llama or GPT-2 folder instead of the model trained here).

No pretrained decoder weights can be installed offline, so the experiment trains its own
Llama-architecture model (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention:
:mod:`jcompress.models.llama`) and its own byte-level BPE tokenizer, then compresses it
with the methods of the one-shot papers and reports perplexity on held-out text.

Text (offline, English): Python's bundled documentation. Every help topic of
``pydoc_data.topics`` is one document; with ``data='python-docs'`` (the default) every
standard-library module whose docstrings hold prose is one more (its module, class and
function docstrings joined; tests, IDLE, turtle demos and tkinter left out). Documents
are split by a hash of their name (``sha256(name) % 10``: 0 test, 1 validation, else
train), so no document is in two splits. Python 3.11, full variant (``python-docs``,
2048-token vocabulary): 562 documents (450 / 52 / 60), 516,182 train / 49,644
validation / 64,475 test tokens (``results.json``'s ``tokens``); the first 16,384 of
the validation and test streams are evaluated. The quick variant uses the help topics
only (``data='pydoc-topics'``, 512-token vocabulary: 172,070 / 6,775 / 38,887 tokens).

Tokenizer: byte-level BPE (``tokenizers``), trained on the train documents only.

Model: ``vocab 2048, hidden 384, 6 layers, 8 query / 2 key-value heads of 48, SwiGLU
1024, untied embeddings`` (10.9M parameters, 9.3M of them in the blocks' Linears, the
size of nanoGPT's character-level Shakespeare model), trained from scratch for 300 steps
of 16 x 128 tokens (about 1.2 passes over the train stream) with AdamW (warmup, cosine decay, weight decay on matrices only) on random
``seq_len + 1``-token windows of the train stream. The quick model: hidden 64, 2
layers, 4 heads, 150 steps. The trained model is saved as a
Hugging Face folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) under
``jcompress.data.cache_dir() / 'oneshot_llm' / <hash of the training texts and the tokenizer, model and
training settings>`` and read back with :func:`jcompress.models.hf_lm.load`; a training
run saves its state every ``checkpoint_every`` steps there, so a killed run resumes, and
a finished folder is reused.

Compression (:func:`jcompress.blockwise.compress`): 128 calibration windows of 128 tokens
cut from the train stream; each decoder block is compressed from the statistics of its
inputs, which are the outputs of the already-compressed blocks before it. All 7 Linears
of every block are compressed; embeddings, norms and ``lm_head`` stay float32. Methods:

* 50% unstructured and 2:4 sparsity: magnitude (per layer), Wanda, SparseGPT;
* 4 and 3-bit weights, groups of ``group_size`` inputs (128; 64 in the quick variant),
  symmetric min-max grids: round-to-nearest,
  GPTQ (activation order), AWQ (scale search on a grid of 20, then the reference's
  weight-clipping search on every Linear but the query and key projections);
* SmoothQuant W8A8 (per-token dynamic 8-bit activations, 8-bit per-output weights),
  migration strength alpha chosen from ``alphas`` by validation perplexity, and the same
  quantizers with no scales folded (``w8a8 unsmoothed``, the paper's W8A8 baseline).

Outlier features (``--config.outlier_scale=20``): large decoders have a few hidden
dimensions whose activations are tens of times the rest, and Wanda's, AWQ's and
SmoothQuant's gains rest on them; the models trained here have none
(``scripts/llm_outlier_channels.py``). With ``outlier_scale`` set, the trained model is
first rescaled by :func:`plant_outliers` (``outlier_channels`` hidden dimensions and as many
random MLP dimensions per block, times ``outlier_scale``, their weights divided by it: the
same function, perplexity equal to float rounding), saved beside it, and the table is
measured on that model: a controlled test of the methods' mechanism, not a pretrained
model. The hidden dimensions are random (``outlier_select='random'``, folder
``<model>-outliers4x20``) or, with ``outlier_select='ablation'`` (folder
``<model>-outliers4x20-ablation``), the ones the trained model depends on most, as large
models' outlier dimensions are (Dettmers et al. 2022: zeroing them collapses perplexity,
zeroing as many random ones does not): those whose zeroing in every block's norms raises
the loss most on 16 training windows (:func:`ablation_losses`; never validation or test
text). ``--config.methods=pruning`` runs only dense and the six sparsity rows.

Every choice (the SmoothQuant alpha) is made on validation perplexity; test perplexity
is measured once per compressed model. Perplexity: sliding windows of ``eval_seq_len``
moved by ``eval_stride`` (:func:`jcompress.lm.perplexity`). ``seconds`` is the wall time
of the block-by-block compression (statistics, solver and output passes, compilation
included).

Expected runtime per seed: full, about 15 minutes of wall time on 2 idle CPU cores to train
(3 s a step; once, cached) and about 15 CPU-minutes to compress and evaluate (much longer
on a loaded machine, see RESULTS.md); quick, about 45 seconds of CPU (15 of them training,
cached after the first run).

Expected result (the papers' ordering): at 50% sparsity SparseGPT and Wanda stay far
closer to dense perplexity than magnitude pruning (Frantar & Alistarh 2023; Sun et al.
2023); at 4 and 3 bits GPTQ and AWQ stay below round-to-nearest (Frantar et al. 2022;
Lin et al. 2023); SmoothQuant W8A8 stays close to dense (Xiao et al. 2022). The measured
table and where it departs from this are in ``experiments/RESULTS.md`` (at 10.9M
parameters Wanda and AWQ are within noise of magnitude and round-to-nearest: this model's
activations have no outlier features, ``scripts/llm_outlier_channels.py``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments import common
from experiments.common import figure, write_results
from jcompress import blockwise, lm, oneshot
from jcompress.data import cache_dir
from jcompress.models import hf_lm
from jcompress.models.llama import Llama, LlamaConfig

__all__ = [
    "CORPORA",
    "METHODS",
    "METHOD_SETS",
    "OUTLIER_SELECTS",
    "ablation_losses",
    "documents",
    "get_config",
    "plant_outliers",
    "run",
    "split_documents",
    "train_tokenizer",
]

CORPORA = ("python-docs", "pydoc-topics")
SPLITS = ("train", "validation", "test")

# AWQ's weight-clipping search on every Linear but the query and key projections, as the
# reference's default (auto_clip) does: their errors are seen only through the softmax.
AWQ_CLIP = {r"[qk]_proj": False, ".*": True}
# (method, setting, blockwise.method arguments); the weight-quantization methods also get config.group_size.
# 'w8a8' is SmoothQuant's quantizers with no scales folded: the W8A8 baseline of its paper.
METHODS = [
    ("magnitude", "50%", {"sparsity": 0.5}),
    ("wanda", "50%", {"sparsity": 0.5}),
    ("sparsegpt", "50%", {"sparsity": 0.5}),
    ("magnitude", "2:4", {"n_m": (2, 4)}),
    ("wanda", "2:4", {"n_m": (2, 4)}),
    ("sparsegpt", "2:4", {"n_m": (2, 4)}),
    ("rtn", "4-bit", {"bits": 4}),
    ("gptq", "4-bit", {"bits": 4, "act_order": True}),
    ("awq", "4-bit", {"bits": 4, "clip": AWQ_CLIP}),
    ("rtn", "3-bit", {"bits": 3}),
    ("gptq", "3-bit", {"bits": 3, "act_order": True}),
    ("awq", "3-bit", {"bits": 3, "clip": AWQ_CLIP}),
    ("w8a8", "unsmoothed", {}),
]
QUICK = {("magnitude", "50%"), ("sparsegpt", "50%"), ("rtn", "3-bit"), ("gptq", "3-bit")}
# config.methods: every row; QUICK plus SmoothQuant; the sparsity rows only (no SmoothQuant).
METHOD_SETS = ("all", "quick", "pruning")
PRUNING = ("magnitude", "wanda", "sparsegpt")
# config.outlier_select: how plant_outliers' hidden dimensions are chosen.
OUTLIER_SELECTS = ("random", "ablation")
ABLATION_WINDOWS = 16  # training windows of calib_seq_len tokens that ablation_losses measures on
_STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
}


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """The full run (``'paper'``) or a tiny model trained for seconds (``'quick'``).

    Fields: ``data`` (one of :data:`CORPORA`), ``model`` (a Hugging Face folder to use
    instead of training; ``''`` trains), ``vocab_size``, the model's sizes
    (``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``,
    ``intermediate_size``), training (``train_seq_len``, ``batch_size``, ``steps``,
    ``warmup_steps``, ``lr``, ``weight_decay``, ``checkpoint_every``), calibration
    (``calib_windows``, ``calib_seq_len``), weight grids (``group_size``), SmoothQuant's
    ``alphas``, evaluation (``eval_seq_len``, ``eval_stride``, ``eval_tokens``: the first
    that many tokens of the validation and test streams, 0 for all), ``methods`` (one of
    :data:`METHOD_SETS`: ``'all'``; ``'quick'``, the subset :data:`QUICK` plus SmoothQuant;
    ``'pruning'``, dense and the six magnitude / Wanda / SparseGPT rows at 50% and 2:4, no
    quantization and no SmoothQuant), and planted outlier features (``outlier_scale``: 0
    compresses the model as trained; a factor such as 20 first applies
    :func:`plant_outliers` with ``outlier_channels`` channels; ``outlier_select``, one of
    :data:`OUTLIER_SELECTS`, picks the hidden dimensions: ``'random'``, or ``'ablation'``,
    those whose zeroing raises the trained model's training-text loss most,
    :func:`ablation_losses`).
    """
    config = common.base_config(
        variant,
        data="python-docs",
        model="",
        vocab_size=2048,
        hidden_size=384,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=1024,
        train_seq_len=128,
        batch_size=16,
        steps=300,
        warmup_steps=50,
        lr=2e-3,
        weight_decay=0.1,
        checkpoint_every=100,
        calib_windows=128,
        calib_seq_len=128,
        group_size=128,
        alphas=(0.25, 0.5, 0.75),
        eval_seq_len=128,
        eval_stride=64,
        eval_tokens=16384,
        methods="all",
        outlier_channels=4,
        outlier_scale=0.0,
        outlier_select="random",
    )
    if config.quick:
        config.update(
            {
                "data": "pydoc-topics",
                "vocab_size": 512,
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 4,  # every Linear 64 x 64: one solver compilation per method
                "intermediate_size": 64,
                "train_seq_len": 64,
                "batch_size": 16,
                "steps": 150,
                "warmup_steps": 10,
                "lr": 3e-3,
                "checkpoint_every": 0,
                "calib_windows": 32,
                "calib_seq_len": 64,
                "group_size": 64,
                "alphas": (0.5,),
                "eval_seq_len": 64,
                "eval_stride": 32,
                "eval_tokens": 6000,
                "methods": "quick",
            }
        )
    return config


# ----------------------------------------------------------------------------- text


def _stdlib_documents() -> dict[str, str]:
    """``{'stdlib/<path>': docstrings}`` of the standard library's modules (prose of 5+ words)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP & set(rel.parts):
            continue
        try:
            module = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        texts = [ast.get_docstring(node) for node in ast.walk(module) if isinstance(node, kinds)]
        texts = [t for t in texts if t and len(t.split()) >= 5]
        if texts:
            docs[f"stdlib/{rel.as_posix()}"] = "\n\n".join(texts)
    return docs


def documents(corpus: str) -> dict[str, str]:
    """The documents of an offline corpus, ``{name: text}`` in sorted name order.

    Args:
      corpus: ``'pydoc-topics'`` (the help topics of ``pydoc_data.topics``, named
        ``topic/<name>``) or ``'python-docs'`` (those plus ``stdlib/<path>`` documents:
        the docstrings of each standard-library module).

    Raises:
      ValueError: an unknown corpus.
    """
    if corpus not in CORPORA:
        raise ValueError(f"data={corpus!r} is not an offline corpus of this experiment; choose one of {CORPORA}")
    from pydoc_data.topics import topics

    docs = {f"topic/{name}": text for name, text in topics.items()}
    if corpus == "python-docs":
        docs.update(_stdlib_documents())
    return dict(sorted(docs.items()))


def split_documents(docs: dict[str, str]) -> dict[str, list[str]]:
    """Disjoint ``{'train', 'validation', 'test'}`` lists of texts: ``sha256(name) % 10`` is 0 for test, 1 for validation.

    Example:
      >>> parts = split_documents({"a": "x", "b": "y"})
      >>> sorted(parts) == ["test", "train", "validation"]
      True
    """
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, text in docs.items():
        bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
        parts["test" if bucket == 0 else "validation" if bucket == 1 else "train"].append(text)
    return parts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (deterministic for the same input).

    The vocabulary holds the 256 byte symbols, the merges, and ``<|endoftext|>`` (id 0),
    which separates documents in the token streams.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _stream(tok, texts: list[str]) -> np.ndarray:
    """The documents tokenized and joined, each followed by ``<|endoftext|>``: ``(n,)`` int32."""
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------- model


def _llama_config(config, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_position=max(config.train_seq_len, config.calib_seq_len, config.eval_seq_len),
    )


def _loss(graphdef, params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def _train_step(graphdef, tx, params, opt_state, batch):
    """One AdamW step on ``batch (B, seq + 1)`` int32: ``(params, opt_state, loss)``."""
    loss, grads = jax.value_and_grad(functools.partial(_loss, graphdef))(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _optimizer(*, lr: float, warmup_steps: int, steps: int, weight_decay: float) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to ``lr / 10``, gradients clipped to norm 1."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, steps, end_value=lr * 0.1)
    decay_mask = functools.partial(jax.tree.map, lambda x: x.ndim > 1)  # matrices, not norm scales
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask),
    )


@functools.lru_cache(maxsize=4)
def _step_fn(graphdef, lr: float, warmup_steps: int, steps: int, weight_decay: float):
    """``(tx, jitted step)`` for one model structure and schedule, compiled once per process."""
    tx = _optimizer(lr=lr, warmup_steps=warmup_steps, steps=steps, weight_decay=weight_decay)
    return tx, jax.jit(functools.partial(_train_step, graphdef, tx), donate_argnums=(0, 1))


def _save_state(path: Path, step: int, tree, losses: list[float]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}
    with open(tmp, "wb") as f:
        np.savez(f, step=step, losses=np.asarray(losses, np.float32), **leaves)
    os.replace(tmp, path)


def _load_state(path: Path, tree):
    with np.load(path) as f:
        leaves = [jnp.asarray(f[f"leaf{i}"]) for i in range(len(jax.tree.leaves(tree)))]
        return int(f["step"]), jax.tree.unflatten(jax.tree.structure(tree), leaves), f["losses"].tolist()


def _train(config, cfg: LlamaConfig, train_ids: np.ndarray, folder: Path) -> dict:
    """Train the Llama from scratch; resume from ``folder/train_state.npz``. Returns the training log."""
    model = Llama(cfg, rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model)
    tx, step_fn = _step_fn(graphdef, config.lr, config.warmup_steps, config.steps, config.weight_decay)
    opt_state = tx.init(params)
    step, losses = 0, []
    state_file = folder / "train_state.npz"
    if state_file.exists():
        step, (params, opt_state), losses = _load_state(state_file, (params, opt_state))
    span = config.train_seq_len + 1
    if len(train_ids) < span:
        raise ValueError(f"the train text has {len(train_ids)} tokens, fewer than train_seq_len + 1 = {span}")
    t0 = time.perf_counter()
    while step < config.steps:
        rng = np.random.default_rng([config.seed, step])  # the batch depends on the step only: resuming is exact
        starts = rng.integers(0, len(train_ids) - span + 1, size=config.batch_size)
        batch = np.stack([train_ids[s : s + span] for s in starts])
        params, opt_state, loss = step_fn(params, opt_state, batch)
        step += 1
        if step % 50 == 0 or step == config.steps:
            losses.append(float(loss))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            _save_state(state_file, step, (params, opt_state), losses)
    nnx.update(model, params)
    _save_hf(folder, model, cfg)
    state_file.unlink(missing_ok=True)
    return {"steps": config.steps, "seconds_this_run": time.perf_counter() - t0, "loss_every_50_steps": losses}


def plant_outliers(
    model: Llama, *, channels: int, scale: float, seed: int, hidden: Sequence[int] | None = None
) -> dict:
    """Give ``model`` outlier input features without changing the function it computes (in place).

    Large language models have a few hidden-state dimensions whose activations are tens of
    times larger than the rest, the same dimensions in every layer (Dettmers et al. 2022;
    Xiao et al. 2022); the small models trained here have none. This rescales exact
    equivalences of the network (:func:`jcompress.oneshot.apply_scales` with scales
    ``1 / scale``): ``channels`` hidden dimensions (chosen at random once, or given as
    ``hidden``) are multiplied by ``scale`` in both RMSNorm weights of every block and the
    matching input rows of ``q/k/v/gate/up_proj`` divided by it; in every block
    ``channels`` intermediate dimensions of ``up_proj``'s output, chosen at random, are
    multiplied by ``scale`` and the matching rows of ``down_proj`` divided. Those Linears'
    inputs then have outlier channels with small weights, as in a large model; the logits
    are unchanged up to float32 rounding.

    Args:
      model: a :class:`~jcompress.models.llama.Llama`.
      channels: dimensions planted in the hidden state and in each block's MLP (>= 1).
      scale: the factor (> 1), e.g. 20.
      seed: picks the random dimensions. The intermediate ones are the same with or
        without ``hidden`` (the random hidden draw is made either way).
      hidden: ``channels`` distinct hidden dimensions to plant instead of random ones,
        e.g. those :func:`ablation_losses` finds the model depends on most.

    Returns:
      ``{"hidden": [...], "hidden_select": "random" | "given", "intermediate": [[...] per
      block] (random), "scale": scale}``; the dimensions sorted.

    Raises:
      ValueError: ``channels``, ``scale`` or ``hidden`` out of range.

    Example:
      >>> planted = plant_outliers(model, channels=4, scale=20.0, seed=0)
    """
    cfg = model.cfg
    limit = min(cfg.hidden_size, cfg.intermediate_size)
    if not isinstance(channels, int) or not 1 <= channels <= limit:
        raise ValueError(f"outlier_channels={channels!r} must be an integer in [1, {limit}]")
    if not scale > 1:
        raise ValueError(f"outlier_scale={scale!r} must be > 1 (0 leaves the model as trained)")
    rng = np.random.default_rng([seed, 1])
    chosen_hidden = np.sort(rng.choice(cfg.hidden_size, channels, replace=False))
    if hidden is not None:
        given = np.sort(np.asarray(hidden, np.int64))
        if (
            given.shape != (channels,)
            or len(set(given.tolist())) != channels
            or not 0 <= given.min() <= given.max() < cfg.hidden_size
        ):
            raise ValueError(
                f"hidden={list(hidden)!r} must be {channels} distinct dimensions in [0, {cfg.hidden_size})"
            )
        chosen_hidden = given
    s_hidden = np.ones(cfg.hidden_size, np.float32)
    s_hidden[chosen_hidden] = 1.0 / scale
    inner = []
    for block in model.layers:
        chosen = np.sort(rng.choice(cfg.intermediate_size, channels, replace=False))
        s_inner = np.ones(cfg.intermediate_size, np.float32)
        s_inner[chosen] = 1.0 / scale
        state = nnx.state(block, nnx.Param)
        scales = {"attn_norm": s_hidden, "mlp_norm": s_hidden, "mlp/up_proj": s_inner}
        nnx.replace_by_pure_dict(state, oneshot.apply_scales(nnx.to_pure_dict(state), block.scale_groups(), scales))
        nnx.update(block, state)
        inner.append(chosen.tolist())
    return {
        "hidden": chosen_hidden.tolist(),
        "hidden_select": "random" if hidden is None else "given",
        "intermediate": inner,
        "scale": float(scale),
    }


def _masked_loss(graphdef, params, batch, keep):
    """:func:`_loss` with every block's two RMSNorm weights multiplied by ``keep (hidden,)``."""
    model = nnx.merge(graphdef, params)
    for block in model.layers:
        for norm in (block.attn_norm, block.mlp_norm):
            norm.scale[...] = norm.scale[...] * keep
    return _loss(*nnx.split(model), batch)


def ablation_losses(model: Llama, windows: np.ndarray) -> tuple[float, np.ndarray]:
    """How much the model depends on each hidden dimension: its loss with that dimension zeroed.

    For each hidden dimension ``d``, entry ``d`` of both RMSNorm weights of every block is
    set to 0 (every block's attention and MLP then read the hidden state without ``d``;
    the residual stream and the final norm keep it) and the mean next-token loss on
    ``windows`` is measured; one compiled loss function takes the mask as an argument.
    The analogue of Dettmers et al. (2022)'s test that zeroing a large model's few outlier
    dimensions collapses its perplexity while zeroing as many random ones barely moves it.

    Args:
      model: a :class:`~jcompress.models.llama.Llama` (not modified).
      windows: ``(n, seq_len)`` int token windows (training text: the choice must not see
        validation or test text).

    Returns:
      ``(loss, increases)``: the unablated mean loss and ``(hidden_size,)`` float64 of the
      loss with each dimension zeroed minus it.
    """
    graphdef, params = nnx.split(model)
    fn = jax.jit(functools.partial(_masked_loss, graphdef))
    batch = jnp.asarray(windows, jnp.int32)
    size = model.cfg.hidden_size
    base = float(fn(params, batch, jnp.ones(size, jnp.float32)))
    losses = np.empty(size, np.float64)
    for d in range(size):
        losses[d] = float(fn(params, batch, jnp.ones(size, jnp.float32).at[d].set(0.0)))
    return base, losses - base


def _save_hf(folder: Path, model: Llama, cfg: LlamaConfig) -> None:
    """``config.json`` and ``model.safetensors`` in the Hugging Face Llama layout (kernels transposed)."""
    from safetensors.numpy import save_file

    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {
        "model.embed_tokens.weight": p["embed"]["embedding"],
        "model.norm.weight": p["norm"]["scale"],
        "lm_head.weight": p["lm_head"]["kernel"].T,
    }
    for i in range(cfg.num_layers):
        layer, pre = p["layers"][i], f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
        tensors[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
        for group, hf_group in (("attn", "self_attn"), ("mlp", "mlp")):
            for proj, leaves in layer[group].items():
                tensors[f"{pre}{hf_group}.{proj}.weight"] = leaves["kernel"].T
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    tmp = folder / f".model.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))  # written last: marks the folder complete


def _cache_key(config, train_texts) -> str:
    """The trained model's cache key: the settings below and a hash of the training texts.

    The texts are Python's bundled documentation, which differs between Python versions
    and installed packages, so their content (not only the data's name) is in the key.
    """
    fields = [
        "data",
        "seed",
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "train_seq_len",
        "batch_size",
        "steps",
        "warmup_steps",
        "lr",
        "weight_decay",
        "calib_seq_len",
        "eval_seq_len",
    ]
    texts = hashlib.sha256("\0".join(train_texts).encode()).hexdigest()
    blob = json.dumps({**{f: config[f] for f in fields}, "train_texts": texts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_config(config) -> None:
    """Raise ValueError naming the field for a ``methods`` or ``outlier_*`` setting this experiment does not have."""
    if config.methods not in METHOD_SETS:
        raise ValueError(
            f"methods={config.methods!r} is not a method set of this experiment; choose one of {METHOD_SETS}"
        )
    if config.outlier_select not in OUTLIER_SELECTS:
        raise ValueError(
            f"outlier_select={config.outlier_select!r} is not a selection; choose one of {OUTLIER_SELECTS}"
        )
    if config.model and config.outlier_scale:
        raise ValueError("outlier_scale plants outliers in the model trained here; leave it 0 with model=DIR")


def _prepare(config) -> tuple[Path, dict, dict]:
    """The model folder (trained here or ``config.model``), the token streams and the training log."""
    _check_config(config)
    parts = split_documents(documents(config.data))
    if config.model:
        folder = Path(config.model)
        tok = hf_lm.load_tokenizer(folder)
        return folder, {s: _stream(tok, parts[s]) for s in SPLITS}, {"model": str(folder)}
    folder = cache_dir() / "oneshot_llm" / _cache_key(config, parts["train"])
    folder.mkdir(parents=True, exist_ok=True)
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        tmp = folder / f".tokenizer.json.tmp{os.getpid()}"
        train_tokenizer(parts["train"], config.vocab_size).save(str(tmp))
        os.replace(tmp, tok_file)
    tok = hf_lm.load_tokenizer(folder)
    streams = {s: _stream(tok, parts[s]) for s in SPLITS}
    log_file = folder / "training.json"
    if (folder / "config.json").exists():  # written last by a finished training run
        log = {**(json.loads(log_file.read_text()) if log_file.exists() else {}), "cached": True}
    else:
        cfg = _llama_config(config, tok.get_vocab_size(with_added_tokens=True))
        log = _train(config, cfg, streams["train"], folder)
        log_file.write_text(json.dumps(log))
        log = {**log, "cached": False}
    if config.outlier_scale:
        folder, log = _planted(folder, config, streams["train"]), {**log, "trained_folder": str(folder)}
    return folder, streams, log


def _planted(trained: Path, config, train_ids: np.ndarray) -> Path:
    """The trained model with :func:`plant_outliers` applied, saved beside it (once).

    With ``outlier_select='ablation'`` the hidden dimensions are the ``outlier_channels``
    of largest :func:`ablation_losses` increase on :data:`ABLATION_WINDOWS` training
    windows of ``calib_seq_len`` tokens (drawn with seed ``10_000 + seed``, apart from the
    calibration windows' ``seed``); ``planted.json`` records them with their increases.
    """
    suffix = "" if config.outlier_select == "random" else f"-{config.outlier_select}"
    folder = trained.parent / f"{trained.name}-outliers{config.outlier_channels}x{config.outlier_scale:g}{suffix}"
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(exist_ok=True)
    model, _, cfg = hf_lm.load(trained)
    hidden, chosen = None, {}
    if config.outlier_select == "ablation":
        seed = 10_000 + config.seed
        windows = lm.sample_windows(train_ids, num=ABLATION_WINDOWS, seq_len=config.calib_seq_len, seed=seed)
        t0 = time.perf_counter()
        base, increases = ablation_losses(model, windows)
        order = np.argsort(-increases, kind="stable")
        hidden = sorted(order[: config.outlier_channels].tolist())
        chosen = {
            "select": "ablation",
            "ablation": {
                "windows": ABLATION_WINDOWS,
                "seq_len": config.calib_seq_len,
                "seed": seed,
                "loss": base,
                "loss_increase": {str(d): float(increases[d]) for d in hidden},
                "median_increase": float(np.median(increases)),
                "top_increases": [[int(d), float(increases[d])] for d in order[:16]],
                "seconds": time.perf_counter() - t0,
            },
        }
    planted = plant_outliers(
        model, channels=config.outlier_channels, scale=config.outlier_scale, seed=config.seed, hidden=hidden
    )
    shutil.copyfile(trained / "tokenizer.json", folder / "tokenizer.json")
    (folder / "planted.json").write_text(json.dumps({**planted, **chosen}))
    _save_hf(folder, model, cfg)
    return folder


# ----------------------------------------------------------------------------- compression


def _whole_windows(ids: np.ndarray, limit: int, seq_len: int, stride: int) -> np.ndarray:
    """The first at most ``limit`` tokens (0: all), cut so that every window is full (one compilation)."""
    n = min(len(ids), limit or len(ids))
    if n < seq_len:
        raise ValueError(f"the evaluation text has {n} tokens, fewer than eval_seq_len={seq_len}; lower eval_seq_len")
    return ids[: seq_len + (n - seq_len) // stride * stride]


def _evaluate(model, ids: np.ndarray, config) -> float:
    return lm.perplexity(model, ids, seq_len=config.eval_seq_len, stride=config.eval_stride, batch_size=16).perplexity


def _compress(folder: Path, calib: np.ndarray, name: str, kwargs: dict):
    """A freshly loaded model compressed with one method, with its act quantization applied: ``(model, report)``."""
    model, _, _ = hf_lm.load(folder)
    if name == "w8a8":  # SmoothQuant's quantizers, no scales folded (groups=())
        method = lambda c: oneshot.smoothquant(c.stats, c.channels, groups=(), **kwargs)
    else:
        method = blockwise.method(name, **kwargs)
    model, report = blockwise.compress(model, calib, method, batch_size=16)
    return blockwise.with_act_quant(model, report.act_quant), report


def _selected_methods(config) -> list[tuple[str, str, dict]]:
    """The rows of :data:`METHODS` that ``config.methods`` compresses (SmoothQuant is run apart)."""
    if config.methods == "quick":
        return [m for m in METHODS if m[:2] in QUICK]
    if config.methods == "pruning":
        return [m for m in METHODS if m[0] in PRUNING]
    return list(METHODS)


def _row(method: str, setting: str, val: float, test: float, dense_test: float, report=None, alpha=None) -> dict:
    return {
        "method": method,
        "setting": setting,
        "alpha": alpha,
        "val_ppl": val,
        "test_ppl": test,
        "ratio_to_dense": test / dense_test,
        "block_error": None if report is None else float(np.mean([b.output_error for b in report.blocks])),
        "seconds": 0.0 if report is None else report.seconds,
    }


def _selection(planted: dict) -> str:
    """How the planted hidden dimensions were chosen, in words."""
    if planted.get("select", "random") == "random":
        return "chosen at random"
    a = planted["ablation"]
    return (
        f"those whose zeroing raised the trained model's loss most on {a['windows']} training windows of "
        f"{a['seq_len']} tokens"
    )


def _planted_notes(planted: dict | None) -> list[str]:
    if planted is None:
        return []
    before = planted["dense_before"]
    note = (
        f"Planted outlier features (plant_outliers, scale {planted['scale']:g}): hidden dimensions "
        f"{planted['hidden']} ({_selection(planted)}) and {len(planted['intermediate'][0])} random MLP "
        f"dimensions per block; the dense model's perplexity before planting: validation "
        f"{before['validation']:.4f}, test {before['test']:.4f}."
    )
    if planted.get("select") == "ablation":
        a = planted["ablation"]
        increases = ", ".join(f"{d}: {v:+.4f}" for d, v in a["loss_increase"].items())
        note += (
            f" Loss increase when zeroed (training loss {a['loss']:.3f}; median over dimensions "
            f"{a['median_increase']:+.4f}): {increases}."
        )
    return [note]


def _deviations(n_params: int, tokens: dict, config, planted: dict | None = None) -> list[dict]:
    deviation = common.deviation
    trained = (
        f"a {n_params / 1e6:.1f}M-parameter Llama trained here for {config.steps} steps on {tokens['train']} tokens"
    )
    out = [
        deviation(
            "model",
            paper="pretrained OPT, BLOOM and LLaMA decoders of 125M to 176B parameters",
            ours=trained if not config.model else config.model,
            reason="no pretrained decoder weights are installable offline; training has to fit 2 shared CPU cores",
        ),
        deviation(
            "evaluation text",
            paper="WikiText-2 test (also PTB and C4), 2048-token segments",
            ours=(
                f"held-out Python documentation ({tokens['validation']} validation / {tokens['test']} test tokens, "
                f"the first {config.eval_tokens or 'all'} of each evaluated), windows of {config.eval_seq_len} "
                f"moved by {config.eval_stride}"
            ),
            reason="nothing can be downloaded and WikiText is not installed; the model's context is short",
        ),
        deviation(
            "calibration set",
            paper="128 random 2048-token segments of C4 (GPTQ, SparseGPT, Wanda); samples of the Pile (AWQ, SmoothQuant)",
            ours=f"{config.calib_windows} random {config.calib_seq_len}-token windows of the train text",
            reason="the model's own training text, cut to its context length",
        ),
    ]
    if config.methods != "pruning":
        out.append(
            deviation(
                "SmoothQuant alpha",
                paper="a fixed migration strength per model family (0.5 for OPT and BLOOM)",
                ours=f"chosen from {tuple(config.alphas)} by validation perplexity",
                reason="a model trained here has no published alpha",
            )
        )
    if planted is not None:
        out.append(
            deviation(
                "outlier features",
                paper="emerge in pretrained models of billions of parameters (a few hidden dimensions, every layer)",
                ours=(
                    f"planted by an exact rescale of the trained model: {len(planted['hidden'])} hidden "
                    f"({_selection(planted)}) and {len(planted['intermediate'][0])} random MLP dimensions per block "
                    f"times {planted['scale']:g}"
                ),
                reason="a model trained on 2 CPU cores has none; the rescale leaves its function unchanged",
            )
        )
    if config.group_size != 128:
        out.append(
            deviation(
                "weight groups",
                paper="groups of 128 inputs (AWQ; GPTQ's grouped results)",
                ours=f"groups of {config.group_size} inputs for RTN, GPTQ and AWQ alike",
                reason="the model's Linears have fewer inputs, or input counts that are not multiples of 128",
            )
        )
    return out


def _comparisons(rows: list[dict]) -> list[dict]:
    """The papers' claims, as paired test-perplexity differences (lower is better) of the rows present."""
    present = {(r["method"], r["setting"]) for r in rows}
    pairs = [(better, "magnitude", s) for s in ("50%", "2:4") for better in ("sparsegpt", "wanda")]
    pairs += [(better, "rtn", s) for s in ("4-bit", "3-bit") for better in ("gptq", "awq")]
    claims = [
        common.comparison(
            f"{better} - {baseline} at {setting}",
            metric="test_ppl",
            a={"method": better, "setting": setting},
            b={"method": baseline, "setting": setting},
            higher_is_better=False,
        )
        for better, baseline, setting in pairs
        if {(better, setting), (baseline, setting)} <= present
    ]
    baselines = [("unsmoothed W8A8", "w8a8")] if ("w8a8", "unsmoothed") in present else []
    baselines = baselines + [("dense", "dense")] if ("smoothquant", "W8A8") in present else []
    for label, baseline in baselines:
        claims.append(
            common.comparison(
                f"smoothquant W8A8 - {label}",
                metric="test_ppl",
                a={"method": "smoothquant"},
                b={"method": baseline},
                higher_is_better=False,
            )
        )
    return claims


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train (or load) the decoder, compress it with every method, measure validation and test perplexity."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    folder, streams, training = _prepare(config)
    eval_ids = {
        s: _whole_windows(streams[s], config.eval_tokens, config.eval_seq_len, config.eval_stride)
        for s in ("validation", "test")
    }
    calib = lm.sample_windows(
        streams["train"], num=config.calib_windows, seq_len=config.calib_seq_len, seed=config.seed
    )
    dense, tok, cfg = hf_lm.load(folder)
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(dense, nnx.Param)))
    dense_val, dense_test = _evaluate(dense, eval_ids["validation"], config), _evaluate(dense, eval_ids["test"], config)
    rows = [_row("dense", "float32", dense_val, dense_test, dense_test)]
    planted = None
    if config.outlier_scale:  # the same function before planting: its perplexity must agree
        trained, _, _ = hf_lm.load(Path(training["trained_folder"]))
        planted = json.loads((folder / "planted.json").read_text())
        planted["dense_before"] = {s: _evaluate(trained, eval_ids[s], config) for s in ("validation", "test")}
    for method, setting, hp in _selected_methods(config):
        kwargs = {**hp, "group_size": config.group_size} if "bits" in hp else hp
        model, report = _compress(folder, calib, method, kwargs)
        val, test = _evaluate(model, eval_ids["validation"], config), _evaluate(model, eval_ids["test"], config)
        rows.append(_row(method, setting, val, test, dense_test, report))
    # SmoothQuant: alpha chosen on validation perplexity; the test split sees only the chosen model
    candidates = []
    for alpha in config.alphas if config.methods != "pruning" else ():
        model, report = _compress(folder, calib, "smoothquant", {"alpha": float(alpha)})
        candidates.append((_evaluate(model, eval_ids["validation"], config), float(alpha), model, report))
    if candidates:
        val, alpha, model, report = min(candidates, key=lambda c: c[0])
        test = _evaluate(model, eval_ids["test"], config)
        rows.append(_row("smoothquant", "W8A8", val, test, dense_test, report, alpha=alpha))
    sample = lm.generate(dense, "The return statement", max_new_tokens=24, tokenizer=tok)

    fig, ax = figure(width=8.0)
    ax.bar(range(len(rows)), [r["test_ppl"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    ax.axhline(dense_test, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [f"{r['method']}\n{r['setting']}" for r in rows], fontsize=6, rotation=45)
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log)")
    ax.set_title(f"{n_params / 1e6:.1f}M-parameter Llama on Python docs, one-shot block by block")
    tokens = {s: len(streams[s]) for s in SPLITS}
    bits_note = f"weights: symmetric min-max grids, groups of {config.group_size} inputs"
    return write_results(
        out,
        rows,
        figure=fig,
        name="oneshot_llm",
        formats={
            "alpha": "{:g}",
            "val_ppl": "{:.2f}",
            "test_ppl": "{:.2f}",
            "ratio_to_dense": "{:.3f}",
            "block_error": "{:.4f}",
            "seconds": "{:.1f}",
        },
        notes=[
            (
                f"Model: {n_params / 1e6:.2f}M parameters ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                f"{cfg.num_heads}/{cfg.num_kv_heads} query/key-value heads, vocabulary {cfg.vocab_size}); tokens "
                f"train / validation / test {tokens['train']} / {tokens['validation']} / {tokens['test']} "
                f"(evaluated: {len(eval_ids['validation'])} / {len(eval_ids['test'])})."
            ),
            (
                f"Calibration: {config.calib_windows} x {config.calib_seq_len} train tokens; perplexity with windows "
                f"of {config.eval_seq_len} moved by {config.eval_stride}; ratio_to_dense = test ppl / dense test ppl; "
                f"{bits_note}."
            ),
            "block_error: mean over blocks of ||f'(h) - f(h)||^2 / ||f(h) - h||^2 on the calibration inputs.",
            "seconds: block-by-block compression wall time, compilation included.",
        ]
        + (
            [
                "SmoothQuant alpha by validation perplexity: "
                + ", ".join(f"{a:g} -> {v:.2f}" for v, a, _, _ in candidates),
                "w8a8 unsmoothed: SmoothQuant's weight and activation quantizers with no scales folded.",
            ]
            if candidates
            else [f"methods={config.methods!r}: the sparsity rows only."]
        )
        + _planted_notes(planted),
        deviations=_deviations(n_params, tokens, config, planted),
        comparisons=_comparisons(rows),
        keys=["method", "setting"],
        config=config,
        tokens=tokens,
        num_params=n_params,
        model_folder=str(folder),
        training=training,
        smoothquant_validation={f"{a:g}": v for v, a, _, _ in candidates},
        planted=planted,
        sample=sample,
    )
