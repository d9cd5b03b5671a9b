"""Correspondence decode: folding the reference's pixel patches at matched positions.

Proved against a direct numpy fold (every query, every candidate, slice by slice) and on the
identity: queries that match their own position in the reference, with weight 1, decode to the
reference's pixels exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from gigasid.codecs.correspondence import fold_matches, pad_reference, query_span
from gigasid.core.patches import window_profile

FACTOR, PATCH, RHO = 4, 3, 0.3


def _direct(reference, positions, weights, ref_grid_w, origin, box, out_shape, periodic):
    """The definition, written plainly (slow)."""
    size = FACTOR * PATCH
    window = np.outer(*(2 * [window_profile(size, RHO).numpy()]))
    height, width = out_shape
    canvas = np.zeros((reference.shape[0], height, width))
    cover = np.zeros((height, width))
    _, ref_h, ref_w = reference.shape
    for a in range(positions.shape[0]):
        for b in range(positions.shape[1]):
            top, left = FACTOR * (origin[0] + a), FACTOR * (origin[1] + b)
            rows = np.arange(top, top + size)
            cols = np.arange(left, left + size)
            if periodic:
                rows, cols = rows % height, cols % width
            keep_r, keep_c = (rows >= 0) & (rows < height), (cols >= 0) & (cols < width)
            sub = window[np.ix_(keep_r, keep_c)]
            np.add.at(cover, np.ix_(rows[keep_r], cols[keep_c]), sub)
            for c, w in zip(positions[a, b], weights[a, b]):
                if c < 0:
                    continue
                u, v = divmod(int(c), ref_grid_w)
                ry = np.minimum(np.arange(FACTOR * u, FACTOR * u + size), ref_h - 1)[keep_r]
                rx = np.minimum(np.arange(FACTOR * v, FACTOR * v + size), ref_w - 1)[keep_c]
                patch = reference[:, ry][:, :, rx]
                np.add.at(canvas, (slice(None), *np.ix_(rows[keep_r], cols[keep_c])), w * sub * patch)
    r0, c0, r1, c1 = box
    return (canvas / np.maximum(cover, 1e-300))[:, r0:r1, c0:c1]


def _matches(grid, ref_grid, k=3, seed=0):
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, ref_grid[0] * ref_grid[1], size=(*grid, k))
    positions[0, 0, 1] = -1  # a missing candidate
    weights = rng.random((*grid, k)).astype(np.float32)
    weights[0, 0, 1] = 0.0
    return positions, weights / weights.sum(-1, keepdims=True)


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("box", [(0, 0, 40, 48), (5, 7, 29, 33), (36, 40, 40, 48)])
def test_fold_equals_the_definition(periodic, box):
    rng = np.random.default_rng(1)
    reference = rng.random((3, 30, 26)).astype(np.float32)  # not a multiple of FACTOR: edge pixels
    ref_grid = (30 // FACTOR + 1 - PATCH + 1, 26 // FACTOR + 1 - PATCH + 1)
    latent = (10, 12)  # the output's latent grid: 40x48 pixels
    grid = latent if periodic else (latent[0] - PATCH + 1, latent[1] - PATCH + 1)
    positions, weights = _matches(grid, ref_grid)
    expect = _direct(reference, positions, weights, ref_grid[1], (0, 0), box, (40, 48), periodic)
    got = fold_matches(
        pad_reference(reference, FACTOR), positions, weights, ref_grid_w=ref_grid[1], factor=FACTOR, patch_size=PATCH, rho=RHO,
        query_origin=(0, 0), box=box, out_shape=(40, 48), periodic=periodic,
    )
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("periodic", [False, True])
def test_a_box_from_its_query_span_equals_the_whole(periodic):
    rng = np.random.default_rng(2)
    reference = rng.random((1, 44, 52)).astype(np.float32)
    ref_grid = (11 - PATCH + 1, 13 - PATCH + 1)
    latent = (10, 12)
    grid = latent if periodic else (latent[0] - PATCH + 1, latent[1] - PATCH + 1)
    positions, weights = _matches(grid, ref_grid, seed=3)
    options = dict(ref_grid_w=ref_grid[1], factor=FACTOR, patch_size=PATCH, rho=RHO, out_shape=(40, 48),
                   periodic=periodic)
    whole = fold_matches(pad_reference(reference, FACTOR), positions, weights, query_origin=(0, 0), box=(0, 0, 40, 48), **options)
    box = (13, 21, 27, 40)
    r0, r1 = query_span((13, 27), FACTOR, PATCH, grid[0], periodic=periodic)
    c0, c1 = query_span((21, 40), FACTOR, PATCH, grid[1], periodic=periodic)
    rows, cols = np.arange(r0, r1) % grid[0], np.arange(c0, c1) % grid[1]
    part = fold_matches(pad_reference(reference, FACTOR), positions[np.ix_(rows, cols)], weights[np.ix_(rows, cols)],
                        query_origin=(r0, c0), box=box, **options)
    np.testing.assert_allclose(part, whole[:, 13:27, 21:40], rtol=1e-6, atol=1e-7)


def test_matching_its_own_positions_returns_the_reference():
    rng = np.random.default_rng(4)
    reference = rng.random((3, 48, 64)).astype(np.float32)
    latent = (12, 16)
    grid = (latent[0] - PATCH + 1, latent[1] - PATCH + 1)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    positions = (rows * grid[1] + cols)[:, :, None]
    weights = np.ones(positions.shape, dtype=np.float32)
    got = fold_matches(
        pad_reference(reference, FACTOR), positions, weights, ref_grid_w=grid[1], factor=FACTOR, patch_size=PATCH, rho=RHO,
        query_origin=(0, 0), box=(0, 0, 48, 64), out_shape=(48, 64),
    )
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
