"""Checkpoint layouts that serving engines load: compressed-tensors and GPTQ.

* :mod:`jcompress.formats.compressed_tensors`: the layout llm-compressor writes and
  transformers, vLLM and SGLang load (``pack-quantized`` / ``naive-quantized`` int weights,
  ``float-quantized`` float8 e4m3 weights).
* :mod:`jcompress.formats.gptq`: AutoGPTQ's layout (``qweight`` / ``qzeros`` / ``scales`` /
  ``g_idx``), read by transformers' GPTQ loader, GPTQModel and vLLM.

Both ``write(folder, params, aux, ...)`` a folder from jcompress params and the
``GridAux`` of ``jc.quant.quantize`` or ``jc.oneshot.gptq``, and ``read(folder)`` it back
to ``(params, {leaf: QuantParams})``, exactly. Leaf names map to tensor names through
``names=`` (see :mod:`jcompress.formats.folder`; :func:`renamer` with ``LLAMA_TO_HF`` /
``LLAMA_FROM_HF`` for the Llama models); Dense kernels ``(in, out)`` are stored as
PyTorch Linear weights ``(out, in)``.

Example:
  >>> from jcompress.formats import compressed_tensors
  >>> compressed_tensors.write('out', params, aux, base_folder='tinyllama')
"""

from jcompress.formats import compressed_tensors, gptq
from jcompress.formats.folder import LLAMA_FROM_HF, LLAMA_TO_HF, FolderError, renamer

__all__ = ["LLAMA_FROM_HF", "LLAMA_TO_HF", "FolderError", "compressed_tensors", "gptq", "renamer"]
