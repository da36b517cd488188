"""The reference readers load what jcompress.formats writes (the ``interop`` extra).

Needs PyTorch, transformers and compressed-tensors (``pip install -e '.[interop]'``), which
the main environment does not hold: every test here is skipped with the reason when they
are absent. ``.ci/run`` runs this file in a separate environment with the extra.

* the compressed-tensors library decompresses our export (int and float8 weights) to exactly
  our dequantized weights, and its compress of our grids gives our bytes;
* transformers loads our exported tiny Llamas (GPTQ 4-bit with act order; round-to-nearest
  8-bit) and its logits equal jcompress's model with the same dequantized weights;
* jcompress reads a folder the library itself compressed (tests/fixtures/interop) to the
  library's own decompressed weights, recomputed here by the installed library;
* GPTQ's activation-order groups (``static_groups=False``, a ``weight_g_idx`` under
  ``actorder: "group"``): the library decompresses them to our weights and transformers'
  logits equal ours. compressed-tensors 0.19 removed ``actorder: "group"``, so these run
  with compressed-tensors <= 0.18 (e.g. ``pip install --target DIR compressed-tensors==0.18.0``
  and ``PYTHONPATH=DIR``) and are skipped, with that reason, with later releases;
* 2:4 sparse float weights in ``sparse-24-bitmask``: the library's compressor decompresses
  them to our weights (compressed-tensors <= 0.14, the last with that compressor; skipped
  with later releases).
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the interop extra is not installed: pip install -e '.[interop]'")
transformers = pytest.importorskip("transformers", reason="the interop extra is not installed (transformers)")
pytest.importorskip("compressed_tensors", reason="the interop extra is not installed (compressed-tensors)")

from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import match_named_modules
from flax import nnx
from safetensors.torch import load_file

from jcompress import oneshot, quant, tree
from jcompress.core import grid
from jcompress.formats import LLAMA_FROM_HF, LLAMA_TO_HF, renamer
from jcompress.formats import compressed_tensors as ct
from jcompress.models import hf_lm
from jcompress.oneshot.gptq import quantize_matrix

FIXTURES = Path(__file__).parent / "fixtures"


def _library_reads_group_actorder() -> bool:
    """Whether the installed compressed-tensors still reads ``actorder: "group"`` (removed in 0.19)."""
    from compressed_tensors.quantization import QuantizationArgs

    try:
        QuantizationArgs(num_bits=4, strategy="group", group_size=16, actorder="group")
    except ValueError:
        return False
    return True


needs_group_actorder = pytest.mark.skipif(
    not _library_reads_group_actorder(),
    reason="the installed compressed-tensors removed actorder 'group' (weight_g_idx); run with "
    "compressed-tensors<=0.18",
)


def _linear_tree(names):
    """A torch module tree holding an ``nn.Linear`` under each dotted name (for the library's matcher)."""
    root = torch.nn.Module()
    for name in names:
        *path, last = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, torch.nn.Linear(1, 1))
    return root


def _library_decompress(folder: Path) -> dict[str, np.ndarray]:
    """``{module: weight (out, in) float32}``: every quantized module of ``folder``, matched to its
    scheme and decompressed by the installed compressed-tensors library from the folder's config."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    tensors = load_file(str(folder / "model.safetensors"))
    linears = _linear_tree(sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}))
    out = {}
    for scheme in config.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        for module, _ in match_named_modules(linears, scheme.targets, config.ignore):
            local = {k[len(module) + 1 :]: v for k, v in tensors.items() if k.startswith(module + ".")}
            out[module] = compressor.decompress(local, scheme)["weight"].float().numpy()
    return out


GRIDS = [
    {"bits": 4, "group_size": 16, "symmetric": False},
    {"bits": 4},
    {"bits": 8, "symmetric": False},
    {"bits": 8, "group_size": 32},
    {"bits": 4, "axis": None, "symmetric": False},
    {"bits": 3, "group_size": 16, "symmetric": False},
]


@pytest.mark.parametrize("fmt", ct.FORMATS)
def test_library_decompresses_our_export_exactly(tmp_path, fmt):
    rng = np.random.default_rng(0)
    params = {f"l{i}": {"kernel": rng.normal(size=(64, 24)).astype(np.float32)} for i in range(len(GRIDS))}
    grids = {f"l{i}/kernel": grid.quantize_leaf(params[f"l{i}"]["kernel"], **kw) for i, kw in enumerate(GRIDS)}
    ct.write(tmp_path, params, grids, format=fmt)
    got = _library_decompress(tmp_path)
    assert sorted(got) == sorted(f"l{i}" for i in range(len(GRIDS)))
    for leaf, qp in grids.items():
        np.testing.assert_array_equal(got[leaf.split("/")[0]], np.asarray(grid.dequantize(qp)).T)


def test_library_decompresses_our_float8_export_exactly(tmp_path):
    rng = np.random.default_rng(3)
    params = {f"l{i}": {"kernel": rng.normal(size=(64, 24)).astype(np.float32)} for i in range(3)}
    grids = {
        "l0/kernel": ct.float8_grid(params["l0"]["kernel"]),
        "l1/kernel": ct.float8_grid(params["l1"]["kernel"], axis=None),
        "l2/kernel": grid.quantize_leaf(params["l2"]["kernel"], bits=4, group_size=16),
    }
    assert ct.write(tmp_path, params, grids)["format"] == "mixed-precision"
    got = _library_decompress(tmp_path)
    for leaf, g in grids.items():
        np.testing.assert_array_equal(got[leaf.split("/")[0]], np.asarray(g.dequantize()).T)


@pytest.mark.parametrize("fmt", ct.FORMATS)
def test_our_tensors_are_the_library_compress(tmp_path, fmt):
    """The library, given our dequantized weight, scale and zero point, writes our bytes."""
    rng = np.random.default_rng(2)
    params = {f"l{i}": {"kernel": rng.normal(size=(64, 24)).astype(np.float32)} for i in range(len(GRIDS))}
    grids = {f"l{i}/kernel": grid.quantize_leaf(params[f"l{i}"]["kernel"], **kw) for i, kw in enumerate(GRIDS)}
    ct.write(tmp_path, params, grids, format=fmt)
    ours = load_file(str(tmp_path / "model.safetensors"))
    config = QuantizationConfig.model_validate(
        json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    )
    compressor = BaseCompressor.get_value_from_registry(fmt)
    for scheme in config.config_groups.values():
        for module in scheme.targets:
            qp = grids[f"{module}/kernel"]
            state = {
                "weight": torch.from_numpy(np.asarray(grid.dequantize(qp)).T.copy()),
                "weight_scale": ours[f"{module}.weight_scale"],
            }
            if not qp.symmetric:  # the library's zero point is signed, as its codes
                zero = (
                    np.asarray(qp.zero_point, np.int32).reshape(-1, 1)
                    if qp.axis is None
                    else np.asarray(qp.zero_point).T
                )
                state["weight_zero_point"] = torch.from_numpy(
                    (zero - 2 ** (qp.bits - 1)).astype(np.int8).reshape(state["weight_scale"].shape)
                )
            theirs = compressor.compress(state, scheme)
            for key, value in theirs.items():
                if key != "weight_scale":
                    np.testing.assert_array_equal(
                        ours[f"{module}.{key}"].numpy(), value.numpy(), err_msg=f"{module}.{key}"
                    )
            assert {k for k in ours if k.startswith(module + ".")} == {f"{module}.{k}" for k in theirs}


def test_library_written_fixtures_read_to_what_the_library_decompresses():
    for name in ("ct_pack", "ct_naive"):
        folder = FIXTURES / "interop" / name
        ours = dict(tree.named_leaves(ct.read(folder)[0]))
        theirs = _library_decompress(folder)
        assert sorted(theirs) == ["a", "b", "c"]
        for module, weight in theirs.items():
            np.testing.assert_array_equal(ours[f"{module}/kernel"].T, weight)


@pytest.mark.parametrize(
    ("fixture", "scheme"),
    [("llama_gqa_sharded", "gptq-w4"), ("llama_rope3_tied", "rtn-w8-asym"), ("llama_rope3_tied", "float8")],
)
def test_transformers_loads_our_llama_with_equal_logits(tmp_path, fixture, scheme):
    """GQA, a sharded base folder and an untied head: GPTQ (4 bits, groups of 16, act order),
    pack-quantized. Tied embeddings and llama3 rope scaling: round-to-nearest 8-bit
    asymmetric, naive-quantized (transformers 5.24 with compressed-tensors 0.20 refuses
    asymmetric pack-quantized checkpoints, the library's own too: its meta-device compress
    leaves the zero point unpacked; test_our_tensors_are_the_library_compress covers them),
    and float8 e4m3 per channel, float-quantized."""
    base = FIXTURES / "lm" / fixture
    model, _, _ = hf_lm.load(base)
    ids = np.random.default_rng(1).integers(0, model.embed.embedding.shape[0], size=(2, 16)).astype(np.int32)
    state = nnx.state(model, nnx.Param)
    fmt = {"gptq-w4": "pack-quantized", "rtn-w8-asym": "naive-quantized", "float8": None}[scheme]
    if scheme == "gptq-w4":
        stats = oneshot.calibrate(model, [jnp.asarray(ids)], forward=lambda m, x: m(x)[0])
        params, aux = oneshot.gptq(stats, bits=4, group_size=16, act_order=True)(state)
        grids = aux.grids
    elif scheme == "rtn-w8-asym":
        params, aux = quant.quantize(bits=8, symmetric=False)(state)
        grids = aux.grids
    else:
        flat = dict(tree.named_leaves(nnx.to_pure_dict(state)))
        grids = {leaf: ct.float8_grid(np.asarray(w)) for leaf, w in flat.items() if leaf.endswith("kernel")}
        params = tree.set_by_name(nnx.to_pure_dict(state), {k: jnp.asarray(g.dequantize()) for k, g in grids.items()})
    nnx.update(model, params)
    ours = np.asarray(model(jnp.asarray(ids))[0])
    out = tmp_path / "exported"
    qc = ct.write(out, params, grids, names=renamer(LLAMA_TO_HF), base_folder=base, format=fmt or "pack-quantized",
                  actorder="weight")  # fmt: skip
    assert sum(len(g["targets"]) for g in qc["config_groups"].values()) == len(grids)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():  # the first forward decompresses the packed weights
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    weights = {renamer(LLAMA_FROM_HF)(n): p.detach().numpy() for n, p in hf.named_parameters() if n.endswith("weight")}
    assert set(grids) <= set(weights)  # transformers decompressed every quantized Linear, exactly
    for leaf, qp in grids.items():
        np.testing.assert_array_equal(weights[leaf], np.asarray(qp.dequantize()).T)


@needs_group_actorder
@pytest.mark.parametrize("fmt", ct.FORMATS)
def test_library_decompresses_our_g_idx_export_exactly(tmp_path, fmt):
    """GPTQ with act_order and dynamic groups: scattered groups in weight_g_idx, symmetric and not."""
    rng = np.random.default_rng(5)
    params, grids = {}, {}
    for i, symmetric in enumerate((True, False)):
        kernel = rng.normal(size=(64, 24)).astype(np.float32)
        x = rng.normal(size=(128, 64)).astype(np.float32) * rng.uniform(0.2, 3.0, size=64).astype(np.float32)
        _, qp = quantize_matrix(
            jnp.asarray(kernel), jnp.asarray(x.T @ x), bits=4, group_size=16, act_order=True, static_groups=False,
            symmetric=symmetric, block_size=16,
        )  # fmt: skip
        assert qp.g_idx is not None and not np.array_equal(qp.g_idx, np.arange(64) // 16)
        params[f"l{i}"] = {"kernel": np.asarray(grid.dequantize(qp))}
        grids[f"l{i}/kernel"] = qp
    qc = ct.write(tmp_path, params, grids, format=fmt)
    assert {g["weights"]["actorder"] for g in qc["config_groups"].values()} == {"group"}
    got = _library_decompress(tmp_path)
    assert sorted(got) == ["l0", "l1"]
    for leaf, qp in grids.items():
        np.testing.assert_array_equal(got[leaf.split("/")[0]], np.asarray(grid.dequantize(qp)).T)


@needs_group_actorder
def test_transformers_loads_our_g_idx_llama_with_equal_logits(tmp_path):
    """The tiny Llama quantized by GPTQ (4 bits, groups of 16 in activation order, dynamic grids),
    pack-quantized with weight_g_idx: transformers' weights and logits equal jcompress's."""
    base = FIXTURES / "lm" / "llama_gqa_sharded"
    model, _, _ = hf_lm.load(base)
    ids = np.random.default_rng(1).integers(0, model.embed.embedding.shape[0], size=(2, 16)).astype(np.int32)
    stats = oneshot.calibrate(model, [jnp.asarray(ids)], forward=lambda m, x: m(x)[0])
    gptq = oneshot.gptq(stats, bits=4, group_size=16, act_order=True, static_groups=False)
    params, aux = gptq(nnx.state(model, nnx.Param))
    grids = aux.grids
    assert all(qp.g_idx is not None for qp in grids.values())
    nnx.update(model, params)
    ours = np.asarray(model(jnp.asarray(ids))[0])
    out = tmp_path / "exported"
    qc = ct.write(out, params, grids, names=renamer(LLAMA_TO_HF), base_folder=base)
    assert {g["weights"]["actorder"] for g in qc["config_groups"].values()} == {"group"}

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    weights = {renamer(LLAMA_FROM_HF)(n): p.detach().numpy() for n, p in hf.named_parameters() if n.endswith("weight")}
    assert set(grids) <= set(weights)
    for leaf, qp in grids.items():
        np.testing.assert_array_equal(weights[leaf], np.asarray(qp.dequantize()).T)


def _sparse24_compressor():
    """The installed library's sparse-24-bitmask compressor, or None (compressed-tensors >= 0.15 dropped it)."""
    from compressed_tensors.config import Sparse24BitMaskConfig

    try:
        return BaseCompressor.load_from_registry("sparse-24-bitmask", config=Sparse24BitMaskConfig())
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


@pytest.mark.skipif(
    _sparse24_compressor() is None,
    reason="the installed compressed-tensors has no sparse-24-bitmask compressor; run with compressed-tensors<=0.14",
)
def test_library_decompresses_our_sparse24_export_exactly(tmp_path):
    """2:4 sparse float weights (kept 2 of every 4 inputs by magnitude, a few groups emptier):
    sparse-24-bitmask tensors that the library turns back into our weights, and whose bytes
    equal the library's own compression of them."""
    rng = np.random.default_rng(7)
    params = {}
    for i, (n_in, out) in enumerate(((64, 24), (32, 8))):
        w = rng.normal(size=(n_in, out)).astype(np.float32)
        groups = np.abs(w).reshape(n_in // 4, 4, out)
        w[(np.argsort(np.argsort(-groups, axis=1), axis=1) >= 2).reshape(n_in, out)] = 0.0
        if i == 0:
            w[4:8, 0] = 0.0  # an empty group: l0 keeps two of its zeros; l1 has exactly 2 non-zeros per group
        params[f"l{i}"] = {"kernel": w}
    qc = ct.write(tmp_path, params, {}, sparsity="sparse-24-bitmask")
    assert qc["sparsity_config"]["targets"] == ["l0", "l1"]
    ours = load_file(str(tmp_path / "model.safetensors"))
    compressor = _sparse24_compressor()
    for module, leaf in params.items():
        local = {k.rsplit(".", 1)[1]: v for k, v in ours.items() if k.startswith(module + ".")}
        assert sorted(local) == ["bitmask", "compressed", "shape"]
        theirs = compressor.decompress_weight(local).numpy()
        np.testing.assert_array_equal(theirs, leaf["kernel"].T)
        if module == "l1":  # the library picks the 2 largest of every 4: with 2 non-zeros, ours
            again = compressor.compress_weight(f"{module}.weight", torch.from_numpy(leaf["kernel"].T.copy()))
            for key, value in again.items():
                np.testing.assert_array_equal(ours[key].numpy(), value.numpy(), err_msg=key)
