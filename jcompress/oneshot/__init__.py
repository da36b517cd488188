"""One-shot compression from calibration data: OBS, SparseGPT, Wanda, GPTQ.

Each method compresses a trained model's Dense layers without retraining, using only
``H = sum x x^T`` of every layer's inputs on a few hundred calibration sequences:

* :func:`calibrate`: ``{kernel name: LayerStats}`` of a model on calibration inputs;
  :func:`sequential`: calibrate and compress layer after layer, each on the
  already-compressed layers before it (the papers' procedure);
* :func:`sparsegpt`: SparseGPT (unstructured or ``NM(n, m)``, optional joint quantization);
* :func:`wanda`: Wanda (``|W| * ||X||``, no weight update);
* :func:`obs`: exact greedy OBS pruning, row by row (small layers);
* :func:`gptq`: GPTQ (groups, activation order; exact zeros kept).
* :func:`awq`: AWQ (activation-aware per-channel scales folded into the preceding norm
  or Linear, then round-to-nearest); :func:`smoothquant`: SmoothQuant W8A8 (activation
  outliers migrated into the weights, inputs fake-quantized by :func:`act_quantizer`).
  Both need per-channel statistics (:class:`ChannelStats`) and the model's scale groups;
  :func:`jcompress.blockwise.compress` provides both for decoder LMs.

Every method is a factory ``method(stats, *, hyperparameters) -> Transform`` whose aux
(``MaskAux`` or ``GridAux``) reports ``errors[name] = ||X K - X K'||^2 / ||X K||^2`` on
the calibration data. The solvers share the OBS column loop of
:mod:`jcompress.core.obs_loop` and the grid of :mod:`jcompress.core.grid`.

Example:
  >>> stats = jc.oneshot.calibrate(model, batches)
  >>> t = jc.chain(jc.oneshot.sparsegpt(stats, sparsity=0.5), jc.oneshot.gptq(stats, bits=4))
  >>> params, aux = t(nnx.state(model, nnx.Param))
  >>> jc.export.write('m.jcz', jc.compressed.compress(params, aux))
"""

from jcompress.oneshot.awq import ChannelStats, apply_scales, awq
from jcompress.oneshot.calibration import LayerStats, calibrate, sequential
from jcompress.oneshot.gptq import gptq
from jcompress.oneshot.obs import obs
from jcompress.oneshot.smoothquant import act_quantizer, smoothquant
from jcompress.oneshot.sparsegpt import sparsegpt
from jcompress.oneshot.wanda import wanda

__all__ = [
    "ChannelStats",
    "LayerStats",
    "act_quantizer",
    "apply_scales",
    "awq",
    "calibrate",
    "gptq",
    "obs",
    "sequential",
    "smoothquant",
    "sparsegpt",
    "wanda",
]
