"""``jcompress demo``: the main job, on the embedded default data.

Trains LeNet-300-100 on ``mnist5k`` (or reuses the cached checkpoint), then runs the
compression pipeline stage by stage and prints one row per stage: test accuracy,
nonzero weights, bits per weight, bytes and compression ratio. Bytes are the size of
a file really written to ``out`` (float32 for the dense model, the jcompress compressed
file for compressed stages). Writes ``out/report.json`` (``{"rows": [...]}``) and
``out/report.png``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jcompress import checkpoint, data, models, report, train

__all__ = ["main", "trained_lenet300"]

DEMO_EPOCHS = 20


def trained_lenet300(ds: data.Dataset, *, epochs: int = DEMO_EPOCHS, seed: int = 0, progress: bool = True):
    """LeNet-300-100 trained on ``ds`` with Adam, cached under ``data.cache_dir()``.

    Returns ``(model, config)``. A cached checkpoint is reused only when it was trained
    with the same dataset, epochs and seed (the key is a hash of those).
    """
    config = dict(name="lenet300", input_shape=list(ds.input_shape), num_classes=ds.num_classes, seed=seed)
    key = hashlib.sha1(json.dumps([config, ds.name, epochs, "adam1e-3", 128]).encode()).hexdigest()[:10]
    run_dir = data.cache_dir() / "demo" / f"lenet300-{ds.name}-{key}"
    ckpt = run_dir / "ckpt"
    if checkpoint.latest_step(ckpt) is not None:
        meta = checkpoint.Checkpointer(ckpt).read_meta()
        if meta.get("epoch") == epochs:
            model, config, _ = checkpoint.load_model(ckpt, build=models.from_meta)
            return model, config
    model = models.create(**config)
    fn = models.functional(model)
    res = train.fit(
        fn.apply, fn.params, fn.extra, ds, tx=optax.adam(1e-3), epochs=epochs, batch_size=128, seed=seed,
        out_dir=run_dir, meta={"model": config, "data": ds.name}, progress=progress,
    )
    return models.merge(model, res.params, res.extra), config


def _row(stage: str, accuracy: float, nonzeros: int, nbytes: int, dense_params: int, dense_bytes: int, **extra) -> dict:
    return {
        "stage": stage,
        "accuracy": round(float(accuracy), 4),
        "nonzeros": int(nonzeros),
        "bits_per_weight": round(nbytes * 8 / dense_params, 3),
        "bytes": int(nbytes),
        "ratio": round(dense_bytes / nbytes, 2),
        **extra,
    }


def print_rows(rows: list[dict]) -> None:
    head = f"{'stage':<34}{'accuracy':>9}{'nonzeros':>10}{'bits/w':>8}{'bytes':>10}{'ratio':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['stage']:<34}{r['accuracy']:>9.4f}{r['nonzeros']:>10}{r['bits_per_weight']:>8.2f}"
            f"{r['bytes']:>10}{r['ratio']:>7.1f}x"
        )


def plot_rows(rows: list[dict], path: Path, *, pipeline_stages: int | None = None) -> None:
    """Accuracy vs file size, one numbered point per stage (legend), the pipeline's path joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [r["bytes"] / 1024 for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    n = len(rows) if pipeline_stages is None else pipeline_stages
    ax.plot(xs[:n], ys[:n], "-", color="0.7", zorder=1)
    for i, (r, x, y) in enumerate(zip(rows, xs, ys), start=1):
        ax.scatter([x], [y], s=40, zorder=2, label=f"{i}. {r['stage']} ({r['ratio']:.1f}x)")
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("file size on disk (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("jcompress demo: LeNet-300-100 on mnist5k")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Han et al. 2015, Table 2: LeNet-300-100 keeps 8% / 9% / 26% of fc1 / fc2 / fc3.
HAN_SPARSITY = {"fc1/kernel": 0.92, "fc2/kernel": 0.91, "fc3/kernel": 0.74}


def main(out: Path, epochs: int | None = None) -> int:
    from jcompress import compressed, export, pipeline, quant
    from jcompress.distill.run import demo_stage

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = data.load("mnist5k")
    model, config = trained_lenet300(ds, epochs=epochs or DEMO_EPOCHS)
    fn = models.functional(model)
    print(f"LeNet-300-100 trained on mnist5k ({time.perf_counter() - t0:.0f} s); compressing ...", flush=True)

    def accuracy(params) -> float:
        return train.evaluate(fn.apply, params, fn.extra, ds.x_test, ds.y_test)["accuracy"]

    def finetune(params, wrap):
        # Retrain with the structure kept (masks, then fixed cluster assignments) at a lower rate.
        res = train.fit(fn.apply, params, fn.extra, ds, tx=wrap(optax.adam(3e-4)), epochs=8, batch_size=128,
                        seed=1, progress=False, eval_every=0)  # fmt: skip
        return res.params

    # 1. Deep Compression: prune -> fine-tune -> k-means share -> fine-tune centroids -> Huffman -> file.
    dc = pipeline.deep_compression(
        sparsity=HAN_SPARSITY, finetune_fn=finetune,
        eval_fn=lambda p: {"accuracy": accuracy(p)}, out_dir=out / "files", meta={"model": config},
    )(fn.params)  # fmt: skip
    dense_bytes = dc.rows[0]["bytes"]
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(fn.params))
    rows = [
        _row(r["stage"], r["accuracy"], r["nonzeros"], r["bytes"], n_params, dense_bytes) for r in dc.rows
    ]
    # 2. Post-training int8 quantization (per output channel) of the dense model, as a file.
    q_params, q_aux = quant.quantize(bits=8, axis=-1)(fn.params)
    q_bytes = export.write(out / "files" / "int8.jcz", compressed.compress(q_params, q_aux))
    rows.append(_row("int8 PTQ (dense model)", accuracy(q_params), _nonzeros(q_params), q_bytes, n_params, dense_bytes))

    # 3. Distillation into a much smaller MLP (a different architecture), saved dense.
    d = demo_stage(model, ds, epochs=10)
    s_bytes = export.write_dense(out / "files" / "student.jcz", d["student_params"])
    rows.append(
        _row(f"distilled student {d['student']}", d["accuracy"], int(d["params"]), s_bytes, n_params, dense_bytes,
             student_alone_accuracy=d["student_alone_accuracy"])  # fmt: skip
    )

    print()
    print_rows(rows)
    seconds = round(time.perf_counter() - t0, 1)
    report.save_json({"model": config, "data": ds.name, "rows": rows, "seconds": seconds}, out / "report.json")
    plot_rows(rows, out / "report.png", pipeline_stages=len(dc.rows))
    print(f"\nwrote {out / 'report.json'} and {out / 'report.png'} in {seconds:.0f} s")
    return 0


def _nonzeros(params) -> int:
    return sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(params))
