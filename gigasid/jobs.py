"""Job assembly: from a reference image and a :class:`JobConfig` to a sampled image, in memory.

This is where the layers meet: the reference pyramid and output shapes (``core.pyramid``), one
image denoiser per scale (``core`` backends, with ``index`` candidates for knn), and the
application's options of the coarse-to-fine sampler (``core.sampler``). No file I/O happens here;
``cli`` reads and writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gigasid.config import JobConfig
from gigasid.core.denoisers import ExactDenoiser, FusedDenoiser, KnnDenoiser
from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.noise_schedule import make_noise_schedule
from gigasid.core.patches import grid_shape, unfold_rows
from gigasid.core.pyramid import output_pyramid_shapes, pyramid_shapes, resample
from gigasid.core.sampler import SampleResult, ScaleTiming, sample
from gigasid.errors import ConfigError, InputError
from gigasid.index.candidates import ReferenceCandidates

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class PreparedJob:
    """Everything that does not depend on the seed: reuse it across samples."""

    config: JobConfig
    reference_shapes: list[tuple[int, int]]
    output_shapes: list[tuple[int, int]]
    channels: int
    denoisers: list[ImageDenoiser]
    fixed_coarsest: torch.Tensor | None
    setup_seconds: list[float] = field(default_factory=list)  # per scale, finest first


def reference_shapes(height: int, width: int, config: JobConfig) -> list[tuple[int, int]]:
    """The reference pyramid's shapes, finest first."""
    if min(height, width) < config.patch_size:
        raise InputError(
            f"the image is {height}x{width}, smaller than the patch size {config.patch_size}; "
            "use a larger image or a smaller patch_size (--set patch_size=N)"
        )
    min_short = min(config.min_short_side, height, width)
    try:
        return pyramid_shapes(height, width, min_short_side=min_short, num_scales=config.num_scales)
    except ValueError as error:
        raise ConfigError(f"{error} for this {height}x{width} image; lower num_scales or set it to null") from None


def reference_pyramid(image: torch.Tensor, config: JobConfig) -> list[torch.Tensor]:
    """The reference at every scale, finest first; each level resampled from the one above."""
    shapes = reference_shapes(image.shape[1], image.shape[2], config)
    levels = [image]
    for shape in shapes[1:]:
        levels.append(resample(levels[-1], shape))
    return levels


def default_size(height: int, width: int, config: JobConfig) -> tuple[int, int]:
    return (max(1, round(height * config.output_scale[0])), max(1, round(width * config.output_scale[1])))


def output_shapes(ref_shapes: list[tuple[int, int]], size: tuple[int, int], config: JobConfig) -> list[tuple[int, int]]:
    """The output pyramid; refuses a size whose coarsest scale cannot hold a patch."""
    shapes = output_pyramid_shapes(ref_shapes, *size)
    patch = config.patch_size
    if min(shapes[-1]) < patch:
        need = [-(-patch * full // coarse) for full, coarse in zip(shapes[0], shapes[-1])]
        raise InputError(
            f"output size {size[0]}x{size[1]} is too small: its coarsest scale would be "
            f"{shapes[-1][0]}x{shapes[-1][1]}, smaller than the patch size {patch}; "
            f"ask for at least {need[0]}x{need[1]}"
        )
    return shapes


def prepare(image: torch.Tensor, config: JobConfig, *, size: tuple[int, int] | None = None) -> PreparedJob:
    """Build the reference pyramid, the output shapes and one denoiser per scale.

    ``image`` is (C, H, W) in [-1, 1]; ``size`` the output (H, W), default the input scaled by
    ``config.output_scale``.
    """
    channels, height, width = image.shape
    levels = reference_pyramid(image, config)
    ref_shapes = [tuple(level.shape[-2:]) for level in levels]
    if size is None:
        size = default_size(height, width, config)
    out_shapes = output_shapes(ref_shapes, size, config)
    periodic = config.application == "tileable"
    denoisers, setup = [], []
    for level in levels:
        started = time.perf_counter()
        denoisers.append(scale_denoiser(level, config, periodic=periodic))
        setup.append(time.perf_counter() - started)
    fixed = None
    if config.application == "retarget":
        fixed = resample(levels[-1], out_shapes[-1])
    return PreparedJob(config, ref_shapes, out_shapes, channels, denoisers, fixed, setup)


def scale_denoiser(
    level: torch.Tensor, config: JobConfig, *, periodic: bool, index_dir: Path | None = None
) -> ImageDenoiser:
    """The image denoiser of one scale. With ``index_dir`` a knn index saved there is opened (and
    one built here is saved there), so a job's workers share one index per scale."""
    size = config.patch_size
    backend = config.denoiser.backend
    source = None
    if backend == "knn":
        patch_denoiser = KnnDenoiser(level, size)
        if index_dir is not None and (index_dir / ReferenceCandidates._STATE).is_file():
            source = ReferenceCandidates.load(index_dir)
        else:
            index = config.index
            source = ReferenceCandidates(
                level,
                size,
                k=index.k,
                index=index.kind,
                search_dims=index.search_dims,
                nlist=index.nlist,
                nprobe=index.nprobe,
                coherence=index.coherence,
                search_stride=index.search_stride,
            )
            if index_dir is not None:
                source.save(index_dir)
    else:
        grid_h, _ = grid_shape(*level.shape[-2:], size)
        dataset = unfold_rows(level.contiguous(), size, 0, grid_h)
        dense = ExactDenoiser if backend == "exact" else FusedDenoiser
        patch_denoiser = dense(dataset, compute_dtype=_DTYPES[config.denoiser.compute_dtype])
    return ImageDenoiser(patch_denoiser, patch_size=size, rho=config.rho, periodic=periodic, candidate_source=source)


def run(job: PreparedJob, *, seed: int, on_scale=None) -> SampleResult:
    """Sample one image of a prepared job: (C, H, W) in [-1, 1] at ``result.image``."""
    config = job.config
    alphas, sigmas = make_noise_schedule(config.noise_schedule, config.num_steps)
    return sample(
        job.denoisers,
        job.output_shapes,
        channels=job.channels,
        alphas=alphas,
        sigmas=sigmas,
        eta=config.eta,
        seed=seed,
        symmetry=config.symmetry if config.application == "symmetric" else "none",
        periodic=config.application == "tileable",
        fixed_coarsest=job.fixed_coarsest,
        on_scale=on_scale,
    )


def to_pixels(image) -> np.ndarray:
    """Model space [-1, 1] (C, H, W) → uint8 (C, H, W); the one conversion every output uses."""
    values = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    scaled = np.clip((np.asarray(values, dtype=np.float32) + 1.0) * 0.5, 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def generate(
    image: torch.Tensor, config: JobConfig, *, seed: int = 0, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """One sample, (C, H, W) in [-1, 1], from a (C, H, W) reference in [-1, 1]."""
    return run(prepare(image, config, size=size), seed=seed).image


__all__ = ["PreparedJob", "ScaleTiming", "generate", "output_shapes", "prepare", "reference_pyramid", "run", "scale_denoiser"]
