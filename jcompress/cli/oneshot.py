"""``jcompress oneshot``: compress a Hugging Face Llama or GPT-2 folder block by block and report perplexity.

The model is loaded tensor by tensor (:func:`jcompress.models.hf_lm.load`), calibrated on
``--calib`` random windows of ``--seq-len`` tokens of the offline calibration text
(:func:`jcompress.lm.corpus_ids`), compressed one decoder block at a time
(:func:`jcompress.blockwise.compress`, one progress line per block) and evaluated by
perplexity on the held-out evaluation text before and after. ``report.json`` in ``--out``
holds the perplexities, per-block seconds and output errors, per-layer errors, the bytes
of the written model, the device bytes of the compressed parameters in memory (float
arrays: dense bytes; :func:`jcompress.report.device_nbytes`), the zero patterns of pruned
kernels with their ``sparse_runtime`` (none: they run dense), and the peak memory (the process's maximum resident set size from
``resource.getrusage``, and the devices' peak bytes in use where the backend reports it).

Example:
  $ jcompress oneshot --model llama-folder --method gptq --bits 4 --group-size 128 --calib 128 --seq-len 512 --out runs/w4
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from jcompress.cli.args import fraction, new_dir, positive_int, seed

__all__ = ["main", "register"]

METHODS = ("gptq", "sparsegpt", "wanda", "magnitude", "rtn", "awq", "smoothquant")
FORMATS = ("native", "compressed-tensors")
# the arguments recorded in report.json
_SETTINGS = (
    "bits",
    "group_size",
    "act_order",
    "sparsity",
    "n_m",
    "alpha",
    "act_scale",
    "calib",
    "seq_len",
    "batch_size",
    "devices",
    "seed",
    "format",
)


def n_m(text: str) -> tuple[int, int]:
    """``--n-m 2:4``: keep n of every m consecutive inputs (0 < n < m)."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"expected N:M with 0 < N < M such as 2:4, got {text!r}")
    return n, m


def sparsity(text: str) -> float:
    """A sparsity in [0, 1)."""
    value = fraction(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), got {text!r}")
    return value


def bits(text: str) -> int:
    """A weight code width, 2..8."""
    value = positive_int(text)
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"expected bits in 2..8, got {text!r}")
    return value


def register(subparsers) -> None:
    """Add ``jcompress oneshot`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "oneshot", help="one-shot compression of a Llama / GPT-2 folder, block by block, with perplexity"
    )
    p.add_argument("--model", required=True, help="Hugging Face folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--bits", type=bits, default=4, help="weight bits for gptq, rtn, awq (default 4)")
    p.add_argument("--group-size", type=positive_int, default=None, help="inputs per quantization group (e.g. 128)")
    p.add_argument("--act-order", action="store_true", help="gptq: columns in decreasing activation energy")
    p.add_argument(
        "--dynamic-groups",
        action="store_true",
        help="gptq with --act-order: groups formed in activation order, stored with a per-input group index (g_idx)",
    )
    p.add_argument("--clip", action="store_true", help="awq: search a clipping ratio per output unit and group")
    p.add_argument(
        "--sparsity", type=sparsity, default=None, help="fraction of weights removed (sparsegpt, wanda, magnitude)"
    )
    p.add_argument("--n-m", type=n_m, default=None, help="N:M sparsity such as 2:4 (instead of --sparsity)")
    p.add_argument("--alpha", type=fraction, default=0.5, help="smoothquant migration strength in [0, 1] (0.5)")
    p.add_argument("--act-scale", choices=("token", "tensor"), default="token", help="smoothquant activation scales")
    p.add_argument("--calib", type=positive_int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration and evaluation window")
    p.add_argument("--batch-size", type=positive_int, default=None, help="calibration sequences per batch")
    p.add_argument("--devices", type=positive_int, default=1, help="devices of the data mesh (default 1)")
    p.add_argument(
        "--eval-tokens", type=positive_int, default=16384, help="held-out tokens for perplexity (default 16384)"
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of the calibration windows")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="native",
        help="native .jcz, or a compressed-tensors folder (Llama, quantized)",
    )
    p.add_argument("--out", type=new_dir, required=True, help="output directory: the model and report.json")
    p.set_defaults(func=main)


def _device_peak() -> int | None:
    import jax

    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _nbytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main(args: argparse.Namespace) -> int:
    """Run ``jcompress oneshot`` for parsed ``args``; prints one line per block and a summary."""
    from flax import nnx

    from jcompress import blockwise, compressed, export, lm, parallel, tree
    from jcompress.core import base
    from jcompress.models import hf_lm
    from jcompress.oneshot.calibration import mask_tree
    from jcompress.report import device_nbytes, sparse_runtime, sparsity_pattern

    start = time.perf_counter()
    if args.method in ("sparsegpt", "wanda", "magnitude") and (args.sparsity is None) == (args.n_m is None):
        raise ValueError(f"--method {args.method} needs exactly one of --sparsity or --n-m")
    if args.format == "compressed-tensors" and args.method not in ("gptq", "rtn", "awq"):
        raise ValueError("--format compressed-tensors holds quantized weights: use it with --method gptq, rtn or awq")
    if args.dynamic_groups and not (args.method == "gptq" and args.act_order):
        raise ValueError("--dynamic-groups applies to --method gptq with --act-order")
    if args.clip and args.method != "awq":
        raise ValueError("--clip applies to --method awq")
    factory = blockwise.method(
        args.method, bits=args.bits, group_size=args.group_size, act_order=args.act_order, sparsity=args.sparsity,
        n_m=args.n_m, alpha=args.alpha, act_scale=args.act_scale, static_groups=False if args.dynamic_groups else None,
        clip=args.clip,
    )  # fmt: skip
    mesh = parallel.data_mesh(args.devices)
    model, tokenizer, cfg = hf_lm.load(args.model, mesh=mesh if args.devices > 1 else None, axis="data")
    if args.format == "compressed-tensors" and type(model).__name__ != "Llama":
        raise ValueError("--format compressed-tensors is written for Llama folders; use --format native for GPT-2")
    calib = lm.sample_windows(
        lm.corpus_ids(tokenizer, "calibration"), num=args.calib, seq_len=args.seq_len, seed=args.seed
    )
    held_out = lm.corpus_ids(tokenizer, "evaluation")[: args.eval_tokens]
    if len(held_out) < args.seq_len + 1:
        raise ValueError(f"--eval-tokens {args.eval_tokens} must exceed --seq-len {args.seq_len}")
    ppl = lambda m: lm.perplexity(m, held_out, seq_len=args.seq_len, stride=args.seq_len, batch_size=8).perplexity
    dense_bytes = _nbytes(nnx.state(model, nnx.Param))
    before = ppl(model)
    print(
        f"{args.model}: {type(model).__name__}, {cfg.num_layers} blocks, {dense_bytes:,} bytes; perplexity {before:.3f}"
    )
    num_blocks = cfg.num_layers

    def progress(r):
        worst = max(r.layer_errors.values()) if r.layer_errors else 0.0
        print(
            f"block {r.index + 1}/{num_blocks}: {r.seconds:.2f} s, output error {r.output_error:.4g}, "
            f"worst layer error {worst:.4g}",
            flush=True,
        )

    model, report = blockwise.compress(
        model, calib, factory, mesh=mesh, batch_size=args.batch_size, progress=progress, keep_grids=True
    )
    after = ppl(blockwise.with_act_quant(model, report.act_quant))
    args.out.mkdir(parents=True, exist_ok=True)
    params = nnx.state(model, nnx.Param)
    auxes = [base.GridAux(report.grids, None)] if report.grids else []
    if args.method in ("sparsegpt", "wanda", "magnitude"):
        pruned = {n: x != 0 for n, x in tree.named_leaves(params) if n in report.layer_errors}
        auxes.append(base.MaskAux(mask_tree(params, pruned), None, None))
    act = {n: a._asdict() for n, a in report.act_quant.items()}
    if args.format == "native":
        path = args.out / "model.jcz"
        written = export.write(
            path, compressed.compress(params, *auxes), meta={"method": args.method, "act_quant": act}
        )
    else:
        from jcompress.formats import LLAMA_TO_HF, compressed_tensors, renamer

        path = args.out / "model"
        compressed_tensors.write(
            path, params, auxes[0], names=renamer(LLAMA_TO_HF), base_folder=args.model,
            actorder="weight" if args.act_order else None,
        )  # fmt: skip
        written = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    patterns = sorted({sparsity_pattern(x) for n, x in tree.named_leaves(params) if n in report.layer_errors} - {None})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    result = {
        "model": str(args.model),
        "method": args.method,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in _SETTINGS},
        "perplexity_before": before,
        "perplexity_after": after,
        "eval_tokens": len(held_out),
        "blocks": [{"index": r.index, "seconds": r.seconds, "output_error": r.output_error} for r in report.blocks],
        "layer_errors": report.layer_errors,
        "dense_bytes": dense_bytes,
        # the compressed weights in memory are float arrays again: device bytes stay dense
        "device_bytes": device_nbytes(params),
        "sparsity_patterns": patterns,
        "sparse_runtime": sparse_runtime() if patterns else None,
        "written_bytes": int(written),
        "written": str(path),
        "seconds": time.perf_counter() - start,
        "compress_seconds": report.seconds,
        "peak_host_rss_bytes": int(rss),
        "peak_device_bytes": _device_peak(),
        "act_quant": act,
    }
    (args.out / "report.json").write_text(json.dumps(result, indent=2))
    device = result["peak_device_bytes"]
    print(
        f"perplexity {before:.3f} -> {after:.3f}; {dense_bytes:,} -> {int(written):,} bytes ({path}), "
        f"{result['device_bytes']:,} bytes on the devices; "
        f"{report.seconds:.1f} s compressing; peak host RSS {rss / 2**20:.0f} MiB"
        + (f", peak device {device / 2**20:.0f} MiB" if device else " (the backend reports no device memory)")
    )
    print(f"report: {args.out / 'report.json'}")
    return 0
