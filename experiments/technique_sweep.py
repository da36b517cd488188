"""Every compression technique of jcompress on one trained model: accuracy vs real bytes vs latency.

Command::

    jcompress run technique_sweep [--quick] [--seeds N] [--data mnist5k] [--out runs/technique_sweep]

What it does: trains LeNet-300-100 on ``mnist5k`` (4,000 train / 1,000 test MNIST digits)
and applies, each to the same trained weights, magnitude / Taylor / SNIP / OBD (Fisher
diagonal) pruning at 90%, neuron-entropy structured pruning and L2 structured hard
pruning (``nnx/surgery.py``: the removed neurons are gone), truncated SVD
(``nnx/factorize.py`` on the hidden layers), k-means weight sharing (5 bits), int8
and int4 post-training quantization, int4 QAT, distillation into a 4x narrower MLP, and
the combinations prune + int8 and prune + sharing + Huffman (Deep Compression). Pruning,
sharing, QAT and the new architectures get a short fine-tune (2 epochs, 1 in quick mode).

Every row is measured by :func:`jcompress.advisor.advise`, the same code the
``jcompress advise`` command uses, given the validation accuracy to rank by (its Pareto
front and pick are made on validation); the test accuracy of each candidate is measured
once beside it. Both are of the params read back from the file
the technique wrote with ``jcompress.export`` (float32 in the same container for the
dense model and for architecture changes); bytes on disk; latency of the jitted forward
pass on 256 test images (``jcompress.timing``, the median of calls interleaved across techniques).
Masked and quantized models are decoded to dense float arrays and run at dense speed,
and the latency column shows it; only structured pruning, SVD and distillation are
faster. One table, one scatter plot (accuracy against bytes and against latency; the
Pareto front marked).

Expected result (full mode, seeds 0-2, test accuracy mean +- std on mnist5k; RESULTS.md):
dense 94.17 +- 0.38%; magnitude pruning at 90% 93.50 +- 0.26% (7.8x, stored as float32
values with 5-bit relative indices; 0.7 points below dense at every seed); Taylor and SNIP
at 90% with one global threshold 86.3% (their scores are not comparable across layers;
SNIP ranks exactly as Taylor on the same batch), OBD 89.1%; L2 structured removal of half
the neurons 93.8% at 2.1x smaller, entropy-ranked removal 91.0%; SVD at rank 25% 93.9%,
2.9x smaller; k-means sharing 94.1% at 6.8x; int8 94.2% at 4.0x; int4 PTQ 94.2% and QAT
(Adam 1e-3, 2 epochs) 93.9% at 7.8x; the 4x narrower distilled student 92.1%, 4.4x
smaller; prune + int8 93.5% at 21.6x; prune + sharing + Huffman 93.6% at 31.8x, the
smallest file. Only the smaller architectures can run faster.
Masked and quantized models all run at dense speed (within timing noise).
Quick mode (``techniques``: dense, magnitude pruning, int8 and the Deep Compression
combination; 3 dense epochs, one fine-tune epoch, fewer repeats) needs about 20 s of CPU.
At seed 0: dense 90.4% test accuracy; int8 90.3% at 4.0x; magnitude pruning 90.0% at 8.0x;
pruning + sharing + Huffman 89.7% at 31.3x, the smallest file.

Claims checked over seeds (``--seeds``, paired by seed) against the dense model, test
accuracy: magnitude pruning at 90%, int8, and prune + sharing + Huffman.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments import common
from jcompress import advisor, compressed, export, models, quant, train
from jcompress.pruning import masks as masks_lib
from jcompress.pruning import optim, scores

SPARSITY = 0.9
LR = 1e-3
# The techniques a run may include (config ``techniques``); the dense model is always measured.
TECHNIQUES = (
    "magnitude", "taylor", "snip", "obd", "entropy", "l2_structured", "svd", "sharing", "int8", "int4", "int4_qat",
    "distill", "prune_int8", "deep_compression",
)  # fmt: skip


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """Every technique on LeNet-300-100 trained 20 epochs (``'paper'``), or on 1,000 images briefly (``'quick'``).

    ``finetune_epochs`` is each technique's fine-tune; ``latency_repeats`` the timed
    forward passes per technique; ``train_images`` keeps the first training images (0: all).
    """
    config = common.base_config(
        variant, data="mnist5k", epochs=20, finetune_epochs=2, distill_epochs=15, latency_repeats=20, train_images=0,
        techniques=TECHNIQUES,
    )  # fmt: skip
    if config.quick:
        config.update({"epochs": 3, "finetune_epochs": 1, "distill_epochs": 2, "latency_repeats": 3,
                       "techniques": ("magnitude", "int8", "deep_compression")})  # fmt: skip
    return config


def _loss_fn(apply_fn):
    def loss(params, batch):
        x, y = batch
        return train.cross_entropy(apply_fn(params, x), y)

    return loss


def _score_candidates(ds) -> list[advisor.Candidate]:
    """Pruning at 90% by Taylor, SNIP and OBD scores (magnitude comes from the advisor's defaults)."""
    batch = (jnp.asarray(ds.x_train[:256]), jnp.asarray(ds.y_train[:256]))
    batches = [(jnp.asarray(ds.x_train[i : i + 128]), jnp.asarray(ds.y_train[i : i + 128])) for i in range(0, 512, 128)]

    def taylor(s):
        return jax.jit(lambda p: scores.taylor_scores(p, jax.grad(_loss_fn(s.apply_fn))(p, batch)))(s.params)

    def snip(s):
        return jax.jit(lambda p: scores.snip_scores(_loss_fn(s.apply_fn), p, batch))(s.params)

    def obd(s):
        return jax.jit(lambda p: scores.obd_scores(p, scores.fisher_diagonal(_loss_fn(s.apply_fn), p, batches)))(s.params)

    return [  # the kernels are pruned
        advisor.pruning_candidate(SPARSITY, score_fn=taylor, label="Taylor prune"),
        advisor.pruning_candidate(SPARSITY, score_fn=snip, label="SNIP prune"),
        advisor.pruning_candidate(SPARSITY, score_fn=obd, label="OBD prune"),
    ]


def _entropy_candidate(model, ds) -> advisor.Candidate:
    """Neuron-entropy scores (histogram entropy of each hidden unit) for structured hard pruning."""

    @jax.jit
    def entropy_scores(params, x):
        ent = scores.neuron_entropy(models.merge(model, params).hidden(x))
        return scores.unit_scores(params, {"fc1/kernel": ent[0], "fc2/kernel": ent[1]})

    def entropy(s):
        return entropy_scores(s.params, jnp.asarray(ds.x_train[:1000]))

    return advisor.structured_candidate(0.5, score_fn=entropy, label="entropy: remove neurons")


def _prune_int8_candidate() -> advisor.Candidate:
    """Magnitude pruning to 90% + fine-tune with masks kept, then per-tensor int8 of the survivors."""

    def build(s: advisor.Subject) -> advisor.Built:
        pruned, paux = jax.jit(masks_lib.magnitude(sparsity=SPARSITY, scope="global"))(s.params)
        tx = optax.chain(optax.adam(LR), optim.keep_masked(paux.masks))
        tuned = masks_lib.apply_masks(s.finetune_fn(s.apply_fn, pruned, tx=tx, epochs=s.epochs), paux.masks)
        qparams, qaux = jax.jit(quant.quantize(bits=8, axis=None))(tuned)
        path = s.workdir / "prune_int8.jcz"
        export.write(path, compressed.compress(qparams, paux, qaux))  # sparse layout: survivors' codes only
        return advisor.Built(export.load_params(path), s.apply_fn, path, {"sparsity": SPARSITY, "bits": 8})

    return advisor.Candidate(f"prune {SPARSITY:.0%} + int8", "combination", True, build)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Apply every technique to one trained LeNet-300-100; write results.json/.md and plot.png to ``workdir``."""
    out = Path(workdir)
    ds = common.load_data(config.data, config.data_dir)
    if config.train_images:
        n = min(config.train_images, len(ds.x_train))
        ds = ds._replace(x_train=ds.x_train[:n], y_train=ds.y_train[:n])
    net = common.train_model("lenet300", ds, epochs=config.epochs, lr=LR, batch_size=128, seed=config.seed)
    model_config = {"name": "lenet300", "input_shape": list(ds.input_shape), "num_classes": ds.num_classes}
    fns = advisor.data_functions(net.model, model_config, ds, distill_epochs=config.distill_epochs, seed=config.seed)
    unknown = [t for t in config.techniques if t not in TECHNIQUES]
    if unknown:
        raise ValueError(f"techniques: unknown {unknown}; choose from {', '.join(TECHNIQUES)}")
    taylor, snip, obd = _score_candidates(ds)
    make = {
        "magnitude": lambda: advisor.pruning_candidate(SPARSITY, lr=LR, label="magnitude prune"),
        "taylor": lambda: taylor,
        "snip": lambda: snip,
        "obd": lambda: obd,
        "entropy": lambda: _entropy_candidate(net.model, ds),
        "l2_structured": lambda: advisor.structured_candidate(0.5, label="L2: remove neurons"),
        "svd": lambda: advisor.lowrank_candidate(0.25),
        "sharing": lambda: advisor.sharing_candidate(lr=LR),
        "int8": lambda: advisor.quantization_candidate(8),
        "int4": lambda: advisor.quantization_candidate(4),
        "int4_qat": lambda: advisor.quantization_candidate(4, qat=True, lr=LR),
        "distill": lambda: advisor.distillation_candidate(0.25),
        "prune_int8": _prune_int8_candidate,
        "deep_compression": lambda: advisor.deep_compression_candidate(SPARSITY, lr=LR),
    }
    candidates = [advisor.dense_candidate()] + [make[t]() for t in TECHNIQUES if t in config.techniques]
    # advise ranks on validation (eval_fn) and measures test once per candidate (test_fn), only to report it
    advice = advisor.advise(
        net.model, fns.apply_fn, fns.eval_fn, test_fn=fns.test_fn, inputs=fns.inputs, finetune_fn=fns.finetune_fn,
        distill_fn=fns.distill_fn, candidates=candidates, epochs=config.finetune_epochs,
        repeats=config.latency_repeats, workdir=out / "files",
    )  # fmt: skip
    failed = [r for r in advice.rows if r.get("error")]
    if failed:
        raise RuntimeError(f"technique {failed[0]['name']!r} failed: {failed[0]['error']}")
    rows = []
    for r in advice.rows:
        rows.append(
            {
                "technique": r["name"],
                "family": r["family"],
                "same_architecture": r["keeps_architecture"],
                "val_accuracy": r["val_accuracy"],  # what advise ranked on
                "accuracy": r["test_accuracy"],
                "val_accuracy_drop": r["accuracy_drop"],
                "bytes": r["bytes"],
                "ratio": r["ratio"],
                "latency_ms": r["latency_ms"],
                "speedup": r["speedup"],
                "pareto": r["pareto"],
                "seconds": r["seconds"],
            }
        )
    notes = [
        (f"LeNet-300-100 on {ds.name}: {len(ds.x_train)} training and {len(ds.x_test)} test images; dense accuracy "
        f"{net.accuracy:.4f}."),
        ("bytes: the file each technique wrote (jcompress.export; float32 for the dense model and for new "
        "architectures); accuracy: the params read back from that file."),
        ("latency: jitted forward on 256 validation images, median of calls interleaved across techniques (warm-up "
        "excluded); a difference from dense within the interquartile ranges is 'same as dense' (speedup empty); masked "
        "and quantized weights are dense float arrays at run time, so they run at dense speed."),
        ("pareto: on the front of (validation accuracy up, bytes down, latency down; latencies within 10% of each other "
         "or whose interquartile ranges overlap count as equal)."),
        f"advisor's pick with no constraints (1 point of validation accuracy allowed): {advice.reason}",
    ]
    dense = {"technique": rows[0]["technique"]}
    by_key = {"magnitude": "magnitude prune", "int8": "int8", "deep_compression": "Huffman"}
    comparisons = [
        common.comparison(f"{r['technique']} vs dense, test accuracy", metric="accuracy",
                          a={"technique": r["technique"]}, b=dense)
        for r in rows[1:] for key, word in by_key.items() if key in config.techniques and word in r["technique"]
    ]  # fmt: skip
    result = common.write_results(
        out, rows, figure=advisor.plot_figure(advice), name="technique_sweep", comparisons=comparisons,
        keys=["technique", "family"],
        deviations=[common.deviation("papers", paper="each technique's own paper, model and data",
                                     ours="every technique on one LeNet-300-100, 90% sparsity, short fine-tunes",
                                     reason="a side-by-side survey, not a reproduction of one paper")],
        formats={"val_accuracy": "{:.4f}", "accuracy": "{:.4f}", "val_accuracy_drop": "{:+.4f}", "ratio": "{:.1f}x",
                 "latency_ms": "{:.3f}", "speedup": "{:.2f}x", "seconds": "{:.1f}", "bytes": "{:,.0f}"},
        notes=notes, config=config,
    )  # fmt: skip
    return result
