"""The embedded latent space: a lapped PCA transform fitted on the reference in closed form.

Each latent cell (i, j) holds K coefficients of the 2f×2f pixel block centred on its f×f block
(pixels [f·i − f/2, f·i + 3f/2) per axis, edge-replicated past the image), seen through a sine
window w[n] = sin(π(n + ½)/2f). The sine window satisfies w[n]² + w[n + f]² = 1 (Princen–Bradley),
so windowing at analysis and again at synthesis, with overlap-add at stride f, rebuilds the image
exactly when all coefficients are kept: this is why decoded images have no f-pixel block seams,
unlike a plain block transform. The K directions are the principal components of windowed blocks
sampled from the reference's pyramid (their covariance summed in float64, so the fit's memory does
not depend on the reference's size), and one global scale brings the latents to the RMS of pixel
values, which is what the noise schedule assumes (σ_max = 1 against data in [-1, 1]).

A texture channel (``texture=True``) follows the K coefficients: the norm of what they leave out
of the windowed block, in the same units. Two blocks' distance over the K coefficients plus this
channel is still at most their true distance (‖a − b‖ ≥ |‖a‖ − ‖b‖| on the residuals), but it
is far closer to it for textures the K components do not resolve: without it, gravel, foliage or
fur and a smooth surface of the same colour have nearly the same latents, and a denoiser that
matches latents paints smooth patches (fog) where the texture was. The decoder ignores it.

This module is the math only (torch, and a compiled CPU twin of the encoder that a test holds
equal to it): :func:`fit_lapped_pca` reads pixels through a callback, the caller owns the files. It does not choose K: :mod:`bench.codec` measures reconstruction per K.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from gigasid.core.jit import numba, parallel_kernels

# the RMS the latents are scaled to: that of natural images in [-1, 1] (about 0.5)
LATENT_RMS = 0.5


def sine_window(factor: int) -> torch.Tensor:
    """The 2f-tap analysis/synthesis window, float64."""
    n = torch.arange(2 * factor, dtype=torch.float64)
    return torch.sin(math.pi * (n + 0.5) / (2 * factor))


class BlockCovariance:
    """Running float64 mean and second moment of windowed blocks (rows of C·(2f)² values)."""

    def __init__(self, dims: int):
        self.count = 0
        self.total = torch.zeros(dims, dtype=torch.float64)
        self.outer = torch.zeros(dims, dims, dtype=torch.float64)

    def add(self, blocks: torch.Tensor) -> None:
        blocks = blocks.to(torch.float64)
        self.count += blocks.shape[0]
        self.total += blocks.sum(0)
        self.outer += blocks.T @ blocks

    def principal(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, the k leading directions as columns, all eigenvalues descending)."""
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(covariance)
        order = torch.argsort(values, descending=True)
        values, vectors = values[order].clamp_min(0.0), vectors[:, order]
        # a deterministic sign per direction (eigh's is arbitrary): largest entry positive
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
        return mean, vectors[:, :k] * signs[:, :k], values


class LappedPCACodec:
    """Encode/decode with a fitted lapped PCA basis (see the module docstring)."""

    name = "pca"

    def __init__(
        self, mean: np.ndarray, basis: np.ndarray, scale: float, *, image_channels: int, factor: int = 8,
        texture: bool = False,
    ):
        self.factor = factor
        self.image_channels = image_channels
        self.coefficients = basis.shape[1]
        self.texture = texture
        self.channels = self.coefficients + int(texture)
        self.encode_halo = factor  # reach f/2 past the block, rounded up to whole cells
        self.decode_halo = 1
        self.mean = torch.as_tensor(np.asarray(mean), dtype=torch.float64)
        self.basis = torch.as_tensor(np.asarray(basis), dtype=torch.float64)  # (C·(2f)², K)
        self.scale = float(scale)
        window = sine_window(factor)
        self._window = torch.outer(window, window).repeat(image_channels, 1, 1).reshape(-1)  # (C·(2f)²,)
        self._window1d = window
        self._analysis = (self.basis * self._window[:, None]).T.contiguous()  # (K, D): window folded in
        self._mean_coef = self.basis.T @ self.mean  # (K,)

    # ---- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, covariance: BlockCovariance, k: int, *, image_channels: int, factor: int = 8, texture: bool = False
    ) -> LappedPCACodec:
        """The codec of the k leading directions of the sampled blocks' covariance."""
        dims = image_channels * (2 * factor) ** 2
        if not 1 <= k <= dims:
            raise ValueError(f"latent channels must be in [1, {dims}] for {image_channels}-channel images, got {k}")
        mean, basis, values = covariance.principal(k)
        # scale the coefficients to the pixel RMS: the mean square of a latent entry is the mean of
        # the kept eigenvalues (the coefficients are centred)
        power = float(values[:k].mean())
        scale = LATENT_RMS / math.sqrt(power) if power > 0 else 1.0
        return cls(mean.numpy(), basis.numpy(), scale, image_channels=image_channels, factor=factor, texture=texture)

    # ---- the contract ------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.device.type == "cpu" and _encode_parallel is not None:
            return self._encode_compiled(pixels)
        return self._encode_torch(pixels)

    def _encode_torch(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` in torch (any device): the reference for the compiled CPU kernel."""
        blocks = _blocks(pixels.to(torch.float64), self.factor)  # (D, h, w), unwindowed
        dims, height, width = blocks.shape
        flat = blocks.reshape(dims, -1)
        coef = self._analysis @ flat - self._mean_coef[:, None]
        if self.texture:
            # ‖w·b − mean‖² − ‖coef‖²: the basis is orthonormal, so this is the residual's energy
            centred = flat * self._window[:, None] - self.mean[:, None]
            residual = (centred.pow(2).sum(0) - coef.pow(2).sum(0)).clamp_min(0.0).sqrt()
            coef = torch.cat([coef, residual[None]])
        return (coef * self.scale).reshape(self.channels, height, width).to(torch.float32)

    def _encode_compiled(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` by one pass over the pixels per cell (:func:`_encode_cell`): no block
        matrix (C·(2f)² float64 values a cell) is built, measured 7x faster than the torch path
        on a 520x5120 band, with the same float32 latents there."""
        _, height, width = pixels.shape
        rows, cols = -(-height // self.factor), -(-width // self.factor)
        kernel = _encode_parallel if parallel_kernels() else _encode_serial
        out = np.empty((self.channels, rows, cols), dtype=np.float32)
        kernel(
            np.ascontiguousarray(pixels.to(torch.float32).numpy()), self.factor, self._kernel_analysis,
            self._mean_coef.numpy(), self._kernel_weighted_mean, self._kernel_window_sq,
            float(self.mean.pow(2).sum()), self.texture, self.scale, out,
        )
        return torch.from_numpy(out)

    @functools.cached_property
    def _kernel_analysis(self) -> np.ndarray:
        return self._analysis.T.contiguous().numpy()  # (D, K): a cell's K sums run over k innermost

    @functools.cached_property
    def _kernel_weighted_mean(self) -> np.ndarray:
        return (self._window * self.mean).numpy()

    @functools.cached_property
    def _kernel_window_sq(self) -> np.ndarray:
        return self._window.pow(2).numpy()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        f = self.factor
        height, width = latents.shape[1:]
        coef = latents[: self.coefficients].to(torch.float64).reshape(self.coefficients, -1) / self.scale
        blocks = (self.basis @ coef + self.mean[:, None]) * self._window[:, None]  # synthesis window
        # overlap-add at stride f: block (i, j) lands on padded rows [f·i, f·i + 2f), i.e. image
        # rows [f·i − f/2, …)
        canvas = F.fold(blocks[None], (f * height + f, f * width + f), 2 * f, stride=f)[0]
        half = f // 2
        canvas = canvas[:, half : half + f * height, half : half + f * width]
        # divide by the summed squared window; 1 inside, less on the outer half-blocks
        rows = _coverage(self._window1d, height, f)
        cols = _coverage(self._window1d, width, f)
        return (canvas / (rows[:, None] * cols[None, :])).to(torch.float32)

    def state(self) -> dict:
        return {
            "name": self.name,
            "factor": self.factor,
            "image_channels": self.image_channels,
            "scale": self.scale,
            "mean": self.mean.numpy(),
            "basis": self.basis.numpy(),
            "texture": self.texture,
        }

    @classmethod
    def from_state(cls, state: dict) -> LappedPCACodec:
        return cls(
            state["mean"], state["basis"], state["scale"], image_channels=int(state["image_channels"]),
            factor=int(state["factor"]), texture=bool(state.get("texture", False)),
        )


if numba is not None:

    @numba.njit(nogil=True, cache=True, inline="always")
    def _encode_cell(pixels, i, j, f, analysis_t, weighted_mean, window_sq, acc):
        """The analysis sums of cell (i, j) into ``acc`` (K,), and the block's Σ w²v² and Σ w·mean·v
        (for the texture channel); the 2f×2f block is read in place, edge-replicated past the
        image like :func:`_blocks`, in its (C, ky, kx) order."""
        channels, height, width = pixels.shape
        half = f // 2
        acc[:] = 0.0
        energy = 0.0
        cross = 0.0
        d = 0
        for c in range(channels):
            for ky in range(2 * f):
                row = min(max(f * i - half + ky, 0), height - 1)
                for kx in range(2 * f):
                    col = min(max(f * j - half + kx, 0), width - 1)
                    value = np.float64(pixels[c, row, col])
                    for k in range(analysis_t.shape[1]):
                        acc[k] += analysis_t[d, k] * value
                    energy += window_sq[d] * value * value
                    cross += weighted_mean[d] * value
                    d += 1
        return energy, cross

    @numba.njit(nogil=True, cache=True, inline="always")
    def _encode_row(pixels, i, f, analysis_t, mean_coef, weighted_mean, window_sq, mean_sq, texture, scale, out,
                    acc):
        count = analysis_t.shape[1]
        for j in range(out.shape[2]):
            energy, cross = _encode_cell(pixels, i, j, f, analysis_t, weighted_mean, window_sq, acc)
            power = 0.0
            for k in range(count):
                coef = acc[k] - mean_coef[k]
                power += coef * coef
                out[k, i, j] = np.float32(coef * scale)
            if texture:
                # ‖w·b − mean‖² − ‖coef‖², expanded: ‖w·b‖² − 2⟨w·b, mean⟩ + ‖mean‖² − ‖coef‖²
                residual = energy - 2.0 * cross + mean_sq - power
                out[count, i, j] = np.float32(math.sqrt(max(residual, 0.0)) * scale)

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _encode_parallel(pixels, f, analysis_t, mean_coef, weighted_mean, window_sq, mean_sq, texture, scale, out):
        for i in numba.prange(out.shape[1]):  # each cell is computed alone: any split, the same bits
            acc = np.empty(analysis_t.shape[1], dtype=np.float64)
            _encode_row(pixels, i, f, analysis_t, mean_coef, weighted_mean, window_sq, mean_sq, texture, scale,
                        out, acc)

    @numba.njit(nogil=True, cache=True)
    def _encode_serial(pixels, f, analysis_t, mean_coef, weighted_mean, window_sq, mean_sq, texture, scale, out):
        acc = np.empty(analysis_t.shape[1], dtype=np.float64)
        for i in range(out.shape[1]):
            _encode_row(pixels, i, f, analysis_t, mean_coef, weighted_mean, window_sq, mean_sq, texture, scale,
                        out, acc)
else:  # pragma: no cover - without numba the torch path runs
    _encode_parallel = _encode_serial = None


def _blocks(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(C·(2f)², h, w): the 2f×2f block of every cell, edge-replicated past the image."""
    channels, height, width = pixels.shape
    f, half = factor, factor // 2
    rows, cols = -(-height // f), -(-width // f)
    # replicate by index clamping: cells need rows [−f/2, f·rows + f/2)
    r = torch.arange(-half, f * rows + half).clamp(0, height - 1)
    c = torch.arange(-half, f * cols + half).clamp(0, width - 1)
    padded = pixels[:, r][:, :, c]
    unfolded = F.unfold(padded[None], 2 * f, stride=f)[0]  # (C·(2f)², rows·cols), (C, ky, kx) order
    return unfolded.reshape(channels * (2 * f) ** 2, rows, cols)


def _coverage(window: torch.Tensor, cells: int, factor: int) -> torch.Tensor:
    """Per pixel row of a ``cells``-cell decode: the sum of the squared windows covering it."""
    f, half = factor, factor // 2
    total = torch.zeros(f * cells + f, dtype=torch.float64)
    for cell in range(cells):
        total[f * cell : f * cell + 2 * f] += window**2
    return total[half : half + f * cells]


def _lattice_blocks(read_pixels, shape: tuple[int, int], factor: int, rows: range, cols: range) -> torch.Tensor:
    """(C·(2f)², len(rows), len(cols)) float64: :func:`_blocks` of the given cells only, the
    pixels read once for the band of rows they span (edge-replicated past the image, as there)."""
    height, width = shape
    f, half = factor, factor // 2
    top, bottom = max(0, f * rows[0] - half), min(height, f * rows[-1] + f + half)
    pixels = read_pixels((top, 0, bottom, width)).to(torch.float64)
    offsets = torch.arange(2 * f)
    row_index = ((torch.tensor(list(rows))[:, None] * f - half + offsets).clamp(0, height - 1) - top).flatten()
    col_index = (torch.tensor(list(cols))[:, None] * f - half + offsets).clamp(0, width - 1).flatten()
    channels = pixels.shape[0]
    cut = pixels[:, row_index][:, :, col_index].reshape(channels, len(rows), 2 * f, len(cols), 2 * f)
    return cut.permute(0, 2, 4, 1, 3).reshape(channels * (2 * f) ** 2, len(rows), len(cols))


def block_window(factor: int, image_channels: int) -> torch.Tensor:
    """(C·(2f)², 1, 1): the sine analysis window over a block's values, in :func:`_blocks`' order."""
    window = sine_window(factor)
    return torch.outer(window, window).repeat(image_channels, 1, 1).reshape(-1, 1, 1)


def fit_lapped_pca(
    read_pixels, shapes: list[tuple[int, int]], k: int, *, image_channels: int, max_blocks: int,
    factor: int = 8, band_cells: int = 32, texture: bool = False,
) -> LappedPCACodec:
    """Fit the codec on blocks sampled from every level of a pixel pyramid, in bounded memory.

    ``read_pixels(level, box)`` returns the (C, h, w) pixels of ``box`` of pyramid level
    ``level`` (finest first, ``shapes[level]`` its size). Cells on a lattice of stride s per axis
    are sampled, s the smallest that keeps the count under ``max_blocks``; the pixels are read in
    bands of ``band_cells`` cell rows, so memory does not grow with the reference.
    """
    from gigasid.codecs import latent_shape

    grids = [latent_shape(h, w, factor) for h, w in shapes]
    total = sum(rows * cols for rows, cols in grids)
    stride = max(1, math.ceil(math.sqrt(total / max_blocks)))
    band = max(stride, band_cells // stride * stride)
    window = block_window(factor, image_channels)
    covariance = BlockCovariance(image_channels * (2 * factor) ** 2)
    for level, (shape, (rows, cols)) in enumerate(zip(shapes, grids)):
        for r0 in range(0, rows, band):
            # the cells on a global lattice of stride s (r0 is a multiple of s), only those cut
            picked = _lattice_blocks(lambda b, level=level: read_pixels(level, b), shape, factor,
                                     range(r0, min(rows, r0 + band), stride), range(0, cols, stride)) * window
            covariance.add(picked.reshape(picked.shape[0], -1).T)
    return LappedPCACodec.fit(covariance, k, image_channels=image_channels, factor=factor, texture=texture)
