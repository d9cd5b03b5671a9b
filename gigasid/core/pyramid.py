"""Pyramid geometry, antialiased cubic resampling and the two-scale Laplacian blend.

Resampling is separable and expressed as *taps*: for every output index along an axis, the input
indices it reads and their weights. Taps are a pure function of (input length, output length,
boundary), so a tiled engine can take the taps of any output range and know exactly which input
rows it needs. The kernel is Keys' cubic (a = -0.5), widened by the shrink factor when
downsampling (antialiasing), with pixel centres aligned (align_corners=False). At a plain edge,
taps that fall outside are dropped and the rest renormalised; a periodic axis wraps them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

# resample_axis's CPU fast path; torch is the reference and CUDA path
from gigasid.core.jit import numba, parallel_kernels
from gigasid.core.patches import Periodic, periodic_axes

CUBIC_SUPPORT = 2.0  # Keys' cubic is non-zero on (-2, 2)


def pyramid_shapes(
    height: int,
    width: int,
    *,
    min_short_side: int,
    num_scales: int | None = None,
    scale_factor: float = 0.5,
) -> list[tuple[int, int]]:
    """Shapes of the Gaussian pyramid, finest first: level l is ⌈H·f^l⌉ × ⌈W·f^l⌉.

    With ``num_scales`` None the depth is the smallest that brings the short side down to
    ``min_short_side`` (or one less, when that last halving would overshoot far below it while the
    level above is barely over), and the coarsest level is pinned to exactly that short side,
    keeping the aspect ratio (never larger than the level above).
    """
    if min_short_side < 1:
        raise ValueError(f"min_short_side must be >= 1, got {min_short_side}")

    def level(index: int) -> tuple[int, int]:
        factor = scale_factor**index
        return math.ceil(height * factor - 1e-9), math.ceil(width * factor - 1e-9)

    derived = num_scales is None
    if num_scales is None:
        num_scales = 1
        while min(level(num_scales - 1)) > min_short_side:
            num_scales += 1
        # the first level at or below min_short_side may overshoot far below it, while the level
        # above is only just over it (200 → 25 → 13 for 24): then that level is the coarsest
        if num_scales > 2:
            above, last = min(level(num_scales - 2)), min(level(num_scales - 1))
            if above / min_short_side < min_short_side / last:
                num_scales -= 1
    shapes = [level(i) for i in range(num_scales)]
    coarsest = min(shapes[-1])
    if num_scales > 1 and (coarsest < min_short_side or (derived and coarsest != min_short_side)):
        above = shapes[-2]
        if min(above) < min_short_side:
            raise ValueError(
                f"num_scales={num_scales} is too deep for min_short_side={min_short_side}: "
                f"the level above the coarsest is already {above[0]}x{above[1]}"
            )
        short = min(height, width)
        shapes[-1] = (
            min(-(-height * min_short_side // short), above[0]),
            min(-(-width * min_short_side // short), above[1]),
        )
    return shapes


def output_pyramid_shapes(
    reference_shapes: list[tuple[int, int]], output_height: int, output_width: int
) -> list[tuple[int, int]]:
    """The output's shape at every scale: the reference pyramid's sampling density, output extent.

    Level l keeps the reference's ratio between level l and level 0, so each scale's patches are
    matched at the resolution they were taken at. Unconditional runs get the reference shapes.
    """
    ref_h, ref_w = reference_shapes[0]
    return [
        (
            max(1, math.ceil(output_height * h / ref_h - 1e-9)),
            max(1, math.ceil(output_width * w / ref_w - 1e-9)),
        )
        for h, w in reference_shapes
    ]


def _cubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5
    ax = x.abs()
    near = ((a + 2) * ax - (a + 3)) * ax * ax + 1
    far = ((a * ax - 5 * a) * ax + 8 * a) * ax - 4 * a
    return torch.where(ax <= 1, near, torch.where(ax < 2, far, torch.zeros_like(ax)))


def resample_taps(
    in_len: int,
    out_len: int,
    *,
    periodic: bool = False,
    out_range: tuple[int, int] | None = None,
    wrap: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights), each (n_out, taps): output i = Σ_t weights[i, t] · input[indices[i, t]].

    ``out_range`` restricts to output indices [o0, o1) (a tile). Weights are float64 and sum to 1.
    With ``wrap=False`` a periodic axis keeps the raw indices (below 0 or ≥ in_len past an edge),
    which is how a tile knows the contiguous input range it reads.
    """
    o0, o1 = out_range if out_range is not None else (0, out_len)
    ratio = in_len / out_len
    stretch = max(ratio, 1.0)  # widen the kernel when shrinking: antialiasing
    radius = CUBIC_SUPPORT * stretch
    centres = (torch.arange(o0, o1, dtype=torch.float64) + 0.5) * ratio - 0.5
    taps = math.floor(2 * radius) + 2
    first = torch.floor(centres - radius).to(torch.int64) + 1
    indices = first[:, None] + torch.arange(taps, dtype=torch.int64)[None, :]
    weights = _cubic((indices.to(torch.float64) - centres[:, None]) / stretch)
    if periodic:
        if wrap:
            indices = indices % in_len
    else:
        outside = (indices < 0) | (indices >= in_len)
        weights = weights.masked_fill(outside, 0.0)
        indices = indices.clamp(0, in_len - 1)
    weights = weights / weights.sum(1, keepdim=True)
    return indices, weights


@functools.lru_cache(maxsize=256)
def _cached_taps(in_len: int, out_len: int, periodic: bool, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a sampler resamples the same few shapes at every step (the blend): the taps are computed
    # once (callers index into them, never write)
    return resample_taps(in_len, out_len, periodic=periodic, out_range=(first, last))


def resample_axis(
    image: torch.Tensor,
    axis: int,
    out_len: int,
    *,
    periodic: bool = False,
    in_len: int | None = None,
    src_start: int = 0,
    out_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resample one axis to ``out_len`` with antialiased cubic taps.

    A tile passes the part it holds: ``image`` covers input positions [src_start, src_start + n)
    of an axis of length ``in_len`` (unwrapped on a periodic axis), and only output positions
    ``out_range`` (unwrapped too) are computed. The whole-image call is the special case, so a
    tile computes each output value with exactly the same taps and arithmetic.
    """
    in_len = image.shape[axis] if in_len is None else in_len
    o0, o1 = out_range if out_range is not None else (0, out_len)
    positions = torch.arange(o0, o1)
    if in_len == out_len:  # identity: the output is the input at the same positions
        return image.narrow(axis, o0 - src_start, o1 - o0)
    wrapped = positions % out_len if periodic else positions
    first, last = int(wrapped.min()), int(wrapped.max()) + 1
    indices, weights = _cached_taps(in_len, out_len, periodic, first, last)
    indices, weights = indices[wrapped - first], weights[wrapped - first]
    # where the held part starts; on a periodic axis a position and its wraps are the same value
    local = (indices - src_start) % in_len if periodic else indices - src_start
    if int(local.min()) < 0 or int(local.max()) >= image.shape[axis]:
        raise ValueError("resample_axis: the input does not cover the taps of the requested outputs")
    # one gather and multiply-add per tap, summed in tap order: each output value gets the same
    # arithmetic whatever part of the axis a tile holds, and no (…, out, taps) tensor is formed
    local = local.to(image.device)
    weights = weights.to(image.device, image.dtype)
    if numba is not None and image.device.type == "cpu" and image.dtype == torch.float32:
        return _resample_compiled(image, axis, local, weights)
    if axis == image.dim() - 1 and image.dim() > 1:
        # gathering along the last axis is ~20x slower than along a leading one: transpose
        flipped = image.transpose(-1, -2).contiguous()
        out = _resample_gathered(flipped, image.dim() - 2, local, weights)
        return out.transpose(-1, -2).contiguous()
    return _resample_gathered(image, axis, local, weights)


def _resample_gathered(image: torch.Tensor, axis: int, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The torch path (any device): the compiled path's sum, tap by tap. Each product is rounded
    before it is added, as in the kernel (``addcmul_`` fuses them on CPUs with FMA, a bit apart),
    so the two give the same bits (tests/core/test_torch_twins.py)."""
    shape = [1] * image.dim()
    shape[axis] = -1
    out = image.index_select(axis, local[:, 0]) * weights[:, 0].reshape(shape)
    for tap in range(1, local.shape[1]):
        out += image.index_select(axis, local[:, tap]) * weights[:, tap].reshape(shape)
    return out


def _resample_compiled(image: torch.Tensor, axis: int, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The CPU path: the same sum, tap by tap, in a numba loop over contiguous rows (the torch
    ops cost ~20x more here). The axis is moved to the middle of a (B, N, M) view; the last axis
    is transposed first so the inner loop stays contiguous."""
    last = axis == image.dim() - 1
    work = image.transpose(-1, -2) if last and image.dim() > 1 else image
    if last and image.dim() > 1:
        axis -= 1
    work = work.contiguous()
    shape = list(work.shape)
    before = math.prod(shape[:axis])
    after = math.prod(shape[axis + 1 :])
    source = work.reshape(before, shape[axis], after).numpy()
    out = np.empty((before, local.shape[0], after), dtype=np.float32)
    serial = not parallel_kernels()
    kernel = _taps_serial if serial else _taps_parallel
    kernel(source, np.ascontiguousarray(local.numpy()), np.ascontiguousarray(weights.numpy()), out)
    shape[axis] = local.shape[0]
    result = torch.from_numpy(out).reshape(shape)
    if last and image.dim() > 1:
        result = result.transpose(-1, -2).contiguous()
    return result


def resample(image: torch.Tensor, shape: tuple[int, int], *, periodic: Periodic = False) -> torch.Tensor:
    """Resample the last two axes of (..., H, W) to ``shape`` (rows first, then columns); a
    periodic axis wraps (``periodic``: both axes, or (rows, columns))."""
    wrap_rows, wrap_cols = periodic_axes(periodic)
    rows = resample_axis(image, image.dim() - 2, shape[0], periodic=wrap_rows)
    return resample_axis(rows, image.dim() - 1, shape[1], periodic=wrap_cols)


def half_shape(height: int, width: int) -> tuple[int, int]:
    """The next pyramid level's shape below (height, width): ⌈H/2⌉ × ⌈W/2⌉."""
    return math.ceil(height / 2), math.ceil(width / 2)


def laplacian_blend(fine: torch.Tensor, coarser: torch.Tensor, *, periodic: Periodic = False) -> torch.Tensor:
    """Two-scale Laplacian blend: up(coarser) + (fine - up(down(fine))).

    Keeps the fine estimate's detail band and takes its low band from the finished coarser scale
    (paper: TwoScaleBlend). ``down`` goes to ⌈H/2⌉ × ⌈W/2⌉ whatever the coarser scale's shape.
    """
    height, width = fine.shape[-2:]
    low = resample(resample(fine, half_shape(height, width), periodic=periodic), (height, width), periodic=periodic)
    return resample(coarser, (height, width), periodic=periodic) + (fine - low)


if numba is not None:

    # no fastmath: a fused multiply-add in one twin and not the other would change the bits
    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _taps_row(source, local, weights, out, b, i):
        row = out[b, i]
        first = source[b, local[i, 0]]
        w = weights[i, 0]
        for j in range(row.shape[0]):
            row[j] = first[j] * w
        for tap in range(1, local.shape[1]):
            src = source[b, local[i, tap]]
            w = weights[i, tap]
            for j in range(row.shape[0]):
                row[j] += src[j] * w

    @numba.njit(nogil=True, parallel=True, cache=True)
    def _taps_parallel(source, local, weights, out):
        rows = out.shape[1]
        for n in numba.prange(out.shape[0] * rows):
            _taps_row(source, local, weights, out, n // rows, n % rows)

    @numba.njit(nogil=True, cache=True)
    def _taps_serial(source, local, weights, out):
        rows = out.shape[1]
        for n in range(out.shape[0] * rows):
            _taps_row(source, local, weights, out, n // rows, n % rows)
