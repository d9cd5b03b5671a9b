"""Pyramid geometry, antialiased cubic resampling and the two-scale Laplacian blend."""

from __future__ import annotations

import pytest
import torch

from gigasid.core.pyramid import (
    half_shape,
    laplacian_blend,
    output_pyramid_shapes,
    pyramid_shapes,
    resample,
    resample_taps,
)


def test_paper_size_pyramid() -> None:
    # 186x248 is the paper's size: 4 scales, the last ⌈23.25⌉ = 24 rows
    shapes = pyramid_shapes(186, 248, min_short_side=24)
    assert shapes == [(186, 248), (93, 124), (47, 62), (24, 31)]


def test_pinned_coarsest_level() -> None:
    # 180x240: the 4th level would be ⌈22.5⌉ x 30 = 23x30, below 24: pinned to 24 rows, aspect kept
    assert pyramid_shapes(180, 240, min_short_side=24) == [(180, 240), (90, 120), (45, 60), (24, 32)]
    # 200x300: level 3 is 25x38, just over 24; level 4 would be 13x19, far below. The level just
    # over becomes the coarsest and is pinned down to 24x36 (no near-duplicate 25x38 + 24x36)
    shapes = pyramid_shapes(200, 300, min_short_side=24)
    assert shapes == [(200, 300), (100, 150), (50, 75), (24, 36)]
    # 256x256: 32 is further above 24 (1.33x) than 16 is below it (1.5x)... 32 stays closest
    assert pyramid_shapes(256, 256, min_short_side=24)[-2:] == [(64, 64), (24, 24)]
    # 180x240 kept its 23x30 level (pinned up), as 45 is far above 24


def test_explicit_num_scales() -> None:
    assert pyramid_shapes(186, 248, min_short_side=24, num_scales=1) == [(186, 248)]
    assert pyramid_shapes(186, 248, min_short_side=24, num_scales=2) == [(186, 248), (93, 124)]
    assert pyramid_shapes(186, 248, min_short_side=24, num_scales=4) == [
        (186, 248),
        (93, 124),
        (47, 62),
        (24, 31),
    ]
    # 5 levels would put 24x31 above a 12x16 coarsest that cannot be pinned to 24 below it
    with pytest.raises(ValueError, match="too deep"):
        pyramid_shapes(186, 248, min_short_side=24, num_scales=6)
    with pytest.raises(ValueError, match="min_short_side"):
        pyramid_shapes(186, 248, min_short_side=0)


def test_output_pyramid_shapes() -> None:
    reference = pyramid_shapes(186, 248, min_short_side=24)
    assert output_pyramid_shapes(reference, 186, 248) == reference
    assert output_pyramid_shapes(reference, 186, 372) == [(186, 372), (93, 186), (47, 93), (24, 47)]


def test_resample_of_constant_is_constant() -> None:
    image = torch.full((3, 37, 53), 0.3125)
    for shape in [(19, 27), (74, 106), (37, 20), (5, 90)]:
        for periodic in (False, True):
            out = resample(image, shape, periodic=periodic)
            assert out.shape == (3, *shape)
            # the taps' weights sum to 1 in float64; float32 products and sums leave ~1e-7
            torch.testing.assert_close(out, torch.full_like(out, 0.3125), atol=1e-6, rtol=0)


def test_resample_taps_sum_to_one() -> None:
    for in_len, out_len in [(64, 32), (47, 24), (24, 47), (10, 3)]:
        for periodic in (False, True):
            indices, weights = resample_taps(in_len, out_len, periodic=periodic)
            assert indices.shape == weights.shape and indices.shape[0] == out_len
            assert int(indices.min()) >= 0 and int(indices.max()) < in_len
            torch.testing.assert_close(weights.sum(1), torch.ones(out_len, dtype=torch.float64))


def test_resample_same_size_is_identity() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 21, 34, generator=generator)
    assert torch.equal(resample(image, (21, 34)), image)
    assert torch.equal(resample(image, (21, 34), periodic=True), image)


def test_periodic_resample_commutes_with_roll() -> None:
    generator = torch.Generator().manual_seed(1)
    signal = torch.randn(3, 64, 64, generator=generator)
    # ratio 2: a roll of 2 input pixels is a roll of 1 output pixel, value for value
    left = resample(torch.roll(signal, 2, -1), (32, 32), periodic=True)
    right = torch.roll(resample(signal, (32, 32), periodic=True), 1, -1)
    assert torch.equal(left, right)  # same taps, same summation order: bit-identical
    # ratio 4 rows, 2 cols, both axes at once
    left = resample(torch.roll(signal, (4, 6), (-2, -1)), (16, 32), periodic=True)
    right = torch.roll(resample(signal, (16, 32), periodic=True), (1, 3), (-2, -1))
    assert torch.equal(left, right)
    # upsampling too: roll 1 at 32 is roll 2 at 64
    small = signal[:, :32, :32]
    left = resample(torch.roll(small, 1, -1), (32, 64), periodic=True)
    right = torch.roll(resample(small, (32, 64), periodic=True), 2, -1)
    torch.testing.assert_close(left, right, atol=1e-6, rtol=0)


def test_periodic_resample_of_a_sinusoid_has_no_edge_effect() -> None:
    cols = torch.arange(64, dtype=torch.float32)
    wave = torch.sin(2 * torch.pi * cols / 16).expand(1, 8, 64)
    out = resample(wave, (8, 32), periodic=True)
    # the same wave sampled at the coarser grid's centres, damped by the antialiasing kernel:
    # every column has the same amplitude ratio; no column near the wrap is special
    expected_phase = torch.sin(2 * torch.pi * ((torch.arange(32) + 0.5) * 2 - 0.5) / 16)
    ratio = out[0, 0] / expected_phase
    assert float(ratio.std()) < 1e-5


def _smooth(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A smooth random texture: noise upsampled 4x (band-limited, like a finished coarse scale)."""
    generator = torch.Generator().manual_seed(seed)
    return resample(
        torch.randn(channels, height // 4 + 1, width // 4 + 1, generator=generator), (height, width)
    )


@pytest.mark.parametrize(
    "fine_shape,coarse_shape", [((64, 80), (32, 40)), ((63, 81), (32, 41)), ((47, 62), (24, 31))]
)
def test_laplacian_blend_keeps_the_coarse_low_band(fine_shape, coarse_shape) -> None:
    fine = _smooth(3, *fine_shape, seed=1)
    coarser = _smooth(3, *coarse_shape, seed=2)
    blend = laplacian_blend(fine, coarser)
    assert blend.shape == fine.shape

    def relative_error(image: torch.Tensor) -> float:
        return float((resample(image, coarse_shape) - coarser).norm() / coarser.norm())

    blended, unblended = relative_error(blend), relative_error(fine)
    # measured: blended 0.05-0.07 (down(up(c)) is not exactly c for a cubic kernel), unblended
    # ~1.1-1.5 (fine and coarser are independent). Bound 0.15 and a 10x separation.
    assert blended < 0.15
    assert blended * 10 < unblended


def test_laplacian_blend_of_consistent_scales_is_fine() -> None:
    fine = _smooth(3, 64, 80, seed=4)
    coarser = resample(fine, half_shape(64, 80))
    # coarser = down(fine) exactly: up(coarser) + fine - up(down(fine)) = fine (round-off only)
    torch.testing.assert_close(laplacian_blend(fine, coarser), fine, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        laplacian_blend(fine, resample(fine, (32, 40), periodic=True), periodic=True), fine, atol=1e-5, rtol=0
    )
