"""Patch geometry: unfolding an image's patches and folding them back is the identity.

An image denoiser whose patch denoiser returns its queries must return x_t itself: the fold
weights every pixel's covering patches by the window and divides by the window sum, so any
error in unfold, fold, the periodic wrap or ``window_sum`` shows up as a non-identity.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.patches import (
    fold_columns,
    grid_shape,
    patch_window,
    periodic_pad,
    unfold_rows,
    window_columns,
    window_sum,
    wrap_periodic,
)


class IdentityPatches:
    """A patch 'denoiser' that returns its queries: folding them must give x_t back."""

    needs_candidates = False

    def __init__(self, chunk: int = 1024):
        self.chunk = chunk  # queries per call (the image denoiser feeds pieces of this size)

    def __call__(self, queries, alpha, sigma, candidates=None):
        return queries.clone()


def _image(channels: int = 3, height: int = 23, width: int = 31, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(channels, height, width, generator=generator) * 2 - 1


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("rho", [0.2, math.inf])
# one band and one chunk; then bands and chunks that do not divide the 19 x 27 grid
@pytest.mark.parametrize("band_queries,chunk", [(16384, 1024), (40, 7)])
def test_fold_of_own_patches_is_identity(rho: float, periodic: bool, band_queries: int, chunk: int) -> None:
    x_t = _image()
    denoiser = ImageDenoiser(
        IdentityPatches(chunk), patch_size=5, rho=rho, periodic=periodic, band_queries=band_queries
    )
    out = denoiser(x_t, 0.5, 0.5)
    assert out.shape == x_t.shape
    # a weighted average of identical values: only float32 summation round-off (measured 4.8e-7)
    torch.testing.assert_close(out, x_t, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rho", [0.1, 0.05, 0.01])
def test_a_narrow_window_still_folds_every_pixel_back(rho: float) -> None:
    """The corner pixel is covered by one patch, at its corner: a narrow window's weight there
    must not underflow (0/0, or a subnormal's few bits) in the fold's division."""
    window = patch_window(15, rho)
    assert float(window.min()) >= 1e-30 and bool(torch.isfinite(window).all())
    x_t = _image(height=31, width=37)
    out = ImageDenoiser(IdentityPatches(), patch_size=15, rho=rho)(x_t, 0.5, 0.5)
    torch.testing.assert_close(out, x_t, atol=1e-5, rtol=0)


def test_fold_identity_grey_and_patch_size_one() -> None:
    x_t = _image(channels=1, height=9, width=12)
    for size in (1, 3, 9):
        out = ImageDenoiser(IdentityPatches(), patch_size=size, rho=0.2)(x_t, 0.9, 0.1)
        torch.testing.assert_close(out, x_t, atol=1e-5, rtol=0)


def test_image_smaller_than_patch_raises() -> None:
    with pytest.raises(ValueError, match="smaller than the patch size"):
        ImageDenoiser(IdentityPatches(), patch_size=7, rho=0.2)(_image(height=6, width=20), 0.5, 0.5)


@pytest.mark.parametrize("rho", [0.2, 1.0, math.inf])
@pytest.mark.parametrize("size", [1, 5, 7])
def test_window_sum_equals_fold_of_windows(rho: float, size: int) -> None:
    height, width = 13, 17
    window = patch_window(size, rho)
    grid_h, grid_w = grid_shape(height, width, size)
    columns = window.reshape(1, size * size, 1).expand(1, size * size, grid_h * grid_w)
    brute = F.fold(columns, (height, width), size)[0, 0]
    # sums of <= P² window values of order 1: float32 relative round-off ~1e-7 per add
    torch.testing.assert_close(window_sum(height, width, window), brute, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rho", [0.2, 1.0, math.inf])
def test_periodic_window_sum_equals_wrapped_loop(rho: float) -> None:
    height, width, size = 9, 11, 5
    window = patch_window(size, rho, dtype=torch.float64)
    brute = torch.zeros(height, width, dtype=torch.float64)
    for row in range(height):
        for col in range(width):
            for dy in range(size):
                for dx in range(size):
                    brute[(row + dy) % height, (col + dx) % width] += window[dy, dx]
    torch.testing.assert_close(
        window_sum(height, width, window, periodic=True), brute, rtol=1e-12, atol=1e-12
    )
    # with periodic patches every pixel is covered by the whole window once
    torch.testing.assert_close(brute, torch.full_like(brute, float(window.sum())), rtol=1e-12, atol=1e-12)


def test_patch_window_values() -> None:
    flat = patch_window(5, math.inf)
    assert torch.equal(flat, torch.ones(5, 5))
    window = patch_window(5, 0.2, dtype=torch.float64)
    coords = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    profile = torch.exp(-0.5 * (coords / 0.2) ** 2)
    torch.testing.assert_close(window, torch.outer(profile, profile), rtol=0, atol=1e-15)
    assert window[2, 2].item() == 1.0
    # golden: edge of a rho = 0.2 window is exp(-12.5) ≈ 3.7267e-06
    assert abs(window[2, 0].item() - 3.726653172078671e-06) < 1e-15
    with pytest.raises(ValueError, match="rho"):
        patch_window(5, 0.0)


def test_periodic_unfold_and_fold_by_hand() -> None:
    """Periodic patches are the patches of the wrapped image; folding wraps the overhang back."""
    size, (channels, height, width) = 3, (2, 5, 7)
    image = _image(channels, height, width)
    padded = periodic_pad(image, size)
    rows = unfold_rows(padded, size, 0, height)
    assert rows.shape == (height * width, size * size * channels)
    for row, col in [(0, 0), (4, 6), (3, 5), (2, 1)]:
        rolled = torch.roll(image, (-row, -col), (1, 2))[:, :size, :size]
        assert torch.equal(rows[row * width + col], rolled[:, :size, :size].reshape(-1))
    window = patch_window(size, 0.5)
    canvas = torch.zeros(channels, height + size - 1, width + size - 1)
    fold_columns(canvas, window_columns(rows, window), 0, width, size)
    folded = wrap_periodic(canvas, height, width) / window_sum(height, width, window, periodic=True)
    torch.testing.assert_close(folded, image, atol=1e-6, rtol=0)
