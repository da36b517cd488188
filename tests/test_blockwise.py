"""Block-by-block one-shot compression of tiny decoders (jcompress.blockwise) and ``jcompress oneshot``.

The models have random weights, so their perplexity says nothing; the papers' ordering is
checked on what the methods optimise, each block's output error on its calibration
inputs. The solver runs use a 2-block Llama whose projections are all 64 x 64 (one XLA
compile per solver); the command runs on the GPT-2 fixture. 8 host devices come from
tests/conftest.py.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jcompress import blockwise, lm, parallel, tree
from jcompress.models import hf_lm
from jcompress.models.llama import Llama, LlamaConfig

FIXTURES = Path(__file__).parent / "fixtures" / "lm"
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)")


def _calib(tok, num=8, seq_len=16):
    return lm.sample_windows(lm.corpus_ids(tok, "calibration", limit=60), num=num, seq_len=seq_len, seed=0)


def _tiny_llama():
    """2 random blocks with every projection 64 x 64 (no GQA), so each solver compiles once."""
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)  # numpy: no XLA compile per shape

    def init(name, s):
        z = rng.normal(size=s.shape)
        v = 1 + 0.1 * z if name.endswith("scale") else z / np.sqrt(s.shape[0]) if name.endswith("kernel") else z
        return jnp.asarray(v, jnp.float32)

    return nnx.merge(graphdef, tree.map_with_names(init, state))


def _run(factory, devices=1, solver_devices="all"):
    ids = np.random.default_rng(1).integers(0, 320, (8, 16))
    mesh = parallel.data_mesh(devices)
    model, report = blockwise.compress(_tiny_llama(), ids, factory, mesh=mesh, solver_devices=solver_devices)
    return dict(tree.named_leaves(nnx.state(model, nnx.Param))), report


@pytest.fixture(scope="module")
def runs():
    """A tiny Llama compressed by GPTQ, SparseGPT and their baselines (compiles shared)."""
    methods = {
        "gptq": blockwise.method("gptq", bits=4),
        "rtn": blockwise.method("rtn", bits=4),
        "sparsegpt": blockwise.method("sparsegpt", sparsity=0.5),
        "magnitude": blockwise.method("magnitude", sparsity=0.5),
    }
    out = {(m, 1): _run(f) for m, f in methods.items()}
    if jax.device_count() >= 8:  # statistics summed over 8 data shards; solves spread: test_blockwise_solvers.py
        for m in ("gptq", "sparsegpt"):
            out[(m, 8)] = _run(methods[m], devices=8, solver_devices="one")
    return out


@needs8
@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_same_weights_on_1_and_8_devices(runs, method):
    one, eight = runs[(method, 1)][0], runs[(method, 8)][0]
    assert one.keys() == eight.keys()
    for name in one:
        np.testing.assert_allclose(np.asarray(eight[name]), np.asarray(one[name]), atol=1e-5, rtol=0, err_msg=name)
        if method == "sparsegpt" and name.endswith("kernel") and name.startswith("layers"):
            assert np.array_equal(np.asarray(eight[name]) == 0, np.asarray(one[name]) == 0), name
    errs1, errs8 = runs[(method, 1)][1].layer_errors, runs[(method, 8)][1].layer_errors
    np.testing.assert_allclose([errs8[n] for n in errs1], list(errs1.values()), rtol=1e-3)


def test_report_covers_every_linear_and_sparsity_is_exact(runs):
    params, report = runs[("sparsegpt", 1)]
    kernels = [n for n in params if n.startswith("layers/") and n.endswith("/kernel")]
    assert len(kernels) == 14 and sorted(report.layer_errors) == sorted(kernels)
    assert [b.index for b in report.blocks] == [0, 1] and (report.num_sequences, report.seq_len) == (8, 16)
    assert all(b.seconds > 0 for b in report.blocks) and report.act_quant == {}
    for n in kernels:
        k = np.asarray(params[n])
        assert int((k == 0).sum()) == round(0.5 * k.size), n
    assert np.all(np.asarray(params["lm_head/kernel"]) != 0)  # outside the blocks: untouched


def test_gptq_and_sparsegpt_beat_rtn_and_magnitude_block_by_block(runs):
    for good, baseline in (("gptq", "rtn"), ("sparsegpt", "magnitude")):
        ours, theirs = runs[(good, 1)][1], runs[(baseline, 1)][1]
        for a, b in zip(ours.blocks, theirs.blocks):
            assert 0 < a.output_error < 0.85 * b.output_error, (good, a.index, a.output_error, b.output_error)
        assert sum(ours.layer_errors.values()) < sum(theirs.layer_errors.values())


def test_gptq_weights_sit_on_4_bit_grids(runs):
    params = runs[("gptq", 1)][0]
    k = np.asarray(params["layers/1/mlp/down_proj/kernel"])
    assert all(len(np.unique(k[:, j])) <= 16 for j in range(k.shape[1]))


def test_bad_input_is_named():
    model, tok, _ = hf_lm.load(FIXTURES / "gpt2")
    ids = _calib(tok)
    with pytest.raises(ValueError, match="sample_windows"):
        blockwise.compress(model, ids.reshape(-1), blockwise.method("rtn"))
    with pytest.raises(ValueError, match="batch_size=3"):
        blockwise.compress(model, ids, blockwise.method("rtn"), batch_size=3)
    with pytest.raises(ValueError, match="'data' axis"):
        blockwise.compress(model, ids, blockwise.method("rtn"), mesh=Mesh(np.array(jax.devices()[:1]), ("fsdp",)))
    if jax.device_count() >= 8:
        with pytest.raises(ValueError, match="multiple of the mesh's data axis"):
            blockwise.compress(model, ids, blockwise.method("rtn"), mesh=parallel.data_mesh(8), batch_size=4)
    with pytest.raises(ValueError, match="sparsity"):
        blockwise.method("wanda")
    with pytest.raises(ValueError, match="not one of"):
        blockwise.method("obq")
    with pytest.raises(ValueError, match="fewer than seq_len=400"):
        lm.sample_windows(lm.corpus_ids(tok, "calibration", limit=5), num=2, seq_len=400)
    with pytest.raises(ValueError, match="not a decoder"):
        blockwise.compress(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), ids, blockwise.method("rtn"))
    np.testing.assert_array_equal(jnp.asarray(ids).shape, (8, 16))


def test_oneshot_command(tmp_path, capsys):
    from jcompress import cli, export

    out = tmp_path / "nm"
    argv = ["oneshot", "--model", str(FIXTURES / "gpt2"), "--method", "wanda", "--n-m", "2:4", "--calib", "8",
            "--seq-len", "16", "--batch-size", "8", "--eval-tokens", "200", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "block 1/2:" in printed and "block 2/2:" in printed and "perplexity" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wanda" and report["settings"]["n_m"] == [2, 4] and len(report["blocks"]) == 2
    assert len(report["layer_errors"]) == 8 and report["peak_host_rss_bytes"] > 0
    assert all(0 < b["output_error"] < 1 for b in report["blocks"])
    assert np.isfinite(report["perplexity_before"]) and np.isfinite(report["perplexity_after"])
    assert report["written_bytes"] == (out / "model.jcz").stat().st_size
    # 2:4 zeros in float arrays: the device bytes stay dense, and the report says so
    assert report["device_bytes"] == report["dense_bytes"] and report["sparsity_patterns"] == ["2:4"]
    assert report["sparse_runtime"].startswith("none on this backend")
    c_attn = np.asarray(export.load_params(out / "model.jcz")["layers"][1]["attn"]["c_attn"]["kernel"])
    assert c_attn.shape == (64, 192)  # the fused projection is one Linear
    assert np.all((c_attn.reshape(16, 4, 192) != 0).sum(axis=1) == 2)
    # a calibration text shorter than --seq-len, and a pruning method without its sparsity
    bad = ["oneshot", "--model", str(FIXTURES / "gpt2"), "--calib", "8", "--out", str(tmp_path / "bad")]
    assert cli.main([*bad, "--method", "rtn", "--seq-len", "100000"]) == 2
    assert "fewer than seq_len=100000" in capsys.readouterr().err
    assert cli.main([*bad, "--method", "wanda"]) == 2
    assert "needs exactly one of --sparsity or --n-m" in capsys.readouterr().err
    assert cli.main([*bad, "--method", "gptq", "--dynamic-groups"]) == 2
    assert "--dynamic-groups applies to --method gptq with --act-order" in capsys.readouterr().err
    assert cli.main([*bad, "--method", "gptq", "--clip"]) == 2
    assert "--clip applies to --method awq" in capsys.readouterr().err


def test_oneshot_command_writes_activation_order_groups(tmp_path, capsys):
    """GPTQ with dynamic activation-order groups, written as compressed-tensors with a scattered weight_g_idx."""
    from safetensors.numpy import load_file

    from jcompress import cli

    out = tmp_path / "g"
    argv = ["oneshot", "--model", str(FIXTURES / "llama_gqa_sharded"), "--method", "gptq", "--bits", "4", "--group-size", "16",
            "--act-order", "--dynamic-groups", "--format", "compressed-tensors", "--calib", "8", "--seq-len", "16",
            "--batch-size", "8", "--eval-tokens", "200", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    config = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    tensors = {n: t for f in sorted((out / "model").glob("*.safetensors")) for n, t in load_file(str(f)).items()}
    g_idx = {n: t for n, t in tensors.items() if n.endswith("weight_g_idx")}
    assert len(g_idx) == 14  # 7 projections in each of 2 blocks
    for t in g_idx.values():
        assert np.all(np.bincount(t) == 16)  # groups of 16 inputs each
    assert any(np.any(np.diff(t) < 0) for t in g_idx.values())  # formed in activation order, not contiguous
