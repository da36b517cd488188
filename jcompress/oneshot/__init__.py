"""One-shot compression from calibration data: OBS/OBC, SparseGPT, Wanda, GPTQ.

Each method compresses a trained model's Dense layers without retraining, using only
``H = sum x x^T`` of every layer's inputs on a few hundred calibration sequences:

* :mod:`~jcompress.oneshot.calibration`: collect ``H`` per layer (streaming, optionally
  layer by layer on the already-compressed model) and the shared per-layer driver;
* :mod:`~jcompress.oneshot.obs`: exact greedy OBS pruning, row by row (small layers);
* :mod:`~jcompress.oneshot.sparsegpt`: SparseGPT (unstructured, N:M, optional joint
  quantization);
* :mod:`~jcompress.oneshot.wanda`: Wanda (``|W| * ||X||``) and the magnitude baseline;
* :mod:`~jcompress.oneshot.gptq`: GPTQ (2..8 bits, groups, activation order) and the
  round-to-nearest baseline.

Every solver is ``solver(params, stats, *, hyperparameters) -> (new_params, aux)`` with
``aux.errors[name] = ||X K - X K'||^2 / ||X K||^2``.

Example:
  >>> from jcompress.oneshot import calibration, sparsegpt
  >>> stats = calibration.linear_input_stats(model, fwd, batches, token_mask=mask_fn)
  >>> params, aux = sparsegpt.prune(params, stats, sparsity=0.5)
"""

from jcompress.oneshot import calibration, gptq, obs, sparsegpt, wanda
from jcompress.oneshot.calibration import LayerStats, linear_input_stats, relative_error, sequential

__all__ = [
    "LayerStats",
    "calibration",
    "gptq",
    "linear_input_stats",
    "obs",
    "relative_error",
    "sequential",
    "sparsegpt",
    "wanda",
]
