"""Two processes x two CPU devices end with the params of one process on the same global batches."""

import numpy as np
import pytest

from jcompress.distill import multihost


def _assert_same_params(a: dict, b: dict, rel: float = 1e-6) -> None:
    assert sorted(a) == sorted(b)
    for name, x in a.items():
        scale = max(np.abs(x).max(), np.abs(b[name]).max(), 1e-30)
        assert np.abs(x - b[name]).max() / scale < rel, name


def test_two_processes_match_one_process():
    steps, batch_size = 3, 32
    # a generous deadline: four jax processes compiling at once on a loaded 2-core machine take minutes
    results = multihost.launch(processes=2, devices=2, steps=steps, batch_size=batch_size, timeout=600)
    assert [r["processes"] for r in results] == [2, 2]
    assert [r["devices"] for r in results] == [4, 4]
    # every process holds the same replicated params
    _assert_same_params(results[0]["params"], results[1]["params"], rel=1e-12)
    # one process on one device, reading whole global batches
    single = multihost.run_steps(steps=steps, batch_size=batch_size, process_index=0, process_count=1, num_devices=1)
    _assert_same_params(single["params"], results[0]["params"])
    np.testing.assert_allclose(results[0]["loss"], single["loss"], rtol=1e-6)
    # and the run did train: params moved away from their initialisation
    start = multihost.run_steps(steps=0, batch_size=batch_size, process_index=0, process_count=1, num_devices=1)
    assert max(np.abs(single["params"][n] - start["params"][n]).max() for n in start["params"]) > 1e-3


def test_a_failing_worker_is_reported_not_hung():
    # a global batch of 3 rows cannot be split over 2 processes: each worker exits with an error,
    # reported as its exit code and stderr well before the deadline (a timeout would not match)
    with pytest.raises(RuntimeError, match=r"(?s)process 0: exit code [1-9].*batch_size=3 must be divisible by the number of processes"):
        multihost.launch(processes=2, devices=1, steps=1, batch_size=3, timeout=600)
