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

Two implementations of one sum: :func:`_fold_matches`, a loop compiled by numba (the CPU path; the
same function uncompiled is its plain-Python reading), and :func:`_fold_matches_torch`, vectorised
over queries for any torch device (the CUDA path, and the CPU path without numba). Both accumulate
in float64; they add the same terms in other orders (tests/core/test_torch_twins.py).
"""

from __future__ import annotations

import numpy as np
import torch

from gigasid.core.jit import numba  # None without numba: the slow path keeps the math
from gigasid.core.patches import periodic_axes, window_profile

Box = tuple[int, int, int, int]


def _fold_matches(reference, positions, weights, ref_grid_w, factor, window, query_r0, query_c0,
                  box_r0, box_c0, out, coverage, out_h, out_w, wrap_rows, wrap_cols):
    """Add every query's weighted reference pixel patches into ``out`` (h, w·C) over the box.

    ``reference`` (Hr, Wr·C), padded so that every patch lies inside; ``positions``/``weights``
    (n_r, n_c, k), query (a, b) being the global latent patch (query_r0 + a, query_c0 + b);
    ``window`` (fP,) the 1-D profile. Patch rows are split into at most two runs of columns that
    stay contiguous in the box (two where a periodic output wraps), so the inner loops run over
    contiguous slices and vectorise.
    """
    channels = out.shape[1] // coverage.shape[1]
    size = window.shape[0]
    box_h, box_w = coverage.shape
    seg_dx = np.empty(2, dtype=np.int64)  # first patch column of each run
    seg_ox = np.empty(2, dtype=np.int64)  # its box column
    seg_n = np.empty(2, dtype=np.int64)  # its length
    for a in range(positions.shape[0]):
        top = factor * (query_r0 + a)
        for b in range(positions.shape[1]):
            left = factor * (query_c0 + b)
            runs = 0
            dx = 0
            while dx < size:  # the patch's columns → runs of box columns
                x = left + dx
                if wrap_cols:
                    x = x % out_w
                length = size - dx
                if wrap_cols:
                    length = min(length, out_w - x)
                start, stop = max(x, box_c0), min(x + length, box_c0 + box_w)
                if stop > start:
                    seg_dx[runs] = dx + start - x
                    seg_ox[runs] = start - box_c0
                    seg_n[runs] = stop - start
                    runs += 1
                dx += length
            if runs == 0:
                continue
            for dy in range(size):
                y = top + dy
                if wrap_rows:
                    y = y % out_h
                oy = y - box_r0
                if oy < 0 or oy >= box_h:
                    continue
                wy = window[dy]
                cover = coverage[oy]
                for r in range(runs):
                    wins = window[seg_dx[r] : seg_dx[r] + seg_n[r]]
                    cov = cover[seg_ox[r] : seg_ox[r] + seg_n[r]]
                    for i in range(seg_n[r]):
                        cov[i] += wy * wins[i]
                for j in range(positions.shape[2]):
                    w = weights[a, b, j]
                    c = positions[a, b, j]
                    if c < 0 or w < 1e-8:  # below float32 round-off of the weights' sum
                        continue
                    ry = factor * (c // ref_grid_w) + dy
                    rx0 = factor * (c % ref_grid_w)
                    ref_row = reference[ry]
                    out_row = out[oy]
                    wwy = w * wy
                    for r in range(runs):
                        n = seg_n[r]
                        src = ref_row[(rx0 + seg_dx[r]) * channels : (rx0 + seg_dx[r] + n) * channels]
                        dst = out_row[seg_ox[r] * channels : (seg_ox[r] + n) * channels]
                        wins = window[seg_dx[r] : seg_dx[r] + n]
                        for i in range(n):
                            wx = wwy * wins[i]
                            for ch in range(channels):
                                dst[i * channels + ch] += wx * src[i * channels + ch]


if numba is not None:
    _fold_matches = numba.njit(nogil=True, cache=True, boundscheck=False)(_fold_matches)

# reference pixels gathered at once by the torch path (Q queries × k candidates × (f·P)² × C):
# ~128 MB of float64 per block
_TORCH_BLOCK_VALUES = 1 << 24


def _fold_matches_torch(reference, positions, weights, ref_grid_w, factor, window, query_r0, query_c0,
                        box, out_h, out_w, wrap_rows, wrap_cols):
    """:func:`_fold_matches` for torch tensors on any device, vectorised over the queries.

    ``reference`` (Hr, Wr, C) float32, ``positions``/``weights`` (n_r, n_c, k), ``window`` (fP,)
    float64, all on one device. Returns (out (h, w, C), coverage (h, w)), float64: the same terms
    as the loop, summed in another order (a block's weighted patches first, then scattered with
    ``index_add_``).
    """
    device = reference.device
    r0, c0, r1, c1 = box
    box_h, box_w = r1 - r0, c1 - c0
    channels = reference.shape[2]
    size = window.shape[0]
    n_r, n_c, k = positions.shape
    offsets = torch.arange(size, device=device)

    def targets(first: int, count: int, start: int, stop: int, length: int, periodic: bool):
        # (count, fP) box rows (or cols) of every query's patch pixels, and which lie in the box
        where = factor * (first + torch.arange(count, device=device))[:, None] + offsets[None, :]
        if periodic:
            where = where % length
        inside = (where >= start) & (where < stop)
        return (where - start).clamp(0, stop - start - 1), inside

    rows, row_in = targets(query_r0, n_r, r0, r1, out_h, wrap_rows)
    cols, col_in = targets(query_c0, n_c, c0, c1, out_w, wrap_cols)
    # coverage: every query's window, separable, over a product set of queries
    coverage = torch.zeros(box_h, box_w, dtype=torch.float64, device=device)
    row_cover = torch.zeros(box_h, dtype=torch.float64, device=device).index_add_(
        0, rows[row_in], window.expand(n_r, size)[row_in]
    )
    col_cover = torch.zeros(box_w, dtype=torch.float64, device=device).index_add_(
        0, cols[col_in], window.expand(n_c, size)[col_in]
    )
    coverage += torch.outer(row_cover, col_cover)
    out = torch.zeros(box_h * box_w, channels, dtype=torch.float64, device=device)
    w = weights.to(torch.float64)
    w = torch.where((positions >= 0) & (w >= 1e-8), w, 0.0)  # the loop skips the others
    cand = positions.clamp_min(0)
    ref_top = factor * torch.div(cand, ref_grid_w, rounding_mode="floor")
    ref_left = factor * (cand % ref_grid_w)
    window_2d = torch.outer(window, window)[:, :, None]  # (fP, fP, 1)
    queries = n_r * n_c
    block = max(1, _TORCH_BLOCK_VALUES // max(1, k * size * size * channels))
    for start in range(0, queries, block):
        stop = min(queries, start + block)
        a = torch.arange(start, stop, device=device) // n_c
        b = torch.arange(start, stop, device=device) % n_c
        tops, lefts, wq = ref_top.view(-1, k)[start:stop], ref_left.view(-1, k)[start:stop], w.view(-1, k)[start:stop]
        ref_rows = tops[:, :, None, None] + offsets[None, None, :, None]  # (q, k, fP, 1)
        ref_cols = lefts[:, :, None, None] + offsets[None, None, None, :]  # (q, k, 1, fP)
        patches = reference[ref_rows, ref_cols].to(torch.float64)  # (q, k, fP, fP, C)
        blended = (patches * wq[:, :, None, None, None]).sum(1) * window_2d  # (q, fP, fP, C)
        target = rows[a][:, :, None] * box_w + cols[b][:, None, :]  # (q, fP, fP)
        keep = row_in[a][:, :, None] & col_in[b][:, None, :]
        out.index_add_(0, target[keep], blended[keep])
    return out.view(box_h, box_w, channels), coverage


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


def pad_reference(reference: np.ndarray, factor: int) -> np.ndarray:
    """The finest pixel level (C, H, W) as the fold reads it: (H', W', C) float32, padded with edge
    pixels to whole cells (as a partial last block encodes), so every matched patch lies inside.
    Make it once per reference and pass it to :func:`fold_matches` for every box."""
    channels, height, width = reference.shape
    padded = np.empty((-(-height // factor) * factor, -(-width // factor) * factor, channels), dtype=np.float32)
    padded[:height, :width] = reference.transpose(1, 2, 0)  # one copy, no index arrays
    padded[:height, width:] = padded[:height, width - 1 : width]
    padded[height:] = padded[height - 1 : height]
    return padded


def fold_matches(
    padded_reference: np.ndarray,
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
    periodic: bool | tuple[bool, bool] = False,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """The (C, h, w) pixels of ``box`` from the matches of the queries touching it.

    ``padded_reference`` is :func:`pad_reference` of the finest pixel level; ``positions``
    (n_r, n_c, k) int64 reference latent patch indices (row · ``ref_grid_w`` + col, −1 = none) of
    the queries starting at global latent patch ``query_origin``, ``weights`` their weights;
    ``out_shape`` the pixel canvas (f × the latent grid) a periodic output wraps on (``periodic``:
    both axes, or (rows, columns)). Pixels no
    query touches stay 0. ``device``: where the fold runs (None: the CPU); the numba loop on the
    CPU, the torch code elsewhere or without numba. The result is a CPU array either way.
    """
    r0, c0, r1, c1 = box
    wrap_rows, wrap_cols = periodic_axes(periodic)
    device = torch.device(device if device is not None else "cpu")
    if numba is None or device.type != "cpu":
        out, coverage = _fold_matches_torch(
            torch.as_tensor(padded_reference, device=device),
            torch.as_tensor(np.asarray(positions, dtype=np.int64), device=device),
            torch.as_tensor(np.asarray(weights, dtype=np.float32), device=device),
            int(ref_grid_w), int(factor), window_profile(factor * patch_size, rho).to(device),
            int(query_origin[0]), int(query_origin[1]), (int(r0), int(c0), int(r1), int(c1)),
            int(out_shape[0]), int(out_shape[1]), wrap_rows, wrap_cols,
        )
        out = out / coverage.clamp_min(1e-300)[:, :, None]
        return out.permute(2, 0, 1).to(torch.float32).cpu().numpy()
    window = window_profile(factor * patch_size, rho).numpy()
    channels = padded_reference.shape[2]
    out = np.zeros((r1 - r0, (c1 - c0) * channels), dtype=np.float64)
    coverage = np.zeros((r1 - r0, c1 - c0), dtype=np.float64)
    _fold_matches(
        padded_reference.reshape(padded_reference.shape[0], -1),
        np.ascontiguousarray(positions, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float32),
        int(ref_grid_w), int(factor), window, int(query_origin[0]), int(query_origin[1]),
        int(r0), int(c0), out, coverage, int(out_shape[0]), int(out_shape[1]), wrap_rows, wrap_cols,
    )
    out = out.reshape(r1 - r0, c1 - c0, channels) / np.maximum(coverage, 1e-300)[:, :, None]
    return out.transpose(2, 0, 1).astype(np.float32)
