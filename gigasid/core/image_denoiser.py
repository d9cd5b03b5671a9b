"""The image denoiser: unfold x_t into all stride-1 patches, denoise each, fold back (paper Alg. 1).

Patches are processed in bands of patch rows so the (M, D) patch matrix of the noisy image is
never held whole; each band is folded into the output canvas as soon as it is denoised. A
periodic denoiser wraps patches around the image edges (tileable output). Where a backend needs
nearest-neighbour candidates, a :class:`CandidateSource` supplies them for the whole grid first.
With usage balancing (``core.usage_balance``) the weights of every query are computed first,
re-weighted together, then folded: a whole image only.

An image denoiser has a ``device``: its backend's reference data and its candidate source live
there, inputs are moved there, and results go back to the caller's device, so a caller holding
CPU arrays (the engine) is the same whatever the device. On the CPU the backends' numba kernels
run; elsewhere their torch twins do.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from gigasid.core.denoisers import PatchDenoiser
from gigasid.core.patches import (
    fold_columns,
    grid_shape,
    patch_window,
    periodic_axes,
    periodic_pad,
    unfold_rows,
    window_columns,
    window_sum,
    wrap_periodic,
)
from gigasid.core.usage_balance import UsageBalance, balance_weights


class CandidateSource(Protocol):
    """Finds candidate reference positions for every patch of a noisy image."""

    def __call__(
        self,
        x_t: torch.Tensor,
        alpha: float,
        *,
        periodic: bool,
        step: int | None,
        origin: tuple[int, int] = (0, 0),
        global_grid: tuple[int, int] | None = None,
        crop: bool = False,
    ) -> torch.Tensor:
        """x_t (C, H, W) → (grid_h·grid_w, k) int64 positions in the reference grid (-1 = none).

        A source that has a ``to(device)`` method is moved to the image denoiser's device.

        ``step`` is the sampler's step index: a source may reuse what it found at step + 1.
        With ``crop`` x_t is a plain crop of a larger image (periodic or not) whose patch grid is
        ``global_grid``, and ``origin`` is the global (row, col) of its first patch.
        """


class ImageDenoiser:
    """x_t (C, H, W) at (alpha, sigma) → x_hat (C, H, W)."""

    def __init__(
        self,
        patch_denoiser: PatchDenoiser,
        *,
        patch_size: int,
        rho: float,
        periodic: bool | tuple[bool, bool] = False,  # both axes, or (rows, columns)
        candidate_source: CandidateSource | None = None,
        band_queries: int = 16384,
        device: torch.device | str = "cpu",
        balance: UsageBalance | None = None,
    ):
        if patch_denoiser.needs_candidates and candidate_source is None:
            raise ValueError("this denoiser backend needs a candidate source (an index)")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # the reference data moves once, here; a backend without ``to`` stays where it is
        if hasattr(patch_denoiser, "to"):
            patch_denoiser = patch_denoiser.to(self.device)
        if hasattr(candidate_source, "to"):
            candidate_source = candidate_source.to(self.device)
        self.patch_denoiser = patch_denoiser
        self.patch_size = patch_size
        self.window = patch_window(patch_size, rho)
        self.periodic = periodic
        self.candidate_source = candidate_source
        self.band_queries = band_queries
        # usage balancing (``core.usage_balance``): whole images only, knn backends only
        if balance is not None and not patch_denoiser.needs_candidates:
            raise ValueError("usage balancing re-weights candidates: it needs a knn backend")
        self.balance = balance
        # the fold buffer is reused (fresh pages cost more than the fold), one per thread: tiles
        # of a scale share this denoiser on a threaded scheduler
        self._local = threading.local()

    def _buffer(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        needed = shape[0] * shape[1]
        columns = getattr(self._local, "columns", None)
        if columns is None or columns.numel() < needed or columns.device != device:
            columns = self._local.columns = torch.empty(needed, dtype=torch.float32, device=device)
        return columns[:needed].view(shape)

    def _fold_bands(self, source, window, canvas, grid_h, grid_w, denoise) -> None:
        """The generic path: unfold a band of patch rows, denoise it in chunks, fold it.
        ``denoise(patches, queries)`` gives a chunk's denoised patches from its noisy ones and
        its slice of the flat query grid."""
        size, chunk = self.patch_size, self.patch_denoiser.chunk
        band = max(1, self.band_queries // grid_w)
        for row0 in range(0, grid_h, band):
            row1 = min(grid_h, row0 + band)
            queries = unfold_rows(source, size, row0, row1)
            count = queries.shape[0]
            columns = self._buffer((queries.shape[1], count), source.device)
            first = row0 * grid_w
            for start in range(0, count, chunk):
                stop = min(count, start + chunk)
                denoised = denoise(queries[start:stop], slice(first + start, first + stop))
                window_columns(denoised, window, out=columns[:, start:stop])
            fold_columns(canvas, columns, row0, grid_w, size)

    def _queries(self, x_t, alpha, step, origin, global_grid):
        """(the float32 source, padded when periodic; its patch grid; the candidates or None):
        what :meth:`__call__` and :meth:`matches` both start from."""
        _, height, width = x_t.shape
        size = self.patch_size
        periodic = periodic_axes(self.periodic) if origin is None else (False, False)
        if (not periodic[0] and height < size) or (not periodic[1] and width < size):
            raise ValueError(f"image {height}x{width} is smaller than the patch size {size}")
        source = x_t.to(torch.float32).contiguous()
        if any(periodic):
            source = periodic_pad(source, size, periodic)
        candidates = None
        if self.patch_denoiser.needs_candidates and alpha > 0.0:
            candidates = self.candidate_source(
                x_t, alpha, periodic=self.periodic, step=step, origin=origin or (0, 0), global_grid=global_grid,
                crop=origin is not None,
            ).to(x_t.device)
        return source, grid_shape(height, width, size, periodic=periodic), candidates

    def __call__(
        self,
        x_t: torch.Tensor,
        alpha: float,
        sigma: float,
        *,
        step: int | None = None,
        origin: tuple[int, int] | None = None,
        global_grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x_hat of x_t.

        A crop of a larger image (a tile and its halo) passes ``origin``, the global (row, col)
        of its first patch, and ``global_grid``, the whole image's patch grid: it is denoised as a
        plain image (its edges are not the image's; the caller keeps only the part far enough
        inside), with candidates chosen by global position. x_t may be on any device: it is
        denoised on this denoiser's, and x_hat comes back on x_t's.
        """
        caller = x_t.device
        x_t = x_t.to(self.device)
        _, height, width = x_t.shape
        periodic = periodic_axes(self.periodic) if origin is None else (False, False)
        window = self.window.to(device=x_t.device)
        source, (grid_h, grid_w), candidates = self._queries(x_t, alpha, step, origin, global_grid)
        # float64 canvas: each pixel's sum of patch contributions, and the periodic wrap, come
        # out the same whatever the crop (tile) or the thread split
        canvas = torch.zeros(source.shape, dtype=torch.float64, device=x_t.device)
        fold_image = getattr(self.patch_denoiser, "fold_image", None)
        if self.balance is not None and candidates is not None:
            if origin is not None:
                raise ValueError("usage balancing weighs the whole image's queries: it cannot denoise a crop")
            weights = self._all_weights(source, candidates, alpha, sigma, grid_h, grid_w)
            keep = self.balance.keep
            if keep is not None and keep < weights.shape[1]:  # the others weigh 0: gather only these
                # in the candidates' own order: the weighted sum adds the same terms in the same order
                order = torch.argsort(-weights, dim=1, stable=True)[:, :keep].sort(dim=1).values
                weights, candidates = weights.gather(1, order), candidates.gather(1, order)
            self._fold_bands(source, window, canvas, grid_h, grid_w,
                             lambda _, rows: self.patch_denoiser.blend(weights[rows], candidates[rows]))
        elif fold_image is None or not fold_image(source, candidates, alpha, sigma, window, canvas, grid_h, grid_w):
            self._fold_bands(source, window, canvas, grid_h, grid_w, lambda patches, rows: self.patch_denoiser(
                patches, alpha, sigma, None if candidates is None else candidates[rows]))
        if any(periodic):
            canvas = wrap_periodic(canvas, height, width)
        canvas /= window_sum(height, width, window.double(), periodic=periodic)
        return canvas.to(torch.float32).to(caller)

    def matches(
        self,
        x_t: torch.Tensor,
        alpha: float,
        sigma: float,
        *,
        step: int | None = None,
        origin: tuple[int, int] | None = None,
        global_grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the knn backend averages for every query of x_t: candidate positions and their
        weights, both (grid_h, grid_w, k), from the same candidates as :meth:`__call__` (the
        correspondence decode folds the reference's pixels with them). Arguments as there."""
        if not self.patch_denoiser.needs_candidates:
            raise ValueError("matches need a knn backend (dense backends weigh every patch)")
        if alpha <= 0.0:
            raise ValueError("at alpha = 0 every patch weighs the same: there are no matches")
        caller = x_t.device
        source, (grid_h, grid_w), candidates = self._queries(x_t.to(self.device), alpha, step, origin, global_grid)
        if self.balance is not None and origin is not None:
            raise ValueError("usage balancing weighs the whole image's queries: it cannot match a crop")
        k = candidates.shape[1]
        weights = self._all_weights(source, candidates, alpha, sigma, grid_h, grid_w)
        return candidates.reshape(grid_h, grid_w, k).to(caller), weights.reshape(grid_h, grid_w, k).to(caller)

    def _all_weights(self, source, candidates, alpha, sigma, grid_h, grid_w) -> torch.Tensor:
        """(Q, k) weights of every query of ``source`` over its candidates, usage-balanced when
        this denoiser balances."""
        compiled = getattr(self.patch_denoiser, "image_weights", None)
        weights = None if compiled is None else compiled(source, candidates, alpha, sigma, grid_h, grid_w)
        if weights is None:
            weights = torch.empty(candidates.shape, dtype=torch.float32, device=source.device)
            band = max(1, self.band_queries // grid_w)
            for row0 in range(0, grid_h, band):
                row1 = min(grid_h, row0 + band)
                first, last = row0 * grid_w, row1 * grid_w
                queries = unfold_rows(source, self.patch_size, row0, row1)
                weights[first:last] = self.patch_denoiser.weights(queries, alpha, sigma, candidates[first:last])
        if self.balance is None:
            return weights
        balanced = balance_weights(weights.cpu(), candidates.cpu(), self.patch_denoiser.num_patches, self.balance)
        return balanced.to(weights.device)

