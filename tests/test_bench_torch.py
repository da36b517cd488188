"""B9's PyTorch peers compute what jcompress's solvers compute (bench extra; skipped without PyTorch)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch peers need the bench extra: pip install -e '.[bench]'")

import jax.numpy as jnp

from jcompress.bench import b9_torch_peers as b9
from jcompress.bench.b4_sparsegpt import make_problem, reference_sparsegpt
from jcompress.oneshot.gptq import quantize_matrix
from jcompress.oneshot.wanda import wanda


@pytest.fixture(scope="module")
def problem():
    kernel, h = make_problem(256, 96, 512, seed=3)
    return kernel.astype(np.float32), h.astype(np.float32)


def test_torch_sparsegpt_equals_the_numpy_reference(problem):
    kernel, h = problem
    ours = b9.torch_sparsegpt(torch.from_numpy(kernel.T.copy()), torch.from_numpy(h), sparsity=0.5).numpy()
    ref = reference_sparsegpt(kernel.T, h, sparsity=0.5)
    assert np.sum(ours == 0) == np.sum(ref == 0) == kernel.size // 2
    np.testing.assert_array_equal(ours == 0, ref == 0)
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_torch_gptq_equals_jcompress_asymmetric_gptq(problem):
    kernel, h = problem
    ours, qp = quantize_matrix(jnp.asarray(kernel), jnp.asarray(h), bits=4, symmetric=False)
    peer = b9.torch_gptq(torch.from_numpy(kernel.T.copy()), torch.from_numpy(h), bits=4).numpy().T
    # Same grid per output unit: every peer weight lies on jcompress's grid.
    scale = np.asarray(qp.scale)[0]
    zero = np.asarray(qp.zero_point)[0]
    codes = np.round(peer / scale + zero)
    assert codes.min() >= 0 and codes.max() <= 15
    np.testing.assert_allclose(peer, (codes - zero) * scale, atol=1e-5)
    # Float rounding in the error feedback may flip a few codes at ties; the rest agree.
    assert np.mean(np.abs(np.asarray(ours) - peer) <= 1e-5) >= 0.99
    assert b9._rel_err(kernel.T, np.asarray(ours).T, h) == pytest.approx(b9._rel_err(kernel.T, peer.T, h), rel=1e-3)


def test_torch_wanda_equals_jcompress_wanda(problem):
    kernel, h = problem
    params, _ = wanda({"k": jnp.asarray(h)}, sparsity=0.5)({"k": jnp.asarray(kernel)})
    peer = b9.torch_wanda(torch.from_numpy(kernel.T.copy()), torch.from_numpy(h), sparsity=0.5).numpy().T
    np.testing.assert_array_equal(np.asarray(params["k"]), peer)
    assert np.all(np.sum(peer == 0, axis=0) == 128)
