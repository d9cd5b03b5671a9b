"""CPU fast path of the knn image denoiser: distances, weights, output and fold in one pass.

The torch path (``KnnDenoiser`` inside ``ImageDenoiser``) materialises, per step, the unfolded
queries, the gathered candidate patches (k× the queries), the denoised patches and their
transpose for ``F.fold``: about 2 GB of memory traffic per step for a 186×248 image. This kernel
computes exactly the same quantity — for every query, ‖x - alpha y_j‖² over its candidates read
straight from the reference, the softmax weights, and the window-weighted sum folded into the
canvas — reading the image and the (cache-resident) reference in place. It is compiled by numba
on first use (cached on disk) and used on CPU tensors only; the torch path stays the reference
implementation and the CUDA path, and a test holds the two equal.
"""

from __future__ import annotations

import math
import threading

import numpy as np

try:  # optional: without numba the torch path runs
    import numba

    numba.config.THREADING_LAYER = "workqueue"  # torch and faiss already bring an OpenMP each
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None


def available() -> bool:
    return numba is not None


if numba is not None:

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False, inline="always")
    def _logit(source, x0, src_w, reference, y0, ref_w, size, run, alpha, ref_sq, scale):
        """-‖x - alpha y‖² / (2 sigma²) without ‖x‖² (constant over the candidates) for the
        patches starting at flat offsets x0 (query) and y0 (candidate)."""
        dot = np.float32(0.0)
        for dy in range(size):
            # slices, not flat index arithmetic: numba then vectorises the loop (measured 8x
            # faster here)
            x_row = source[x0 + dy * src_w : x0 + dy * src_w + run]
            y_row = reference[y0 + dy * ref_w : y0 + dy * ref_w + run]
            for i in range(run):
                dot += x_row[i] * y_row[i]
        return -(alpha * alpha * ref_sq - 2.0 * alpha * dot) * scale

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    def _fold_rows(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                   row0, row1, grid_w, out, out_w):
        """Denoise and fold query rows [row0, row1) into ``out`` (rows row0.. of the canvas).

        Images are flat (H, W, C) arrays here (``*_w`` = W·C, the row length), so one patch row is
        ``run`` = P·C contiguous values: unit-stride loops the compiler vectorises.
        """
        size = window.shape[0]
        run = window.shape[1]
        channels = run // size
        grid_w_ref = ref_w // channels - size + 1
        k = candidates.shape[1]
        scale = 1.0 / (2.0 * sigma * sigma)
        logits = np.empty(k, dtype=np.float64)
        starts = np.empty(k, dtype=np.int64)
        patch = np.empty(size * run, dtype=np.float32)
        for row in range(row0, row1):
            local = row - row0
            for col in range(grid_w):
                query = row * grid_w + col
                x0 = row * src_w + col * channels
                count = 0
                for j in range(k):
                    c = candidates[query, j]
                    if c < 0 or alpha == 0.0:
                        continue
                    top = c // grid_w_ref
                    y0 = top * ref_w + (c - top * grid_w_ref) * channels
                    logits[count] = _logit(source, x0, src_w, reference, y0, ref_w, size, run, alpha,
                                           ref_sq[c], scale)
                    starts[count] = y0
                    count += 1
                o0 = local * out_w + col * channels
                if count == 0:  # no candidate (or alpha = 0): the dataset mean
                    for dy in range(size):
                        o_row = out[o0 + dy * out_w : o0 + dy * out_w + run]
                        m_row = mean[dy * run : dy * run + run]
                        w_row = window[dy]
                        for i in range(run):
                            o_row[i] += w_row[i] * m_row[i]
                    continue
                best = logits[0]
                for j in range(1, count):
                    best = max(best, logits[j])
                total = 0.0
                for j in range(count):
                    logits[j] = math.exp(logits[j] - best)
                    total += logits[j]
                # the weighted patch in a small float32 buffer (cache-resident), then one
                # window-weighted add into the float64 canvas: k times less canvas traffic
                first = True
                for j in range(count):
                    w = np.float32(logits[j] / total)
                    if w < 1e-8:  # below float32 round-off of the sum: adds nothing
                        continue
                    for dy in range(size):
                        y_row = reference[starts[j] + dy * ref_w : starts[j] + dy * ref_w + run]
                        p_row = patch[dy * run : dy * run + run]
                        if first:
                            for i in range(run):
                                p_row[i] = w * y_row[i]
                        else:
                            for i in range(run):
                                p_row[i] += w * y_row[i]
                    first = False
                for dy in range(size):
                    o_row = out[o0 + dy * out_w : o0 + dy * out_w + run]
                    p_row = patch[dy * run : dy * run + run]
                    w_row = window[dy]
                    for i in range(run):
                        o_row[i] += w_row[i] * p_row[i]


    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    def _weights_rows(source, src_w, reference, ref_w, ref_sq, candidates, size, channels, alpha, sigma,
                      grid_w, out):
        """The softmax weights of every query's candidates (what the fold averages with): the
        same dot products, in the same order, as :func:`_fold_rows`."""
        run = size * channels
        grid_w_ref = ref_w // channels - size + 1
        k = candidates.shape[1]
        scale = 1.0 / (2.0 * sigma * sigma)
        logits = np.empty(k, dtype=np.float64)
        for query in range(candidates.shape[0]):
            row, col = query // grid_w, query % grid_w
            x0 = row * src_w + col * channels
            best = -np.inf
            for j in range(k):
                c = candidates[query, j]
                if c < 0:
                    logits[j] = -np.inf
                    continue
                top = c // grid_w_ref
                y0 = top * ref_w + (c - top * grid_w_ref) * channels
                logits[j] = _logit(source, x0, src_w, reference, y0, ref_w, size, run, alpha, ref_sq[c], scale)
                best = max(best, logits[j])
            total = 0.0
            for j in range(k):
                logits[j] = 0.0 if logits[j] == -np.inf else math.exp(logits[j] - best)
                total += logits[j]
            for j in range(k):
                out[query, j] = np.float32(logits[j] / total) if total > 0.0 else np.float32(0.0)

    @numba.njit(nogil=True, cache=True)
    def _merge(canvas, buffers, bounds, size):
        """Pieces overlap by P-1 rows: add them in a fixed order, so the result is deterministic."""
        height, row_len = canvas.shape
        for piece in range(buffers.shape[0]):
            start = bounds[piece]
            rows = min(bounds[piece + 1] - start + size - 1, height - start)
            canvas[start : start + rows] += buffers[piece, : rows * row_len].reshape((rows, row_len))

    @numba.njit(nogil=True, parallel=True, cache=True)
    def _fold_parallel(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                       grid_h, grid_w, canvas, bounds, buffers):
        for piece in numba.prange(len(bounds) - 1):
            _fold_rows(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                       bounds[piece], bounds[piece + 1], grid_w, buffers[piece], canvas.shape[1])
        _merge(canvas, buffers, bounds, window.shape[0])

    @numba.njit(nogil=True, cache=True)
    def _fold_serial(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                     grid_h, grid_w, canvas, bounds, buffers):
        # the same pieces in the same order as _fold_parallel: the same sums, bit for bit
        for piece in range(len(bounds) - 1):
            _fold_rows(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                       bounds[piece], bounds[piece + 1], grid_w, buffers[piece], canvas.shape[1])
        _merge(canvas, buffers, bounds, window.shape[0])


class CompiledKnnFold:
    """The kernel bound to one reference: its (H, W, C) copy and mean patch are made once."""

    def __init__(self, reference: np.ndarray, ref_sq: np.ndarray, mean_patch: np.ndarray, patch_size: int):
        channels = reference.shape[0]
        self.channels, self.patch_size = channels, patch_size
        self.reference = np.ascontiguousarray(reference.transpose(1, 2, 0))  # (H, W, C)
        self.row_len = self.reference.shape[1] * channels
        self.ref_sq = np.ascontiguousarray(ref_sq, dtype=np.float32)
        # mean patch (C, P, P) → P runs of P·C values, the kernel's patch-row layout
        runs = mean_patch.reshape(channels, patch_size, patch_size).transpose(1, 2, 0)
        self.mean = np.ascontiguousarray(runs.reshape(-1), dtype=np.float32)

    def __call__(self, source, candidates, window, alpha, sigma, grid_h, grid_w, canvas) -> None:
        """Add the window-weighted knn estimates of every patch of ``source`` (C, H', W') into
        ``canvas`` (C, H', W'); ``candidates`` (grid_h·grid_w, k) int64 or None (alpha = 0)."""
        if candidates is None:
            candidates = np.full((grid_h * grid_w, 1), -1, dtype=np.int64)
        channels = self.channels
        source_hwc = np.ascontiguousarray(source.transpose(1, 2, 0))
        window_runs = np.ascontiguousarray(np.repeat(window, channels, axis=1), dtype=np.float32)
        height, width = canvas.shape[1:]
        # float64 accumulation: a pixel's sum must not depend on where the kernel split the rows
        # between threads (nor on the crop a tile passes), or near-tied candidates flip later
        canvas_hwc = np.zeros((height, width * channels), dtype=np.float64)
        # a fixed number of row pieces (not one per thread): the split, and so every sum, is the
        # same whatever the thread count
        pieces = max(1, min(grid_h, 8))
        bounds = np.linspace(0, grid_h, pieces + 1).astype(np.int64)
        span = grid_h // pieces + 2 + self.patch_size - 1
        buffers = np.zeros((pieces, span * width * channels), dtype=np.float64)
        # numba's workqueue layer must not be entered from two threads at once (Dask's threads
        # scheduler): worker threads and single-thread budgets take the serial twin
        serial = numba.get_num_threads() == 1 or threading.current_thread() is not threading.main_thread()
        kernel = _fold_serial if serial else _fold_parallel
        kernel(
            source_hwc.reshape(-1), width * channels, self.reference.reshape(-1), self.row_len, self.ref_sq,
            candidates, window_runs, self.mean, float(alpha), float(sigma), grid_h, grid_w, canvas_hwc,
            bounds, buffers,
        )
        canvas += canvas_hwc.reshape(height, width, channels).transpose(2, 0, 1)

    def weights(self, source, candidates, alpha, sigma, grid_h, grid_w) -> np.ndarray:
        """(grid_h·grid_w, k) float32 softmax weights of ``candidates`` for the patches of
        ``source`` (C, H', W'), computed as the fold computes them."""
        channels = self.channels
        source_hwc = np.ascontiguousarray(source.transpose(1, 2, 0))
        width = source.shape[2]
        out = np.zeros(candidates.shape, dtype=np.float32)
        _weights_rows(
            source_hwc.reshape(-1), width * channels, self.reference.reshape(-1), self.row_len, self.ref_sq,
            candidates, self.patch_size, channels, float(alpha), float(sigma), grid_w, out,
        )
        return out
