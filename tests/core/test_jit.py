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
