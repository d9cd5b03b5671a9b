"""Golden numbers: statistics of fixed-seed outputs of the real presets, written into this file, so
that a change the in-memory and the tiled paths would share (and so agree on: tiled == untiled
cannot see it) still shows.

Three jobs, small enough for a few seconds:

* ``uncond``: the ``uncond`` preset (knn, IVF, P = 15, T = 10, 4 scales) on ``examples/rocket.png``
  (186x248, the paper's size), in memory through :func:`gigasid.generate`;
* ``smoke-tiled``: the ``smoke`` preset (knn, P = 7, T = 3, 2 scales) on a 96x128 crop of the
  rocket, a 96x160 output (wider than the reference), run tile by tile through the job store
  (``engine.create_job`` + ``engine.execute`` with the ``sync`` profile, tile 40: tiles that do
  not divide the image); its uint8 output;
* ``latent``: the ``gigapixel`` preset (lapped-PCA latents, correspondence decode, eta = 1) made
  small (K = 16, P = 5, T = 3) on ``examples/coffee.png`` (256x384), in memory.

The statistics: shape, mean, std, sum of squares, a checksum-like projection Σ r_i x_i on a fixed
hash pattern r_i ∈ [-0.5, 0.5), and 8 values at fixed flat positions, on the values in [-1, 1]
(a uint8 output divided by 255, so in [0, 1]).

Tolerances. These outputs are bit-identical whatever the thread count (checked when they were
recorded: torch 1 vs 2 threads, numba 1 vs 2, faiss 1 vs 2, every combination), so the tolerances
only have to absorb a summation order that a future kernel might change: float32 round-off
(~1e-7 a value) and, rarely, its amplification by a near-tie of two patches at small σ (the oracle
in ``test_oracle.py`` measured up to 4e-4 at a few pixels). Against that: mean and std ±1e-5, the
sum of squares ±1e-5 relative, the projection ±2e-3 (1e-2 for uint8, where a value may round the
other way), a value ±1e-3 (±1/255 for uint8). What a changed algorithm moves, measured on ``uncond``
when recording: ρ 0.2 → 0.21 moved the mean by 8e-5, the sum of squares by 1.3e-4 relative and the
projection by 0.31; ``index.nprobe`` 4 → 5 by 3e-5, 1.4e-5 and 0.45; T 10 → 11 by 5e-5, 1.3e-4 and
0.01; eta 0 → 0.01 by 2.5e-5, 1.8e-5 and 0.26 — each caught by at least two statistics.

A different CPU (another BLAS kernel, another FAISS build) may legitimately move them more.

To regenerate after an INTENDED change of the algorithm (or of the presets, the examples, FAISS's
clustering): run ``python tests/test_golden.py``, which prints the ``GOLDEN`` mapping for the code
as it is now; paste it over the one below and say in the commit message what changed and why.
Recorded at commit 9e07a4d.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import gigasid
from gigasid.config import load_pipeline
from gigasid.graph import engine
from gigasid.graph.profiles import load_profile
from gigasid.io.images import read_image

REPO = Path(__file__).resolve().parents[1]
# eta = 1 (the paper's latent setting; the preset's own is 0): keeps the stochastic step's fresh
# noise under a golden number
LATENT_SMALL = ["patch_size=5", "num_steps=3", "min_short_side=10", "latent.channels=16", "index.kind=auto", "eta=1"]

# fmt: off
GOLDEN = {
    "uncond": {
        "shape": (3, 186, 248), "uint8": False, "mean": -0.4162272, "std": 0.2410681, "sumsq": 32016.3768,
        "projection": 0.386869,
        "values": [-0.921569, -0.640953, 0.698045, -0.537321, -0.388232, -0.379208, -0.180627, -0.411765],
    },
    "smoke-tiled": {
        "shape": (3, 96, 160), "uint8": True, "mean": 0.2999215, "std": 0.0805772, "sumsq": 4444.21367,
        "projection": 1.566333,
        "values": [0.211765, 0.203922, 0.219608, 0.317647, 0.333333, 0.423529, 0.427451, 0.360784],
    },
    "latent": {
        "shape": (3, 256, 384), "uint8": False, "mean": -0.246585, "std": 0.440071, "sumsq": 75045.2646,
        "projection": 6.773798,
        "values": [0.937255, 0.325165, 0.309603, -0.219134, -0.364706, -0.521569, -0.686535, -0.654902],
    },
}
# fmt: on

TOLERANCE = {  # (float output, uint8 output)
    "mean": (1e-5, 1e-5),
    "std": (1e-5, 1e-5),
    "projection": (2e-3, 1e-2),
    "values": (1e-3, 1.0 / 255 + 1e-9),
}
SUMSQ_RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def example(name: str, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
    pixels = np.ascontiguousarray(read_image(REPO / "examples" / name)[rows, cols])
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def run_uncond() -> np.ndarray:
    return gigasid.generate(example("rocket.png"), load_pipeline("uncond"), seed=1).numpy()


def run_smoke_tiled() -> np.ndarray:
    image = example("rocket.png", slice(40, 136), slice(60, 188))  # 96x128
    with tempfile.TemporaryDirectory() as folder:
        store = engine.create_job(
            Path(folder) / "job.zarr", image, load_pipeline("smoke"), size=(96, 160), seed=2, tile=40
        )
        try:
            engine.execute(store, load_profile("sync"), progress=engine.Progress(io.StringIO()))
            return engine.read_output(store)
        finally:
            store.release_lock()


def run_latent() -> np.ndarray:
    return gigasid.generate(example("coffee.png"), load_pipeline("gigapixel", LATENT_SMALL), seed=3).numpy()


JOBS = {"uncond": run_uncond, "smoke-tiled": run_smoke_tiled, "latent": run_latent}


def statistics(output: np.ndarray) -> dict:
    """The golden statistics of an output: values in [-1, 1] (uint8 scaled to [0, 1])."""
    values = output.astype(np.float64) / 255.0 if output.dtype == np.uint8 else output.astype(np.float64)
    flat = values.reshape(-1)
    index = np.arange(flat.size, dtype=np.int64)
    pattern = ((index * 2654435761) % 4294967296) / 4294967296.0 - 0.5  # a fixed, exact hash
    picks = np.linspace(0, flat.size - 1, 8).astype(np.int64)
    return {
        "shape": tuple(int(n) for n in output.shape),
        "uint8": output.dtype == np.uint8,
        "mean": round(float(flat.mean()), 7),
        "std": round(float(flat.std()), 7),
        "sumsq": float(f"{(flat**2).sum():.9g}"),
        "projection": round(float((flat * pattern).sum()), 6),
        "values": [round(float(v), 6) for v in flat[picks]],
    }


@pytest.mark.parametrize("job", list(JOBS))
def test_golden_numbers(job):
    got, want = statistics(JOBS[job]()), GOLDEN[job]
    assert got["shape"] == want["shape"] and got["uint8"] == want["uint8"]
    which = 1 if want["uint8"] else 0
    report = f"{job}: got {got}, recorded {want} (see this module's docstring to regenerate)"
    for key in ("mean", "std", "projection"):
        assert abs(got[key] - want[key]) <= TOLERANCE[key][which], f"{key} moved; {report}"
    assert abs(got["sumsq"] - want["sumsq"]) <= SUMSQ_RTOL * want["sumsq"], f"sumsq moved; {report}"
    moved = np.abs(np.subtract(got["values"], want["values"])).max()
    assert moved <= TOLERANCE["values"][which], f"values moved by {moved:.3g}; {report}"


if __name__ == "__main__":  # print the GOLDEN mapping for the code as it is now
    torch.set_num_threads(1)
    print("GOLDEN = {")
    for name, run in JOBS.items():
        print(f"    {name!r}: {statistics(run())!r},", file=sys.stdout, flush=True)
    print("}")
