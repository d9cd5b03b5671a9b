"""Closed-form patch denoisers: the optimal denoiser of a finite patch dataset (paper Eq. 2).

For a noisy patch x at noise level (alpha, sigma) and dataset patches y_j,

    D(x) = Σ_j w_j y_j,   w = softmax_j( -‖x - alpha y_j‖² / (2 sigma²) ).

‖x‖² is the same for every j and drops out of the softmax, leaving the matmul form
softmax((2 alpha x·y_j - alpha² ‖y_j‖²) / (2 sigma²)). At alpha = 0 every weight is equal and the
answer is the dataset mean. Every backend here computes that same quantity on (M, D) patch rows;
they differ in how:

* ``exact``  chunked matmul + softmax over the whole dataset; the (M, N) score matrix is never
  held whole.
* ``fused``  PyTorch's scaled-dot-product attention through the homogeneous-coordinate trick
  q = [x, 1], k = [alpha y, -½ alpha² ‖y‖²], v = y, scale 1/sigma².
* ``knn``    exact weights over a given set of candidate positions per query (from ``index/``),
  with the candidate patches read straight from the reference image by position.

Both dense backends work on mean-centred patches: distances are translation invariant, and
centring keeps the dot products small, which matters when they are computed in bfloat16.
Nothing here knows about images beyond :func:`gather_patches`; ``image_denoiser`` unfolds and
folds around these.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from gigasid.core import knn_fold
from gigasid.core.patches import gather_patches

BackendName = Literal["exact", "fused", "knn"]


class PatchDenoiser(Protocol):
    """The contract every backend meets."""

    #: whether __call__ needs ``candidates`` (positions into the reference patch grid)
    needs_candidates: bool
    #: how many queries one call handles efficiently; callers feed it pieces of this size
    chunk: int
    #: where its dataset lives; queries must be there too (``ImageDenoiser`` moves them)
    device: torch.device

    def to(self, device: torch.device | str) -> PatchDenoiser:
        """Move the dataset to ``device`` (in place) and return self."""

    def __call__(
        self, queries: torch.Tensor, alpha: float, sigma: float, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(M, D) noisy patch rows → (M, D) clean estimates, float32."""


class ExactDenoiser:
    """Kernel regression over the full (N, D) dataset, ``chunk`` queries at a time.

    The elementwise passes over each (chunk, N) block of logits are memory-bound: 128 queries
    (21 MB of logits at N = 40 248) measured ~5 % faster per query than 256, and 256 ~25 % faster
    than 1024, on this 2-core CPU (64 is slower again: the matmuls get too thin).
    """

    needs_candidates = False

    def __init__(
        self,
        dataset: torch.Tensor,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        chunk: int = 128,
        device: torch.device | str | None = None,
    ):
        accumulate = torch.float64 if compute_dtype == torch.float64 else torch.float32
        self.mean = dataset.to(accumulate).mean(0)
        centred = dataset.to(accumulate) - self.mean
        self.centred = centred.to(compute_dtype).contiguous()
        # the score matmul reads the dataset as a (D, N) matrix: contiguous that way it runs
        # ~20 % faster on CPU than through the transposed view (measured, bfloat16, N = 40 248)
        self.centred_t = self.centred.T.contiguous()
        self.sq_norms = centred.pow(2).sum(1)
        self.compute_dtype, self.accumulate, self.chunk = compute_dtype, accumulate, chunk
        # logits are clamped here before exp (see __call__): every exp, and every weight after
        # softmax divides by its row's sum (at most N), must stay a normal number. CPUs take a
        # slow path for denormal results: measured 21 vs 8 ms per softmax of a 256 x 40 248 chunk
        # at sigma 0.2-0.5 with the floor at log(tiny) + 1 instead of this one, the same output
        self._underflow = math.log(torch.finfo(accumulate).tiny) + 1.0 + math.log(max(1, dataset.shape[0]))
        self.device = self.centred.device
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> ExactDenoiser:
        """The dataset on ``device`` (computed where it was given, then moved: the same values)."""
        self.mean, self.centred, self.centred_t, self.sq_norms = (
            t.to(device) for t in (self.mean, self.centred, self.centred_t, self.sq_norms)
        )
        self.device = self.centred.device
        return self

    def __call__(self, queries, alpha, sigma, candidates=None):
        if alpha == 0.0:
            return self.mean.to(torch.float32).expand(queries.shape[0], -1).clone()
        out = torch.empty(queries.shape[0], self.centred.shape[1], dtype=torch.float32, device=queries.device)
        # logits = (2 alpha x·y - alpha² ‖y‖²) / (2 sigma²): the scale goes into the query, the
        # dot products come out of the matmul in compute_dtype (as in the paper's bfloat16
        # bottleneck) and the bias is subtracted in the accumulation dtype
        bias = self.sq_norms * (alpha * alpha / (2.0 * sigma * sigma))
        # the (chunk, N) blocks are allocated once per call and reused by every chunk: fresh
        # blocks this large come from the OS each time (page faults and zeroing, ~25 % of a
        # chunk's time measured)
        rows_max = min(self.chunk, queries.shape[0])
        n = bias.shape[0]
        device = queries.device
        scores = torch.empty(rows_max, n, dtype=self.compute_dtype, device=device)
        logits = torch.empty(rows_max, n, dtype=self.accumulate, device=device)
        weights = torch.empty(rows_max, n, dtype=self.accumulate, device=device)
        mixed = self.compute_dtype != self.accumulate
        weights_low = torch.empty(rows_max, n, dtype=self.compute_dtype, device=device) if mixed else None
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk].to(self.accumulate) - alpha * self.mean
            q = (q * (alpha / (sigma * sigma))).to(self.compute_dtype)
            m = q.shape[0]
            rows = logits[:m]
            torch.matmul(q, self.centred_t, out=scores[:m])
            rows.copy_(scores[:m]).sub_(bias)
            # At small sigma most of a row lies ~100s below its max, where exp's result is
            # denormal or zero, and torch's CPU exp leaves its vectorised path for those (measured
            # ~100x slower per element). Clamping them to ~-76 below the max first (N = 40 248)
            # gives weights of ~1e-33 instead of ~0 relative to the largest (1): far below float32
            # resolution of a sum that is >= 1. Shift first, then clamp: at sigma -> 0 the logits
            # reach ~1e10, where float32 cannot hold "max - 76" as a threshold, but the shifted
            # values are exact. The max is exact in any order, and torch's softmax sums each row in one
            # thread, so the result does not depend on the thread count (a plain .sum() here split
            # short rows' sums across threads: the profiles then differed)
            rows.sub_(rows.amax(1, keepdim=True)).clamp_min_(self._underflow)
            chunk_weights = torch.ops.aten._softmax.out(rows, 1, False, out=weights[:m])
            if mixed:
                chunk_weights = weights_low[:m].copy_(chunk_weights)
            # as (D, N) @ (N, m): the same product, measured 25 vs 35 ms for a 256-query bfloat16
            # chunk at N = 40 248, D = 675 (the (m, N) @ (N, D) form runs slower for this D)
            blended = torch.matmul(self.centred_t, chunk_weights.T).T.to(self.accumulate)
            out[start : start + self.chunk] = blended + self.mean
        return out


class FusedDenoiser:
    """The exact denoiser through fused scaled-dot-product attention (paper §4, trick 1)."""

    needs_candidates = False

    def __init__(
        self,
        dataset: torch.Tensor,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        chunk: int = 8192,
        device: torch.device | str | None = None,
    ):
        accumulate = torch.float64 if compute_dtype == torch.float64 else torch.float32
        self.mean = dataset.to(accumulate).mean(0)
        centred = dataset.to(accumulate) - self.mean
        self.centred = centred
        self.sq_norms = centred.pow(2).sum(1)
        self.compute_dtype, self.accumulate, self.chunk = compute_dtype, accumulate, chunk
        self.device = self.centred.device
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> FusedDenoiser:
        """The dataset on ``device`` (computed where it was given, then moved: the same values)."""
        self.mean, self.centred, self.sq_norms = (t.to(device) for t in (self.mean, self.centred, self.sq_norms))
        self.device = self.centred.device
        return self

    def __call__(self, queries, alpha, sigma, candidates=None):
        if alpha == 0.0:
            return self.mean.to(torch.float32).expand(queries.shape[0], -1).clone()
        _, d = self.centred.shape
        keys = torch.cat([alpha * self.centred, (-0.5 * alpha * alpha) * self.sq_norms[:, None]], 1)
        values = F.pad(self.centred, (0, 1))
        keys, values = keys.to(self.compute_dtype), values.to(self.compute_dtype)
        out = torch.empty(queries.shape[0], d, dtype=torch.float32, device=queries.device)
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk].to(self.accumulate) - alpha * self.mean
            q = F.pad(q, (0, 1), value=1.0).to(self.compute_dtype)
            attended = F.scaled_dot_product_attention(
                q[None, None], keys[None, None], values[None, None], scale=1.0 / (sigma * sigma)
            )[0, 0, :, :d]
            out[start : start + self.chunk] = attended.to(self.accumulate) + self.mean
        return out


class KnnDenoiser:
    """Exact weights over given candidate positions; candidates are read from the reference image.

    ``reference`` is the (C, H, W) reference at this scale. Candidate positions are flat
    indices into its (H-P+1) × (W-P+1) grid of patch corners, -1 for an empty slot.
    """

    needs_candidates = True

    def __init__(
        self,
        reference: torch.Tensor,
        patch_size: int,
        *,
        chunk: int = 256,
        compiled: bool = True,
        device: torch.device | str | None = None,
    ):
        self.reference = reference.to(torch.float32).contiguous()
        self.compiled = compiled and knn_fold.available()
        self.patch_size, self.chunk = patch_size, chunk
        self.mean = patch_mean(self.reference, patch_size)
        self.sq_norms = patch_sq_norms(self.reference, patch_size)  # (N,), gathered by position
        self._kernel = None  # the compiled CPU path, bound to this reference on first use
        self.device = self.reference.device
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> KnnDenoiser:
        """The reference on ``device``; off the CPU the torch path runs (the compiled one is
        CPU-only)."""
        self.reference, self.mean, self.sq_norms = (t.to(device) for t in (self.reference, self.mean, self.sq_norms))
        self.device = self.reference.device
        return self

    def __call__(self, queries, alpha, sigma, candidates=None):
        if alpha == 0.0:
            return self.mean.expand(queries.shape[0], -1).clone()
        if candidates is None:
            raise ValueError("the knn denoiser needs candidate positions for every query")
        out = torch.empty_like(queries, dtype=torch.float32)
        scale = 1.0 / (2.0 * sigma * sigma)
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk].to(torch.float32)
            cand = candidates[start : start + self.chunk]
            patches = gather_patches(self.reference, cand.clamp_min(0), self.patch_size)  # (m, k, D)
            out[start : start + self.chunk] = self._mix(self._weights(q, cand, patches, alpha, scale), cand, patches)
        return out

    @property
    def num_patches(self) -> int:
        """The reference's patch count: candidate positions lie in [0, num_patches)."""
        return int(self.sq_norms.shape[0])

    def blend(self, weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(m, D): each query's candidates averaged with given (m, k) weights (usage balancing's
        re-weighted ones), as :meth:`__call__` averages with its own."""
        out = torch.empty((candidates.shape[0], self.mean.shape[-1]), dtype=torch.float32, device=self.device)
        for start in range(0, candidates.shape[0], self.chunk):
            cand = candidates[start : start + self.chunk]
            patches = gather_patches(self.reference, cand.clamp_min(0), self.patch_size)
            out[start : start + self.chunk] = self._mix(weights[start : start + self.chunk], cand, patches)
        return out

    def _mix(self, weights: torch.Tensor, cand: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        blended = torch.bmm(weights.to(patches.dtype).unsqueeze(1), patches).squeeze(1)
        lost = (cand < 0).all(1)
        if bool(lost.any()):  # a query with no candidate at all learns nothing: the mean
            blended[lost] = self.mean
        return blended

    def _weights(self, q, cand, patches, alpha, scale):
        # ‖x - alpha y‖², expanded so the (m, k, D) difference is never formed
        cross = torch.bmm(patches, q.unsqueeze(-1)).squeeze(-1)
        dist = self.sq_norms[cand.clamp_min(0)] * (alpha * alpha) - 2.0 * alpha * cross
        logits = (-scale * dist).masked_fill(cand < 0, -math.inf)
        return torch.softmax(logits, dim=1)

    def weights(self, queries, alpha, sigma, candidates) -> torch.Tensor:
        """The (m, k) softmax weights of each query's candidates (0 for a missing one): what
        :meth:`__call__` averages with, for a caller that needs the matches themselves."""
        scale = 1.0 / (2.0 * sigma * sigma)
        out = torch.zeros(candidates.shape, dtype=torch.float32, device=queries.device)
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk].to(torch.float32)
            cand = candidates[start : start + self.chunk]
            patches = gather_patches(self.reference, cand.clamp_min(0), self.patch_size)
            out[start : start + self.chunk] = torch.nan_to_num(self._weights(q, cand, patches, alpha, scale))
        return out

    def image_weights(self, source, candidates, alpha, sigma, grid_h, grid_w) -> torch.Tensor | None:
        """:meth:`weights` of every patch of ``source`` by the compiled CPU path, or None where it
        does not apply (the caller then unfolds and calls :meth:`weights`)."""
        if not self.compiled or source.device.type != "cpu" or self.device.type != "cpu":
            return None
        kernel = self._compiled()
        found = kernel.weights(source.numpy(), candidates.contiguous().numpy(), alpha, sigma, grid_h, grid_w)
        return torch.from_numpy(found)

    def _compiled(self):
        if self._kernel is None:
            self._kernel = knn_fold.CompiledKnnFold(
                self.reference.numpy(), self.sq_norms.numpy(), self.mean.numpy(), self.patch_size
            )
        return self._kernel

    def fold_image(self, source, candidates, alpha, sigma, window, canvas, grid_h, grid_w) -> bool:
        """Denoise every patch of ``source`` and fold it into ``canvas`` in one compiled pass.

        The CPU fast path (:mod:`gigasid.core.knn_fold`); returns False where it does not apply
        (CUDA tensors, numba missing, ``compiled=False``) and the caller runs the generic loop.
        """
        if not self.compiled or source.device.type != "cpu" or self.device.type != "cpu":
            return False
        self._compiled()(
            source.numpy(),
            None if candidates is None else candidates.contiguous().numpy(),
            window.to(torch.float32).numpy(),
            alpha,
            sigma,
            grid_h,
            grid_w,
            canvas.numpy(),
        )
        return True


def patch_mean(reference: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The mean of all patch rows of a (C, H, W) image, without building them: (C·P·P,)."""
    channels, height, width = reference.shape
    grid_h, grid_w = height - patch_size + 1, width - patch_size + 1
    # pixel (dy, dx) of the mean patch is the mean of the window [dy, dy + grid_h) x [dx, dx + grid_w)
    # of the image: P² box sums, read off one float64 summed-area table
    table = F.pad(reference.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))
    top, left = slice(0, patch_size), slice(0, patch_size)
    bottom, right = slice(grid_h, grid_h + patch_size), slice(grid_w, grid_w + patch_size)
    sums = table[:, bottom, right] - table[:, top, right] - table[:, bottom, left] + table[:, top, left]
    return (sums / (grid_h * grid_w)).reshape(channels * patch_size * patch_size).to(torch.float32)


def patch_sq_norms(reference: torch.Tensor, patch_size: int) -> torch.Tensor:
    """‖y‖² of every patch of a (C, H, W) image, flat over its patch grid: a box filter of ‖·‖²."""
    energy = reference.to(torch.float64).pow(2).sum(0)
    summed = F.avg_pool2d(energy[None, None], patch_size, 1)[0, 0] * (patch_size * patch_size)
    return summed.flatten().to(torch.float32)
