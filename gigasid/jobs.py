"""In-memory jobs: from a reference tensor and a :class:`JobConfig` to a sampled image.

:func:`prepare` builds what does not depend on the seed (the reference pyramid, its latents, one
denoiser per scale: ``gigasid.plan``), so that several samples reuse it; :func:`run` samples one
image by running the engine (``graph.engine.run_in_memory``) on a store held in memory, one
whole-image tile per scale, on the synchronous executor: the same tasks and the same step as a
tiled job on disk, not a second sampler. No file I/O here; ``cli`` reads and writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gigasid import plan as job_plan
from gigasid.codecs import Codec, latent_shape
from gigasid.config import JobConfig
from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.noise_schedule import make_noise_schedule
from gigasid.plan import (
    codec_factor,
    default_size,
    output_shapes,
    reference_pyramid,
    scale_denoiser,
    structure_size,
    to_pixels,
)


@dataclass
class ScaleTiming:
    """Wall time of one finished scale."""

    scale: int
    shape: tuple[int, int]
    seconds: float


@dataclass
class SampleResult:
    """The finished scales, finest first (index = scale), and per-scale timings."""

    scales: list[torch.Tensor]
    timings: list[ScaleTiming] = field(default_factory=list)
    #: the pixel image, when the scales are latents a decoder turned into pixels
    decoded: torch.Tensor | None = None

    @property
    def image(self) -> torch.Tensor:
        """The output: the decoded pixels of a latent job, else the finest scale."""
        return self.decoded if self.decoded is not None else self.scales[0]


@dataclass
class PreparedJob:
    """Everything that does not depend on the seed: reuse it across samples.

    Shapes and ``channels`` are those of the sampling grid: pixels, or latent cells of ``codec``.
    """

    config: JobConfig
    reference_shapes: list[tuple[int, int]]
    output_shapes: list[tuple[int, int]]
    channels: int
    denoisers: list[ImageDenoiser]
    fixed_coarsest: torch.Tensor | None
    setup_seconds: list[float] = field(default_factory=list)  # per scale, finest first
    codec: Codec | None = None  # None: the job samples pixels
    pixel_reference: torch.Tensor | None = None  # the finest pixel level (correspondence decode, text style)
    size: tuple[int, int] | None = None  # the pixel output (H, W)
    pixel_shapes: list[tuple[int, int]] = field(default_factory=list)
    image_channels: int = 3
    #: outpaint, inpaint: (``plan.KnownRegion``, the reference's levels, the inpainting hole or None)
    known: tuple | None = None
    #: ``latent.layout=pixel``: the reference's coarsest pixel level, sampled per seed
    layout_level: torch.Tensor | None = None

    def plan(self, seed: int) -> job_plan.JobPlan:
        """The job plan of one sample: one whole-image tile per scale."""
        return job_plan.JobPlan.whole(
            self.config, seed, self.size, channels=self.channels, image_channels=self.image_channels,
            factor=1 if self.codec is None else self.codec.factor, reference_shapes=self.reference_shapes,
            pixel_reference_shapes=self.pixel_shapes, output_shapes=self.output_shapes,
        )


def prepare(
    image: torch.Tensor,
    config: JobConfig,
    *,
    size: tuple[int, int] | None = None,
    structure: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
) -> PreparedJob:
    """Build the reference pyramid (and its latents), the output shapes and one denoiser per scale.

    ``image`` is (C, H, W) in [-1, 1]; ``size`` the pixel output (H, W), default the input scaled
    by ``config.output_scale``. ``structure``: the layout image of an analogy, (C', H', W') in
    [-1, 1] (then the default size is its own, scaled; ``plan.structure_size``). ``mask``: inpaint's
    region to regenerate, bool (H, W) (True = regenerate). ``excluded``: pixels of ``image`` that
    are no reference (several references on one canvas, ``plan.reference_atlas``), bool (H, W).
    """
    job_plan.check_structure(config, structure is not None)
    job_plan.check_mask_given(config, mask is not None)
    channels, height, width = image.shape
    if mask is not None:
        job_plan.check_mask(np.asarray(mask), (height, width))
        mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    if job_plan.known_kind(config) is not None:
        size = job_plan.known_size(config, (height, width), size)
    if structure is not None:
        size = job_plan.structure_size(tuple(structure.shape[1:]), size, config)
    pixel_levels = reference_pyramid(image, config, mask)  # inpaint: the known pixels' pyramid
    pixel_shapes = [tuple(level.shape[-2:]) for level in pixel_levels]
    codec = job_plan.build_codec(
        config, lambda s, b: pixel_levels[s][:, b[0] : b[2], b[1] : b[3]], pixel_shapes, channels
    )
    levels = pixel_levels if codec is None else [job_plan.encode_level(codec, level) for level in pixel_levels]
    ref_shapes = [tuple(level.shape[-2:]) for level in levels]
    if size is None:
        size = default_size(height, width, config)
    out_shapes = output_shapes(pixel_shapes, size, config)
    periodic = job_plan.wraps(config)
    region = job_plan.known_region(config, (height, width), size, ref_shapes, out_shapes)
    holes = None if mask is None else job_plan.known_holes(config, mask, pixel_shapes)
    if excluded is not None:  # several references: the gaps between them are no patches
        holes = job_plan.excluded_cells(config, torch.as_tensor(excluded, dtype=torch.bool), pixel_shapes)
    denoisers, setup = [], []
    for scale, level in enumerate(levels):
        started = time.perf_counter()
        excluded = None if holes is None else holes[scale]  # inpaint: the hole is not copied from itself
        balance = job_plan.usage_balance(config, out_shapes[-1], ref_shapes[-1]) if scale == len(levels) - 1 else None
        denoisers.append(scale_denoiser(level, config, periodic=periodic, excluded=excluded, balance=balance))
        setup.append(time.perf_counter() - started)
    fixed = None
    if structure is not None:  # analogy: the structure's pyramid down to the output's coarsest grid
        coarsest = job_plan.output_pyramid_shapes(pixel_shapes, *size)[-1]
        shapes = job_plan.structure_shapes(*structure.shape[1:], coarsest)
        layout = job_plan.structure_pyramid(job_plan.match_channels(structure, channels), shapes)[-1]
        fixed = job_plan.structure_coarsest(layout, codec, denoisers[-1], config)
    elif job_plan.application(config).text_guided:
        job_plan.check_style_size(pixel_shapes[0], size)
    elif job_plan.application(config).given_coarsest:
        fixed = job_plan.given_coarsest(levels[-1], out_shapes[-1], job_plan.wraps(config))
    layout_level = pixel_levels[-1] if job_plan.pixel_layout(config) else None
    sampled_channels = channels if codec is None else codec.channels
    return PreparedJob(
        config, ref_shapes, out_shapes, sampled_channels, denoisers, fixed, setup, codec,
        image if codec is not None or job_plan.application(config).text_guided else None, tuple(size),
        pixel_shapes, channels,
        known=None if region is None else (region, levels, mask), layout_level=layout_level,
    )


def run(job: PreparedJob, *, seed: int, on_scale=None) -> SampleResult:
    """Sample one image of a prepared job: (C, H, W) in [-1, 1] at ``result.image``."""
    from gigasid.graph import engine

    pixels = None if job.pixel_reference is None else job.pixel_reference.numpy()
    given = job.fixed_coarsest
    if job.layout_level is not None:
        given = engine.pixel_layout(job.config, seed, job.layout_level, job.output_shapes[-1], job.codec)
    store = engine.run_in_memory(
        job.plan(seed), job.denoisers, codec=job.codec, pixel_reference=pixels, given_coarsest=given,
        known=job.known,
    )
    timings = store.manifest["timings"]
    result = SampleResult(
        [torch.from_numpy(store.array(f"scales/{s}/final")[...]) for s in range(len(job.output_shapes))],
        [ScaleTiming(s, job.output_shapes[s], float(timings.get(str(s), 0.0)))
         for s in reversed(range(len(job.output_shapes)))],
    )
    if job.codec is not None:
        result.decoded = torch.from_numpy(np.asarray(store.array("output")[...]))
    if on_scale is not None:
        for timing in result.timings:
            on_scale(timing)
    return result


def generate(
    image: torch.Tensor, config: JobConfig, *, seed: int = 0, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """One sample, (C, H, W) in [-1, 1], from a (C, H, W) reference in [-1, 1]."""
    return run(prepare(image, config, size=size), seed=seed).image


__all__ = [
    "PreparedJob", "SampleResult", "ScaleTiming", "codec_factor", "generate", "latent_shape", "make_noise_schedule",
    "output_shapes", "prepare", "reference_pyramid", "run", "scale_denoiser", "structure_size", "to_pixels",
]
