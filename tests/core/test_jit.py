"""The numba set-up in gigasid.core.jit: numba's BLAS probe skips scipy.linalg, which stays usable."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

CHECK = """
import sys
import gigasid.core.jit as jit
assert jit.numba is not None
assert "scipy.linalg" not in sys.modules, "importing gigasid loaded scipy.linalg"
assert sys.modules.get("scipy.linalg.cython_blas", "absent") == "absent", "the import block was left behind"
import numpy as np
from gigasid.core import pyramid
import torch
image = torch.rand(3, 40, 50)
small = pyramid.resample(image, (20, 25))  # a compiled kernel runs
assert small.shape == (3, 20, 25)
import scipy.linalg
u, s, vt = scipy.linalg.svd(np.eye(3))
assert np.allclose(s, 1.0)
print("ok")
"""


def test_numba_set_up_skips_scipy_linalg_and_leaves_it_importable() -> None:
    # a fresh interpreter: this test session may have imported scipy.linalg already
    done = subprocess.run([sys.executable, "-c", CHECK], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_a_task_thread_runs_parallel_kernels_only_when_it_runs_alone() -> None:
    """numba's workqueue pool must not be entered from two threads at once: a task thread of the
    threads scheduler takes the serial twins unless its executor runs one task at a time (a
    one-tile scale), and then its kernels use every thread it was given, with the same bits."""
    import os

    import numba
    import torch

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    from gigasid.core import pyramid
    from gigasid.core.jit import parallel_kernels
    from gigasid.graph.profiles import LocalExecutor, Profile

    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))
    expected = pyramid.resample(image, (32, 40))

    def probe():
        return parallel_kernels(), numba.get_num_threads(), pyramid.resample(image, (32, 40))

    executor = LocalExecutor(Profile(kind="threads", workers=2, compute_threads=2))
    seen = {}
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        for parallel in (1, 2):
            got = []
            executor.run_graph({"a": (probe, []), "b": (probe, ["a"])}, got.append, parallel=parallel)
            seen[parallel] = [(alone, threads) for alone, threads, _ in got]
            for _, _, small in got:
                assert torch.equal(small, expected)
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)
    assert seen[1] == [(True, 2), (True, 2)]
    assert seen[2] == [(False, 2), (False, 2)]
    assert not parallel_kernels() or numba.get_num_threads() > 1  # the main thread keeps its own
