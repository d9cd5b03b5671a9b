"""Noise as a pure function of (seed, scale, step, channel, row, col) (DESIGN.md §4.3)."""

from __future__ import annotations

import torch

from gigasid.core.noise import gaussian_noise


def test_sub_box_is_the_slice_of_a_bigger_box() -> None:
    big = gaussian_noise(7, 2, 5, 3, (-10, -20, 50, 70))
    for row0, col0, row1, col1 in [(0, 0, 16, 16), (-10, -20, -9, -19), (13, 41, 50, 70), (3, 5, 4, 64)]:
        part = gaussian_noise(7, 2, 5, 3, (row0, col0, row1, col1))
        assert part.shape == (3, row1 - row0, col1 - col0)
        assert torch.equal(part, big[:, row0 + 10 : row1 + 10, col0 + 20 : col1 + 20])
    # fewer channels: the leading planes of the same field
    assert torch.equal(gaussian_noise(7, 2, 5, 1, (0, 0, 8, 8)), big[:1, 10:18, 20:28])


def test_far_away_positions_are_keyed_not_wrapped() -> None:
    # positions beyond 2^16 and the far corner of a gigapixel are still distinct draws
    near = gaussian_noise(0, 0, 0, 1, (0, 0, 4, 4))
    far = gaussian_noise(0, 0, 0, 1, (70000, 70000, 70004, 70004))
    assert not torch.equal(near, far)
    assert torch.equal(far, gaussian_noise(0, 0, 0, 1, (69990, 69990, 70010, 70010))[:, 10:14, 10:14])


def test_every_key_part_changes_the_field() -> None:
    box = (0, 0, 32, 32)
    base = gaussian_noise(1, 0, 3, 2, box)
    variants = {
        "seed": gaussian_noise(2, 0, 3, 2, box),
        "scale": gaussian_noise(1, 1, 3, 2, box),
        "step": gaussian_noise(1, 0, 4, 2, box),
    }
    for name, other in variants.items():
        # independent standard normals: differ almost everywhere, and are uncorrelated
        assert (other != base).float().mean() > 0.99, name
        corr = torch.corrcoef(torch.stack([other.flatten(), base.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.1, name  # 2048 pairs: std error 0.022, 0.1 is 4.5 sigma
    assert (base[0] != base[1]).float().mean() > 0.99  # channels too
    assert torch.equal(base, gaussian_noise(1, 0, 3, 2, box))  # and the same key is the same field


def test_standard_normal_statistics() -> None:
    values = gaussian_noise(123, 0, 1, 1, (0, 0, 320, 320))  # 102400 values
    assert values.dtype == torch.float32
    assert bool(torch.isfinite(values).all())
    flat = values.flatten().double()
    # N = 102400: std error of the mean 0.0031, of the std 0.0022; bounds are ~5 std errors
    assert abs(float(flat.mean())) < 0.016
    assert abs(float(flat.std()) - 1.0) < 0.011
    # tails of a normal: P(|z| > 3) = 0.0027 (expected 276 values, Poisson std 17)
    assert 200 < int((flat.abs() > 3).sum()) < 360
    # neighbours uncorrelated: lag-1 along rows, columns and across channels (std error 0.003)
    grid = values[0]
    for a, b in [(grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:]), (grid[:-1, :-1], grid[1:, 1:])]:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.02
    two = gaussian_noise(123, 0, 1, 2, (0, 0, 160, 320))
    corr = torch.corrcoef(two.flatten(1))[0, 1]
    assert abs(float(corr)) < 0.02
