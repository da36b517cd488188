"""Serving checkpoint layouts (jcompress.formats): exact round trips, byte layout, refused folders.

No PyTorch here: the layouts are checked against facts of the reference writers (bit
order, zero-point offsets, tensor shapes) and against folders the compressed-tensors
library itself wrote (tests/fixtures/interop, built by scripts/make_interop_fixtures.py).
tests/test_interop.py runs the reference readers themselves.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jcompress import tree
from jcompress.core import grid
from jcompress.core.base import GridAux
from jcompress.formats import LLAMA_FROM_HF, LLAMA_TO_HF, FolderError, gptq, renamer
from jcompress.formats import compressed_tensors as ct
from jcompress.formats import folder as fs
from jcompress.models import hf_lm

INTEROP = Path(__file__).parent / "fixtures" / "interop"
LM = Path(__file__).parent / "fixtures" / "lm"
LEAF = "layers/0/q_proj/kernel"


def _params(n_in=64, out=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "layers": {0: {"q_proj": {"kernel": rng.normal(size=(n_in, out)).astype(np.float32),
                                  "bias": rng.normal(size=out).astype(np.float32)}}},
        "norm": {"scale": rng.normal(size=n_in).astype(np.float32)},
        "head": {"kernel": rng.normal(size=(n_in, 8)).astype(np.float32)},
    }  # fmt: skip


def _grid(shape=(64, 32), *, bits, axis=-1, group_size=None, symmetric=True, seed=0, fp16=False) -> grid.QuantParams:
    """A valid grid with random codes over the whole code range, built in numpy (no XLA compiles)."""
    rng = np.random.default_rng(seed)
    qmin, qmax = grid.code_range(bits, symmetric)
    n_in, out = shape
    stored = () if axis is None else (1, out) if group_size is None else (n_in // group_size, out)
    codes = rng.integers(qmin, qmax + 1, size=shape).astype(np.int32)
    codes[0, 0], codes[1, 0] = qmin, qmax
    scale = rng.uniform(0.01, 0.1, size=stored).astype(np.float16 if fp16 else np.float32).astype(np.float32)
    zero = np.zeros(stored, np.int32) if symmetric else rng.integers(qmin, qmax + 1, size=stored).astype(np.int32)
    return grid.QuantParams(codes, scale, zero, bits, symmetric, None if axis is None else 1, group_size)


def _g_idx_grid(*, bits, group_size, symmetric, n_in=64, seed=0, fp16=False) -> grid.QuantParams:
    """A grouped grid whose groups are scattered over the inputs, as GPTQ's activation-order groups:
    ``g_idx`` a random permutation of ``arange(n_in) // group_size``."""
    qp = _grid((n_in, 32), bits=bits, group_size=group_size, symmetric=symmetric, seed=seed, fp16=fp16)
    g_idx = np.random.default_rng(seed + 1).permutation(np.arange(n_in, dtype=np.int32) // group_size)
    return dataclasses.replace(qp, g_idx=g_idx)


def _assert_same_grid(a: grid.QuantParams, b: grid.QuantParams):
    assert (a.bits, a.symmetric, a.axis, a.group_size) == (b.bits, b.symmetric, b.axis, b.group_size)
    for f in ("codes", "scale", "zero_point"):
        x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f
    assert (a.g_idx is None) == (b.g_idx is None), "g_idx"
    if a.g_idx is not None:
        assert np.asarray(a.g_idx).dtype == np.asarray(b.g_idx).dtype == np.int32
        assert np.array_equal(np.asarray(a.g_idx), np.asarray(b.g_idx)), "g_idx"


def _assert_same_params(a, b):
    fa, fb = dict(tree.named_leaves(a)), dict(tree.named_leaves(b))
    assert sorted(fa) == sorted(fb)
    for k, v in fa.items():
        assert np.array_equal(np.asarray(v), np.asarray(fb[k])), k


def _assert_read_back(read, params, qp):
    """``read`` == (params with LEAF dequantized from ``qp``, {LEAF: qp}), exactly."""
    back, grids = read
    assert list(grids) == [LEAF]
    _assert_same_grid(grids[LEAF], qp)
    expected = dict(tree.named_leaves(params))
    expected[LEAF] = np.asarray(grid.dequantize(qp))
    _assert_same_params(back, fs.nest(expected))


# ---------------------------------------------------------------- bit packing


def test_pack_int32_bit_order_matches_the_reference_writers():
    # value j of a word sits in bits j*bits..: [1, 2, 3] at 4 bits is 0x321, [1..4] at 8 bits 0x04030201
    assert fs.pack_int32(np.array([[1, 2, 3]]), bits=4).tolist() == [[0x321]]
    assert fs.pack_int32(np.array([[1, 2, 3, 4, 5]]), bits=8).tolist() == [[0x04030201, 5]]
    # eight 15s fill a word: the top nibble makes it negative as int32
    assert fs.pack_int32(np.full((1, 8), 15), bits=4).tolist() == [[-1]]
    # 3 bits straddle words: value 10 (0b111) starts at bit 30, its top bit is bit 0 of word 1
    v = np.zeros((1, 11), np.int64)
    v[0, 10] = 7
    assert fs.pack_int32(v, bits=3).view(np.uint32).tolist() == [[0b11 << 30, 1]]
    # along axis 0 (zero points along the output dim)
    assert fs.pack_int32(np.array([[1], [2], [3]]), bits=4, axis=0).tolist() == [[0x321]]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_pack_unpack_round_trip(bits, axis):
    v = np.random.default_rng(bits).integers(0, 2**bits, size=(5, 37))
    words = fs.pack_int32(v, bits=bits, axis=axis)
    n = v.shape[axis]
    assert words.dtype == np.int32 and words.shape[axis] == -(-n * bits // 32)
    assert np.array_equal(fs.unpack_int32(words, bits=bits, count=n, axis=axis), v)
    with pytest.raises(ValueError, match=r"\[0, "):
        fs.pack_int32(v + 2**bits, bits=bits)


# ---------------------------------------------------------------- compressed-tensors

GRIDS = {
    "int4-asym-group": {"bits": 4, "group_size": 16, "symmetric": False},
    "int4-sym-channel": {"bits": 4},
    "int4-sym-group": {"bits": 4, "group_size": 16},
    "int8-asym-channel": {"bits": 8, "symmetric": False},
    "int8-sym-group": {"bits": 8, "group_size": 16},
    "int4-asym-tensor": {"bits": 4, "axis": None, "symmetric": False},
    "int3-asym-group": {"bits": 3, "group_size": 16, "symmetric": False},
}


@pytest.mark.parametrize("fmt", ct.FORMATS)
@pytest.mark.parametrize("kind", GRIDS)
def test_compressed_tensors_round_trip_is_exact(tmp_path, kind, fmt):
    params = _params()
    qp = _grid(**GRIDS[kind])
    ct.write(tmp_path, params, {LEAF: qp}, format=fmt)
    _assert_read_back(ct.read(tmp_path), params, qp)


def test_compressed_tensors_tensor_layout(tmp_path):
    params = _params(n_in=64, out=24)
    asym = _grid((64, 24), bits=4, group_size=16, symmetric=False)
    qc = ct.write(tmp_path, params, {LEAF: asym})
    t = load_file(str(tmp_path / "model.safetensors"))
    m = "layers.0.q_proj"
    assert t[f"{m}.weight_packed"].shape == (24, 8) and t[f"{m}.weight_packed"].dtype == np.int32
    assert t[f"{m}.weight_shape"].tolist() == [24, 64]
    assert t[f"{m}.weight_scale"].shape == (24, 4) and t[f"{m}.weight_scale"].dtype == np.float32
    assert t[f"{m}.weight_zero_point"].shape == (3, 4)  # 24 outputs * 4 bits / 32, 4 groups
    # asymmetric: the packed words hold jcompress's unsigned codes (signed code + 8)
    codes = np.asarray(asym.codes).T
    first = sum(int(codes[0, j]) << (4 * j) for j in range(8))
    assert t[f"{m}.weight_packed"].view(np.uint32)[0, 0] == first
    assert np.array_equal(t[f"{m}.weight_scale"], np.asarray(asym.scale).T)
    # biases and float tensors unchanged; kernels as (out, in)
    assert np.array_equal(t[f"{m}.bias"], params["layers"][0]["q_proj"]["bias"])
    assert np.array_equal(t["head.weight"], params["head"]["kernel"].T)
    assert np.array_equal(t["norm.scale"], params["norm"]["scale"])
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == [m] and qc["ignore"] == ["head"]
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                "group_size": 16, "dynamic": False}  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == qc
    # symmetric: no zero point stored, int8 codes signed
    sym = _grid((64, 24), bits=8)
    ct.write(tmp_path / "n", params, {LEAF: sym}, format="naive-quantized")
    t = load_file(str(tmp_path / "n" / "model.safetensors"))
    assert f"{m}.weight_zero_point" not in t and t[f"{m}.weight_scale"].shape == (24, 1)
    assert t[f"{m}.weight"].dtype == np.int8 and np.array_equal(t[f"{m}.weight"], np.asarray(sym.codes).T)


def test_act_order_grids_are_recorded_as_actorder_weight_without_g_idx(tmp_path):
    # jcompress's GPTQ with act_order keeps contiguous groups, so its grid is an ordinary
    # grouped grid (tests/test_interop.py writes a real act-order GPTQ model)
    params = _params()
    qp = _grid(bits=4, group_size=16, symmetric=False)
    kernel = grid.dequantize(qp)
    params["layers"][0]["q_proj"]["kernel"] = np.asarray(kernel)
    qc = ct.write(tmp_path, params, GridAux({LEAF: qp}), actorder="weight")
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert not any(k.endswith("g_idx") for k in tensors)
    back, grids = ct.read(tmp_path)
    _assert_same_grid(grids[LEAF], qp)
    assert np.array_equal(back["layers"][0]["q_proj"]["kernel"], np.asarray(kernel))
    # a contiguous weight_g_idx (older writers) or the library's -1 placeholder read as contiguous groups
    for placeholder in (np.arange(64) // 16, np.full(64, -1)):
        tensors["layers.0.q_proj.weight_g_idx"] = placeholder.astype(np.int32)
        save_file(tensors, str(tmp_path / "model.safetensors"))
        _assert_same_grid(ct.read(tmp_path)[1][LEAF], qp)
    # another order is read as the grid's g_idx; groups out of range are refused by name
    tensors["layers.0.q_proj.weight_g_idx"] = (np.arange(64) % 4).astype(np.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _assert_same_grid(ct.read(tmp_path)[1][LEAF], dataclasses.replace(qp, g_idx=np.arange(64, dtype=np.int32) % 4))
    tensors["layers.0.q_proj.weight_g_idx"] = (np.arange(64) % 5).astype(np.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(FolderError, match=r"layers\.0\.q_proj\.weight_g_idx\) holds groups 0\.\.4"):
        ct.read(tmp_path)


@pytest.mark.parametrize("fmt", ct.FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_g_idx_round_trip(tmp_path, fmt, symmetric):
    """Activation-order groups (GPTQ with static_groups=False): weight_g_idx with actorder 'group'."""
    params = _params()
    qp = _g_idx_grid(bits=4, group_size=16, symmetric=symmetric)
    qc = ct.write(tmp_path, params, {LEAF: qp}, format=fmt, actorder="weight")
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] == "group" and weights["strategy"] == "group" and weights["group_size"] == 16
    t = load_file(str(tmp_path / "model.safetensors"))
    g_idx = t["layers.0.q_proj.weight_g_idx"]
    assert g_idx.dtype == np.int32 and np.array_equal(g_idx, qp.g_idx)
    _assert_read_back(ct.read(tmp_path), params, qp)
    # the weights are (codes - zero[g_idx]) * scale[g_idx], input by input
    codes, zero, scale = np.asarray(qp.codes), np.asarray(qp.zero_point), np.asarray(qp.scale)
    expected = (codes - zero[qp.g_idx]).astype(np.float32) * scale[qp.g_idx]
    assert np.array_equal(ct.read(tmp_path)[0]["layers"][0]["q_proj"]["kernel"], expected)
    with pytest.raises(ValueError, match=f"{LEAF}: the grid has a g_idx but no groups"):
        ct.write(tmp_path / "bad", params, {LEAF: dataclasses.replace(qp, group_size=None, scale=qp.scale[:1],
                                                                      zero_point=qp.zero_point[:1])})  # fmt: skip


def test_mixed_schemes_and_name_mappings(tmp_path):
    params = _params()
    grids = {
        LEAF: _grid(bits=4, group_size=16),
        "head/kernel": _grid((64, 8), bits=8, symmetric=False),
    }
    to_hf = {LEAF: "model.layers.0.self_attn.q_proj.weight", "layers/0/q_proj/bias": "model.layers.0.self_attn.q_proj.bias",
             "norm/scale": "model.norm.weight", "head/kernel": "lm_head.weight"}  # fmt: skip
    qc = ct.write(tmp_path, params, grids, names=to_hf)
    assert sorted(g["targets"][0] for g in qc["config_groups"].values()) == [
        "lm_head",
        "model.layers.0.self_attn.q_proj",
    ]
    back, got = ct.read(tmp_path, names={v: k for k, v in to_hf.items()})
    for leaf, qp in grids.items():
        _assert_same_grid(got[leaf], qp)
    assert np.array_equal(back["norm"]["scale"], params["norm"]["scale"])
    # a callable leaves a leaf out with None
    ct.write(
        tmp_path / "c", params, grids, names=lambda leaf: None if leaf.startswith("head") else fs.hf_name(leaf, None)
    )
    assert (
        "head"
        not in ct.read(tmp_path / "c", names=lambda n: n.replace(".", "/").replace("q_proj/weight", "q_proj/kernel"))[0]
    )
    with pytest.raises(KeyError, match="no entry for the leaf .head/kernel."):
        ct.write(tmp_path / "d", params, grids, names={LEAF: "q.weight"})
    with pytest.raises(ValueError, match="written twice"):
        ct.write(tmp_path / "d", params, {}, names=lambda leaf: "same")


def _llama_leaves(base: Path) -> dict:
    """``{leaf: array in jcompress orientation}`` of a Llama fixture, named by the loader's own mapping."""
    cfg = hf_lm.read_config(base)
    flat = {}
    for name, arr in load_file(str(base / "model.safetensors")).items():
        target = hf_lm._llama_target(name, cfg)  # (params path, transposed), or None for a tied head
        if isinstance(target, tuple):
            leaf = "/".join(map(str, target[0]))
            flat[leaf] = arr.T if target[1] else arr
    return flat


def test_llama_rules_agree_with_the_loader_and_name_what_they_miss():
    for fixture in ("llama_rope3_tied", "llama_gqa_sharded"):
        cfg = hf_lm.read_config(LM / fixture)
        for name in hf_lm.checkpoint_files(LM / fixture):
            target = hf_lm._llama_target(name, cfg)
            if isinstance(target, tuple):
                leaf = "/".join(map(str, target[0]))
                assert renamer(LLAMA_TO_HF)(leaf) == name and renamer(LLAMA_FROM_HF)(name) == leaf
    assert renamer(LLAMA_TO_HF)("layers/2/attn/q_proj/bias") == "model.layers.2.self_attn.q_proj.bias"
    with pytest.raises(KeyError, match="no rule renames 'layers/0/odd/kernel'"):
        renamer(LLAMA_TO_HF)("layers/0/odd/kernel")


def test_base_folder_config_and_tokenizer_are_carried(tmp_path):
    base = LM / "llama_rope3_tied"
    flat = _llama_leaves(base)
    kernels = [leaf for leaf in flat if leaf.endswith("kernel")]
    aux = GridAux({leaf: _grid(flat[leaf].shape, bits=4, group_size=16, seed=i) for i, leaf in enumerate(kernels)})
    params = fs.nest(flat)
    out = tmp_path / "w4"
    ct.write(out, params, aux, names=renamer(LLAMA_TO_HF), base_folder=base)
    base_config = json.loads((base / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == base_config
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").exists() and not (out / "reference.npz").exists()
    n_linear = sum(1 for k in flat if k.endswith("kernel"))
    assert sum(len(g["targets"]) for g in config["quantization_config"]["config_groups"].values()) == n_linear
    back, grids = ct.read(out, names=renamer(LLAMA_FROM_HF))
    assert sorted(grids) == sorted(kernels)
    for leaf, qp in aux.grids.items():
        _assert_same_grid(grids[leaf], qp)
    back = dict(tree.named_leaves(back))
    assert sorted(back) == sorted(flat)
    for leaf, w in flat.items():
        assert leaf in grids or np.array_equal(back[leaf], w), leaf
    with pytest.raises(ValueError, match="differ from base_folder"):
        ct.write(base, params, aux, names=renamer(LLAMA_TO_HF), base_folder=base)


def test_library_written_folders_are_read_to_the_library_weights():
    for name in ("ct_pack", "ct_naive"):
        params, grids = ct.read(INTEROP / name)
        ref = np.load(INTEROP / name / "reference.npz")
        flat = dict(tree.named_leaves(params))
        assert sorted(grids) == ["a/kernel", "b/kernel", "c/kernel"]
        for k in ref.files:
            leaf = k.replace(".weight", "/kernel").replace(".bias", "/bias")
            got = flat[leaf].T if leaf.endswith("kernel") else flat[leaf]
            assert np.array_equal(got, ref[k]), (name, k)
            if leaf in grids:
                assert np.array_equal(np.asarray(grid.dequantize(grids[leaf])).T, ref[k])
    _, grids = ct.read(INTEROP / "ct_pack")
    assert (grids["a/kernel"].bits, grids["a/kernel"].group_size, grids["c/kernel"].bits) == (4, 16, 8)
    # the library's symmetric codes reach -8: read as the equivalent asymmetric grid, zero point 8
    b = grids["b/kernel"]
    assert not b.symmetric and np.all(np.asarray(b.zero_point) == 8) and np.asarray(b.codes).min() == 0


def test_library_written_g_idx_folder_is_read_to_the_library_weights():
    """ct_group: compressed-tensors 0.18 packed 4-bit groups with a scattered weight_g_idx (actorder 'group')."""
    params, grids = ct.read(INTEROP / "ct_group")
    ref = np.load(INTEROP / "ct_group" / "reference.npz")
    flat = dict(tree.named_leaves(params))
    assert sorted(grids) == ["a/kernel", "c/kernel"] and sorted(ref.files) == sorted(
        ["a.weight", "a.bias", "b.weight", "c.weight", "c.bias", "head.weight"]
    )
    for k in ref.files:
        leaf = k.replace(".weight", "/kernel").replace(".bias", "/bias")
        got = flat[leaf].T if leaf.endswith("kernel") else flat[leaf]
        assert np.array_equal(got, ref[k]), k
    for leaf, n_in in (("a/kernel", 64), ("c/kernel", 32)):
        g_idx = np.asarray(grids[leaf].g_idx)
        assert grids[leaf].group_size == 16 and g_idx.shape == (n_in,)
        assert np.array_equal(np.bincount(g_idx), [16] * (n_in // 16))
        assert not np.array_equal(g_idx, np.arange(n_in) // 16)
        assert np.array_equal(np.asarray(grid.dequantize(grids[leaf])).T, ref[leaf.replace("/kernel", ".weight")])


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    t = load_file(str(folder / "model.safetensors"))
    fn(t)
    save_file(t, str(folder / "model.safetensors"))


def _assert_edits_refused(tmp_path, cases, read):
    """Each ``(edit tensors, edit config, message)`` applied to a copy of ``tmp_path / 'ok'`` makes ``read`` refuse it."""
    for i, (tensors, config, message) in enumerate(cases):
        folder = _copy(tmp_path / "ok", tmp_path / str(i))
        if tensors:
            _edit_tensors(folder, tensors)
        if config:
            _edit_config(folder, config)
        with pytest.raises(FolderError, match=message):
            read(folder)


def test_corrupt_or_foreign_compressed_tensors_folders_are_refused_by_name(tmp_path):
    src = INTEROP / "ct_pack"
    cases = [
        ("missing scale", lambda t: t.pop("c.weight_scale"), None, r"c\.weight_scale is missing"),
        ("missing zero point", lambda t: t.pop("a.weight_zero_point"), None, r"a\.weight_zero_point is missing"),
        ("missing shape", lambda t: t.pop("b.weight_shape"), None, r"b\.weight_shape is missing"),
        ("scale shape", lambda t: t.update({"a.weight_scale": t["a.weight_scale"][:, :2]}), None,
         r"a\.weight_scale has shape \(24, 2\)"),
        ("packed shape", lambda t: t.update({"b.weight_shape": np.array([40, 56])}), None, r"b\.weight_packed has shape"),
        ("orphan zero point", lambda t: [t.pop("a.weight_packed"), t.pop("a.weight_scale")], None,
         r"a\.weight_shape belongs to no quantized module"),
        ("group size", None, lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=32),
         r"a\.weight_scale has shape \(24, 4\)"),
        ("float scheme", None, lambda q: q["config_groups"]["group_1"]["weights"].update(type="float"),
         r"'group_1' stores type='float'"),
        ("activations", None, lambda q: q["config_groups"]["group_2"].update(input_activations={"num_bits": 8}),
         r"'group_2' quantizes input_activations"),
        ("format", None, lambda q: q.update(format="marlin-24") or [g.pop("format") for g in q["config_groups"].values()],
         r"format 'marlin-24'"),
        ("method", None, lambda q: q.update(quant_method="awq"), r"quant_method is 'awq'"),
        ("untargeted", None, lambda q: q["config_groups"].pop("group_2"), r"c\.weight_scale belongs to a module no"),
    ]  # fmt: skip
    for i, (what, tensors, config, message) in enumerate(cases):
        folder = _copy(src, tmp_path / str(i))
        if tensors:
            _edit_tensors(folder, tensors)
        if config:
            _edit_config(folder, config)
        with pytest.raises(FolderError, match=message):
            ct.read(folder)
    folder = _copy(src, tmp_path / "truncated")
    (folder / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(FolderError, match="truncated"):
        ct.read(folder)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(FolderError, match="no quantization_config"):
        ct.read(tmp_path / "plain")
    folder = _copy(INTEROP / "ct_naive", tmp_path / "naive")
    _edit_tensors(folder, lambda t: t.pop("b.weight_scale"))
    with pytest.raises(FolderError, match=r"b\.weight"):
        ct.read(folder)


def test_float8_weights_round_trip_beside_int_grids(tmp_path):
    params = _params()
    w, head = params["layers"][0]["q_proj"]["kernel"], params["head"]["kernel"]
    grids = {LEAF: ct.float8_grid(w), "head/kernel": ct.float8_grid(head, axis=None)}
    for g, x in ((grids[LEAF], w), (grids["head/kernel"], head)):  # e4m3: 3 mantissa bits, subnormals from 2**-9
        assert np.all(np.abs(g.dequantize() - x) <= np.abs(x) * 2.0**-4 + g.scale * 2.0**-9)
        assert np.isclose(np.abs(g.dequantize()).max(), np.abs(x).max(), rtol=1e-6)
    qc = ct.write(tmp_path, params, grids)
    assert qc["format"] == "float-quantized"
    weights = {g["targets"][0]: g["weights"] for g in qc["config_groups"].values()}
    assert weights["layers.0.q_proj"]["type"] == "float" and weights["layers.0.q_proj"]["strategy"] == "channel"
    assert weights["head"]["strategy"] == "tensor"
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["layers.0.q_proj.weight"]["dtype"] == "F8_E4M3" and header["head.weight_scale"]["shape"] == [1]
    back, got = ct.read(tmp_path)
    for leaf, g in grids.items():
        assert isinstance(got[leaf], ct.Float8Grid)
        assert got[leaf].values.tobytes() == g.values.tobytes() and np.array_equal(got[leaf].scale, g.scale)
        assert np.array_equal(dict(tree.named_leaves(back))[leaf], g.dequantize())
    # beside an int grid the config is mixed-precision, each group with its own format
    qc = ct.write(tmp_path / "mixed", params, {LEAF: grids[LEAF], "head/kernel": _grid((64, 8), bits=4)})
    assert qc["format"] == "mixed-precision"
    assert sorted(g["format"] for g in qc["config_groups"].values()) == ["float-quantized", "pack-quantized"]
    assert sorted(ct.read(tmp_path / "mixed")[1]) == ["head/kernel", LEAF]
    # float weights with a zero point or in groups are not a layout jcompress reads
    for edit, message in (
        (lambda q: q["config_groups"]["group_1"]["weights"].update(symmetric=False), "float weights with a zero point"),
        (
            lambda q: q["config_groups"]["group_1"]["weights"].update(strategy="group", group_size=16),
            "strategy 'group'",
        ),
    ):
        folder = _copy(tmp_path / "mixed", tmp_path / f"bad{len(message)}")
        _edit_config(folder, edit)
        with pytest.raises(FolderError, match=message):
            ct.read(folder)


def test_grids_the_layout_cannot_hold_are_refused_by_leaf(tmp_path):
    params = _params()
    qp = _grid(bits=4)
    per_input = grid.QuantParams(qp.codes, np.ones((64, 1), np.float32), np.zeros((64, 1), np.int32), 4, True, 0, None)
    with pytest.raises(ValueError, match=f"{LEAF}: .*axis 0"):
        ct.write(tmp_path, params, {LEAF: per_input})
    with pytest.raises(ValueError, match=f"{LEAF}: bits=12"):
        ct.write(tmp_path, params, {LEAF: _grid(bits=12)})
    with pytest.raises(ValueError, match="norm/scale: only Dense kernels"):
        ct.write(
            tmp_path,
            params,
            {"norm/scale": grid.QuantParams(np.zeros(64, np.int32), np.float32(1), np.int32(0), 4, True, None, None)},
        )
    with pytest.raises(ValueError, match=r"leaves not in params: \['nope/kernel'\]"):
        ct.write(tmp_path, params, {"nope/kernel": qp})
    with pytest.raises(ValueError, match="format="):
        ct.write(tmp_path, params, {}, format="marlin-24")


# ---------------------------------------------------------------- GPTQ

GPTQ_GRIDS = {
    "int4-asym-group": {"bits": 4, "group_size": 16, "symmetric": False},
    "int4-sym-channel": {"bits": 4},
    "int8-sym-group": {"bits": 8, "group_size": 16},
    "int2-asym-channel": {"bits": 2, "symmetric": False},
}


@pytest.mark.parametrize("fmt", gptq.CHECKPOINT_FORMATS)
@pytest.mark.parametrize("kind", GPTQ_GRIDS)
def test_gptq_round_trip_is_exact(tmp_path, kind, fmt):
    params = _params()
    qp = _grid(**GPTQ_GRIDS[kind], fp16=True)
    if fmt == "gptq" and not qp.symmetric:  # v1 stores zero - 1: a zero point of 0 is refused
        zero = np.asarray(qp.zero_point).copy()
        zero[0, 0] = 0
        with pytest.raises(ValueError, match=f"{LEAF}: a zero point of 0"):
            gptq.write(tmp_path, params, {LEAF: dataclasses.replace(qp, zero_point=zero)}, checkpoint_format=fmt)
        qp = dataclasses.replace(qp, zero_point=np.maximum(zero, 1))
    qc = gptq.write(tmp_path, params, {LEAF: qp}, checkpoint_format=fmt)
    assert qc["bits"] == qp.bits and qc["sym"] == qp.symmetric and qc["group_size"] == (qp.group_size or -1)
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == qc
    _assert_read_back(gptq.read(tmp_path), params, qp)


def test_gptq_tensor_layout(tmp_path):
    params = _params(n_in=64, out=32)
    w = params["layers"][0]["q_proj"]["kernel"]
    sym = grid.quantize_leaf(w, bits=4, group_size=16)
    gptq.write(tmp_path, params, {LEAF: sym}, desc_act=True, scale_dtype="float32")
    _assert_same_grid(gptq.read(tmp_path)[1][LEAF], sym)
    t = load_file(str(tmp_path / "model.safetensors"))
    m = "layers.0.q_proj"
    assert t[f"{m}.qweight"].shape == (8, 32) and t[f"{m}.qweight"].dtype == np.int32
    assert t[f"{m}.qzeros"].shape == (4, 4) and t[f"{m}.scales"].shape == (4, 32)
    assert np.array_equal(t[f"{m}.g_idx"], np.arange(64) // 16)
    # symmetric: unsigned codes c + 8 packed along the inputs; zero 8 stored as 7 (format 'gptq')
    u = np.asarray(sym.codes) + 8
    assert t[f"{m}.qweight"].view(np.uint32)[0, 0] == sum(int(u[j, 0]) << (4 * j) for j in range(8))
    assert np.all(t[f"{m}.qzeros"].view(np.uint32) == 0x77777777)
    assert not any(k.endswith(".weight") for k in t if k.startswith(m))
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (cfg["desc_act"], cfg["static_groups"], cfg["checkpoint_format"]) == (True, True, "gptq")
    # float16 scales by default: a grid re-rounded on float16 scales comes back exactly
    sym16 = gptq.fp16_scales(sym, w)
    assert np.array_equal(np.asarray(sym16.scale), np.asarray(sym.scale).astype(np.float16).astype(np.float32))
    assert np.abs(np.asarray(sym16.codes) - np.asarray(sym.codes)).max() <= 1
    gptq.write(tmp_path / "h", params, {LEAF: sym16})
    assert load_file(str(tmp_path / "h" / "model.safetensors"))[f"{m}.scales"].dtype == np.float16
    _assert_same_grid(gptq.read(tmp_path / "h")[1][LEAF], sym16)


def test_gptq_refusals_name_the_leaf_or_tensor(tmp_path):
    params = _params()
    with pytest.raises(ValueError, match=f"{LEAF}: bits=3"):
        gptq.write(tmp_path, params, {LEAF: _grid(bits=3)})
    with pytest.raises(ValueError, match=f"{LEAF}: the GPTQ layout has no per-tensor scale"):
        gptq.write(tmp_path, params, {LEAF: _grid(bits=4, axis=None)})
    mixed = {LEAF: _grid(bits=4), "head/kernel": _grid((64, 8), bits=8)}
    with pytest.raises(ValueError, match="layers/0/q_proj/kernel: grid .* differs from head/kernel's"):
        gptq.write(tmp_path, params, mixed)
    with pytest.raises(ValueError, match="no leaf with a grid"):
        gptq.write(tmp_path, params, {})
    gptq.write(tmp_path / "ok", params, {LEAF: _grid(bits=4, group_size=16)})
    m = "layers.0.q_proj"
    cases = [
        (lambda t: t.pop(f"{m}.qzeros"), None, rf"{m}\.qzeros is missing"),
        (lambda t: t.pop(f"{m}.qweight"), None, rf"{m}\.g_idx belongs to no quantized module"),
        (lambda t: t.update({f"{m}.scales": t[f"{m}.scales"][:2]}), None, rf"{m}\.scales has shape \(2, 32\)"),
        (lambda t: t.update({f"{m}.g_idx": np.arange(64, dtype=np.int32) % 5}), None,
         rf"{m}\.g_idx\) holds groups 0\.\.4"),
        (lambda t: t.update({f"{m}.g_idx": np.zeros(32, np.int32)}), None,
         r"must be an integer array of shape \(64,\)"),
        (None, lambda q: q.update(bits=3), r"bits=3"),
        (None, lambda q: q.update(quant_method="awq"), r"quant_method is 'awq'"),
        (None, lambda q: q.update(group_size=32), rf"{m}\.scales has shape \(4, 32\)"),
    ]
    _assert_edits_refused(tmp_path, cases, gptq.read)


@pytest.mark.parametrize("fmt", gptq.CHECKPOINT_FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_g_idx_round_trip(tmp_path, fmt, symmetric):
    """Activation-order groups: desc_act true, static_groups false, the grid's g_idx as the g_idx tensor."""
    params = _params()
    qp = _g_idx_grid(bits=4, group_size=16, symmetric=symmetric, fp16=True)
    if not symmetric:
        qp = dataclasses.replace(qp, zero_point=np.maximum(qp.zero_point, 1))  # format 'gptq' stores zero - 1
    qc = gptq.write(tmp_path, params, {LEAF: qp}, checkpoint_format=fmt)
    assert (qc["desc_act"], qc["static_groups"], qc["group_size"]) == (True, False, 16)
    t = load_file(str(tmp_path / "model.safetensors"))
    assert t["layers.0.q_proj.g_idx"].dtype == np.int32 and np.array_equal(t["layers.0.q_proj.g_idx"], qp.g_idx)
    _assert_read_back(gptq.read(tmp_path), params, qp)
    # fp16_scales keeps the groups
    w = np.asarray(grid.dequantize(qp))
    assert np.array_equal(gptq.fp16_scales(qp, w).codes, qp.codes)
    with pytest.raises(ValueError, match="desc_act=False, but a grid has a g_idx"):
        gptq.write(tmp_path / "no", params, {LEAF: qp}, desc_act=False)
    # contiguous grids keep their config: desc_act only when asked, static groups with it
    plain = dataclasses.replace(qp, g_idx=None)
    assert gptq.write(tmp_path / "p", params, {LEAF: plain})["desc_act"] is False
    assert gptq.write(tmp_path / "q", params, {LEAF: plain}, desc_act=True)["static_groups"] is True


# ---------------------------------------------------------------- 2:4 sparsity (sparse-24-bitmask)


def _sparse24_params():
    """_params() with the q_proj kernel pruned to 2 of every 4 inputs per output (one group to 1, one to 0)."""
    params = _params()
    w = params["layers"][0]["q_proj"]["kernel"]  # (64, 32): groups of 4 inputs along axis 0
    rank = np.argsort(np.argsort(-np.abs(w.reshape(16, 4, 32)), axis=1), axis=1).reshape(64, 32)
    w[rank >= 2] = 0.0
    w[0:4, 0] = [0.0, 0.5, 0.0, 0.0]
    w[4:8, 1] = 0.0
    return params


def test_sparse24_bitmask_round_trip_and_layout(tmp_path):
    params = _sparse24_params()
    head = _grid((64, 8), bits=4, group_size=16)  # a quantized leaf beside it stays quantized
    qc = ct.write(tmp_path, params, {"head/kernel": head}, sparsity="sparse-24-bitmask")
    m = "layers.0.q_proj"
    sc = qc["sparsity_config"]
    assert (sc["format"], sc["sparsity_structure"], sc["targets"]) == ("sparse-24-bitmask", "2:4", [m])
    w_t = params["layers"][0]["q_proj"]["kernel"].T  # (out 32, in 64)
    assert sc["global_sparsity"] == pytest.approx(np.mean(w_t == 0))
    t = load_file(str(tmp_path / "model.safetensors"))
    assert f"{m}.weight" not in t and np.array_equal(t[f"{m}.shape"], [[32], [64]])
    assert t[f"{m}.compressed"].shape == (32, 32) and t[f"{m}.compressed"].dtype == np.float32
    assert t[f"{m}.bitmask"].shape == (32, 8) and t[f"{m}.bitmask"].dtype == np.uint8
    # row 0, inputs 0..7: the group (0, .5, 0, 0) keeps input 1 and its first zero (input 0); bit i = input i
    keep = np.unpackbits(t[f"{m}.bitmask"], axis=-1, bitorder="little").astype(bool)
    assert keep[0, :4].tolist() == [True, True, False, False] and keep.sum() == 32 * 32
    assert np.array_equal(t[f"{m}.compressed"], w_t[keep].reshape(32, 32))
    back, grids = ct.read(tmp_path)
    _assert_same_grid(grids["head/kernel"], head)
    expected = dict(tree.named_leaves(params))
    expected["head/kernel"] = np.asarray(grid.dequantize(head))
    _assert_same_params(back, fs.nest(expected))
    # sparse alone: no config groups
    assert ct.write(tmp_path / "s", params, {}, sparsity="sparse-24-bitmask")["config_groups"] == {}
    _assert_same_params(ct.read(tmp_path / "s")[0], params)


def test_sparse24_bitmask_refusals_name_the_tensor(tmp_path):
    params = _sparse24_params()
    with pytest.raises(ValueError, match="no float Linear weight is 2:4 sparse"):
        ct.write(tmp_path / "x", _params(), {}, sparsity="sparse-24-bitmask")
    with pytest.raises(ValueError, match="sparsity='2:4' must be None"):
        ct.write(tmp_path / "x", params, {}, sparsity="2:4")
    ct.write(tmp_path / "ok", params, {}, sparsity="sparse-24-bitmask")
    m = "layers.0.q_proj"

    def three_of_four(t):
        t[f"{m}.bitmask"] = t[f"{m}.bitmask"].copy()
        t[f"{m}.bitmask"][0, 0] |= 0b100  # a third input marked in row 0's first group
    cases = [
        (three_of_four, None, rf"{m}\.bitmask does not mark exactly 2 of every 4"),
        (lambda t: t.pop(f"{m}.compressed"), None, rf"{m}\.compressed is missing"),
        (lambda t: t.update({f"{m}.compressed": t[f"{m}.compressed"][:, :8]}), None, rf"{m}\.compressed has shape"),
        (None, lambda q: q["sparsity_config"].update(format="sparse-bitmask"), r"sparsity_config has format"),
        (None, lambda q: q["sparsity_config"].update(targets=["other"]), rf"{m}\.bitmask belongs to a module"),
    ]
    _assert_edits_refused(tmp_path, cases, ct.read)
