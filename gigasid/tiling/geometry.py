"""The receptive field of one sampler step, per axis: what a tile must read to be exact.

For a tile core [a, b) on an axis of length L at step t (DESIGN.md §4.2):

* the Laplacian blend (all steps but the last, all scales but the coarsest) makes the blended
  estimate on the core depend on the unblended x_hat over ``estimate`` = the down-sampling taps of
  the half-level range that the up-sampling taps of the core read; the coarser scale is read
  over ``coarse`` = the up-sampling taps of the core;
* x_hat on ``estimate`` depends on x_t over ``read``: every patch covering a pixel reaches P-1
  further, and with a strided index search a patch takes its candidates from a searched patch up
  to ``search_stride - 1`` before it.

Ranges are half-open and, on a periodic (tileable) axis, unwrapped: they may start below 0 or end
past L, meaning the values wrap around. On a plain axis they are clipped to [0, L).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gigasid.core.pyramid import half_shape, resample_taps

Range = tuple[int, int]


@dataclass(frozen=True)
class AxisPlan:
    """What one tile reads along one axis."""

    core: Range
    estimate: Range  # x_hat needed (the blend's support)
    read: Range  # x_t needed
    coarse: Range | None  # coarser final needed (None: no blend at this step)


def _span(indices) -> Range:
    return int(indices.min()), int(indices.max()) + 1


def plan_axis(
    core: Range,
    length: int,
    *,
    patch_size: int,
    search_stride: int,
    coarse_length: int | None,
    periodic: bool,
) -> AxisPlan:
    """The ranges one tile core needs along an axis; ``coarse_length`` None means no blend."""
    if coarse_length is None:
        estimate, coarse = core, None
    else:
        half = half_shape(length, length)[0]
        up, _ = resample_taps(half, length, periodic=periodic, out_range=core, wrap=False)
        h0, h1 = _span(up)
        down_lo = _down_span(length, half, h0, periodic)
        down_hi = _down_span(length, half, h1 - 1, periodic)
        estimate = (down_lo[0], down_hi[1])
        coarse_taps, _ = resample_taps(coarse_length, length, periodic=periodic, out_range=core, wrap=False)
        coarse = _span(coarse_taps)
    read = read_range(estimate, length, patch_size=patch_size, search_stride=search_stride, periodic=periodic)
    if not periodic:
        estimate = (max(0, estimate[0]), min(length, estimate[1]))
    return AxisPlan(core=core, estimate=estimate, read=read, coarse=coarse)


def read_range(estimate: Range, length: int, *, patch_size: int, search_stride: int, periodic: bool) -> Range:
    """The x_t an estimate range of x_hat depends on: every patch covering one of its pixels
    reaches P - 1 further, and a strided search takes a patch's candidates from a searched patch
    up to ``search_stride - 1`` before it."""
    reach = patch_size - 1
    read = (estimate[0] - reach - (search_stride - 1), estimate[1] + reach)
    if not periodic:
        read = (max(0, read[0]), min(length, read[1]))
    return read


def _down_span(length: int, half: int, position: int, periodic: bool) -> Range:
    """Fine-level range the down-sampling taps of one (unwrapped) half-level position read."""
    wrapped = position % half if periodic else min(max(position, 0), half - 1)
    taps, _ = resample_taps(length, half, periodic=periodic, out_range=(wrapped, wrapped + 1), wrap=False)
    lo, hi = _span(taps)
    shift = (position - wrapped) // half * length if periodic else 0
    return lo + shift, hi + shift


def halo(length: int, *, patch_size: int, search_stride: int, blend: bool, periodic: bool = False) -> tuple[int, int]:
    """How far (before, after) any tile of an axis reads x_t beyond its core: the maximum over
    every position of the axis (the blend's half-level grid makes the reach vary with position).

    A pure function of the parameters (DESIGN.md §4.2): the halo is computed, never configured.
    Evaluated on the periodic geometry, where no edge clips the reach.
    """
    reach = patch_size - 1
    if not blend:
        return reach + search_stride - 1, reach
    half = half_shape(length, length)[0]
    up, _ = resample_taps(half, length, periodic=True, wrap=False)  # (length, taps), raw
    down, _ = resample_taps(length, half, periodic=True, wrap=False)  # (half, taps), raw
    down_lo, down_hi = down.min(1).values, down.max(1).values + 1

    def fine_span(position):  # the fine range the down taps of (unwrapped) half positions read
        wrapped = position % half
        shift = (position - wrapped) // half * length
        return down_lo[wrapped] + shift, down_hi[wrapped] + shift

    lo, _ = fine_span(up.min(1).values)
    _, hi = fine_span(up.max(1).values)
    positions = torch.arange(length)
    before = int((positions - (lo - reach - (search_stride - 1))).max())
    after = int(((hi + reach) - (positions + 1)).max())
    return before, after


def tile_ranges(length: int, tile: int) -> list[Range]:
    """Cores of the tiles along an axis: [0, tile), [tile, 2·tile), ..., the last one shorter."""
    return [(start, min(length, start + tile)) for start in range(0, length, tile)]
