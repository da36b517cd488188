"""The README's "Composing transforms in a script" examples, run verbatim.

Every ```python block of that section runs, in order, in one namespace (a later block
uses what an earlier one defined), in a temporary working directory; the test then checks
what the examples computed and wrote.
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Composing transforms in a script"


def _blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], re.DOTALL)


def test_the_section_composes_each_example_with_one_chain():
    blocks = _blocks()
    assert len(blocks) == 2
    for block in blocks:
        assert block.count("jc.chain(") == 1
    oneshot, deep = blocks
    for name in ("jc.oneshot.calibrate", "jc.oneshot.sparsegpt(", "jc.oneshot.gptq(", "jc.compressed.compress("):
        assert name in oneshot
    for name in ("jc.pruning.magnitude(sparsity=0.9)", "jc.sharing.kmeans(k=31)", "huffman=True", "jc.export.write("):
        assert name in deep
    assert "jc.masked(" in README.read_text().split(SECTION)[1].split("\n## ")[0]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("readme")
    namespace: dict = {"__name__": "readme"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for i, block in enumerate(_blocks()):
            exec(compile(block, f"{README}: {SECTION!r}, python block {i + 1}", "exec"), namespace)  # noqa: S102 (the README text is the test)
    return workdir, namespace


def _kernels(params) -> dict:
    from jcompress import tree

    return {n: np.asarray(x) for n, x in tree.named_leaves(params) if n.endswith("kernel")}


def test_oneshot_example(ran):
    from flax import nnx

    from jcompress import compressed, export, tree

    workdir, ns = ran
    ctree, _ = export.read(workdir / "mlp-oneshot.jcz")
    restored = compressed.dequantize_tree(ctree)
    small = tree.to_pure_dict(nnx.state(ns["small"], nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, small)
    assert sorted(ns["stats"]) == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    leaves = dict(_named(ctree))
    for name, w in _kernels(restored).items():
        # half pruned, and the zeros kept by GPTQ (more weights may round to the code of zero)
        assert 0.3 * w.size < np.count_nonzero(w) <= w.size // 2, name
        leaf = leaves[name]
        assert isinstance(leaf, compressed.QuantizedTensor) and leaf.bits == 4 and leaf.group_size in (112, None)
        dense_layout = compressed.QuantizedTensor.from_qparams(leaf.to_qparams())
        # 4-bit codes and a float32 scale per 112 weights (the default grid is symmetric: no zero
        # point is stored); the sparse layout where smaller
        assert leaf.symmetric and leaf.nbits() <= dense_layout.nbits() == 4 * w.size + 32 * w.size // 112
    # the input model is untouched by the chain
    assert np.count_nonzero(np.asarray(ns["model"].fc1.kernel[...])) == 784 * 448


def _named(ctree):
    from jcompress import compressed, tree

    return tree.named_leaves(ctree, is_leaf=compressed.is_compressed)


def test_deep_compression_example(ran):
    from jcompress import compressed, export, train
    from jcompress.core.base import ChainAux, CodebookAux, MaskAux

    workdir, ns = ran
    path = workdir / "mlp-deep-compression.jcz"
    assert ns["nbytes"] == path.stat().st_size
    aux = ns["aux"]
    assert isinstance(aux, ChainAux) and [type(a) for a in aux] == [MaskAux, MaskAux, CodebookAux, CodebookAux]
    ctree, _ = export.read(path)
    dense = sum(x.size for x in jax.tree.leaves(ns["res"].params)) * 4
    assert path.stat().st_size < dense / 20
    restored = ns["restored"]
    for name, w in _kernels(restored).items():
        assert np.count_nonzero(w) <= round(0.1 * w.size) + 1, name  # 90% pruned, zeros kept through both fine-tunes
        assert len(np.unique(w)) <= 32, name  # 31 centroids and the zero
        leaf = dict(_named(ctree))[name]
        assert isinstance(leaf, compressed.CodebookTensor) and leaf.huffman and leaf.k == 31
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, ns["params"])
    fn, ds = ns["fn"], ns["ds"]
    accuracy = train.evaluate(fn.apply, restored, ns["res"].extra, ds.x_test, ds.y_test)["accuracy"]
    dense = train.evaluate(fn.apply, ns["res"].params, ns["res"].extra, ds.x_test, ds.y_test)["accuracy"]
    assert accuracy > 0.8 and accuracy >= dense - 0.05
