"""Patch geometry: unfold an image into patch rows, fold denoised patches back, gather by position.

A patch row is a C×P×P patch flattened in (channel, row, col) order — the order ``F.fold``
expects, so denoised rows reach the fold through one plain 2-D transpose. In a (C, H, W) image
one patch is C·P contiguous runs of P values, which lets :func:`gather_patches` read a reference
patch straight out of the image by its top-left position without ever building the N×D matrix of
all reference patches.

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

#: the smallest value of a window profile: an image's corner pixel is covered by one patch only,
#: at that patch's corner, whose weight (the profile's edge value squared, exp(-1/ρ²)) must stay a
#: normal float32 for the fold's division by the folded window sum: below ρ ≈ 0.11 it would be a
#: subnormal (a few bits of precision) and below ρ ≈ 0.1 zero (0/0). Above ρ ≈ 0.12 the floor is
#: never reached, so the paper's ρ = 0.2 window is the plain Gaussian.
PROFILE_FLOOR = 1e-15


def window_profile(patch_size: int, rho: float) -> torch.Tensor:
    """The 1-D Gaussian over the patch's normalised coordinates ``linspace(-1, 1, P)``, float64,
    floored at :data:`PROFILE_FLOOR`; rho = inf gives ones."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0 (or inf), got {rho}")
    coords = torch.linspace(-1.0, 1.0, patch_size, dtype=torch.float64)
    if math.isinf(rho):
        return torch.ones_like(coords)
    return torch.exp(-0.5 * (coords / rho) ** 2).clamp_min(PROFILE_FLOOR)


def patch_window(patch_size: int, rho: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (P, P) separable Gaussian fold window: the outer product of :func:`window_profile`."""
    profile = window_profile(patch_size, rho)
    return torch.outer(profile, profile).to(dtype)


Periodic = bool | tuple[bool, bool]  # both axes, or (rows, columns): a 360° panorama wraps columns only


def periodic_axes(periodic: Periodic) -> tuple[bool, bool]:
    """(rows wrap, columns wrap) of a ``periodic`` setting given for both axes or per axis."""
    if isinstance(periodic, tuple):
        return bool(periodic[0]), bool(periodic[1])
    return bool(periodic), bool(periodic)


def grid_shape(height: int, width: int, patch_size: int, *, periodic: Periodic = False) -> tuple[int, int]:
    """Shape of the grid of patch top-left corners for an image of (height, width): every pixel
    starts a patch along a periodic axis, H - P + 1 along a plain one."""
    rows, cols = periodic_axes(periodic)
    return (height if rows else height - patch_size + 1), (width if cols else width - patch_size + 1)


def _run_view(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Overlapping view (C·H·W - P + 1, P) of a contiguous (C, H, W) image: row n is the P values
    starting at flat index n. No copy; a patch is C·P rows of this view."""
    total = image.numel()
    return image.as_strided((total - patch_size + 1, patch_size), (1, 1), image.storage_offset())


def unfold_rows(image: torch.Tensor, patch_size: int, row0: int, row1: int) -> torch.Tensor:
    """Patch rows (M, C·P·P) of the patches whose top-left row is in [row0, row1), all columns.

    ``image`` is a contiguous (C, H, W) tensor; for a periodic image the caller passes it padded
    by P-1 (see :func:`periodic_pad`).
    """
    channels, height, width = image.shape
    grid_w = width - patch_size + 1
    view = image.as_strided(
        (row1 - row0, grid_w, channels, patch_size, patch_size),
        (width, 1, height * width, width, 1),
        image.storage_offset() + row0 * width,
    )
    return view.reshape(-1, channels * patch_size * patch_size)


def periodic_pad(image: torch.Tensor, patch_size: int, periodic: Periodic = True) -> torch.Tensor:
    """Wrap the first P-1 rows (columns) of a (C, H, W) image around to the bottom (right), along
    the axes that are periodic."""
    rows, cols = periodic_axes(periodic)
    extra = patch_size - 1
    if extra == 0 or not (rows or cols):
        return image.contiguous()
    return F.pad(image[None], (0, extra if cols else 0, 0, extra if rows else 0), mode="circular")[0].contiguous()


def gather_patches(image: torch.Tensor, positions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch rows of a contiguous (C, H, W) image at flat grid positions: (*positions.shape, C·P·P).

    Reads C·P runs of P values per patch from the image itself; the patch matrix is never built.
    """
    channels, height, width = image.shape
    grid_w = width - patch_size + 1
    top = torch.div(positions, grid_w, rounding_mode="floor")
    first = top * width + (positions - top * grid_w)  # flat index of the top-left corner
    offsets = (
        torch.arange(channels, device=positions.device)[:, None] * (height * width)
        + torch.arange(patch_size, device=positions.device)[None, :] * width
    ).reshape(-1)
    runs = (first.unsqueeze(-1) + offsets).reshape(-1)
    rows = _run_view(image, patch_size).index_select(0, runs)
    return rows.reshape(*positions.shape, channels * patch_size * patch_size)


def window_columns(patches: torch.Tensor, window: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Window-weight patch rows (m, C·P·P) and transpose them to fold columns (C·P·P, m).

    Called on small pieces, writing into ``out`` (a column slice of the fold buffer), so the
    transpose happens in cache and in the same pass as the weighting.
    """
    channels = patches.shape[1] // window.numel()
    weighted = patches * window.reshape(1, 1, -1).expand(1, channels, -1).reshape(1, -1)
    if out is None:
        return weighted.t().contiguous()
    return out.copy_(weighted.t())  # copy_ has a blocked 2-D transpose; mul(out=) does not


def fold_columns(canvas: torch.Tensor, columns: torch.Tensor, row0: int, grid_w: int, patch_size: int) -> None:
    """Add fold columns (C·P·P, L) of the patches with top-left rows row0.. into ``canvas``.

    The L patches are in raster order over a grid of width ``grid_w``. ``canvas`` (C, H', W') must
    cover every pixel they touch (the padded extent for a periodic image; see
    :func:`wrap_periodic`).
    """
    band = columns.shape[1] // grid_w
    shape = (band + patch_size - 1, grid_w + patch_size - 1)
    folded = F.fold(columns[None].to(canvas.dtype), shape, patch_size)  # summed in the canvas' precision
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
    height: int, width: int, window: torch.Tensor, *, periodic: Periodic = False
) -> torch.Tensor:
    """(H, W) sum of the fold window over every patch covering each pixel.

    The window is separable and the covering patches form a product set, so the sum is the outer
    product of two 1-D sums.
    """
    patch_size = window.shape[0]
    profile = window[patch_size // 2] / window[patch_size // 2, patch_size // 2]
    peak = window[patch_size // 2, patch_size // 2]

    def axis_sum(length: int, periodic: bool) -> torch.Tensor:
        if periodic:
            return profile.sum().expand(length).clone()
        grid = length - patch_size + 1
        total = torch.zeros(length, dtype=window.dtype, device=window.device)
        for d in range(patch_size):
            total[d : d + grid] += profile[d]
        return total

    rows, cols = periodic_axes(periodic)
    return torch.outer(axis_sum(height, rows), axis_sum(width, cols)) * peak
