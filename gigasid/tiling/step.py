"""The sampler step (DESIGN.md §2), on one box of one scale: the only implementation there is.

Every output scale runs its own T-step trajectory from noise, coarsest first. :class:`ScaleStepper`
holds what a scale's steps share (its image denoiser, shapes, schedule, seed, the application's
options) and computes, for a tile core and a step t, which boxes of x_t and of the finished
coarser scale it reads (:meth:`ScaleStepper.plan`, :meth:`ScaleStepper.reads`) and x_{t-1} on the
core from them (:meth:`ScaleStepper.step`). The order of operations, value for value:

1. denoise x_t (paper Alg. 1) over the box the estimate needs;
2. symmetric: average x_hat with its mirror image(s) (the mirrored boxes are denoised from their
   own reads), so the last estimate — the output — mirrors exactly;
3. ε̂ from that estimate, before any blend (paper Eq. 5 uses the denoiser's output);
4. on every scale but the coarsest and every step but the last, the Laplacian blend with the
   finished coarser scale;
5. the Eq. 5 update, with fresh noise (η > 0) keyed by (seed, scale, step, global position);
6. an output with a known region (outpaint, inpaint; ``core.known``): its known cells replaced by
   the known values noised to the new level (:meth:`ScaleStepper.hold`), x_T's included.

A core covering the whole image is stepped as a whole image: the denoiser sees the image itself
(periodic wrap done inside it, whole-image candidate search, so index coherence works) and the
blend is ``core.pyramid.laplacian_blend``. Any other core is a crop plus its halo; the two give
the same values (tests/graph: tiled == whole-image, bit for bit). Tileable outputs use periodic
denoisers and resampling; retarget's given coarsest scale is not stepped at all (the engine writes
it). Pure torch: the caller reads and writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.noise import gaussian_noise
from gigasid.core.noise_schedule import epsilon_from_x_hat, step
from gigasid.core.patches import Periodic, grid_shape, periodic_axes
from gigasid.core.pyramid import half_shape, laplacian_blend, resample_axis, resample_taps
from gigasid.tiling.geometry import AxisPlan, plan_axis, read_range

Box = tuple[int, int, int, int]  # half-open (row0, col0, row1, col1)
Symmetry = Literal["none", "horizontal", "vertical", "both"]
Known = tuple[torch.Tensor, torch.Tensor]  # known values (C, h, w) and uint8 mask (1, h, w) over a core
# the mirror images a symmetric estimate averages with: (flip rows, flip columns)
_MIRRORS = {"none": (), "horizontal": ((False, True),), "vertical": ((True, False),),
            "both": ((False, True), (True, False), (True, True))}


@dataclass
class TilePlan:
    rows: AxisPlan
    cols: AxisPlan

    @property
    def read_box(self) -> Box:
        return (self.rows.read[0], self.cols.read[0], self.rows.read[1], self.cols.read[1])

    @property
    def estimate_box(self) -> Box:
        return (self.rows.estimate[0], self.cols.estimate[0], self.rows.estimate[1], self.cols.estimate[1])

    @property
    def coarse_box(self) -> Box | None:
        if self.rows.coarse is None:
            return None
        return (self.rows.coarse[0], self.cols.coarse[0], self.rows.coarse[1], self.cols.coarse[1])


@dataclass
class ScaleStepper:
    """The steps of one output scale, box by box."""

    denoiser: ImageDenoiser
    shape: tuple[int, int]  # this scale's output (H, W)
    coarser_shape: tuple[int, int] | None  # the finished scale above, None on the coarsest
    alphas: torch.Tensor
    sigmas: torch.Tensor
    eta: float
    seed: int
    scale: int
    channels: int
    periodic: Periodic  # both axes, or (rows, columns)
    search_stride: int = 1
    symmetry: Symmetry = "none"

    @property
    def patch_size(self) -> int:
        return self.denoiser.patch_size

    @property
    def wraps(self) -> tuple[bool, bool]:
        """(rows, columns): which axes wrap around."""
        return periodic_axes(self.periodic)

    @property
    def num_steps(self) -> int:
        return len(self.alphas) - 1

    def blends(self, t: int) -> bool:
        return self.coarser_shape is not None and t != 1

    def whole(self, core: Box) -> bool:
        return core == (0, 0, *self.shape)

    def plan(self, core: Box, t: int) -> TilePlan:
        """The ranges a core reads at step t (a whole-image core reads just the image)."""
        r0, c0, r1, c1 = core
        blends = self.blends(t)
        if self.whole(core):
            coarse = self.coarser_shape if blends else None
            return TilePlan(
                AxisPlan((r0, r1), (r0, r1), (r0, r1), None if coarse is None else (0, coarse[0])),
                AxisPlan((c0, c1), (c0, c1), (c0, c1), None if coarse is None else (0, coarse[1])),
            )
        coarse = self.coarser_shape if blends else (None, None)
        options = {"patch_size": self.patch_size, "search_stride": self.search_stride}
        wrap_rows, wrap_cols = self.wraps
        return TilePlan(
            plan_axis((r0, r1), self.shape[0], coarse_length=coarse[0], periodic=wrap_rows, **options),
            plan_axis((c0, c1), self.shape[1], coarse_length=coarse[1], periodic=wrap_cols, **options),
        )

    def reads(self, core: Box, t: int) -> list[Box]:
        """The boxes of x_t that step t of ``core`` reads: its own read box, then one per mirror
        image whose estimate needs another box (symmetric; in :meth:`step`'s ``mirrored`` order)."""
        plan = self.plan(core, t)
        boxes = [plan.read_box]
        for flips in _MIRRORS[self.symmetry]:
            box = self._mirror_read(plan, flips)
            if box != plan.read_box and box not in boxes:
                boxes.append(box)
        return boxes

    def initial(self, core: Box, known: Known | None = None) -> torch.Tensor:
        """x_T on the core: sigma_max times noise keyed by (seed, scale, step 0, position); the
        known cells (``known``: values and uint8 mask over the core) held (:meth:`hold`)."""
        noise = gaussian_noise(self.seed, self.scale, 0, self.channels, core)
        x = float(self.sigmas[-1]) * noise
        return x if known is None else self.hold(core, self.num_steps, x, known, start=noise)

    def hold(
        self, core: Box, index: int, x: torch.Tensor, known: Known, *, start: torch.Tensor | None = None,
        fresh: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x at schedule index ``index`` with its known cells replaced by the known values noised
        to that level, alpha·known + sigma·eps (diffusion inpainting's rule; ``core.known``).

        eps is what the sampler's own Eq. 5 gives a cell whose estimate is exact: it starts as
        x_T's noise z_0 and each step keeps sqrt(1 - eta²) of it and adds eta times the step's
        fresh noise z_t, so eps = z_0 at eta = 0 (DDIM: the known cells' noise stays the one
        the unknown cells started from) and eps = z_t at eta = 1. In between, sqrt(1 - eta²)·z_0
        + eta·z_t has the right variance but not the exact recurrence's mix of earlier steps'
        noise (a flagged departure: it needs two draws per step, not t). Every draw is keyed by
        position, so a tile holds exactly what the whole image holds.
        """
        values, mask = known
        keep = mask.to(torch.bool)
        if not bool(keep.any()):
            return x
        alpha, sigma = float(self.alphas[index]), float(self.sigmas[index])
        if sigma == 0.0:
            held = alpha * values
        else:
            if (index == self.num_steps or self.eta < 1.0) and start is None:
                start = gaussian_noise(self.seed, self.scale, 0, self.channels, core)
            if index == self.num_steps or self.eta == 0.0:
                eps = start
            elif self.eta == 1.0:
                eps = fresh
            else:
                eps = (1.0 - self.eta**2) ** 0.5 * start + self.eta * fresh
            held = alpha * values + sigma * eps
        return torch.where(keep, held, x)

    def step(
        self,
        core: Box,
        t: int,
        x_read: torch.Tensor,
        coarse_read: torch.Tensor | None = None,
        mirrored: Sequence[torch.Tensor] = (),
        known: Known | None = None,
    ) -> torch.Tensor:
        """x_{t-1} on ``core`` from x_t over ``reads(core, t)`` (``x_read`` the first box,
        ``mirrored`` the others) and the coarser scale over ``plan(core, t).coarse_box`` when the
        step blends; the known cells of an output with a known region held (:meth:`hold`;
        ``known`` is its values and mask over the core). A core that is all known is not
        denoised: what the sampler would give there is replaced anyway."""
        sigma_to = float(self.sigmas[t - 1])
        fresh = None
        if self.eta > 0.0 and sigma_to > 0.0:
            fresh = gaussian_noise(self.seed, self.scale, t, self.channels, core)
        if known is not None and bool(known[1].all()):
            return self.hold(core, t - 1, torch.zeros_like(known[0]), known, fresh=fresh)
        x = self._sampled(core, t, x_read, coarse_read, mirrored, fresh)
        return x if known is None else self.hold(core, t - 1, x, known, fresh=fresh)

    def _sampled(self, core, t, x_read, coarse_read, mirrored, fresh) -> torch.Tensor:
        """The sampler's x_{t-1} on ``core`` (see :meth:`step`)."""
        plan = self.plan(core, t)
        alpha, sigma = float(self.alphas[t]), float(self.sigmas[t])
        reads = dict(zip(self.reads(core, t), (x_read, *mirrored)))
        x_hat_est = self._estimate(plan, t, reads)
        rr0, rc0 = plan.rows.read[0], plan.cols.read[0]
        er0, ec0 = plan.rows.estimate[0], plan.cols.estimate[0]
        r0, c0, r1, c1 = core
        x_core = x_read[:, r0 - rr0 : r1 - rr0, c0 - rc0 : c1 - rc0]
        x_hat_core = x_hat_est[:, r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0]
        eps_hat = epsilon_from_x_hat(x_core, x_hat_core, alpha, sigma)
        if self.blends(t):
            if self.whole(core):
                x_hat_core = laplacian_blend(x_hat_core, coarse_read, periodic=self.periodic)
            else:
                x_hat_core = self._blend(plan, x_hat_est, x_hat_core, coarse_read)
        alpha_to, sigma_to = float(self.alphas[t - 1]), float(self.sigmas[t - 1])
        return step(x_hat_core, eps_hat, alpha_to=alpha_to, sigma_to=sigma_to, eta=self.eta, noise=fresh)

    def matches(self, core: Box, x_read: torch.Tensor) -> tuple[Box, torch.Tensor, torch.Tensor] | None:
        """The last step's candidates and weights of the queries whose patches start in ``core``
        (the correspondence decode's input): (query box, positions, weights), both (h, w, k); None
        when no query starts there (a core below or right of the last patch)."""
        plan = self.plan(core, 1)
        grid_h, grid_w = grid_shape(*self.shape, self.patch_size, periodic=self.periodic)
        alpha, sigma = float(self.alphas[1]), float(self.sigmas[1])
        if self.whole(core):
            positions, found = self.denoiser.matches(x_read, alpha, sigma, step=1)
            return (0, 0, grid_h, grid_w), positions, found
        rr0, rc0 = plan.rows.read[0], plan.cols.read[0]
        positions, found = self.denoiser.matches(
            x_read, alpha, sigma, step=1, origin=(rr0, rc0), global_grid=(grid_h, grid_w)
        )
        r0, c0, r1, c1 = core[0], core[1], min(core[2], grid_h), min(core[3], grid_w)
        if r1 <= r0 or c1 <= c0:
            return None
        cut = (slice(r0 - rr0, r1 - rr0), slice(c0 - rc0, c1 - rc0))
        return (r0, c0, r1, c1), positions[cut], found[cut]

    # --- the parts of a step --------------------------------------------------------------------

    def _denoise(self, read_box: Box, x_read: torch.Tensor, t: int) -> torch.Tensor:
        """x_hat over a read box (a whole image is denoised as itself, a crop by global position)."""
        alpha, sigma = float(self.alphas[t]), float(self.sigmas[t])
        if self.whole(read_box):
            return self.denoiser(x_read, alpha, sigma, step=t)
        global_grid = grid_shape(*self.shape, self.patch_size, periodic=self.periodic)
        return self.denoiser(x_read, alpha, sigma, step=t, origin=read_box[:2], global_grid=global_grid)

    def _estimate(self, plan: TilePlan, t: int, reads: dict[Box, torch.Tensor]) -> torch.Tensor:
        """x_hat over the plan's estimate box, mirrored when the output is symmetric."""
        read_box = plan.read_box
        x_hat = self._denoise(read_box, reads[read_box], t)
        estimate = _cut(x_hat, read_box, plan.estimate_box)
        if self.symmetry == "none":
            return estimate
        images = {(False, False): estimate}
        for flips in _MIRRORS[self.symmetry]:
            box = self._mirror_read(plan, flips)
            denoised = x_hat if box == read_box else self._denoise(box, reads[box], t)
            cut = _cut(denoised, box, self._mirror_box(plan.estimate_box, flips))
            images[flips] = cut.flip([axis for axis, flip in ((-2, flips[0]), (-1, flips[1])) if flip])
        # the whole image's mirror(x_hat) = 0.5 (x + flip(x)) per axis, columns first: the same
        # additions in the same order, so a tile equals the whole image bit for bit
        if self.symmetry == "horizontal":
            return 0.5 * (images[(False, False)] + images[(False, True)])
        if self.symmetry == "vertical":
            return 0.5 * (images[(False, False)] + images[(True, False)])
        upper = 0.5 * (images[(False, False)] + images[(False, True)])
        lower = 0.5 * (images[(True, False)] + images[(True, True)])
        return 0.5 * (upper + lower)

    def _mirror_box(self, box: Box, flips: tuple[bool, bool]) -> Box:
        r0, c0, r1, c1 = box
        height, width = self.shape
        if flips[0]:
            r0, r1 = height - r1, height - r0
        if flips[1]:
            c0, c1 = width - c1, width - c0
        return (r0, c0, r1, c1)

    def _mirror_read(self, plan: TilePlan, flips: tuple[bool, bool]) -> Box:
        """The read box whose denoised values cover the mirror image of the estimate box."""
        if self.whole(plan.read_box):
            return plan.read_box
        r0, c0, r1, c1 = self._mirror_box(plan.estimate_box, flips)
        options = {"patch_size": self.patch_size, "search_stride": self.search_stride}
        rows = read_range((r0, r1), self.shape[0], periodic=self.wraps[0], **options)
        cols = read_range((c0, c1), self.shape[1], periodic=self.wraps[1], **options)
        return (rows[0], cols[0], rows[1], cols[1])

    def _blend(self, plan: TilePlan, x_hat_est, x_hat_core, coarse_read) -> torch.Tensor:
        """up(coarser) + (x_hat - up(down(x_hat))) on the core, as ``core.pyramid.laplacian_blend``."""
        height, width = self.shape
        half_h, half_w = half_shape(height, width)
        core_rows, core_cols = plan.rows.core, plan.cols.core
        est_rows, est_cols = plan.rows.estimate, plan.cols.estimate
        wrap_rows, wrap_cols = self.wraps
        half_rows = _half_span(half_h, height, core_rows, wrap_rows)
        half_cols = _half_span(half_w, width, core_cols, wrap_cols)
        # down: rows then columns (as ``resample``), only the half-level positions the up needs
        low = resample_axis(x_hat_est, 1, half_h, periodic=wrap_rows, in_len=height, src_start=est_rows[0],
                            out_range=half_rows)
        low = resample_axis(low, 2, half_w, periodic=wrap_cols, in_len=width, src_start=est_cols[0],
                            out_range=half_cols)
        # up: rows then columns, onto the core
        low = resample_axis(low, 1, height, periodic=wrap_rows, in_len=half_h, src_start=half_rows[0],
                            out_range=core_rows)
        low = resample_axis(low, 2, width, periodic=wrap_cols, in_len=half_w, src_start=half_cols[0],
                            out_range=core_cols)
        coarse_h, coarse_w = self.coarser_shape
        up = resample_axis(coarse_read, 1, height, periodic=wrap_rows, in_len=coarse_h,
                           src_start=plan.rows.coarse[0], out_range=core_rows)
        up = resample_axis(up, 2, width, periodic=wrap_cols, in_len=coarse_w,
                           src_start=plan.cols.coarse[0], out_range=core_cols)
        return up + (x_hat_core - low)


def _cut(values: torch.Tensor, box: Box, inner: Box) -> torch.Tensor:
    """The part of ``values`` (laid over ``box``) that lies over ``inner``."""
    return values[:, inner[0] - box[0] : inner[2] - box[0], inner[1] - box[1] : inner[3] - box[1]]


def _half_span(half: int, length: int, core: tuple[int, int], periodic: bool) -> tuple[int, int]:
    taps, _ = resample_taps(half, length, periodic=periodic, out_range=core, wrap=False)
    return int(taps.min()), int(taps.max()) + 1


def take(image: torch.Tensor, box: Box, *, periodic: Periodic) -> torch.Tensor:
    """The (C, …) values of a (C, H, W) image over a box, which may wrap around the periodic axes."""
    r0, c0, r1, c1 = box
    _, height, width = image.shape
    wrap_rows, wrap_cols = periodic_axes(periodic)
    if not (wrap_rows or wrap_cols):
        return image[:, r0:r1, c0:c1]
    rows = torch.arange(r0, r1) % height if wrap_rows else torch.arange(r0, r1)
    cols = torch.arange(c0, c1) % width if wrap_cols else torch.arange(c0, c1)
    return image[:, rows][:, :, cols]
