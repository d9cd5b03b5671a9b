"""Patch geometry: unfold an image into patch rows, fold denoised patches back, gather by position.

A patch row is a P×P×C patch flattened in (row, col, channel) order, so that one patch is P
contiguous runs of P·C values in an (H, W, C) image. That layout lets :func:`gather_patches` read
a reference patch straight out of the image by its top-left position without ever building the
N×D matrix of all reference patches.

Positions are flat indices ``row * W_grid + col`` into the grid of patch top-left corners. Plain
patches tile the image without padding (grid (H-P+1) × (W-P+1)); periodic patches wrap around the
image (grid H × W), which is what makes a tileable output seamless.

Folding (paper: x_hat = Σ_i R_ρ^(i) x_hat^(i)) weights every patch by a separable Gaussian window
over the patch's normalised coordinates linspace(-1, 1, P) with std ρ, sums overlaps, and divides
by the summed window. ρ = inf is a flat window; ρ → 0 keeps only patch centres (non-local means).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_window(patch_size: int, rho: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (P, P) separable Gaussian fold window; rho = inf gives ones."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0 (or inf), got {rho}")
    coords = torch.linspace(-1.0, 1.0, patch_size, dtype=torch.float64)
    profile = torch.ones_like(coords) if math.isinf(rho) else torch.exp(-0.5 * (coords / rho) ** 2)
    return torch.outer(profile, profile).to(dtype)


def grid_shape(height: int, width: int, patch_size: int, *, periodic: bool = False) -> tuple[int, int]:
    """Shape of the grid of patch top-left corners for an image of (height, width)."""
    if periodic:
        return height, width
    return height - patch_size + 1, width - patch_size + 1


def to_hwc(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) → contiguous (H, W, C), the layout patch rows are read from."""
    return image.permute(1, 2, 0).contiguous()


def _row_view(image_hwc: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Overlapping view (H·W - P + 1, P·C): row n is the P pixels starting at flat pixel n.

    No copy: a patch at (r, c) is rows (r + dy)·W + c for dy < P of this view.
    """
    height, width, channels = image_hwc.shape
    length = height * width - patch_size + 1
    return image_hwc.as_strided((length, patch_size * channels), (channels, 1))


def unfold_rows(
    image_hwc: torch.Tensor, patch_size: int, row0: int, row1: int, *, periodic: bool = False
) -> torch.Tensor:
    """Patch rows (M, P·P·C) of the patches whose top-left row is in [row0, row1), all columns.

    For a periodic image the caller passes the image padded by P-1 (see :func:`periodic_pad`).
    """
    height, width, channels = image_hwc.shape
    grid_w = width - patch_size + 1
    view = image_hwc.as_strided(
        (row1 - row0, grid_w, patch_size, patch_size * channels),
        (width * channels, channels, width * channels, 1),
        image_hwc.storage_offset() + row0 * width * channels,
    )
    return view.reshape(-1, patch_size * patch_size * channels)


def periodic_pad(image_hwc: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Wrap the first P-1 rows and columns around to the bottom and right."""
    extra = patch_size - 1
    if extra == 0:
        return image_hwc
    rows = torch.cat([image_hwc, image_hwc[:extra]], dim=0)
    return torch.cat([rows, rows[:, :extra]], dim=1).contiguous()


def gather_patches(image_hwc: torch.Tensor, positions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch rows of ``image_hwc`` at flat grid positions: (*positions.shape, P·P·C).

    Reads P runs of P·C values per patch from the image itself; the patch matrix is never built.
    """
    height, width, channels = image_hwc.shape
    grid_w = width - patch_size + 1
    top = torch.div(positions, grid_w, rounding_mode="floor")
    left = positions - top * grid_w
    first = top * width + left  # flat pixel index of the top-left corner
    offsets = torch.arange(patch_size, device=positions.device) * width
    runs = (first.unsqueeze(-1) + offsets).reshape(-1)
    rows = _row_view(image_hwc, patch_size).index_select(0, runs)
    return rows.reshape(*positions.shape, patch_size * patch_size * channels)


def window_columns(patches: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Window-weight patch rows (m, P·P·C) and transpose them to fold columns (C, P, P, m).

    Called on small pieces so that the transpose happens in cache.
    """
    patch_size = window.shape[0]
    rows = patches.view(patches.shape[0], patch_size, patch_size, -1)
    return (rows * window[:, :, None]).permute(3, 1, 2, 0)


def fold_columns(canvas: torch.Tensor, columns: torch.Tensor, row0: int, grid_w: int) -> None:
    """Add fold columns (C, P, P, L) of the patches with top-left rows row0.. into ``canvas``.

    The L patches are in raster order over a grid of width ``grid_w``. ``canvas`` (C, H', W') must
    cover every pixel they touch (the padded extent for a periodic image; see
    :func:`wrap_periodic`).
    """
    channels, patch_size, _, count = columns.shape
    band = count // grid_w
    folded = F.fold(
        columns.reshape(1, channels * patch_size * patch_size, count),
        (band + patch_size - 1, grid_w + patch_size - 1),
        patch_size,
    )
    canvas[:, row0 : row0 + band + patch_size - 1, : grid_w + patch_size - 1] += folded[0]


def wrap_periodic(canvas: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fold the overhang of a (C, H+P-1, W+P-1) periodic canvas back onto (C, H, W)."""
    out = canvas[:, :height, :width].clone()
    extra_h, extra_w = canvas.shape[1] - height, canvas.shape[2] - width
    if extra_h:
        out[:, :extra_h] += canvas[:, height:, :width]
    if extra_w:
        out[:, :, :extra_w] += canvas[:, :height, width:]
    if extra_h and extra_w:
        out[:, :extra_h, :extra_w] += canvas[:, height:, width:]
    return out


def window_sum(
    height: int, width: int, window: torch.Tensor, *, periodic: bool = False
) -> torch.Tensor:
    """(H, W) sum of the fold window over every patch covering each pixel.

    The window is separable and the covering patches form a product set, so the sum is the outer
    product of two 1-D sums.
    """
    patch_size = window.shape[0]
    profile = window[patch_size // 2] / window[patch_size // 2, patch_size // 2]
    peak = window[patch_size // 2, patch_size // 2]

    def axis_sum(length: int) -> torch.Tensor:
        if periodic:
            return profile.sum().expand(length).clone()
        grid = length - patch_size + 1
        total = torch.zeros(length, dtype=window.dtype, device=window.device)
        for d in range(patch_size):
            total[d : d + grid] += profile[d]
        return total

    return torch.outer(axis_sum(height), axis_sum(width)) * peak
