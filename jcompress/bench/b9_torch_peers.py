"""B9: SparseGPT, GPTQ and Wanda in jcompress against the same algorithms in PyTorch.

The peers are the published reference implementations' arithmetic, written here in
PyTorch (float32, CPU, the default thread count) so that they run on the same ``W`` and
``H`` as jcompress in the same process:

* SparseGPT (Frantar & Alistarh 2023): dead inputs zeroed, 1% dampening, the upper
  Cholesky factor ``U`` of the dampened ``H^-1``, blocks of 128 columns; in each block the
  weights with the smallest ``w^2 / U_ii^2`` up to the block's share of the sparsity are
  zeroed, then the column loop with lazy batch updates. (The published code zeroes every
  score ``<=`` the block's k-th smallest, one weight more per block than the target; the
  peer zeroes exactly k, as jcompress does, so both prune the same count.)
* GPTQ (Frantar et al. 2023): the same factor and blocks; each column rounded to its row's
  asymmetric min-max grid (range widened to contain 0, integer zero point), its error
  pushed onto the block's later columns, the block's errors onto the rest at once.
* Wanda (Sun et al. 2024): scores ``|W| * ||X_j||``; the smallest half of each output
  row removed (a stable sort per row), no update.

Shapes are the papers' ``W`` ``(out, in)``: BERT-base's FFN (3072x768, 768x3072) and
Llama-7B's attention and MLP projections (4096x4096, 11008x4096 are up/gate; 4096x11008
is down). Quick mode: 256x768 and 768x256. Calibration: ``2 * in`` tokens of correlated
features (:func:`jcompress.bench.b4_sparsegpt.make_problem`).

Figures per method and shape, measured side by side in one process
(:func:`jcompress.timing.compare`, calls interleaved):

* error ratio: jcompress's relative reconstruction error ``tr(D H D^T) / tr(W H W^T)``
  over PyTorch's; target ``<= 1.01`` (same algorithm, so equal up to float rounding);
* warm time ratio: median of interleaved calls after one untimed call; target ``<= 0.5``;
* cold time ratio: the first call of each (jcompress's includes XLA compilation, no
  persistent compilation cache); reported;
* cold with a filled persistent cache (full runs, SparseGPT and GPTQ): jcompress's first
  call in a fresh process whose compilation cache an earlier fresh process filled
  (:func:`jcompress.bench.cold.first_calls`), over PyTorch's first call; target ``<= 1.0``.

Needs PyTorch (``pip install -e '.[bench]'``); without it the module prints why and
returns no rows.
"""

from __future__ import annotations

import numpy as np

from jcompress import timing
from jcompress.bench import cold
from jcompress.bench.b4_sparsegpt import make_problem

__all__ = ["QUICK_SHAPES", "SHAPES", "run", "torch_gptq", "torch_sparsegpt", "torch_wanda"]

SHAPES = {"BERT-base": [(3072, 768), (768, 3072)], "Llama-7B": [(4096, 4096), (11008, 4096), (4096, 11008)]}
QUICK_SHAPES = {"small": [(256, 768), (768, 256)]}


def _torch_inverse_factor(torch, w, h, damp: float):
    """Dead inputs zeroed in ``w``; the upper Cholesky factor of the dampened ``H^-1``."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _obs_blocks(torch, w, u, *, block: int, pick):
    """The lazy-batch column loop shared by SparseGPT and GPTQ; ``pick(w1, u1, i)`` gives column ``i``'s new values."""
    cols = w.shape[1]
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = w[:, b0:b1].clone()
        u1 = u[b0:b1, b0:b1]
        err1 = torch.zeros_like(w1)
        pick_col = pick(w1, u1)
        for i in range(b1 - b0):
            col = w1[:, i]
            q = pick_col(col, i)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    return w


def torch_sparsegpt(w, h, *, sparsity: float, block: int = 128, damp: float = 0.01):
    """SparseGPT on ``w`` ``(out, in)`` (a torch float32 tensor) with ``h`` ``(in, in)``; returns the new ``w``."""
    import torch

    w = w.clone()
    u = _torch_inverse_factor(torch, w, h, damp)

    def pick(w1, u1):
        score = w1**2 / torch.diag(u1).reshape(1, -1) ** 2
        prune = torch.zeros(score.numel(), dtype=torch.bool)
        prune[torch.sort(score.flatten(), stable=True)[1][: round(score.numel() * sparsity)]] = True
        prune = prune.reshape(score.shape)
        return lambda col, i: torch.where(prune[:, i], 0.0, col)

    return _obs_blocks(torch, w, u, block=block, pick=pick)


def torch_gptq(w, h, *, bits: int, block: int = 128, damp: float = 0.01):
    """GPTQ on ``w`` ``(out, in)`` with one asymmetric grid per output row; returns the dequantized ``w``."""
    import torch

    w = w.clone()
    maxq = 2**bits - 1
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    both_zero = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    u = _torch_inverse_factor(torch, w, h, damp)

    def pick(w1, u1):
        return lambda col, i: scale * (torch.clamp(torch.round(col / scale) + zero, 0, maxq) - zero)

    return _obs_blocks(torch, w, u, block=block, pick=pick)


def torch_wanda(w, h, *, sparsity: float):
    """Wanda on ``w`` ``(out, in)``: the ``int(in * sparsity)`` smallest ``|w| * ||x_j||`` of each row set to 0."""
    import torch

    metric = w.abs() * torch.sqrt(torch.diag(h)).reshape(1, -1)
    order = torch.sort(metric, dim=-1, stable=True)[1][:, : int(w.shape[1] * sparsity)]
    prune = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, order, True)
    return torch.where(prune, 0.0, w)


def _rel_err(w: np.ndarray, new_w: np.ndarray, h: np.ndarray) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` for ``(out, in)`` weights, in float64."""
    w64, d = w.astype(np.float64), new_w.astype(np.float64) - w.astype(np.float64)
    return float(np.sum(d * (d @ h.astype(np.float64))) / np.sum(w64 * (w64 @ h.astype(np.float64))))


def _jcompress_fns(kernel, h):
    """The jitted jcompress solvers on a Flax kernel ``(in, out)``: each returns the new kernel."""
    import jax.numpy as jnp

    from jcompress.oneshot.gptq import quantize_matrix
    from jcompress.oneshot.sparsegpt import prune_matrix as sparsegpt_matrix
    from jcompress.oneshot.wanda import prune_matrix as wanda_matrix

    kj, hj = jnp.asarray(kernel), jnp.asarray(h)
    return {
        "SparseGPT 50%": lambda: sparsegpt_matrix(kj, hj, sparsity=0.5)[0],
        "GPTQ 4-bit": lambda: quantize_matrix(kj, hj, bits=4, symmetric=False)[0],
        "Wanda 50%": lambda: wanda_matrix(kj, hj, count=kernel.shape[0] // 2)[0],
    }


def _torch_fns(kernel, h):
    import torch

    w, ht = torch.from_numpy(np.ascontiguousarray(kernel.T)), torch.from_numpy(h)
    return {
        "SparseGPT 50%": lambda: torch_sparsegpt(w, ht, sparsity=0.5).numpy().T,
        "GPTQ 4-bit": lambda: torch_gptq(w, ht, bits=4).numpy().T,
        "Wanda 50%": lambda: torch_wanda(w, ht, sparsity=0.5).numpy().T,
    }


def run(quick: bool) -> list[dict]:
    try:
        import torch
    except ImportError:
        print("  b9_torch_peers: skipped, PyTorch is not installed (pip install -e '.[bench]')")
        return []
    repeats = 3
    rows = []
    for model, shapes in (QUICK_SHAPES if quick else SHAPES).items():
        for n_out, n_in in shapes:
            kernel, h = make_problem(n_in, n_out, 2 * n_in)
            kernel, h = kernel.astype(np.float32), h.astype(np.float32)
            ours, peers = _jcompress_fns(kernel, h), _torch_fns(kernel, h)
            for method in ours:
                ts = timing.compare({"jcompress": ours[method], "torch": peers[method]}, repeats=repeats)
                err_ours = _rel_err(kernel.T, np.asarray(ts["jcompress"].output).T, h)
                err_torch = _rel_err(kernel.T, np.asarray(ts["torch"].output).T, h)
                common = {
                    "method": method, "model": model, "shape_out_in": [n_out, n_in], "tokens": 2 * n_in,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                }  # fmt: skip
                size = f"{model} {n_out}x{n_in}"
                rows += [
                    {
                        "name": f"B9 {method} error vs PyTorch ({size})",
                        "ratio": err_ours / err_torch,
                        "target": "<= 1.01",
                        "met": bool(err_ours <= 1.01 * err_torch),
                        "error_jcompress": err_ours,
                        "error_torch": err_torch,
                        **common,
                    },
                    {
                        "name": f"B9 {method} time vs PyTorch ({size}), warm",
                        "ratio": ts["jcompress"].median / ts["torch"].median,
                        "target": "<= 0.5",
                        "met": bool(ts["jcompress"].median <= 0.5 * ts["torch"].median),
                        "seconds_jcompress": ts["jcompress"].median,
                        "seconds_jcompress_min_max": [ts["jcompress"].low, ts["jcompress"].high],
                        "seconds_torch": ts["torch"].median,
                        "seconds_torch_min_max": [ts["torch"].low, ts["torch"].high],
                        "repeats": repeats,
                        **common,
                    },
                    {
                        "name": f"B9 {method} time vs PyTorch ({size}), cold (compilation included)",
                        "ratio": ts["jcompress"].first / ts["torch"].first,
                        "target": "report",
                        "met": None,
                        "first_call_jcompress": ts["jcompress"].first,
                        "first_call_torch": ts["torch"].first,
                        **common,
                    },
                ]
                if not quick and method in _COLD_CALLS:
                    rows.append(_persistent_cache_row(method, n_in, n_out, ts["torch"].first, size, common))
    return rows


_COLD_CALLS = {
    "SparseGPT 50%": "sparsegpt.prune_matrix(kernel, h, sparsity=0.5)[0]",
    "GPTQ 4-bit": "gptq.quantize_matrix(kernel, h, bits=4, symmetric=False)[0]",
}


def _persistent_cache_row(method: str, n_in: int, n_out: int, torch_first: float, size: str, common: dict) -> dict:
    setup = (
        "import importlib\n"
        "import jax.numpy as jnp\n"
        "from jcompress.bench.b4_sparsegpt import make_problem\n"
        "gptq = importlib.import_module('jcompress.oneshot.gptq')\n"
        "sparsegpt = importlib.import_module('jcompress.oneshot.sparsegpt')\n"
        f"kernel, h = map(jnp.asarray, make_problem({n_in}, {n_out}, {2 * n_in}))"
    )
    firsts = cold.first_calls(setup, _COLD_CALLS[method])
    return cold.row(f"B9 {method} time vs PyTorch ({size})", firsts, torch_first, **common)
