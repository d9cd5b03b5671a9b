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

import numpy as np

from gigasid.core.jit import available, numba, parallel_kernels  # noqa: F401 - available() is this module's API too

if numba is not None:

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False, inline="always")
    def _logits(source, x0, src_w, reference, ref_w, size, run, lanes, starts, ref_sq, count, alpha, scale,
                partial, logits):
        """-‖x - alpha y_j‖² / (2 sigma²) without ‖x‖² (constant over the candidates) for the query
        patch at flat offset x0 and the ``count`` candidates at offsets ``starts``.

        Each patch row is ``run`` contiguous values, read as ``lanes`` (run rounded up to a whole
        number of vector registers; the arrays are padded so the over-read stays inside them):
        per-lane partial sums over the rows, one reduction over the first ``run`` lanes at the
        end. Measured 2x faster than a reduction per row, whose odd-length tail ran scalar.
        """
        partial[:count] = 0.0
        for dy in range(size):
            x_row = source[x0 + dy * src_w : x0 + dy * src_w + lanes]
            for j in range(count):
                y_row = reference[starts[j] + dy * ref_w : starts[j] + dy * ref_w + lanes]
                acc = partial[j]
                for i in range(lanes):
                    acc[i] += x_row[i] * y_row[i]
        for j in range(count):
            dot = np.float32(0.0)
            acc = partial[j]
            for i in range(run):
                dot += acc[i]
            logits[j] = -(alpha * alpha * ref_sq[j] - 2.0 * alpha * dot) * scale

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False, inline="always")
    def _softmax_weights(source, x0, src_w, reference, ref_w, ref_sq, candidates, query, alpha, scale, size, run,
                         lanes, starts, norms, slots, partial, weights):
        """The softmax weights of query ``query``'s valid candidates (patch at flat offset x0) into
        ``weights[:count]``, their offsets into ``starts`` and their columns in ``candidates`` into
        ``slots``; returns ``count`` (0: no candidate, or alpha = 0). One code for the fold and
        for :func:`_weights_rows`, so both see the same weights."""
        channels = run // size
        grid_w_ref = ref_w // channels - size + 1
        count = 0
        for j in range(candidates.shape[1]):
            c = candidates[query, j]
            if c < 0 or alpha == 0.0:
                continue
            top = c // grid_w_ref
            starts[count] = top * ref_w + (c - top * grid_w_ref) * channels
            norms[count] = ref_sq[c]
            slots[count] = j
            count += 1
        if count == 0:
            return 0
        _logits(source, x0, src_w, reference, ref_w, size, run, lanes, starts, norms, count, alpha, scale,
                partial, weights)
        best = weights[0]
        for j in range(1, count):
            best = max(best, weights[j])
        total = 0.0
        for j in range(count):
            weights[j] = math.exp(weights[j] - best)
            total += weights[j]
        for j in range(count):
            weights[j] /= total
        return count

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    def _fold_rows(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                   row0, row1, grid_w, run, out, out_w):
        """Denoise and fold query rows [row0, row1) into ``out`` (rows row0.. of the canvas)."""
        lanes = window.shape[1]
        if lanes == SPECIALISED_LANES:  # the body inlined with a compile-time row length
            _fold_rows_body(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                            row0, row1, grid_w, run, out, out_w, SPECIALISED_LANES)
        else:
            _fold_rows_body(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                            row0, row1, grid_w, run, out, out_w, lanes)

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False, inline="always")
    def _fold_rows_body(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                        row0, row1, grid_w, run, out, out_w, lanes):
        """:func:`_fold_rows` for rows read as ``lanes`` values.

        Images are flat (H, W, C) arrays here (``*_w`` = W·C, the row length), so one patch row is
        ``run`` = P·C contiguous values: unit-stride loops the compiler vectorises. ``window`` and
        ``mean`` rows are ``lanes`` long, zero past ``run``: the padding lanes add exact zeros.
        """
        size = window.shape[0]
        channels = run // size
        k = candidates.shape[1]
        scale = 1.0 / (2.0 * sigma * sigma)
        weights = np.empty(k, dtype=np.float64)
        starts = np.empty(k, dtype=np.int64)
        norms = np.empty(k, dtype=np.float32)
        slots = np.empty(k, dtype=np.int64)
        partial = np.empty((k, lanes), dtype=np.float32)
        patch = np.empty(size * lanes, dtype=np.float32)
        for row in range(row0, row1):
            local = row - row0
            for col in range(grid_w):
                count = _softmax_weights(source, row * src_w + col * channels, src_w, reference, ref_w, ref_sq,
                                         candidates, row * grid_w + col, alpha, scale, size, run, lanes, starts,
                                         norms, slots, partial, weights)
                o0 = local * out_w + col * channels
                if count == 0:  # no candidate (or alpha = 0): the dataset mean
                    for dy in range(size):
                        o_row = out[o0 + dy * out_w : o0 + dy * out_w + lanes]
                        m_row = mean[dy * lanes : dy * lanes + lanes]
                        w_row = window[dy]
                        for i in range(lanes):
                            o_row[i] += w_row[i] * m_row[i]
                    continue
                # the weighted patch in a small float32 buffer (cache-resident), then one
                # window-weighted add into the float64 canvas: k times less canvas traffic
                first = True
                for j in range(count):
                    w = np.float32(weights[j])
                    if w < 1e-8:  # below float32 round-off of the sum: adds nothing
                        continue
                    for dy in range(size):
                        y_row = reference[starts[j] + dy * ref_w : starts[j] + dy * ref_w + lanes]
                        p_row = patch[dy * lanes : dy * lanes + lanes]
                        if first:
                            for i in range(lanes):
                                p_row[i] = w * y_row[i]
                        else:
                            for i in range(lanes):
                                p_row[i] += w * y_row[i]
                    first = False
                for dy in range(size):
                    o_row = out[o0 + dy * out_w : o0 + dy * out_w + lanes]
                    p_row = patch[dy * lanes : dy * lanes + lanes]
                    w_row = window[dy]
                    for i in range(lanes):
                        o_row[i] += w_row[i] * p_row[i]


    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    def _weights_rows(source, src_w, reference, ref_w, ref_sq, candidates, size, channels, lanes, alpha, sigma,
                      grid_w, out):
        """The softmax weights of every query's candidates: what the fold averages with, by the
        same :func:`_softmax_weights`."""
        run = size * channels
        k = candidates.shape[1]
        scale = 1.0 / (2.0 * sigma * sigma)
        weights = np.empty(k, dtype=np.float64)
        starts = np.empty(k, dtype=np.int64)
        norms = np.empty(k, dtype=np.float32)
        slots = np.empty(k, dtype=np.int64)
        partial = np.empty((k, lanes), dtype=np.float32)
        for query in range(candidates.shape[0]):
            out[query, :] = np.float32(0.0)
            row, col = query // grid_w, query % grid_w
            count = _softmax_weights(source, row * src_w + col * channels, src_w, reference, ref_w, ref_sq,
                                     candidates, query, alpha, scale, size, run, lanes, starts, norms, slots,
                                     partial, weights)
            for j in range(count):
                out[query, slots[j]] = np.float32(weights[j])

    @numba.njit(nogil=True, cache=True, inline="always")
    def _merge_row(canvas, buffers, bounds, size, y, total):
        """Canvas row ``y`` of every channel (canvas (C, H, W)) plus the pieces' sums there.
        Pieces overlap by P-1 rows: they are added in piece order into ``total`` (zeroed first),
        then ``total`` to the canvas, so every pixel's sum is the same in any row order."""
        channels, height, width = canvas.shape
        row_len = width * channels
        total[:] = 0.0
        for piece in range(buffers.shape[0]):
            start = bounds[piece]
            rows = min(bounds[piece + 1] - start + size - 1, height - start)
            if start <= y < start + rows:
                offset = (y - start) * row_len
                for i in range(row_len):
                    total[i] += buffers[piece, offset + i]
        for x in range(width):  # (W, C) → (C, W): the canvas is channel-first
            for c in range(channels):
                canvas[c, y, x] += total[x * channels + c]

    @numba.njit(nogil=True, parallel=True, cache=True)
    def _fold_parallel(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                       grid_h, grid_w, run, canvas, bounds, buffers):
        row_len = canvas.shape[2] * canvas.shape[0]
        for piece in numba.prange(len(bounds) - 1):
            _fold_rows(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                       bounds[piece], bounds[piece + 1], grid_w, run, buffers[piece], row_len)
        for y in numba.prange(canvas.shape[1]):
            _merge_row(canvas, buffers, bounds, window.shape[0], y, np.empty(row_len, dtype=np.float64))

    @numba.njit(nogil=True, cache=True)
    def _fold_serial(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                     grid_h, grid_w, run, canvas, bounds, buffers):
        # the same pieces and the same per-pixel sums as _fold_parallel: the same bits
        row_len = canvas.shape[2] * canvas.shape[0]
        for piece in range(len(bounds) - 1):
            _fold_rows(source, src_w, reference, ref_w, ref_sq, candidates, window, mean, alpha, sigma,
                       bounds[piece], bounds[piece + 1], grid_w, run, buffers[piece], row_len)
        total = np.empty(row_len, dtype=np.float64)
        for y in range(canvas.shape[1]):
            _merge_row(canvas, buffers, bounds, window.shape[0], y, total)


LANE_FLOATS = 16  # patch rows are read in whole registers: one AVX-512 register, two AVX2 ones
# the row length (in lanes) the fold is also compiled for as a constant: P = 15 in RGB, the
# default. With a constant, LLVM unrolls the row loops exactly: measured 55 → 46 ms per fold at
# 186x248, with the same bits as the generic loop
SPECIALISED_LANES = 48


def _lanes_for(run: int) -> int:
    """``run`` values rounded up to whole registers: how long a patch row is read."""
    return -(-run // LANE_FLOATS) * LANE_FLOATS


def _padded_flat(image_hwc: np.ndarray, extra: int) -> np.ndarray:
    """A flat float32 copy of an (H, W, C) image with ``extra`` zeros after it: a patch row read
    as whole registers may run past the last pixel."""
    flat = np.zeros(image_hwc.size + extra, dtype=np.float32)
    flat[: image_hwc.size] = image_hwc.reshape(-1)
    return flat


def _padded_runs(rows: np.ndarray, lanes: int) -> np.ndarray:
    """(P, run) patch rows → (P, lanes), zero past ``run``."""
    out = np.zeros((rows.shape[0], lanes), dtype=np.float32)
    out[:, : rows.shape[1]] = rows
    return out


class CompiledKnnFold:
    """The kernel bound to one reference: its padded (H, W, C) copy and mean patch are made once."""

    def __init__(self, reference: np.ndarray, ref_sq: np.ndarray, mean_patch: np.ndarray, patch_size: int):
        channels = reference.shape[0]
        self.channels, self.patch_size = channels, patch_size
        self.run = patch_size * channels
        self.lanes = _lanes_for(self.run)
        self.pad = self.lanes - self.run
        self.reference = _padded_flat(reference.transpose(1, 2, 0), self.pad)  # (H, W, C) + padding
        self.row_len = reference.shape[2] * channels
        self.ref_sq = np.ascontiguousarray(ref_sq, dtype=np.float32)
        # mean patch (C, P, P) → P runs of P·C values, the kernel's patch-row layout
        runs = mean_patch.reshape(channels, patch_size, patch_size).transpose(1, 2, 0).reshape(patch_size, -1)
        self.mean = _padded_runs(runs, self.lanes).reshape(-1)

    def __call__(self, source, candidates, window, alpha, sigma, grid_h, grid_w, canvas) -> None:
        """Add the window-weighted knn estimates of every patch of ``source`` (C, H', W') into
        ``canvas`` (C, H', W'); ``candidates`` (grid_h·grid_w, k) int64 or None (alpha = 0)."""
        if candidates is None:
            candidates = np.full((grid_h * grid_w, 1), -1, dtype=np.int64)
        channels = self.channels
        source_flat = _padded_flat(source.transpose(1, 2, 0), self.pad)
        window_runs = _padded_runs(np.repeat(window, channels, axis=1), self.lanes)
        width = canvas.shape[2]
        # float64 accumulation: a pixel's sum must not depend on where the kernel split the rows
        # between threads (nor on the crop a tile passes), or near-tied candidates flip later
        if canvas.dtype != np.float64 or not canvas.flags.c_contiguous:
            raise ValueError("the compiled fold adds into a C-contiguous float64 canvas")
        # a fixed number of row pieces (not one per thread): the split, and so every sum, is the
        # same whatever the thread count
        pieces = max(1, min(grid_h, 8))
        bounds = np.linspace(0, grid_h, pieces + 1).astype(np.int64)
        span = grid_h // pieces + 2 + self.patch_size - 1
        buffers = np.zeros((pieces, span * width * channels + self.pad), dtype=np.float64)
        # numba's workqueue layer must not be entered from two threads at once (Dask's threads
        # scheduler): concurrent task threads and single-thread budgets take the serial twin
        serial = not parallel_kernels()
        kernel = _fold_serial if serial else _fold_parallel
        kernel(
            source_flat, width * channels, self.reference, self.row_len, self.ref_sq,
            candidates, window_runs, self.mean, float(alpha), float(sigma), grid_h, grid_w, self.run, canvas,
            bounds, buffers,
        )

    def weights(self, source, candidates, alpha, sigma, grid_h, grid_w) -> np.ndarray:
        """(grid_h·grid_w, k) float32 softmax weights of ``candidates`` for the patches of
        ``source`` (C, H', W'), computed as the fold computes them."""
        channels = self.channels
        source_flat = _padded_flat(source.transpose(1, 2, 0), self.pad)
        width = source.shape[2]
        out = np.empty(candidates.shape, dtype=np.float32)  # the kernel writes every entry
        _weights_rows(
            source_flat, width * channels, self.reference, self.row_len, self.ref_sq,
            candidates, self.patch_size, channels, self.lanes, float(alpha), float(sigma), grid_w, out,
        )
        return out
