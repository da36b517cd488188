"""Build tests/fixtures/interop: checkpoint folders written by the compressed-tensors library itself.

jcompress must read what the reference writer produces, not only what jcompress writes.
This script builds a tiny PyTorch model of Linear layers, lets the ``compressed-tensors``
library attach quantization schemes, compute min-max scales and zero points
(``calculate_qparams``), quantize, pack and write the config; then it decompresses the
same model with the library and stores those weights as ``reference.npz`` (PyTorch
orientation, ``(out, in)`` float32, keyed by tensor name).

Folders (a few KB each):

* ``ct_pack``: ``pack-quantized``, three config groups: 4-bit asymmetric with groups of
  16 (targeted by a regex), 4-bit symmetric per channel (the library's symmetric codes
  reach -8, outside jcompress's symmetric range, so the reader turns them into an
  asymmetric grid), 8-bit asymmetric per channel; a float ``head`` in ``ignore``; biases.
* ``ct_naive``: ``naive-quantized``, 8-bit asymmetric with one scale for each tensor.
* ``ct_group``: ``pack-quantized`` with ``actorder: "group"``: 4-bit groups of 16 whose
  inputs are scattered (a random ``weight_g_idx`` with 16 inputs per group, as GPTQ's
  activation-order groups), asymmetric for ``a``, symmetric for ``c``; ``b`` left float.
  Built only by compressed-tensors <= 0.18 (0.19 removed ``actorder: "group"``): run
  this script with such a release (``pip install --target DIR compressed-tensors==0.18.0``,
  ``PYTHONPATH=DIR``) to rebuild it; other releases skip it.

Run (needs the interop extra: torch, transformers, compressed-tensors)::

  python scripts/make_interop_fixtures.py [--out tests/fixtures/interop]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 24, bias=True)
        self.b = torch.nn.Linear(48, 40, bias=False)
        self.c = torch.nn.Linear(32, 16, bias=True)
        self.head = torch.nn.Linear(16, 8, bias=False)


def _args(**kw) -> QuantizationArgs:
    return QuantizationArgs(type="int", dynamic=False, **kw)


SCHEMES = {
    "ct_pack": (
        "pack-quantized",
        {
            "group_0": QuantizationScheme(
                targets=[r"re:^a$"], weights=_args(num_bits=4, symmetric=False, strategy="group", group_size=16)
            ),
            "group_1": QuantizationScheme(targets=["b"], weights=_args(num_bits=4, symmetric=True, strategy="channel")),
            "group_2": QuantizationScheme(
                targets=["c"], weights=_args(num_bits=8, symmetric=False, strategy="channel")
            ),
        },
        ["head"],
    ),
    "ct_group": (
        "pack-quantized",
        {
            "group_0": QuantizationScheme(
                targets=["a"], weights=_args(num_bits=4, symmetric=False, strategy="group", group_size=16)
            ),
            "group_1": QuantizationScheme(
                targets=["c"], weights=_args(num_bits=4, symmetric=True, strategy="group", group_size=16)
            ),
        },
        ["head"],
    ),
    "ct_naive": (
        "naive-quantized",
        {
            "group_0": QuantizationScheme(
                targets=["Linear"], weights=_args(num_bits=8, symmetric=False, strategy="tensor")
            )
        },
        ["head"],
    ),
}


def _observe(module: torch.nn.Module) -> None:
    """Min-max scales and zero points of the module's weight, computed by the library."""
    args = module.quantization_scheme.weights
    w = module.weight.data
    if hasattr(module, "weight_g_idx"):  # scattered groups: a random g_idx, 16 inputs each
        g_idx = torch.randperm(w.shape[1]) // args.group_size
        module.weight_g_idx.data.copy_(g_idx.to(module.weight_g_idx.dtype))
        w = w[:, torch.argsort(g_idx, stable=True)]  # the inputs group by group
    if args.strategy == "group":
        view = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = view.amin(dim=2), view.amax(dim=2)
    elif args.strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zero = calculate_qparams(lo, hi, args)
    module.weight_scale.data.copy_(scale)
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data.copy_(zero)


def _reads_group_actorder() -> bool:
    try:
        _args(num_bits=4, strategy="group", group_size=16, actorder="group")
    except ValueError:
        return False
    return True


def build(out: Path, name: str, seed: int) -> None:
    fmt, groups, ignore = SCHEMES[name]
    if name == "ct_group":
        if not _reads_group_actorder():
            print(f"{name}: skipped, this compressed-tensors has no actorder 'group' (use <= 0.18)")
            return
        for scheme in groups.values():
            scheme.weights.actorder = "group"
    torch.manual_seed(seed)
    model = Tiny()
    for scheme in groups.values():
        scheme.format = fmt
    config = QuantizationConfig(config_groups=groups, format=fmt, ignore=ignore)
    apply_quantization_config(model, config)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            _observe(module)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)  # the format of each scheme
    compressor.compress_model(model)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny-linear-stack"}) + "\n")
    compressor.update_config(str(folder))
    compressor.decompress_model(model)
    ref = {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k.endswith(("weight", "bias"))}
    np.savez(folder / "reference.npz", **ref)
    print(folder, sorted(state), sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests/fixtures/interop")
    parser.add_argument("--only", nargs="*", choices=sorted(SCHEMES), help="build only these folders")
    args = parser.parse_args()
    for seed, name in enumerate(SCHEMES):
        if not args.only or name in args.only:
            build(args.out, name, seed)


if __name__ == "__main__":
    main()
