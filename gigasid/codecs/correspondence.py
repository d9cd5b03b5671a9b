"""Correspondence decode: the pixel output built from the reference's own pixels (DESIGN.md §6).

At the last step of the finest latent scale, x̂ is, per query patch, a weighted average of
reference latent patches at known positions. Latent cell (i, j) stands for the pixel block
[f·i, f·i + f) × [f·j, f·j + f), so the same weights applied to the reference's f·P × f·P pixel
patches at the same positions, folded with the Gaussian window scaled to pixels (the latent
window's footprint, ``linspace(-1, 1, f·P)`` with the same ρ) and divided by the folded window sum,
give a pixel image made of exact reference pixels — sharp, with no codec in the way, and
independent of which encoder produced the latents.

The fold runs for one pixel box at a time from the matches of the queries whose patches touch it,
so the output is tiled exactly like the rest of the job. Plain numpy in, numpy out: the callers
gather the matches (``ImageDenoiser.matches``) and read the reference.
"""

from __future__ import annotations

import numpy as np

from gigasid.core.patches import window_profile

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the slow path keeps the math
    numba = None

Box = tuple[int, int, int, int]


def _fold_matches(reference, positions, weights, ref_grid_w, factor, window, query_r0, query_c0,
                  box_r0, box_c0, out, coverage, out_h, out_w, periodic):
    """Add every query's weighted reference pixel patches into ``out`` (h, w, C) over the box.

    ``reference`` (Hr, Wr, C); ``positions``/``weights`` (n_r, n_c, k), query (a, b) being the
    global latent patch (query_r0 + a, query_c0 + b); ``window`` (fP,) the 1-D profile.
    """
    ref_h, ref_w, channels = reference.shape
    size = window.shape[0]
    box_h, box_w = out.shape[0], out.shape[1]
    oy = np.empty(size, dtype=np.int64)
    ox = np.empty(size, dtype=np.int64)
    for a in range(positions.shape[0]):
        top = factor * (query_r0 + a)
        for d in range(size):  # patch row → box row, or -1 when it falls outside the box
            y = top + d
            if periodic:
                y = y % out_h
            y -= box_r0
            oy[d] = y if 0 <= y < box_h else -1
        for b in range(positions.shape[1]):
            left = factor * (query_c0 + b)
            for d in range(size):
                x = left + d
                if periodic:
                    x = x % out_w
                x -= box_c0
                ox[d] = x if 0 <= x < box_w else -1
            for dy in range(size):
                if oy[dy] < 0:
                    continue
                for dx in range(size):
                    if ox[dx] >= 0:
                        coverage[oy[dy], ox[dx]] += window[dy] * window[dx]
            for j in range(positions.shape[2]):
                w = weights[a, b, j]
                c = positions[a, b, j]
                if c < 0 or w < 1e-8:  # below float32 round-off of the weights' sum
                    continue
                ref_top = factor * (c // ref_grid_w)
                ref_left = factor * (c % ref_grid_w)
                for dy in range(size):
                    if oy[dy] < 0:
                        continue
                    ry = min(ref_top + dy, ref_h - 1)  # a partial last block: edge pixels
                    wy = w * window[dy]
                    for dx in range(size):
                        if ox[dx] < 0:
                            continue
                        rx = min(ref_left + dx, ref_w - 1)
                        wyx = wy * window[dx]
                        for ch in range(channels):
                            out[oy[dy], ox[dx], ch] += wyx * reference[ry, rx, ch]


if numba is not None:
    _fold_matches = numba.njit(cache=True, boundscheck=False)(_fold_matches)


def query_span(box: tuple[int, int], factor: int, patch_size: int, grid: int, *, periodic: bool) -> tuple[int, int]:
    """The latent query rows (or cols) whose pixel patches touch pixel rows [start, stop).

    Non-periodic: clipped to the patch grid [0, grid). Periodic: an unclipped range (the caller
    wraps it), at most the whole grid.
    """
    start, stop = box
    first = start // factor - patch_size + 1
    last = -(-stop // factor)  # exclusive
    if periodic:
        if last - first >= grid:
            return 0, grid
        return first, last
    return max(0, first), min(grid, last)


def fold_matches(
    reference: np.ndarray,
    positions: np.ndarray,
    weights: np.ndarray,
    *,
    ref_grid_w: int,
    factor: int,
    patch_size: int,
    rho: float,
    query_origin: tuple[int, int],
    box: Box,
    out_shape: tuple[int, int],
    periodic: bool = False,
) -> np.ndarray:
    """The (C, h, w) pixels of ``box`` from the matches of the queries touching it.

    ``reference`` (C, Hr, Wr) float32, the finest pixel level; ``positions`` (n_r, n_c, k) int64
    reference latent patch indices (row · ``ref_grid_w`` + col, −1 = none) of the queries starting
    at global latent patch ``query_origin``, ``weights`` their weights; ``out_shape`` the pixel
    canvas (f × the latent grid) a periodic output wraps on. Pixels no query touches stay 0.
    """
    window = window_profile(factor * patch_size, rho).numpy()
    r0, c0, r1, c1 = box
    channels = reference.shape[0]
    out = np.zeros((r1 - r0, c1 - c0, channels), dtype=np.float64)
    coverage = np.zeros((r1 - r0, c1 - c0), dtype=np.float64)
    _fold_matches(
        np.ascontiguousarray(reference.transpose(1, 2, 0), dtype=np.float32),
        np.ascontiguousarray(positions, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float32),
        int(ref_grid_w), int(factor), window, int(query_origin[0]), int(query_origin[1]),
        int(r0), int(c0), out, coverage, int(out_shape[0]), int(out_shape[1]), bool(periodic),
    )
    out /= np.maximum(coverage, 1e-300)[:, :, None]
    return out.transpose(2, 0, 1).astype(np.float32)
