"""Known regions: the pixels an output holds instead of generating (outpainting, inpainting).

An output with a known region is sampled as diffusion inpainting does it: on every scale and at
every step, the known cells of x_t are the known values noised to that step's level,
α_t·known + σ_t·ε (``tiling.step``), and the other cells follow the sampler, whose patches
straddle the border and so continue what is known. The mask is **hard** (a cell is known or not):
a soft ramp would need known values where there are none (outside an outpainted photo) or would
change known pixels (which must come out unchanged); the border is hidden by the denoiser's
patches that straddle it, not by a cross-fade.

An inpainting reference is pyramided **without its hole** (normalised convolution): the pyramid of
the reference times the known share (1 outside the hole, 0 in it) divided, level by level, by the
pyramid of the share itself. A coarse cell's value is then the resampling of the known pixels
alone, so the object the mask removes does not leak into any level, and a coarse cell is in the
hole where less than :data:`KNOWN_SHARE` of its resampling weight reads known pixels: the hole keeps
its size at every scale. (Marking every cell that any tap of the hole reaches grows the hole by
the taps' reach at each level: a few scales down it covered four times its area, and a coarse
layout with so little known context came out as a flat average, the fog seen in large holes.)

Here is the pure geometry, finest level first:

* :func:`known_share`, :func:`share_hole` and :func:`without_hole`: the share pyramid, the hole it
  gives at each level and a level's values from its known pixels alone;
* :func:`hole_pyramid`: excluded cells (several references' gaps) at every pixel level, each
  level from the one above with the pyramid's own resampling taps: a cell is excluded when any
  tap with a nonzero weight reads an excluded cell (nothing of them may reach a patch);
* :func:`latent_hole`: the same for a latent grid of a lapped codec (a cell's 2f×2f block);
* :func:`allowed_patches`: the reference patches that touch no hole cell: the inpainting
  candidate set (the hole is not copied from itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gigasid.core.pyramid import resample, resample_taps

#: a coarse cell is known when at least this share of its resampling weight reads known pixels
#: (a higher threshold measured worse on photos with a 6 % hole: its larger coarse holes lose the
#: context that continues the surroundings)
KNOWN_SHARE = 0.5


def known_share(hole: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The share of each cell's resampling weight that reads known pixels, float32 (H, W) per
    level of a pyramid of ``shapes`` (finest first; ``hole``, bool, is the finest level), each level
    resampled from the one above as the reference pyramid is."""
    levels = [(~hole.to(torch.bool)).to(torch.float32)]
    for shape in shapes[1:]:
        levels.append(resample(levels[-1], shape))
    return levels


def share_hole(share: torch.Tensor) -> torch.Tensor:
    """The hole of a level (bool): the cells whose known share is below :data:`KNOWN_SHARE`."""
    return share < KNOWN_SHARE


def without_hole(weighted: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """A level (C, h, w) from the known pixels alone: ``weighted`` is the level of the reference
    times its known share (the pyramid of reference·share), divided by ``share`` (its rows and
    columns; a band of both gives the band's values). The hole's cells are 0: no patch reads them."""
    known = ~share_hole(share)
    return torch.where(known, weighted / torch.where(known, share, torch.ones_like(share)), torch.zeros_like(weighted))


def _dilate_axis(hole: torch.Tensor, axis: int, out_len: int) -> torch.Tensor:
    """Resample a boolean grid along one axis with "any nonzero tap" instead of a weighted sum."""
    in_len = hole.shape[axis]
    if in_len == out_len:
        return hole
    indices, weights = resample_taps(in_len, out_len)
    touched = torch.zeros((out_len, *hole.shape[1:]) if axis == 0 else (hole.shape[0], out_len), dtype=torch.bool)
    for tap in range(indices.shape[1]):
        live = weights[:, tap] != 0.0
        picked = hole.index_select(axis, indices[:, tap])
        touched |= picked & (live[:, None] if axis == 0 else live[None, :])
    return touched


def dilate_resample(hole: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The cells of a ``shape`` grid whose resampled value (``core.pyramid.resample``, rows then
    columns) reads any cell of ``hole``."""
    return _dilate_axis(_dilate_axis(hole, 0, shape[0]), 1, shape[1])


def hole_pyramid(hole: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The hole at every level of a pyramid of ``shapes`` (finest first; ``hole`` is the finest),
    each level from the one above, as the reference pyramid is resampled."""
    levels = [hole.to(torch.bool)]
    for shape in shapes[1:]:
        levels.append(dilate_resample(levels[-1], shape))
    return levels


def latent_hole(hole: torch.Tensor, factor: int) -> torch.Tensor:
    """The latent cells of a lapped codec (cell i holds the 2f×2f block [f·i − f/2, f·i + 3f/2))
    whose block touches ``hole``: ceil(H/f) × ceil(W/f)."""
    height, width = hole.shape
    rows, cols = -(-height // factor), -(-width // factor)
    half = factor // 2
    # pad so that the last cell's block is inside: 2f + f·(n - 1) values from -f/2
    padded = F.pad(hole[None, None].float(), (half, factor * cols + factor - half - width,
                                              half, factor * rows + factor - half - height))
    return F.max_pool2d(padded, 2 * factor, stride=factor)[0, 0, :rows, :cols] > 0


def allowed_patches(hole: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(grid_h, grid_w) bool: the P×P patches (by top-left corner) that touch no hole cell."""
    touched = F.max_pool2d(hole[None, None].float(), patch_size, stride=1)[0, 0]
    return touched == 0
