"""B8: packed low-bit weights at run time (device bytes of a Llama decoder and LeNet-5, decode speed).

Problem: a randomly initialised Llama-architecture decoder (hidden 512, 4 blocks, 8 heads
with 4 key/value heads, SwiGLU 1,408, vocabulary 4,096, untied; quick mode: hidden 256,
2 blocks, SwiGLU 768). The kernels of every block's 7 projections are quantized round-to-nearest
with ``jc.quant.quantize`` (symmetric; int8 per output channel, int4 in groups of 128 input
rows) and the layers packed with :func:`jcompress.nnx.packed.pack`; the embeddings, norms
and the output head stay float32.

Figures (side by side in the same run):

* ``B8 device bytes int8`` / ``int4``: float32 bytes of the packed projections' kernels /
  the bytes their packed codes and scales take in memory (:func:`packed.device_bytes`,
  from the arrays' ``nbytes``); targets ``>= 3.9`` and ``>= 7.5`` (4x and 8x less the
  scales). The whole model's ratio is reported beside it (the float embeddings and head
  count there).
* ``B8 device bytes int8`` / ``int4 LeNet-5``: the same ratio for the two conv kernels of
  LeNet-5 (28x28x1 inputs, 20 and 50 channels; every kernel quantized per output channel,
  conv and Dense alike, and packed), with the whole model's ratio beside it and the
  largest difference between the packed model's logits and the dequantized model's
  (the packed conv must compute the same function). Targets as above.
* ``B8 decode tok/s int8 / float32`` and ``int4``, at batch 1 and 16: tokens per second of
  one jitted greedy decode step (one new token per sequence, 64 cached positions) of the
  packed model / the float32 model's, medians of interleaved calls after compilation
  (``jcompress.timing.compare``). Reported without a target: on CPU the step at these
  sizes is not memory bound, and the packed layers dequantize their tiles before a float
  matmul (there is no integer or Pallas kernel yet), so a ratio below 1 is the expected
  CPU figure; the memory-bound regime where packing pays is a large model on an
  accelerator.
* ``B8 W8A8 Dense 4096x4096 integer / float32`` and ``dequantized / float32``, at 1, 16 and
  256 tokens (quick mode: 1024x1024): one jitted call of a Dense layer (with bias) whose
  int8 per-column kernel is packed with :func:`packed.pack` and ``act=`` per-token int8
  inputs (``lax.dot_general`` int8 x int8 -> int32, :func:`integer_matmul_rows`), of the
  same packed layer on the float path (dequantize, then ``jnp.dot`` in float32), and of
  the float32 ``nnx.Linear``; ratios of median times (float32 / variant, so above 1 is
  faster), interleaved calls after compilation, and the largest output difference from
  float32. Reported without a target: the figure depends on the backend's int8 matmul
  (on CPU, XLA runs a 1-token int8 product as int32); int8 tensor cores and the TPU MXU
  are where the integer path should gain most.
"""

from __future__ import annotations

__all__ = ["integer_matmul_rows", "run"]


def run(quick: bool) -> list[dict]:
    import math

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jcompress as jc
    from jcompress import models, timing
    from jcompress.models import llama
    from jcompress.nnx import packed

    hidden, blocks, ffn = (256, 2, 768) if quick else (512, 4, 1408)
    cfg = llama.LlamaConfig(
        vocab_size=4096, hidden_size=hidden, num_layers=blocks, num_heads=8, num_kv_heads=4,
        intermediate_size=ffn, max_position=128,
    )  # fmt: skip
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    projections = r"layers/.*/kernel"
    variants = {"float32": model}
    rows = []
    for label, kw, target in (("int8", {"bits": 8}, 3.9), ("int4", {"bits": 4, "group_size": 128}, 7.5)):
        _, aux = jc.masked(jc.quant.quantize(**kw), projections)(params)
        small, _ = packed.pack(aux)(model)
        variants[label] = small
        float_bytes = sum(4 * q.codes.size for q in aux.grids.values())
        b, dense = packed.device_bytes(small), packed.device_bytes(model)
        ratio = float_bytes / b["packed"]
        rows.append(
            {
                "name": f"B8 device bytes {label} projections, float32 / packed",
                "ratio": round(ratio, 3),
                "target": f">= {target}",
                "met": bool(ratio >= target),
                "float32_bytes": float_bytes,
                "packed_bytes": b["packed"],
                "whole_model_ratio": round(dense["total"] / b["total"], 3),
                "layers_packed": len(aux.grids),
            }
        )

    lenet = models.create("lenet5", input_shape=(28, 28, 1), num_classes=10, seed=0)
    lenet_params = nnx.state(lenet, nnx.Param)
    images = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    forward = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x), static_argnums=0)
    for label, bits, target in (("int8", 8, 3.9), ("int4", 4, 7.5)):
        q, aux = jc.quant.quantize(bits=bits)(lenet_params)
        small, _ = packed.pack(aux)(lenet)
        convs = [small.conv1, small.conv2]
        float_bytes = sum(4 * math.prod(c.kernel_shape) for c in convs)
        conv_bytes = sum(a.get_value().nbytes for c in convs for a in (c.codes, c.scale))
        fake = models.merge(lenet, jc.to_pure_dict(q))
        diff = jnp.max(jnp.abs(forward(*nnx.split(small), images) - forward(*nnx.split(fake), images)))
        ratio = float_bytes / conv_bytes
        rows.append(
            {
                "name": f"B8 device bytes {label} LeNet-5 conv kernels, float32 / packed",
                "ratio": round(ratio, 3),
                "target": f">= {target}",
                "met": bool(ratio >= target),
                "float32_bytes": float_bytes,
                "packed_bytes": conv_bytes,
                "whole_model_ratio": round(
                    packed.device_bytes(lenet)["total"] / packed.device_bytes(small)["total"], 3
                ),
                "max_abs_logit_diff_vs_dequantized": float(diff),
            }
        )

    context = 64
    for batch in (1, 16):
        calls = {}
        for label, m in variants.items():
            graphdef, state = nnx.split(m)
            step = jax.jit(lambda s, tok, cache, g=graphdef: nnx.merge(g, s)(tok, cache=cache))
            cache = m.init_cache(batch, context + 1)
            prompt = jnp.ones((batch, context), jnp.int32)
            _, cache = step(state, prompt, cache)  # fill 64 positions; the timed call appends one token
            token = jnp.ones((batch, 1), jnp.int32)
            calls[label] = lambda step=step, state=state, token=token, cache=cache: step(state, token, cache)
        ts = timing.compare(calls, repeats=10 if quick else 30, warmup=2)
        for label in ("int8", "int4"):
            rows.append(
                _against_float32(
                    ts, label, f"B8 decode tok/s {label} / float32, batch {batch}",
                    float32_tok_s=round(batch / ts["float32"].median, 1),
                    **{f"{label}_tok_s": round(batch / ts[label].median, 1)},
                )
            )  # fmt: skip
    return rows + integer_matmul_rows(quick)


def _against_float32(ts: dict, label: str, name: str, **figures) -> dict:
    """A report row: float32's median time over ``label``'s, both spreads (ms), and ``figures``."""
    spread = lambda t: [round(1e3 * t.low, 3), round(1e3 * t.high, 3)]
    return {
        "name": name,
        "ratio": round(ts["float32"].median / ts[label].median, 3),
        "target": "report",
        "met": None,
        **figures,
        "float32_spread_ms": spread(ts["float32"]),
        f"{label}_spread_ms": spread(ts[label]),
        "compile_included": False,
    }


def integer_matmul_rows(quick: bool, *, repeats: int | None = None) -> list[dict]:
    """The ``B8 W8A8 Dense`` rows: integer and dequantized packed layers against float32."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jcompress as jc
    from jcompress import timing
    from jcompress.nnx import packed
    from jcompress.oneshot.smoothquant import ActQuant

    width = 1024 if quick else 4096
    repeats = repeats or (5 if quick else 15)
    class Layer(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(width, width, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x)

    dense = Layer()
    _, aux = jc.quant.quantize(bits=8)(nnx.state(dense, nnx.Param))  # symmetric, per output column
    variants = {
        "float32": dense,
        "dequantized": packed.pack(aux)(dense)[0],
        "integer": packed.pack(aux, act={"fc": ActQuant(8, True, 0.0)})(dense)[0],
    }
    rows = []
    for tokens in (1, 16, 256):
        x = jax.random.normal(jax.random.key(tokens), (tokens, width))
        calls = {}
        for label, m in variants.items():
            graphdef, state = nnx.split(m)
            f = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v))
            calls[label] = lambda f=f, state=state, x=x: f(state, x)
        ts = timing.compare(calls, repeats=repeats, warmup=2)
        out = {k: t.output for k, t in ts.items()}
        for label in ("integer", "dequantized"):
            rows.append(
                _against_float32(
                    ts, label, f"B8 W8A8 Dense {width}x{width} {label} / float32, {tokens} tokens",
                    float32_ms=round(1e3 * ts["float32"].median, 3),
                    **{f"{label}_ms": round(1e3 * ts[label].median, 3)},
                    max_rel_diff_vs_float32=float(
                        jnp.max(jnp.abs(out[label] - out["float32"])) / jnp.max(jnp.abs(out["float32"]))
                    ),
                    repeats=repeats,
                )
            )  # fmt: skip
    return rows
