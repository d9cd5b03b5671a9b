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

from gigasid.codecs import Codec, encode_bands, latent_shape
from gigasid.codecs.correspondence import fold_matches, pad_reference
from gigasid.config import JobConfig
from gigasid.core.denoisers import ExactDenoiser, FusedDenoiser, KnnDenoiser
from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.noise_schedule import make_noise_schedule
from gigasid.core.patches import grid_shape, unfold_rows
from gigasid.core.pyramid import output_pyramid_shapes, pyramid_shapes, resample
from gigasid.core.sampler import SampleResult, ScaleTiming, sample
from gigasid.errors import ConfigError, InputError
from gigasid.index.candidates import ReferenceCandidates
from gigasid.index.search import auto_kind

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
    pixel_reference: torch.Tensor | None = None  # the finest pixel level (correspondence decode)
    size: tuple[int, int] | None = None  # the pixel output (H, W)


def codec_factor(config: JobConfig) -> int:
    """Pixels per sampling-grid cell per side: 1 in pixel space, 8 for the latent codecs."""
    return 1 if config.latent.codec == "pixel" else 8


def pixel_reference_shapes(height: int, width: int, config: JobConfig) -> list[tuple[int, int]]:
    """The reference's pixel pyramid, finest first. In a latent job its coarsest level is f times
    the coarsest sampling grid (``min_short_side`` counts latent cells there)."""
    factor = codec_factor(config)
    if -(-min(height, width) // factor) < config.patch_size:
        unit = "pixels" if factor == 1 else f"latent cells of {factor} px"
        raise InputError(
            f"the image is {height}x{width}, smaller than the patch size {config.patch_size} {unit}; "
            "use a larger image or a smaller patch_size (--set patch_size=N)"
        )
    min_short = min(config.min_short_side * factor, height, width)
    try:
        return pyramid_shapes(height, width, min_short_side=min_short, num_scales=config.num_scales)
    except ValueError as error:
        raise ConfigError(f"{error} for this {height}x{width} image; lower num_scales or set it to null") from None


def reference_shapes(height: int, width: int, config: JobConfig) -> list[tuple[int, int]]:
    """The reference's sampling grids (pixels, or the latent grid of each pixel level), finest first."""
    factor = codec_factor(config)
    return [latent_shape(h, w, factor) for h, w in pixel_reference_shapes(height, width, config)]


def reference_pyramid(image: torch.Tensor, config: JobConfig) -> list[torch.Tensor]:
    """The reference's pixel pyramid, finest first; each level resampled from the one above."""
    shapes = pixel_reference_shapes(image.shape[1], image.shape[2], config)
    levels = [image]
    for shape in shapes[1:]:
        levels.append(resample(levels[-1], shape))
    return levels


def default_size(height: int, width: int, config: JobConfig) -> tuple[int, int]:
    return (max(1, round(height * config.output_scale[0])), max(1, round(width * config.output_scale[1])))


def output_shapes(
    pixel_shapes: list[tuple[int, int]], size: tuple[int, int], config: JobConfig
) -> list[tuple[int, int]]:
    """The output's sampling grids from the reference's pixel pyramid and the pixel output size;
    refuses a size whose coarsest scale cannot hold a patch."""
    factor = codec_factor(config)
    if factor > 1 and config.application == "tileable" and (size[0] % factor or size[1] % factor):
        raise InputError(
            f"a tileable latent output must be a multiple of {factor} px a side to wrap exactly; "
            f"ask for {-(-size[0] // factor) * factor}x{-(-size[1] // factor) * factor} instead of {size[0]}x{size[1]}"
        )
    shapes = [latent_shape(h, w, factor) for h, w in output_pyramid_shapes(pixel_shapes, *size)]
    patch = config.patch_size
    if min(shapes[-1]) < patch:
        need = [-(-patch * full * factor // coarse) for full, coarse in zip(size, shapes[-1])]
        raise InputError(
            f"output size {size[0]}x{size[1]} is too small: its coarsest scale would be "
            f"{shapes[-1][0]}x{shapes[-1][1]}, smaller than the patch size {patch}; "
            f"ask for at least {need[0]}x{need[1]}"
        )
    return shapes


def build_codec(config: JobConfig, read_pixels, pixel_shapes: list[tuple[int, int]], channels: int) -> Codec | None:
    """The job's latent codec (None in pixel space); the pca codec is fitted on the reference
    pyramid, read through ``read_pixels(level, box)``."""
    latent = config.latent
    if latent.codec == "pixel":
        return None
    if latent.codec == "pca":
        from gigasid.codecs.lapped_pca import fit_lapped_pca

        return fit_lapped_pca(
            read_pixels, pixel_shapes, latent.channels, image_channels=channels, max_blocks=latent.fit_blocks,
            texture=latent.texture_channel,
        )
    from gigasid.codecs.vae import load_vae

    return load_vae(latent.vae_path, image_channels=channels)


def encode_level(codec: Codec, level: torch.Tensor) -> torch.Tensor:
    """A whole pixel level's latents, band by band like the store path (the same values)."""
    shape = tuple(level.shape[-2:])
    bands = [band for _, band in encode_bands(codec, lambda b: level[:, b[0] : b[2], b[1] : b[3]], shape)]
    return torch.cat(bands, 1)


def prepare(image: torch.Tensor, config: JobConfig, *, size: tuple[int, int] | None = None) -> PreparedJob:
    """Build the reference pyramid (and its latents), the output shapes and one denoiser per scale.

    ``image`` is (C, H, W) in [-1, 1]; ``size`` the pixel output (H, W), default the input scaled
    by ``config.output_scale``.
    """
    channels, height, width = image.shape
    pixel_levels = reference_pyramid(image, config)
    pixel_shapes = [tuple(level.shape[-2:]) for level in pixel_levels]
    codec = build_codec(
        config, lambda s, b: pixel_levels[s][:, b[0] : b[2], b[1] : b[3]], pixel_shapes, channels
    )
    levels = pixel_levels if codec is None else [encode_level(codec, level) for level in pixel_levels]
    ref_shapes = [tuple(level.shape[-2:]) for level in levels]
    if size is None:
        size = default_size(height, width, config)
    out_shapes = output_shapes(pixel_shapes, size, config)
    periodic = config.application == "tileable"
    denoisers, setup = [], []
    for level in levels:
        started = time.perf_counter()
        denoisers.append(scale_denoiser(level, config, periodic=periodic))
        setup.append(time.perf_counter() - started)
    fixed = None
    if config.application == "retarget":
        fixed = resample(levels[-1], out_shapes[-1])
    sampled_channels = channels if codec is None else codec.channels
    return PreparedJob(
        config, ref_shapes, out_shapes, sampled_channels, denoisers, fixed, setup, codec,
        image if codec is not None else None, tuple(size),
    )


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
            kind = index.kind
            if kind == "auto":
                kind = auto_kind(int(np.prod(grid_shape(*level.shape[-2:], size))))
            source = ReferenceCandidates(
                level,
                size,
                k=index.k,
                index=kind,
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
    correspondence = job.codec is not None and config.latent.decode == "correspondence"
    result = sample(
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
        keep_last_input=correspondence,
    )
    if job.codec is not None:
        height, width = job.size
        if correspondence:
            positions, weights = job.denoisers[0].matches(
                result.last_input, float(alphas[1]), float(sigmas[1]), step=1
            )
            pixels = correspondence_decode(
                config, pad_reference(job.pixel_reference.numpy(), job.codec.factor), job.reference_shapes[0], job.output_shapes[0],
                positions.numpy(), weights.numpy(), box=(0, 0, height, width),
            )
            result.decoded = torch.from_numpy(pixels)
        else:
            result.decoded = job.codec.decode(result.scales[0])[:, :height, :width]
    return result


def correspondence_decode(
    config: JobConfig,
    reference: np.ndarray,
    ref_grid: tuple[int, int],
    out_grid: tuple[int, int],
    positions: np.ndarray,
    weights: np.ndarray,
    *,
    box: tuple[int, int, int, int],
    query_origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """The pixels of ``box`` folded from the reference's pixels at the last step's matches.

    ``reference`` is ``codecs.correspondence.pad_reference`` of the finest pixel level, ``ref_grid``/``out_grid`` the finest latent
    grids of the reference and the output; ``positions``/``weights`` the matches of the queries
    starting at latent patch ``query_origin`` (see ``codecs.correspondence``).
    """
    factor = codec_factor(config)
    return fold_matches(
        reference, positions, weights, ref_grid_w=ref_grid[1] - config.patch_size + 1, factor=factor,
        patch_size=config.patch_size, rho=config.latent.decode_rho or config.rho, query_origin=query_origin, box=box,
        out_shape=(out_grid[0] * factor, out_grid[1] * factor), periodic=config.application == "tileable",
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


__all__ = ["PreparedJob", "ScaleTiming", "codec_factor", "generate", "latent_shape", "output_shapes", "prepare", "reference_pyramid", "run", "scale_denoiser"]
