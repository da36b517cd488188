"""Bad input at every public entry point gets an exception that names the argument or
leaf and says what to do, never a silent wrong result or a bare XLA trace.

Each case is ``(kind, call, exception type, regex the message must match)``; the kinds
are counted in TESTING.md (``python scripts/testing_report.py``).
"""

import re

import jax.numpy as jnp
import pytest

from jcompress import compressed, data, export, lowrank, models, oneshot, quant, sharing
from jcompress.core import masked, topk
from jcompress.core.base import MaskAux
from jcompress.core.patterns import NM, Units
from jcompress.nnx import factorize, surgery
from jcompress.pruning import masks as pmasks
from jcompress.pruning import scores as pscores

W = {"fc1": {"kernel": jnp.ones((8, 6)) * jnp.arange(48.0).reshape(8, 6), "bias": jnp.zeros(6)}}
NAN = {"fc1": {"kernel": jnp.full((4, 4), jnp.nan), "bias": jnp.zeros(4)}}
EMPTY = {"fc1": {"kernel": jnp.zeros((0, 4)), "bias": jnp.zeros(4)}}
INTS = {"fc1": {"kernel": jnp.arange(16).reshape(4, 4), "bias": jnp.zeros(4)}}


def _mlp():
    return models.create("mlp", input_shape=(4,), num_classes=3, widths=[5])


def _unit_cut(units):
    """Masks of ``_mlp()`` that remove the given units of fc1."""
    cut = jnp.ones(5, bool).at[jnp.asarray(list(units))].set(False)
    shapes = {"fc1": {"kernel": (4, 5), "bias": (5,)}, "fc2": {"kernel": (5, 3), "bias": (3,)}}
    masks = {layer: {k: jnp.ones(shape, bool) for k, shape in leaves.items()} for layer, leaves in shapes.items()}
    masks["fc1"]["kernel"] = jnp.broadcast_to(cut, (4, 5))
    return masks


def _mag(params, **kw):
    return pmasks.magnitude(**kw)(params)


def _corrupt_file(tmp_path):
    path = tmp_path / "m.jcz"
    export.write_dense(path, W)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    return export.read(path)


def _truncated_file(tmp_path):
    path = tmp_path / "m.jcz"
    export.write_dense(path, W)
    path.write_bytes(path.read_bytes()[:-10])
    return export.read(path)


def _wrong_magic(tmp_path):
    path = tmp_path / "m.jcz"
    path.write_bytes(b"PK\x03\x04 not a jcompress file at all")
    return export.read(path)


def _corrupt_checkpoint(tmp_path):
    from jcompress import checkpoint

    model = models.create("lenet300", input_shape=(28, 28, 1), num_classes=10)
    fn = models.functional(model)
    config = dict(name="lenet300", input_shape=[28, 28, 1], num_classes=10)
    checkpoint.save_model(tmp_path / "ck", config, fn.params, fn.extra)
    files = sorted(p for p in (tmp_path / "ck").rglob("*") if p.is_file() and p.stat().st_size > 1000)
    for f in files:  # overwrite every data file of the checkpoint with garbage
        f.write_bytes(b"\x00garbage" * 100)
    return checkpoint.load_model(tmp_path / "ck", build=models.from_meta)


def _wrong_checkpoint(tmp_path):
    from jcompress import checkpoint

    small = models.functional(models.create("mlp", input_shape=(4,), num_classes=2, widths=[3]))
    checkpoint.save_model(tmp_path / "ck", dict(name="lenet300", input_shape=[28, 28, 1], num_classes=10),
                          small.params, small.extra)  # fmt: skip
    return checkpoint.load_model(tmp_path / "ck", build=models.from_meta)


CASES = [
    # kind, id, call(tmp_path), exception, message regex
    (
        "sparsity out of range",
        "sparsity=1.0",
        lambda t: _mag(W, sparsity=1.0),
        ValueError,
        r"fc1/kernel.*emptied.*allow_empty=True",
    ),
    ("sparsity out of range", "sparsity=-0.1", lambda t: _mag(W, sparsity=-0.1), ValueError, r"sparsity"),
    (
        "sparsity out of range",
        "per-layer sparsity 1.5",
        lambda t: _mag(W, sparsity={"fc1/kernel": 1.5}),
        ValueError,
        r"fc1/kernel|sparsity",
    ),
    (
        "sparsity out of range",
        "sparsity NaN",
        lambda t: _mag(W, sparsity=float("nan")),
        ValueError,
        r"sparsity=nan must be finite",
    ),
    (
        "layer emptied",
        "units pattern",
        lambda t: _mag(W, sparsity=0.95, pattern=Units()),
        ValueError,
        r"fc1/kernel \(shape \(8, 6\), 48 weights\) would lose every unit",
    ),
    (
        "layer emptied",
        "global scope",
        lambda t: _mag({**W, "fc2": {"kernel": jnp.full((8, 8), 1e3)}}, sparsity=0.55, scope="global"),
        ValueError,
        r"fc1/kernel .* would lose every weight.*allow_empty=True",
    ),
    (
        "N:M invalid",
        "M does not divide axis",
        lambda t: pmasks.make_masks(pscores.magnitude_scores(W), sparsity=None, pattern=NM(2, 5)),
        ValueError,
        r"fc1/kernel: m=5 does not divide",
    ),
    ("N:M invalid", "N > M", lambda t: NM(4, 2), ValueError, r"n is the number kept"),
    (
        "pattern invalid",
        "pattern as a string",
        lambda t: pmasks.magnitude(sparsity=0.5, pattern="nm"),
        TypeError,
        r"pattern='nm' must be a pattern value",
    ),
    ("bits out of range", "bits=0", lambda t: quant.quantize_leaf(W["fc1"]["kernel"], bits=0), ValueError, r"bits"),
    ("bits out of range", "bits=17", lambda t: quant.quantize_leaf(W["fc1"]["kernel"], bits=17), ValueError, r"bits"),
    ("bits out of range", "quantize bits=40", lambda t: quant.quantize(bits=40), ValueError, r"bits=40"),
    (
        "group size invalid",
        "group_size does not divide",
        lambda t: quant.quantize_leaf(W["fc1"]["kernel"], bits=4, axis=1, group_size=3),
        ValueError,
        r"group_size",
    ),
    (
        "count out of range",
        "remove_smallest count > size",
        lambda t: topk.remove_smallest(jnp.ones(5), 6),
        ValueError,
        r"count=6.*\[0, 5\]",
    ),
    (
        "count out of range",
        "remove_smallest count < 0",
        lambda t: topk.remove_smallest(jnp.ones((3, 4)), -1, axis=1),
        ValueError,
        r"count=-1",
    ),
    (
        "group size invalid",
        "GPTQ static_groups not a bool",
        lambda t: oneshot.gptq({"fc1/kernel": jnp.eye(8)}, bits=4, group_size=4, act_order=True, static_groups="no"),
        TypeError,
        r"static_groups='no'",
    ),
    (
        "group size invalid",
        "GPTQ group_size does not divide the inputs",
        lambda t: oneshot.gptq({"fc1/kernel": jnp.eye(8)}, bits=4, group_size=3),
        ValueError,
        r"group_size=3.*8 inputs of fc1/kernel",
    ),
    (
        "calibration statistics invalid",
        "zero calibration tokens",
        lambda t: oneshot.sparsegpt({"fc1/kernel": oneshot.LayerStats(jnp.eye(8), jnp.float32(0))}, sparsity=0.5),
        ValueError,
        r"stats/fc1/kernel counts 0",
    ),
    (
        "calibration statistics invalid",
        "calibration inputs of the wrong width",
        lambda t: oneshot.calibrate(models.create("mlp", input_shape=(4,), num_classes=2, widths=[3]), jnp.ones((2, 5))),
        ValueError,
        r"layer fc1 .*width 5",
    ),
    ("N:M invalid", "n=0 kept in one-shot pruning", lambda t: oneshot.wanda({"fc1/kernel": jnp.eye(8)}, pattern=NM(0, 4)), ValueError, r"NM\.n=0"),
    ("flag not a bool", "allow_empty='False'", lambda t: _mag(W, sparsity=0.5, allow_empty="False"), TypeError, r"allow_empty='False' must be True or False"),
    ("flag not a bool", "symmetric=1", lambda t: quant.quantize(bits=4, symmetric=1), TypeError, r"symmetric=1 must be True or False"),
    ("flag not a bool", "act_order='yes'", lambda t: oneshot.gptq({"fc1/kernel": jnp.eye(8)}, bits=4, act_order="yes"), TypeError, r"act_order='yes'"),
    ("flag not a bool", "kmeans preserve_zeros='no'", lambda t: sharing.kmeans(k=4, preserve_zeros="no"), TypeError, r"preserve_zeros='no'"),
    ("flag not a bool", "hard_prune allow_empty=0", lambda t: surgery.hard_prune(input_shape=(4,), allow_empty=0), TypeError, r"allow_empty=0"),
    ("rank invalid", "rank=0", lambda t: lowrank.svd(rank=0)(W), ValueError, r"rank"),
    ("rank invalid", "rank above min(dims)", lambda t: lowrank.svd(rank=7)(W), ValueError, r"rank|fc1/kernel"),
    ("rank invalid", "energy=1.5", lambda t: lowrank.svd(energy=1.5)(W), ValueError, r"energy"),
    (
        "k too large",
        "k > distinct weights",
        lambda t: sharing.kmeans(k=200)(W),
        ValueError,
        r"k|distinct|fc1/kernel",
    ),
    ("k too large", "k=0", lambda t: sharing.kmeans(k=0), ValueError, r"k=0"),
    (
        "NaN or Inf in params",
        "magnitude pruning",
        lambda t: _mag(NAN, sparsity=0.5),
        ValueError,
        r"params/fc1/kernel contains NaN or inf",
    ),
    (
        "NaN or Inf in params",
        "inf weight",
        lambda t: _mag({"fc1": {"kernel": W["fc1"]["kernel"].at[2, 3].set(jnp.inf)}}, sparsity=0.5),
        ValueError,
        r"params/fc1/kernel contains NaN or inf",
    ),
    ("NaN or Inf in params", "quantization", lambda t: quant.quantize(bits=8)(NAN), ValueError, r"fc1/kernel"),
    ("NaN or Inf in params", "k-means", lambda t: sharing.kmeans(k=4)(NAN), ValueError, r"fc1/kernel|NaN"),
    ("NaN or Inf in params", "compress", lambda t: compressed.compress(NAN), ValueError, r"fc1/kernel.*NaN"),
    ("NaN or Inf in params", "svd", lambda t: lowrank.svd(rank=1)(NAN), ValueError, r"fc1/kernel|NaN"),
    (
        "mask tree mismatch",
        "apply_masks",
        lambda t: pmasks.apply_masks(W, {"fc2": {"kernel": jnp.ones((8, 6), bool)}}),
        ValueError,
        r"fc1/kernel|fc2/kernel|structure",
    ),
    (
        "mask tree mismatch",
        "mask shape",
        lambda t: pmasks.apply_masks(W, {"fc1": {"kernel": jnp.ones((6, 8), bool), "bias": jnp.ones(6, bool)}}),
        ValueError,
        r"fc1/kernel|shape",
    ),
    (
        "selection matches nothing",
        "pruning",
        lambda t: masked(pmasks.magnitude(sparsity=0.5), r"^conv")(W),
        ValueError,
        r"\^conv.*match none of the leaves",
    ),
    (
        "selection matches nothing",
        "quantization",
        lambda t: masked(quant.quantize(bits=8), r"^conv")(W),
        ValueError,
        r"match none of the leaves",
    ),
    (
        "selection matches nothing",
        "k-means",
        lambda t: masked(sharing.kmeans(k=4), r"^conv")(W),
        ValueError,
        r"\^conv.*match none of the leaves",
    ),
    (
        "selection matches nothing",
        "svd",
        lambda t: masked(lowrank.svd(rank=1), r"^conv")(W),
        ValueError,
        r"\^conv.*match none of the leaves",
    ),
    ("selection matches nothing", "bad regex", lambda t: masked(lowrank.svd(rank=1), "fc1[")(W), ValueError, r"does not compile"),
    ("empty arrays", "pruning", lambda t: _mag(EMPTY, sparsity=0.5), ValueError, r"fc1/kernel|empty"),
    ("empty arrays", "quantization", lambda t: quant.quantize(bits=8)(EMPTY), ValueError, r"fc1/kernel|empty"),
    ("integer dtype", "quantize", lambda t: quant.quantize_leaf(jnp.arange(8), bits=4), TypeError, r"dtype|float"),
    ("integer dtype", "pruning", lambda t: _mag(INTS, sparsity=0.5), TypeError, r"fc1/kernel|dtype|float"),
    ("integer dtype", "k-means", lambda t: sharing.kmeans(k=2)(INTS), TypeError, r"fc1/kernel|dtype|float"),
    ("corrupt or wrong file", "flipped byte", _corrupt_file, export.CompressedFileError, r"m\.jcz"),
    ("corrupt or wrong file", "truncated", _truncated_file, export.CompressedFileError, r"m\.jcz"),
    ("corrupt or wrong file", "wrong magic", _wrong_magic, export.CompressedFileError, r"m\.jcz"),
    (
        "corrupt or wrong file",
        "missing checkpoint",
        lambda t: __import__("jcompress").checkpoint.load_model(t / "none", build=models.from_meta),
        FileNotFoundError,
        r"does not exist",
    ),
    ("corrupt or wrong file", "corrupt checkpoint", _corrupt_checkpoint, ValueError, r"could not be restored|corrupt"),
    (
        "corrupt or wrong file",
        "checkpoint of another model",
        _wrong_checkpoint,
        ValueError,
        r"could not be restored|different model",
    ),
    ("unknown name", "dataset", lambda t: data.load("cifar100"), ValueError, r"mnist5k, digits, mnist1d"),
    (
        "unknown name",
        "model",
        lambda t: models.create("vgg16", input_shape=(28, 28, 1), num_classes=10),
        ValueError,
        r"lenet300",
    ),
    ("bits out of range", "index_bits=0", lambda t: compressed.compress(W, index_bits=0), ValueError, r"index_bits=0"),
    (
        "shape mismatch",
        "compress with a wrong aux",
        lambda t: compressed.compress(
            W, MaskAux(masks={"fc1": {"kernel": jnp.zeros((8, 6), bool), "bias": jnp.ones(6, bool)}})
        ),
        ValueError,
        r"fc1/kernel",
    ),
    (
        "shape mismatch",
        "hard_prune masks of another model",
        lambda t: surgery.hard_prune({"fc1": {"kernel": jnp.ones((4, 5), bool)}}, input_shape=(4,))(_mlp()),
        ValueError,
        r"structure of the model's nnx.Param.*fc2/kernel",
    ),
    (
        "layer emptied",
        "hard_prune removes every unit",
        lambda t: surgery.hard_prune(_unit_cut(range(5)), input_shape=(4,))(_mlp()),
        ValueError,
        r"every unit of fc1.*allow_empty=True",
    ),
    (
        "wrong type",
        "hard_prune on a params tree",
        lambda t: surgery.hard_prune(input_shape=(4,))(W),
        TypeError,
        r"model transform.*NNX module",
    ),
    (
        "rank invalid",
        "factorize rank above min(dims)",
        lambda t: factorize.factorize(rank=9)(_mlp()),
        ValueError,
        r"fc1/kernel.*rank=9",
    ),
]


@pytest.mark.parametrize("kind, case, call, exc, pattern", CASES, ids=[f"{k}: {c}" for k, c, *_ in CASES])
def test_bad_input(kind, case, call, exc, pattern, tmp_path):
    with pytest.raises(exc) as info:
        call(tmp_path)
    message = str(info.value)
    assert re.search(pattern, message), f"{kind} / {case}: message does not say what is wrong: {message!r}"
    assert "Traceback" not in message and len(message) < 2000
