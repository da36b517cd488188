"""Deep Compression (Han, Mao & Dally 2016): pruning + k-means weight sharing + Huffman coding.

Command::

    jcompress run deep_compression [--quick] [--seeds N] [--data mnist5k] [--out runs/deep_compression]

What it does, for LeNet-300-100 and LeNet-5 (Caffe variant) on ``mnist5k`` (4,000 train /
1,000 test real MNIST digits) by default: train the dense model with Adam, then run
``jcompress.pipeline.deep_compression``: magnitude pruning to the paper's per-layer rates
(Tables 2-3: LeNet-300-100 keeps 8% / 9% / 26%, LeNet-5 keeps 66% / 12% / 8% / 19%) except
fc1, which keeps 5% (see ``KEPT``: with 8% the file is 33x smaller, not 40x), a
fine-tune that keeps the masks (Adam at the training rate, 20 epochs), k-means sharing with
linear initialisation (conv kernels 8 bits = 255 centroids, fc kernels 5 bits = 31, plus
the exact zero), a centroid fine-tune, and Huffman coding of the codebook indices and the
relative sparse indices (conv 8 bits, fc 5 bits). Every stage writes a real file with
``jcompress.export``; the last row evaluates the params read back from the final file.

Reported per stage (dense, pruned, pruned + fine-tuned, clustered, centroids fine-tuned,
Huffman): validation and test accuracy, nonzeros, bits per weight, bytes on disk, ratio to
the float32 dense file; a control row, the dense model trained on for as many epochs as
the compressed one was fine-tuned (``dense, trained as long``), so that the extra training
is not mistaken for a compression gain; per layer (as the paper's Tables 2-3): weights, kept %, codebook bits, index
bits and stored bits per original weight after Huffman coding.

Measured (full mode, seeds 0, 1, 2, test accuracy mean +- std; 19 minutes of wall time on
2 shared cores): LeNet-300-100 45.8x at 93.87 +- 0.50% against 94.17 +- 0.38% dense and
94.37 +- 0.29% dense trained as long; LeNet-5 42.8x at 97.13 +- 0.23% against 97.17 +- 0.25%
and 97.10 +- 0.26%; every paired difference within noise. Earlier single run (4,000
training images, no control): LeNet-300-100 1,067 KB -> 23.3 KB (45.8x) at 94.4% test accuracy
against 93.9% dense; LeNet-5 1,725 KB -> 40.3 KB (42.8x) at 97.3% against 97.0% dense
(with 10 fine-tune epochs instead of 20, file format 1: 42.5x at 93.7% and 40.2x at 97.1%). The paper: 40x at
1.64% -> 1.58% error and 39x at 0.80% -> 0.74%. Huffman coding saves 7-8% here, not the
paper's 20-30%. Absolute accuracy is lower than the paper's because mnist5k has 4,000
training images instead of 60,000; run with ``--data tfds:mnist`` on a machine with
internet to compare the absolute numbers.
Quick mode (LeNet-300-100 only, 5 dense epochs, 8 + 2 fine-tune epochs) needs about 20 s
of CPU. At seeds 0, 1, 2 its file is 45.9x smaller than dense, and its test accuracy is
1.0, 0.9 and 2.4 points below the dense model's (2.7, 2.1 and 2.9 below the dense control
trained as long): quick mode shows the size, not the paper's "no loss".

Claims checked over seeds (``--seeds``, paired by seed): the final file's test accuracy
minus the dense model's, and minus the dense model trained as long.
"""

from __future__ import annotations

import math
from pathlib import Path

import ml_collections
import numpy as np
import optax

from experiments import common
from jcompress import compressed, pipeline, tree

# The paper's per-layer kept fractions (Deep Compression Tables 2-3 / Han et al. 2015).
PAPER_KEPT = {
    "lenet300": {"fc1/kernel": 0.08, "fc2/kernel": 0.09, "fc3/kernel": 0.26},
    "lenet5": {"conv1/kernel": 0.66, "conv2/kernel": 0.12, "fc1/kernel": 0.08, "fc2/kernel": 0.19},
}
PAPER = {
    "lenet300": {"dense_kb": 1070, "final_kb": 27, "ratio": 40, "error_before": 1.64, "error_after": 1.58},
    "lenet5": {"dense_kb": 1720, "final_kb": 44, "ratio": 39, "error_before": 0.80, "error_after": 0.74},
}
# What this experiment keeps: the paper's rates, except fc1 at 5% instead of 8%. With the
# paper's 8% the file here is 33x smaller, not 40x: Huffman coding saves about 7% on these
# weights instead of the paper's 20-30% (after k-means converges the codebook indices are
# used almost uniformly, about 4.9 of 5 bits of entropy), and the file's header took
# about 2.5 KB (plain JSON in file format 1; deflated to about 0.7 KB since format 2).
# fc1 holds 88% (LeNet-300-100) and 93% (LeNet-5) of the weights.
KEPT = {
    "lenet300": {**PAPER_KEPT["lenet300"], "fc1/kernel": 0.05},
    "lenet5": {**PAPER_KEPT["lenet5"], "fc1/kernel": 0.05},
}
TARGET_RATIO = 40.0
LR = 1e-3
# The control row: the dense model trained on for finetune_epochs + centroid_epochs more epochs.
CONTROL = "dense, trained as long (control)"


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """LeNet-300-100 and LeNet-5 with the paper's pipeline (``'paper'``), or LeNet-300-100 in seconds (``'quick'``).

    ``epochs`` trains the dense model; ``finetune_epochs`` retrains after pruning and
    ``centroid_epochs`` after clustering, both with Adam at ``finetune_lr_scale`` times the
    training rate (the paper's rule is 1/10, for SGD); ``train_images`` keeps the first images
    of the training split (0: all of them).
    """
    config = common.base_config(
        variant, data="mnist5k", models=("lenet300", "lenet5"), epochs=20, finetune_epochs=20, centroid_epochs=5,
        finetune_lr_scale=1.0, train_images=0,
    )  # fmt: skip
    if config.quick:
        config.update({"models": ("lenet300",), "epochs": 5, "finetune_epochs": 8, "centroid_epochs": 2})
    return config


def _compress_model(name: str, ds, config: ml_collections.ConfigDict, *, out: Path) -> tuple[list[dict], list[dict]]:
    epochs, ft_epochs, cft_epochs, seed = config.epochs, config.finetune_epochs, config.centroid_epochs, config.seed
    ft_lr = LR * config.finetune_lr_scale
    net = common.train_model(name, ds, epochs=epochs, lr=LR, batch_size=128, seed=seed)
    # the control: the dense model trained on as long as the compressed one is fine-tuned, at the same rate
    longer = common.fit(
        net.apply, net.params, net.extra, ds, tx=optax.adam(ft_lr), epochs=ft_epochs + cft_epochs, batch_size=128,
        seed=seed + 1,
    )  # fmt: skip

    def evaluate(params):
        return {
            "val_accuracy": common.val_accuracy(net.apply, params, net.extra, ds),
            "accuracy": common.accuracy(net.apply, params, net.extra, ds),
        }

    def finetune_fn(n_epochs):
        def finetune(params, wrap):
            tx = wrap(optax.adam(ft_lr))
            return common.fit(net.apply, params, net.extra, ds, tx=tx, epochs=n_epochs, batch_size=128, seed=seed).params

        return finetune

    sparsity = {n: 1.0 - k for n, k in KEPT[name].items()}
    result = pipeline.deep_compression(
        sparsity=sparsity,
        finetune_fn=finetune_fn(ft_epochs),
        centroid_finetune_fn=finetune_fn(cft_epochs),
        eval_fn=evaluate,
        out_dir=out / name,
        meta={"model": name, "data": ds.name},
    )(net.params)

    dense_acc, dense_bytes = result.rows[0]["accuracy"], result.rows[0]["bytes"]
    stages = []
    for r in result.rows:
        stages.append(
            {
                "model": name,
                "stage": r["stage"],
                "val_accuracy": r["val_accuracy"],
                "accuracy": r["accuracy"],
                "nonzeros": r["nonzeros"],
                "bits_per_weight": r["bits_per_weight"],
                "bytes": r["bytes"],
                "ratio": dense_bytes / r["bytes"],
            }
        )
    final = stages[-1]
    stages.insert(1, {
        "model": name, "stage": CONTROL,
        "val_accuracy": common.val_accuracy(net.apply, longer.params, longer.extra, ds),
        "accuracy": common.accuracy(net.apply, longer.params, longer.extra, ds), "nonzeros": stages[0]["nonzeros"],
        "bits_per_weight": stages[0]["bits_per_weight"], "bytes": dense_bytes, "ratio": 1.0,
    })  # fmt: skip
    final["stage"] = "final file (read back)"
    final["target"] = f">= {TARGET_RATIO:g}x and accuracy >= dense ({dense_acc:.4f})"
    final["met"] = bool(final["ratio"] >= TARGET_RATIO and final["accuracy"] >= dense_acc)
    final["paper"] = (
        f"{PAPER[name]['dense_kb']} KB -> {PAPER[name]['final_kb']} KB ({PAPER[name]['ratio']}x), "
        f"error {PAPER[name]['error_before']}% -> {PAPER[name]['error_after']}%"
    )
    return stages, _layer_rows(name, net.params, result)


def _layer_rows(name: str, dense_params, result) -> list[dict]:
    """Per-layer kept %, codebook bits, index bits and stored bits per weight (paper Tables 2-3)."""
    leaves = dict(tree.named_leaves(result.compressed, is_leaf=compressed.is_compressed))
    rows = []
    for layer, paper_kept in PAPER_KEPT[name].items():
        w = np.asarray(tree.get_by_name(dense_params, layer))
        stored = np.asarray(tree.get_by_name(result.params, layer))
        leaf = leaves[layer]
        bias = leaves[layer.replace("kernel", "bias")]
        rows.append(
            {
                "model": name,
                "layer": layer.split("/")[0],
                "weights": int(w.size),
                "kept": float(np.count_nonzero(stored) / w.size),
                "target_kept": KEPT[name][layer],
                "paper_kept": paper_kept,
                "codebook_bits": math.ceil(math.log2(leaf.k + 1)) if hasattr(leaf, "k") else None,
                "index_bits": getattr(leaf, "index_bits", None),
                "bits_per_weight": (leaf.nbits() + bias.nbits()) / (w.size + math.prod(bias.shape)),
                "bytes": (leaf.nbits() + bias.nbits()) / 8,
            }
        )
    return rows


def _plot(stages: list[dict]):
    fig, (ax_size, ax_acc) = common.figure(2)
    for name, marker in (("lenet300", "o"), ("lenet5", "s")):
        rows = [r for r in stages if r["model"] == name]
        if not rows:
            continue
        xs = np.arange(len(rows))
        ax_size.plot(xs, [r["bytes"] / 1000 for r in rows], marker=marker, label=name)
        ax_acc.plot(xs, [r["accuracy"] for r in rows], marker=marker, label=name)
        labels = [r["stage"].replace(" (", "\n(").replace(" + ", "\n+ ") for r in rows]
    for ax in (ax_size, ax_acc):
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_size.set_yscale("log")
    ax_size.set_ylabel("file size (KB, log scale)")
    ax_size.set_title("Deep Compression: bytes on disk per stage")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("accuracy per stage")
    return fig


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Run Deep Compression on the ``config.models``; write results.json/.md and plot.png to ``workdir``."""
    out, quick = Path(workdir), config.quick
    ds = common.load_data(config.data, config.data_dir)
    if config.train_images:
        n = min(config.train_images, len(ds.x_train))
        ds = ds._replace(x_train=ds.x_train[:n], y_train=ds.y_train[:n])
    stages, layers = [], []
    for name in config.models:
        s, layer = _compress_model(name, ds, config, out=out / "files")
        stages += s
        layers += layer
    notes = [
        f"data: {ds.name}, {len(ds.x_train)} training, {len(ds.x_val)} validation and {len(ds.x_test)} test images"
        + (" (quick mode: a few epochs per stage)" if quick else ""),
        ("bytes are the real sizes of the files written with jcompress.export (float32 dense baseline in the same "
        "container); the last stage's accuracy is measured on the params read back from its file."),
        ("kept per layer: the paper's rates except fc1 at 5% instead of 8% in both LeNet-300-100 and LeNet-5 (at 8% "
        "the file is 33x smaller here: Huffman coding saves 7-8% instead of the paper's 20-30%, and the plain JSON "
        "header of file format 1 took about 2.5 KB; format 2 deflates it to about 0.7 KB)."),
        ("paper (full MNIST): LeNet-300-100 1070 KB -> 27 KB (40x) at 1.64% -> 1.58% error; "
        "LeNet-5 1720 KB -> 44 KB (39x) at 0.80% -> 0.74% error."),
    ]
    deviations = [
        common.deviation("fc1 kept, LeNet-300-100", paper="8%", ours=f"{KEPT['lenet300']['fc1/kernel']:.0%}",
                         reason="with 8% the file is 33x smaller, not 40x: Huffman saves 7-8% here, not 20-30%"),
        common.deviation("fc1 kept, LeNet-5", paper="8%", ours=f"{KEPT['lenet5']['fc1/kernel']:.0%}",
                         reason="the same rule as LeNet-300-100, to reach the paper's 39x"),
        common.deviation("optimizer", paper="Caffe SGD; fine-tuning at 1/10 of the rate",
                         ours=f"Adam {LR:g}; fine-tuning at {config.finetune_lr_scale:g}x that rate",
                         reason="Adam trains the dense models in every experiment here; the fine-tuning rate "
                         "(1/10 or 1x) is chosen by the validation accuracy of the final files, 3 seeds"),
        common.deviation("data", paper="MNIST, 60,000 training images", ours=f"{ds.name}, {len(ds.x_train)} training images",
                         reason="offline data; --data tfds:mnist runs the paper's"),
    ]  # fmt: skip
    comparisons = []
    for name in config.models:
        final = {"model": name, "stage": "final file (read back)"}
        comparisons += [
            common.comparison(f"{name}: final file vs dense, test accuracy", metric="accuracy", a=final,
                              b={"model": name, "stage": "dense (float32)"}),
            common.comparison(f"{name}: final file vs dense trained as long, test accuracy", metric="accuracy",
                              a=final, b={"model": name, "stage": CONTROL}),
        ]  # fmt: skip
    result = common.write_results(
        out, stages, figure=_plot(stages), name="deep_compression", deviations=deviations, comparisons=comparisons,
        keys=["model", "stage"],
        columns=["model", "stage", "val_accuracy", "accuracy", "nonzeros", "bits_per_weight", "bytes", "ratio", "met"],
        formats={"val_accuracy": "{:.4f}", "accuracy": "{:.4f}", "bits_per_weight": "{:.3f}", "ratio": "{:.1f}x",
                 "bytes": "{:,.0f}", "nonzeros": "{:,.0f}"},
        notes=notes, layers=layers, paper=PAPER, config=config,
    )  # fmt: skip
    layer_table = common.markdown_table(
        layers,
        ["model", "layer", "weights", "kept", "target_kept", "paper_kept", "codebook_bits", "index_bits", "bits_per_weight", "bytes"],
        formats={"kept": "{:.1%}", "target_kept": "{:.0%}", "paper_kept": "{:.0%}", "bits_per_weight": "{:.2f}", "bytes": "{:.0f}"},
    )
    md = out / "results.md"
    md.write_text(md.read_text() + "\n## Per layer (as the paper's Tables 2-3)\n\n" + layer_table + "\n")
    return {"rows": result["rows"], "table": result["table"] + "\n\n" + layer_table}
