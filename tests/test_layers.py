"""The package's layering: lazy top-level imports, the public surface and the one timer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress as jc
from jcompress import timing

HEAVY = ("orbax", "tensorflow", "tensorflow_datasets", "matplotlib", "sklearn")


def _loaded_after(statement: str) -> set[str]:
    """Top-level packages among HEAVY that ``statement`` loads in a fresh interpreter."""
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1])) & set(HEAVY)


@pytest.mark.parametrize(
    "statement",
    ["import jcompress", "import jcompress.pruning", "import jcompress.core", "import jcompress as jc; jc.chain"],
)
def test_light_imports_load_neither_orbax_nor_tensorflow(statement):
    assert _loaded_after(statement) == set()


def test_checkpoint_loads_orbax_on_first_use():
    assert "orbax" in _loaded_after("import jcompress as jc; jc.checkpoint")


def test_public_surface_resolves():
    assert sorted(jc.__all__) == sorted([*jc._SUBMODULES, *jc._ATTRIBUTES])
    for name in jc.__all__:
        assert getattr(jc, name) is not None, name
    from jcompress.core import base, patterns

    assert jc.chain is base.chain and jc.masked is base.masked
    assert jc.Transform is base.Transform and jc.ModelTransform is base.ModelTransform
    assert (jc.NM, jc.Block, jc.Units, jc.Unstructured) == (
        patterns.NM,
        patterns.Block,
        patterns.Units,
        patterns.Unstructured,
    )
    for aux in ("MaskAux", "CodebookAux", "GridAux", "FactorAux", "UnitsAux", "ActRangeAux", "ChainAux"):
        assert getattr(jc, aux) is getattr(base, aux)
    assert jc.pruning.__name__ == "jcompress.pruning"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jc.nope  # noqa: B018


# ----------------------------------------------------------------------------- timing


def test_timeit_reports_median_spread_and_first_call_separately():
    calls = []

    def slow_first():
        calls.append(None)
        time.sleep(0.05 if len(calls) == 1 else 0.002)
        return np.ones(2)

    t = timing.timeit(slow_first, repeats=5, warmup=1)
    assert len(calls) == 6 and len(t.times) == 5
    assert t.first >= 0.05  # the first call is reported ...
    assert t.high < 0.05  # ... and never enters the timed calls
    assert t.low <= t.median <= t.high and t.spread == t.high - t.low
    assert t.median == sorted(t.times)[2]
    np.testing.assert_array_equal(t.output, np.ones(2))
    assert "median" in str(t) and "first call" in str(t)


def test_timeit_blocks_until_jax_results_are_ready():
    f = jax.jit(lambda x: (x @ x.T).sum())
    t = timing.timeit(f, jnp.ones((64, 64)), repeats=3)
    assert isinstance(t.output, jax.Array) and float(t.output) == 64.0**3
    assert t.first > 0 and np.isnan(timing.timeit(f, jnp.ones((64, 64)), repeats=1, warmup=0).first)


def test_compare_interleaves_calls():
    order = []
    ts = timing.compare({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert list(ts) == ["a", "b"] and all(len(t.times) == 3 for t in ts.values())


def test_timing_arguments_are_checked():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timing.timeit(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        timing.timeit(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="at least one function"):
        timing.compare({})


# ------------------------------------------------------------------------ import contracts


def test_import_contracts_are_kept(tmp_path):
    """pyproject.toml's [tool.importlinter] contracts (layers, forbidden imports, no cycles) hold."""
    import shutil
    from pathlib import Path

    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    root = Path(__file__).resolve().parents[1]
    cache = ["--cache-dir", str(tmp_path / "cache")]  # a temporary cache: nothing is written into the repository
    out = subprocess.run([exe, *cache], check=False, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
