"""One sampler step on one tile: the in-memory step (``core.sampler``), restricted to a box.

:class:`ScaleStepper` holds what a scale's steps share (its image denoiser, shapes, schedule,
seed) and computes, for a tile core and a step t, which ranges of x_t and of the finished coarser
scale it needs (:meth:`ScaleStepper.plan`) and x_{t-1} on the core from those
(:meth:`ScaleStepper.step`). The order of operations is the sampler's, value for value:
denoise → ε̂ from the unblended estimate → Laplacian blend (not on the last step) → Eq. 5 step with
noise keyed by global position. Pure torch; the caller does the reading and writing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.noise import gaussian_noise
from gigasid.core.noise_schedule import epsilon_from_x_hat, step
from gigasid.core.patches import grid_shape
from gigasid.core.pyramid import half_shape, resample_axis
from gigasid.tiling.geometry import AxisPlan, plan_axis

Box = tuple[int, int, int, int]  # half-open (row0, col0, row1, col1)


@dataclass
class TilePlan:
    rows: AxisPlan
    cols: AxisPlan

    @property
    def read_box(self) -> Box:
        return (self.rows.read[0], self.cols.read[0], self.rows.read[1], self.cols.read[1])

    @property
    def coarse_box(self) -> Box | None:
        if self.rows.coarse is None:
            return None
        return (self.rows.coarse[0], self.cols.coarse[0], self.rows.coarse[1], self.cols.coarse[1])


@dataclass
class ScaleStepper:
    """The steps of one output scale, tile by tile."""

    denoiser: ImageDenoiser
    shape: tuple[int, int]  # this scale's output (H, W)
    coarser_shape: tuple[int, int] | None  # the finished scale above, None on the coarsest
    alphas: torch.Tensor
    sigmas: torch.Tensor
    eta: float
    seed: int
    scale: int
    channels: int
    periodic: bool
    search_stride: int = 1

    @property
    def patch_size(self) -> int:
        return self.denoiser.patch_size

    def blends(self, t: int) -> bool:
        return self.coarser_shape is not None and t != 1

    def plan(self, core: Box, t: int) -> TilePlan:
        r0, c0, r1, c1 = core
        coarse = self.coarser_shape if self.blends(t) else (None, None)
        options = {"patch_size": self.patch_size, "search_stride": self.search_stride, "periodic": self.periodic}
        return TilePlan(
            plan_axis((r0, r1), self.shape[0], coarse_length=coarse[0], **options),
            plan_axis((c0, c1), self.shape[1], coarse_length=coarse[1], **options),
        )

    def initial(self, core: Box) -> torch.Tensor:
        """x_T on the core: sigma_max times noise keyed by (seed, scale, step 0, position)."""
        return float(self.sigmas[-1]) * gaussian_noise(self.seed, self.scale, 0, self.channels, core)

    def step(
        self, core: Box, t: int, x_read: torch.Tensor, coarse_read: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_{t-1} on ``core`` from x_t over ``plan(core, t).read_box`` (and the coarser scale
        over ``coarse_box`` when the step blends)."""
        plan = self.plan(core, t)
        rr0, rc0 = plan.rows.read[0], plan.cols.read[0]
        alpha, sigma = float(self.alphas[t]), float(self.sigmas[t])
        height, width = self.shape
        global_grid = grid_shape(height, width, self.patch_size, periodic=self.periodic)
        x_hat = self.denoiser(x_read, alpha, sigma, step=t, origin=(rr0, rc0), global_grid=global_grid)
        (er0, er1), (ec0, ec1) = plan.rows.estimate, plan.cols.estimate
        r0, c0, r1, c1 = core
        x_hat_est = x_hat[:, er0 - rr0 : er1 - rr0, ec0 - rc0 : ec1 - rc0]
        x_core = x_read[:, r0 - rr0 : r1 - rr0, c0 - rc0 : c1 - rc0]
        x_hat_core = x_hat_est[:, r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0]
        eps_hat = epsilon_from_x_hat(x_core, x_hat_core, alpha, sigma)
        if self.blends(t):
            x_hat_core = self._blend(plan, x_hat_est, x_hat_core, coarse_read)
        alpha_to, sigma_to = float(self.alphas[t - 1]), float(self.sigmas[t - 1])
        fresh = None
        if self.eta > 0.0 and sigma_to > 0.0:
            fresh = gaussian_noise(self.seed, self.scale, t, self.channels, core)
        return step(x_hat_core, eps_hat, alpha_to=alpha_to, sigma_to=sigma_to, eta=self.eta, noise=fresh)

    def _blend(self, plan: TilePlan, x_hat_est, x_hat_core, coarse_read) -> torch.Tensor:
        """up(coarser) + (x_hat - up(down(x_hat))) on the core, as ``core.pyramid.laplacian_blend``."""
        height, width = self.shape
        half_h, half_w = half_shape(height, width)
        core_rows, core_cols = plan.rows.core, plan.cols.core
        est_rows, est_cols = plan.rows.estimate, plan.cols.estimate
        half_rows = _half_span(half_h, height, core_rows, self.periodic)
        half_cols = _half_span(half_w, width, core_cols, self.periodic)
        periodic = self.periodic
        # down: rows then columns (as ``resample``), only the half-level positions the up needs
        low = resample_axis(x_hat_est, 1, half_h, periodic=periodic, in_len=height, src_start=est_rows[0],
                            out_range=half_rows)
        low = resample_axis(low, 2, half_w, periodic=periodic, in_len=width, src_start=est_cols[0],
                            out_range=half_cols)
        # up: rows then columns, onto the core
        low = resample_axis(low, 1, height, periodic=periodic, in_len=half_h, src_start=half_rows[0],
                            out_range=core_rows)
        low = resample_axis(low, 2, width, periodic=periodic, in_len=half_w, src_start=half_cols[0],
                            out_range=core_cols)
        coarse_h, coarse_w = self.coarser_shape
        up = resample_axis(coarse_read, 1, height, periodic=periodic, in_len=coarse_h,
                           src_start=plan.rows.coarse[0], out_range=core_rows)
        up = resample_axis(up, 2, width, periodic=periodic, in_len=coarse_w,
                           src_start=plan.cols.coarse[0], out_range=core_cols)
        return up + (x_hat_core - low)


def _half_span(half: int, length: int, core: tuple[int, int], periodic: bool) -> tuple[int, int]:
    from gigasid.core.pyramid import resample_taps

    taps, _ = resample_taps(half, length, periodic=periodic, out_range=core, wrap=False)
    return int(taps.min()), int(taps.max()) + 1


def take(image: torch.Tensor, box: Box, *, periodic: bool) -> torch.Tensor:
    """The (C, …) values of a (C, H, W) image over a box; on a periodic image the box may wrap."""
    r0, c0, r1, c1 = box
    _, height, width = image.shape
    if not periodic:
        return image[:, r0:r1, c0:c1]
    rows = torch.arange(r0, r1) % height
    cols = torch.arange(c0, c1) % width
    return image[:, rows][:, :, cols]
