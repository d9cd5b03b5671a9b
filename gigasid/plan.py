"""The job plan: from a reference's size and a :class:`JobConfig` to everything a job computes with.

What a job is, decided once and the same for every executor: the reference's pyramid shapes and
the output's, the sampling grid's unit (pixels or latent cells of a codec), one image denoiser
per scale (a backend from :data:`DENOISER_BACKENDS`), the codec (:data:`CODECS`), and what the
application changes (:data:`APPLICATIONS`). :class:`JobPlan` is the typed form of a job store's
manifest. No file I/O and no Dask here: ``graph.engine`` runs a plan, ``jobs`` and ``cli`` are
the front ends.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gigasid.codecs import Codec, encode_bands, latent_shape
from gigasid.codecs.correspondence import fold_matches
from gigasid.config import JobConfig, from_mapping, to_mapping
from gigasid.core.denoisers import ExactDenoiser, FusedDenoiser, KnnDenoiser
from gigasid.core.device import resolve_device
from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.patches import grid_shape, unfold_rows
from gigasid.core.pyramid import output_pyramid_shapes, pyramid_shapes, resample
from gigasid.core.usage_balance import UsageBalance
from gigasid.errors import ConfigError, InputError
from gigasid.index.candidates import ReferenceCandidates
from gigasid.index.search import auto_kind

Box = tuple[int, int, int, int]

# --- applications ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Application:
    """What an application changes in the sampler (DESIGN.md §2); everything else is shared."""

    name: str
    #: periodic denoisers and resampling: the output wraps with no seam
    periodic: bool = False
    #: x_hat averaged with its mirror image(s) after every denoiser call (``config.symmetry``)
    mirrored: bool = False
    #: the coarsest scale is not sampled but given: the reference's coarsest level resized
    given_coarsest: bool = False
    #: runs only in pixel space
    pixel_only: bool = False
    #: the given coarsest scale is a second image's layout (``--structure``: its pyramid down to
    #: the output's coarsest grid, encoded by the job's codec), not the reference's
    structure: bool = False
    #: part of the output is known and held at every scale and step (``core.known``): "placed",
    #: the reference placed on a larger canvas (outpaint); "masked", the reference itself outside
    #: a mask, the mask's patches excluded from the candidates (inpaint)
    known_region: str | None = None
    #: the whole output is the input DDIM-inverted and sampled back with each step's clean
    #: estimate moved toward a text prompt (``config.clip``; :func:`style_trip`), one scale
    text_guided: bool = False


APPLICATIONS: dict[str, Application] = {}


def register_application(application: Application) -> Application:
    APPLICATIONS[application.name] = application
    return application


register_application(Application("uncond"))
register_application(Application("retarget", given_coarsest=True))
register_application(Application("symmetric", mirrored=True, pixel_only=True))
register_application(Application("tileable", periodic=True))
register_application(Application("outpaint", known_region="placed"))
register_application(Application("inpaint", known_region="masked"))
register_application(Application("analogy", given_coarsest=True, structure=True))
register_application(Application("style", given_coarsest=True, pixel_only=True, text_guided=True))


def application(config: JobConfig) -> Application:
    return APPLICATIONS[config.application]


def wraps(config: JobConfig) -> tuple[bool, bool]:
    """(rows, columns): which axes of the output wrap around (periodic denoisers, resampling and
    decoding along them). ``config.wrap``, else the application's own (tileable: both)."""
    if config.wrap == "none":
        periodic = application(config).periodic
        return periodic, periodic
    return config.wrap in ("vertical", "both"), config.wrap in ("horizontal", "both")


def pixel_layout(config: JobConfig) -> bool:
    """Whether the coarsest latent scale is a pixel-space sample, encoded (``latent.layout``)."""
    return config.latent.codec != "pixel" and config.latent.layout == "pixel"


def gives_coarsest(config: JobConfig) -> bool:
    """Whether the job's coarsest scale is written at creation instead of sampled: an
    application's given layout, or the pixel layout of a latent job."""
    return application(config).given_coarsest or pixel_layout(config)


def layout_config(config: JobConfig) -> JobConfig:
    """The pixel-space sampler of a latent job's layout (``latent.layout=pixel``): the paper's
    defaults (T=10, η=0, P=15, ρ=0.2, coarsest short side 24 px: ``JobConfig``'s own) with the
    ``uncond`` preset's candidate search, and the job's application, wrap and device."""
    base = JobConfig()
    return dataclasses.replace(
        base, application=config.application, wrap=config.wrap, device=config.device,
        index=dataclasses.replace(base.index, search_stride=2),
    )


def symmetry(config: JobConfig) -> str:
    """The mirror axes the sampler averages over: ``config.symmetry``, or none."""
    return config.symmetry if application(config).mirrored else "none"


# --- shapes ----------------------------------------------------------------------------------


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


def reference_pyramid(image: torch.Tensor, config: JobConfig, hole: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The reference's pixel pyramid, finest first; each level resampled from the one above.
    With an inpainting ``hole`` (bool (H, W)) the pyramid of the known pixels alone
    (``core.known.without_hole``)."""
    shapes = pixel_reference_shapes(image.shape[1], image.shape[2], config)
    shares = None
    if hole is not None:
        from gigasid.core.known import known_share

        shares = known_share(hole, shapes)
        image = image * shares[0]
    levels = [image]
    for shape in shapes[1:]:
        levels.append(resample(levels[-1], shape))
    if shares is not None:  # level 0 is already its known pixels (the share there is 0 or 1)
        from gigasid.core.known import without_hole

        levels[1:] = [without_hole(level, share) for level, share in zip(levels[1:], shares[1:])]
    return levels


def default_size(height: int, width: int, config: JobConfig) -> tuple[int, int]:
    """The output size when none is asked for: the input scaled by ``output_scale``; a latent
    output's wrapping axes rounded up to whole cells (a wrap joins whole cells)."""
    size = [max(1, round(height * config.output_scale[0])), max(1, round(width * config.output_scale[1]))]
    factor = codec_factor(config)
    for axis, wrapped in enumerate(wraps(config)):
        if wrapped and factor > 1:
            size[axis] = -(-size[axis] // factor) * factor
    return size[0], size[1]


def output_shapes(
    pixel_shapes: list[tuple[int, int]], size: tuple[int, int], config: JobConfig
) -> list[tuple[int, int]]:
    """The output's sampling grids from the reference's pixel pyramid and the pixel output size;
    refuses a size whose coarsest scale cannot hold a patch."""
    factor = codec_factor(config)
    wrap_rows, wrap_cols = wraps(config)
    if factor > 1 and ((wrap_rows and size[0] % factor) or (wrap_cols and size[1] % factor)):
        want = [-(-side // factor) * factor if wrapped else side for side, wrapped in zip(size, (wrap_rows, wrap_cols))]
        raise InputError(
            f"a latent output that wraps must be a multiple of {factor} px along its wrapping axes to wrap "
            f"exactly; ask for {want[0]}x{want[1]} instead of {size[0]}x{size[1]}"
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


def given_coarsest(
    level: torch.Tensor, shape: tuple[int, int], wrap: tuple[bool, bool] = (False, False)
) -> torch.Tensor:
    """retarget's coarsest scale: the reference's coarsest level resized to the output's. Along a
    wrapping axis (``wrap``: rows, columns) the resized layout is made to wrap too (:func:`seamless`):
    its two ends are the reference's, which do not meet, and every finer scale takes its low band
    from this one."""
    return seamless(resample(level, shape), wrap)


def seamless(values: torch.Tensor, wrap: tuple[bool, bool]) -> torch.Tensor:
    """(C, H, W) values with a linear ramp added along each wrapping axis, per line, so that the
    step across the wrap is the ramp's own small step: the jump between the two ends is spread
    evenly over the axis instead of standing at the join."""
    for axis, wrapped in zip((-2, -1), wrap):
        if not wrapped:
            continue
        length = values.shape[axis]
        first, last = values.narrow(axis, 0, 1), values.narrow(axis, length - 1, 1)
        shape = [1, 1, 1]
        shape[axis] = length
        ramp = (torch.arange(length, dtype=values.dtype) / length).reshape(shape)
        values = values + ramp * (first - last)
    return values


# --- the structure image (analogy) -------------------------------------------------------------


def check_structure(config: JobConfig, given: bool) -> None:
    """A structure image is given exactly when the application takes one."""
    takes = application(config).structure
    if takes and not given:
        raise InputError(
            f"the {config.application} application needs a structure image: add --structure CONTENT.jpg "
            "(its layout, drawn with the input's patches)"
        )
    if given and not takes:
        names = ", ".join(name for name, app in APPLICATIONS.items() if app.structure)
        raise InputError(
            f"--structure is for an application that takes a layout image ({names}: --pipeline analogy "
            f"or analogy-large); this pipeline's application is {config.application}"
        )


def structure_size(shape: tuple[int, int], size: tuple[int, int] | None, config: JobConfig) -> tuple[int, int]:
    """The output size of an analogy: ``size``, default the structure image's ``shape`` scaled by
    ``output_scale``. The layout is never stretched: an output of another aspect ratio than the
    structure's (more than 1 % or 1 px off) is refused, not resized to fit."""
    height, width = shape
    size = tuple(size) if size is not None else default_size(height, width, config)
    expected = size[0] * width / height
    if abs(size[1] - expected) > max(1.0, 0.01 * size[1]):
        fit = f"{size[0]}x{max(1, round(expected))}"
        raise InputError(
            f"the structure image is {height}x{width} but the output would be {size[0]}x{size[1]}: another "
            f"aspect ratio would stretch its layout, so it is refused; ask for --size {fit} (its aspect), "
            "or crop the structure image to the output's"
        )
    return size


def structure_shapes(height: int, width: int, coarsest: tuple[int, int]) -> list[tuple[int, int]]:
    """The structure image's pyramid, finest first: halvings as the reference's pyramid (same
    shapes rule, same resampling) down to the output's coarsest pixel short side, then the
    output's coarsest pixel shape itself when that differs by rounding."""
    shapes = pyramid_shapes(height, width, min_short_side=min(min(coarsest), height, width))
    if shapes[-1] != tuple(coarsest):
        shapes.append(tuple(coarsest))
    return shapes


def reference_atlas(images: list[torch.Tensor], config: JobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Several references as one: side by side on one canvas, with a gap between them that no
    patch and no resampling tap of any scale spans. Returns the (C, H, W) canvas and the pixels
    that are not a reference's (bool (H, W): the gaps, and below a shorter image), whose patches
    are left out of the candidates on every scale as an inpainting hole's are: a patch set per
    scale drawn from every image and from nothing else. The first image sets the channels (grey
    and colour are matched as an analogy's structure is)."""
    channels = images[0].shape[0]
    images = [match_channels(image, channels) for image in images]
    height = max(image.shape[1] for image in images)
    width = sum(image.shape[2] for image in images)
    gap = 0
    for _ in range(3):  # the gap changes the canvas, the canvas the pyramid: settles in one or two
        shapes = pixel_reference_shapes(height, width + gap * (len(images) - 1), config)
        shrink = max(height / shapes[-1][0], (width + gap * (len(images) - 1)) / shapes[-1][1])
        # a coarsest-scale patch (latent cells are f px) plus the resampling taps on both sides
        wanted = math.ceil((config.patch_size * codec_factor(config) + 8) * shrink)
        if wanted <= gap:
            break
        gap = wanted
    canvas = torch.zeros(channels, height, width + gap * (len(images) - 1))
    outside = torch.ones(height, canvas.shape[2], dtype=torch.bool)
    left = 0
    for image in images:
        h, w = image.shape[1:]
        canvas[:, :h, left : left + w] = image
        outside[:h, left : left + w] = False
        left += w + gap
    return canvas, outside


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """A (C, H, W) structure image with the reference's channel count: grey is repeated into RGB,
    RGB becomes its Rec. 601 luma. Elementwise, so a strip gives the whole image's values."""
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, *image.shape[1:]).contiguous()
    return 0.299 * image[0:1] + 0.587 * image[1:2] + 0.114 * image[2:3]


def structure_pyramid(image: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The structure's pixel levels at ``shapes`` (:func:`structure_shapes`), each resampled
    from the one above, as :func:`reference_pyramid`."""
    levels = [image]
    for shape in shapes[1:]:
        levels.append(resample(levels[-1], shape))
    return levels


def structure_coarsest(
    level: torch.Tensor, codec: Codec | None, denoiser: ImageDenoiser, config: JobConfig
) -> torch.Tensor:
    """analogy's coarsest scale, as the paper's code makes it: the structure's coarsest pixel
    level (on the output's coarsest pixel grid; encoded with the codec fitted on the reference in
    a latent job) DDIM-inverted with a denoiser of its own patches up to ``structure_noise``,
    then DDIM-sampled back (η = 0) with ``denoiser``, the reference's coarsest: the layout in
    the reference's colours and patches (:class:`RoundTrip`)."""
    x = level if codec is None else encode_level(codec, level)
    if config.structure_noise == 0.0:
        return x
    # the structure's own patches, every one (a few hundred at the coarsest scale): exact, float32
    patches = unfold_rows(x.contiguous(), config.patch_size, 0, grid_shape(*x.shape[-2:], config.patch_size)[0])
    own = ImageDenoiser(ExactDenoiser(patches, compute_dtype=torch.float32), patch_size=config.patch_size,
                        rho=config.rho, device=resolve_device(config.device))
    return ddim_round_trip(x, round_trip(own, denoiser, config, config.structure_noise))


@dataclass
class RoundTrip:
    """DDIM inversion up to schedule index ``start`` and the way back (η = 0), as ``steps``
    single steps, so that a job can keep its state between them: ``begin`` gives the first x,
    ``advance(k, x, memory)`` does step k (0-based) and returns the next (x, memory). Steps
    0 … start−2 invert with ``inverting`` (each lands one index noisier); steps start−1 … 2·start−2
    sample back with ``sampling`` from index start to 0, where ``guide(x_hat, t, start, memory)``
    may replace each clean estimate (text style); ``memory`` is the last guided estimate (None
    before the first). Deterministic; departure from the paper's code: the inversion starts from
    α_1·x_0, without its σ_1·randn (σ_1 = 1e-4 here)."""

    inverting: ImageDenoiser
    sampling: ImageDenoiser
    alphas: torch.Tensor
    sigmas: torch.Tensor
    start: int
    guide: Callable | None = None

    @property
    def steps(self) -> int:
        return 2 * self.start - 1

    def begin(self, x0: torch.Tensor) -> torch.Tensor:
        return float(self.alphas[1]) * x0

    def remembers(self, done: int) -> bool:
        """Whether the state after ``done`` steps holds a guided estimate."""
        return self.guide is not None and done >= self.start

    def advance(self, k: int, x: torch.Tensor, memory: torch.Tensor | None):
        from gigasid.core.noise_schedule import epsilon_from_x_hat, step

        if k < self.start - 1:  # data → noise
            t = k + 1
            alpha, sigma = float(self.alphas[t]), float(self.sigmas[t])
            x_hat = self.inverting(x, alpha, sigma, step=t)
            eps_hat = epsilon_from_x_hat(x, x_hat, alpha, sigma)
            return float(self.alphas[t + 1]) * x_hat + float(self.sigmas[t + 1]) * eps_hat, memory
        t = self.steps - k  # noise → data: start, start − 1, …, 1
        alpha, sigma = float(self.alphas[t]), float(self.sigmas[t])
        x_hat = self.sampling(x, alpha, sigma, step=t)
        if self.guide is not None:
            x_hat = memory = self.guide(x_hat, t, self.start, memory)
        eps_hat = epsilon_from_x_hat(x, x_hat, alpha, sigma)
        to = float(self.alphas[t - 1]), float(self.sigmas[t - 1])
        return step(x_hat, eps_hat, alpha_to=to[0], sigma_to=to[1], eta=0.0, noise=None), memory


def round_trip(
    inverting: ImageDenoiser, sampling: ImageDenoiser, config: JobConfig, noise: float, guide: Callable | None = None
) -> RoundTrip:
    """The :class:`RoundTrip` of ``config``'s schedule whose turning point is the index with the
    fraction of noise σ/(α+σ) nearest to ``noise``."""
    from gigasid.core.noise_schedule import make_noise_schedule

    alphas, sigmas = make_noise_schedule(config.noise_schedule, config.num_steps)
    start = int(torch.argmin(((sigmas / (alphas + sigmas))[1:] - noise).abs())) + 1
    return RoundTrip(inverting, sampling, alphas, sigmas, start, guide)


def ddim_round_trip(x: torch.Tensor, trip: RoundTrip) -> torch.Tensor:
    """``x`` taken through every step of ``trip``."""
    x, memory = trip.begin(x), None
    for k in range(trip.steps):
        x, memory = trip.advance(k, x, memory)
    return x


def check_style_size(reference: tuple[int, int], size: tuple[int, int]) -> None:
    """The style application restyles the input itself: its output has the input's size."""
    if tuple(size) != tuple(reference):
        raise InputError(
            f"text-guided style restyles the input at its own size, {reference[0]}x{reference[1]}; "
            f"got --size {size[0]}x{size[1]}: leave --size out, or resize the input first"
        )


def style_trip(level: torch.Tensor, denoiser: ImageDenoiser, config: JobConfig, seed: int) -> RoundTrip:
    """The style application's trajectory (:class:`RoundTrip`): the input ``level`` inverted with
    its own ``denoiser`` up to ``clip.noise`` and sampled back, every clean estimate on the way
    back moved toward ``clip.prompt`` (``core.guidance.guided_estimate``: the paper's update, γ
    faded by σ_t/σ_start, momentum over the guided estimates). The views CLIP scores are drawn
    from a generator keyed by (seed, step): deterministic for a seed."""
    from gigasid.core.guidance import augmented_views, guided_estimate
    from gigasid.guidance.clip import load_clip

    if level.shape[0] != 3:
        raise InputError(f"text-guided style scores RGB images with CLIP; this input has {level.shape[0]} channels")
    clip = config.clip
    scorer = load_clip(clip.path, clip.prompt)

    def guide(x_hat: torch.Tensor, t: int, start: int, memory: torch.Tensor | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + t) % (2**63))

        def score(estimate: torch.Tensor) -> torch.Tensor:
            return scorer.score(augmented_views((estimate + 1.0) / 2.0, clip.views, scorer.side, generator))

        fade = float(trip.sigmas[t]) / float(trip.sigmas[start])
        return guided_estimate(x_hat, memory, score, strength=clip.strength * fade, momentum=clip.momentum,
                               fill=clip.fill)

    trip = round_trip(denoiser, denoiser, config, clip.noise, guide)  # its schedule fades γ
    return trip


# --- codecs ----------------------------------------------------------------------------------


def _fit_pca(config: JobConfig, read_pixels, pixel_shapes, channels: int) -> Codec:
    from gigasid.codecs.lapped_pca import fit_lapped_pca

    latent = config.latent
    return fit_lapped_pca(
        read_pixels, pixel_shapes, latent.channels, image_channels=channels, max_blocks=latent.fit_blocks,
        texture=latent.texture_channel,
    )


def _load_vae(config: JobConfig, read_pixels, pixel_shapes, channels: int) -> Codec:
    from gigasid.codecs.vae import load_vae

    return load_vae(config.latent.vae_path, image_channels=channels)


#: latent codec name → builder(config, read_pixels(level, box), pixel shapes, image channels)
CODECS: dict[str, Callable[..., Codec]] = {"pca": _fit_pca, "vae": _load_vae}


def build_codec(config: JobConfig, read_pixels, pixel_shapes: list[tuple[int, int]], channels: int) -> Codec | None:
    """The job's latent codec (None in pixel space); the pca codec is fitted on the reference
    pyramid, read through ``read_pixels(level, box)``."""
    if config.latent.codec == "pixel":
        return None
    return CODECS[config.latent.codec](config, read_pixels, pixel_shapes, channels)


def encode_level(codec: Codec, level: torch.Tensor) -> torch.Tensor:
    """A whole pixel level's latents, band by band like the store path (the same values)."""
    shape = tuple(level.shape[-2:])
    bands = [band for _, band in encode_bands(codec, lambda b: level[:, b[0] : b[2], b[1] : b[3]], shape)]
    return torch.cat(bands, 1)


# --- denoisers -------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _knn_backend(level: torch.Tensor, config: JobConfig, index_dir: Path | None, excluded: torch.Tensor | None,
                 k: int | None = None):
    size = config.patch_size
    if index_dir is not None and (index_dir / ReferenceCandidates._STATE).is_file():
        source = ReferenceCandidates.load(index_dir)
    else:
        index = config.index
        kind = index.kind
        if kind == "auto":
            kind = auto_kind(int(np.prod(grid_shape(*level.shape[-2:], size))))
        source = ReferenceCandidates(
            level, size, k=k or index.k, index=kind, search_dims=index.search_dims, nlist=index.nlist,
            nprobe=index.nprobe, coherence=index.coherence, search_stride=index.search_stride, excluded=excluded,
        )
        if index_dir is not None:
            source.save(index_dir)
    return KnnDenoiser(level, size), source


def _dense_backend(dense):
    def build(level: torch.Tensor, config: JobConfig, index_dir: Path | None, excluded: torch.Tensor | None,
              k: int | None = None):
        grid_h, _ = grid_shape(*level.shape[-2:], config.patch_size)
        dataset = unfold_rows(level.contiguous(), config.patch_size, 0, grid_h)
        if excluded is not None:  # inpaint: the patches touching the hole are not candidates
            from gigasid.core.known import allowed_patches

            dataset = dataset[allowed_patches(excluded, config.patch_size).flatten()]
        return dense(dataset, compute_dtype=_DTYPES[config.denoiser.compute_dtype]), None

    return build


#: denoiser backend name → builder(level, config, index_dir, excluded, k) → (patch denoiser, candidate
#: source); ``excluded``: bool cells of the level whose patches are left out (inpaint's hole), or None;
#: ``k``: candidates per query where not ``index.k`` (None; the dense backends weigh every patch)
DENOISER_BACKENDS: dict[str, Callable] = {
    "knn": _knn_backend,
    "exact": _dense_backend(ExactDenoiser),
    "fused": _dense_backend(FusedDenoiser),
}


def scale_denoiser(
    level: torch.Tensor, config: JobConfig, *, periodic: bool, index_dir: Path | None = None,
    excluded: torch.Tensor | None = None, balance: UsageBalance | None = None,
) -> ImageDenoiser:
    """The image denoiser of one scale. With ``index_dir`` a knn index saved there is opened (and
    one built here is saved there), so a job's workers share one index per scale. ``excluded``
    (bool, the level's grid): the patches touching it are no candidates (inpaint's hole).
    ``balance``: the coarsest scale's usage balancing (:func:`usage_balance`), None elsewhere."""
    patch_denoiser, source = DENOISER_BACKENDS[config.denoiser.backend](
        level, config, index_dir, excluded, config.balance.k if balance else None
    )
    return ImageDenoiser(
        patch_denoiser, patch_size=config.patch_size, rho=config.rho, periodic=periodic, candidate_source=source,
        device=resolve_device(config.device), balance=balance,
    )


def usage_balance(
    config: JobConfig, output_coarsest: tuple[int, int], reference_coarsest: tuple[int, int]
) -> UsageBalance | None:
    """The coarsest scale's usage balancing (``core.usage_balance``), or None: where
    ``balance.strength`` is set, that scale is sampled (a given coarsest scale is not, and its
    denoiser also serves an analogy's round trip, which stays the paper's) and the output's
    coarsest scale has at least ``balance.min_share`` times the reference's patches (an output
    about the reference's size is a rearrangement of it, which uses it unevenly by nature)."""
    balance = config.balance
    if balance.strength <= 0.0 or gives_coarsest(config):
        return None
    size = config.patch_size
    queries = math.prod(grid_shape(*output_coarsest, size, periodic=wraps(config)))
    patches = max(1, math.prod(grid_shape(*reference_coarsest, size)))
    if queries < balance.min_share * patches:
        return None
    # the wider pool gives over-used candidates somewhere to go; each query still averages as many
    # as a plain search finds (index.k), the same ones where nothing is over-used
    return UsageBalance(balance.strength, balance.rounds, slack=balance.slack, keep=config.index.k)


def check_balanced_tile(config: JobConfig, coarsest: tuple[int, int], reference_coarsest: tuple[int, int],
                        tile: int) -> None:
    """Usage balancing weighs the coarsest scale's whole image at once: that scale must be one tile."""
    if usage_balance(config, coarsest, reference_coarsest) is not None and max(coarsest) > tile:
        raise InputError(
            f"balance.strength needs the coarsest scale ({coarsest[0]}x{coarsest[1]}) in one tile, but the tile "
            f"is {tile}: use --tile {max(coarsest)} or more, or set balance.strength=0"
        )


def search_stride(config: JobConfig) -> int:
    return config.index.search_stride if config.denoiser.backend == "knn" else 1


# --- decoding --------------------------------------------------------------------------------


def correspondence_decode(
    config: JobConfig,
    reference: np.ndarray,
    ref_grid: tuple[int, int],
    out_grid: tuple[int, int],
    positions: np.ndarray,
    weights: np.ndarray,
    *,
    box: Box,
    query_origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """The pixels of ``box`` folded from the reference's pixels at the last step's matches.

    ``reference`` is ``codecs.correspondence.pad_reference`` of the finest pixel level,
    ``ref_grid``/``out_grid`` the finest latent grids of the reference and the output;
    ``positions``/``weights`` the matches of the queries starting at latent patch ``query_origin``
    (see ``codecs.correspondence``).
    """
    factor = codec_factor(config)
    return fold_matches(
        reference, positions, weights, ref_grid_w=ref_grid[1] - config.patch_size + 1, factor=factor,
        patch_size=config.patch_size, rho=config.latent.decode_rho or config.rho, query_origin=query_origin, box=box,
        out_shape=(out_grid[0] * factor, out_grid[1] * factor), periodic=wraps(config),
        device=resolve_device(config.device),
    )


def to_pixels(image) -> np.ndarray:
    """Model space [-1, 1] (C, H, W) → uint8 (C, H, W); the one conversion every output uses."""
    values = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    scaled = np.clip((np.asarray(values, dtype=np.float32) + 1.0) * 0.5, 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


# --- known regions (outpaint, inpaint) ------------------------------------------------------

PLACES = ("center", "left", "right", "top", "bottom")


def known_kind(config: JobConfig) -> str | None:
    """"placed" (outpaint), "masked" (inpaint) or None: the application's known region."""
    return application(config).known_region


def check_mask_given(config: JobConfig, given: bool) -> None:
    """A mask is given exactly when the application regenerates a masked region."""
    kind = known_kind(config)
    if kind == "masked" and not given:
        raise InputError(f"the {config.application} application needs --mask MASK.png (the reference's size, "
                         "white = regenerate)")
    if given and kind != "masked":
        raise InputError(f"--mask is for --pipeline inpaint (white = regenerate); this pipeline's application "
                         f"is {config.application}")


def check_mask(hole: np.ndarray, reference: tuple[int, int]) -> None:
    """An inpainting mask (bool (H, W), True = regenerate) fits the reference and leaves both
    something to regenerate and something to copy from."""
    if tuple(hole.shape) != tuple(reference):
        raise InputError(f"the mask is {hole.shape[0]}x{hole.shape[1]} but the reference is "
                         f"{reference[0]}x{reference[1]}: give a mask of the reference's size (white = regenerate)")
    if not hole.any():
        raise InputError("the mask has no white pixel: there is nothing to regenerate (white = regenerate)")
    if hole.all():
        raise InputError("the mask is white everywhere: nothing of the reference is left to copy patches from "
                         "(white = regenerate, black = kept)")


def known_size(config: JobConfig, reference: tuple[int, int], size: tuple[int, int] | None) -> tuple[int, int]:
    """The output size of a job with a known region: outpaint's canvas (``size``, default the
    reference scaled by ``output_scale``) must hold the reference; inpaint's is the reference."""
    height, width = reference
    if known_kind(config) == "masked":
        if size is not None and tuple(size) != (height, width):
            raise InputError(f"inpaint keeps the reference's size {height}x{width}; drop --size {size[0]}x{size[1]}")
        return (height, width)
    size = tuple(size) if size is not None else default_size(height, width, config)
    if size[0] < height or size[1] < width:
        raise InputError(f"outpaint grows the image: --size {size[0]}x{size[1]} is smaller than the {height}x{width} "
                         f"reference; ask for at least {height}x{width} (e.g. {height}x{width * 3} for a panorama)")
    if size == (height, width):
        raise InputError(f"--size {size[0]}x{size[1]} is the reference's own size: there is nothing to outpaint; "
                         "ask for a larger canvas")
    return size


def place_reference(config: JobConfig, reference: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Outpaint: the reference's top-left corner (row, col) on the pixel canvas, from
    ``config.place``; in a latent job rounded to the codec's cells (a multiple of 8 px), so the
    reference's latents are the canvas's."""
    (height, width), (canvas_h, canvas_w) = reference, size
    spare_h, spare_w = canvas_h - height, canvas_w - width
    named = {"center": (spare_h // 2, spare_w // 2), "left": (spare_h // 2, 0), "right": (spare_h // 2, spare_w),
             "top": (0, spare_w // 2), "bottom": (spare_h, spare_w // 2)}
    text = config.place.strip().lower()
    if text in named:
        row, col = named[text]
    else:
        parts = text.replace(" ", "").split(",")
        if len(parts) != 2 or not all(part.lstrip("-").isdigit() for part in parts):
            raise InputError(f"--place must be one of {', '.join(PLACES)} or X,Y (the reference's top-left "
                             f"corner in pixels), got {config.place!r}")
        col, row = int(parts[0]), int(parts[1])
        if not (0 <= row <= spare_h and 0 <= col <= spare_w):
            raise InputError(f"--place {col},{row} puts the {height}x{width} reference outside the "
                             f"{canvas_h}x{canvas_w} canvas: X must be in 0..{spare_w} and Y in 0..{spare_h}")
    factor = codec_factor(config)
    if factor > 1:  # the nearest whole cell that keeps the reference on the canvas
        row = min(round(row / factor) * factor, spare_h // factor * factor)
        col = min(round(col / factor) * factor, spare_w // factor * factor)
    return row, col


@dataclass(frozen=True)
class KnownRegion:
    """Where an output's known values come from, scale by scale (``core.known``): the
    reference's level of each scale (pixels or latents) at ``offsets[scale]`` of the output's
    sampling grid; "masked" outputs are the reference's grid (offsets 0) less the hole."""

    kind: str  # "placed" or "masked"
    offset: tuple[int, int]  # the reference's top-left pixel on the canvas
    pixel_shape: tuple[int, int]  # the reference's pixels (the output's known pixels, when placed)
    offsets: tuple[tuple[int, int], ...]  # per scale, in sampling-grid cells

    def manifest(self) -> dict:
        return {"kind": self.kind, "offset": list(self.offset), "pixel_shape": list(self.pixel_shape),
                "offsets": [list(o) for o in self.offsets]}

    @classmethod
    def from_manifest(cls, data: dict | None) -> KnownRegion | None:
        if not data:
            return None
        return cls(data["kind"], tuple(data["offset"]), tuple(data["pixel_shape"]),
                   tuple(tuple(o) for o in data["offsets"]))


def known_region(
    config: JobConfig, pixel_shape: tuple[int, int], size: tuple[int, int],
    ref_shapes: list[tuple[int, int]], out_shapes: list[tuple[int, int]],
) -> KnownRegion | None:
    """The job's known region (None for applications without one). A placed reference's offset
    on a coarser grid is the finest's scaled and rounded, kept on the canvas."""
    kind = known_kind(config)
    if kind is None:
        return None
    if kind == "masked":
        return KnownRegion(kind, (0, 0), tuple(pixel_shape), tuple((0, 0) for _ in out_shapes))
    factor = codec_factor(config)
    row, col = place_reference(config, pixel_shape, size)
    finest = (row // factor, col // factor)
    offsets = []
    for ref, out in zip(ref_shapes, out_shapes):
        offsets.append(tuple(
            max(0, min(int(np.floor(start * out[a] / out_shapes[0][a] + 0.5)), out[a] - ref[a]))
            for a, start in enumerate(finest)
        ))
    return KnownRegion(kind, (row, col), tuple(pixel_shape), tuple(offsets))


def known_holes(
    config: JobConfig, hole: torch.Tensor, pixel_shapes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """An inpainting hole (bool, the finest pixel level) on every scale's sampling grid (the cells
    of too small a known share, ``core.known``); refuses a mask that leaves some scale no patch
    clear of it (nothing to copy the hole from)."""
    from gigasid.core.known import known_share, share_hole

    holes = [share_hole(share) for share in known_share(hole, pixel_shapes)]
    return _scale_cells(config, holes, "the mask leaves", "a smaller mask")


def excluded_cells(
    config: JobConfig, excluded: torch.Tensor, pixel_shapes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """Pixels that are no reference (several references' gaps, bool, the finest pixel level) on
    every scale's sampling grid: every cell a resampling tap of them reaches."""
    from gigasid.core.known import hole_pyramid

    return _scale_cells(config, hole_pyramid(excluded, pixel_shapes), "the gaps between the references leave",
                        "larger references")


def _scale_cells(config: JobConfig, holes: list[torch.Tensor], what: str, remedy: str) -> list[torch.Tensor]:
    from gigasid.core.known import allowed_patches, latent_hole

    factor = codec_factor(config)
    if factor > 1:
        holes = [latent_hole(level, factor) for level in holes]
    for scale, level in enumerate(holes):
        if not allowed_patches(level, config.patch_size).any():
            raise InputError(
                f"{what} no {config.patch_size}x{config.patch_size} patch clear of it at scale {scale} "
                f"({level.shape[0]}x{level.shape[1]}): nothing to fill it from; use {remedy}, fewer scales "
                "(--set num_scales=N) or a smaller patch_size"
            )
    return holes


def known_box(
    region: KnownRegion, scale: int, read_level, channels: int, box: Box, hole: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``scale``'s known values (C, h, w) and mask (1, h, w) uint8 (1 = known) over a box of
    its output grid, from ``read_level(box)``: the reference's level (its sampling grid) over a box
    of its own, and for a masked region the scale's ``hole``."""
    r0, c0, r1, c1 = box
    if region.kind == "masked":
        return read_level(box), (~hole[r0:r1, c0:c1]).to(torch.uint8)[None]
    top, left = region.offsets[scale]
    values = torch.zeros((channels, r1 - r0, c1 - c0), dtype=torch.float32)
    mask = torch.zeros((1, r1 - r0, c1 - c0), dtype=torch.uint8)
    a0, b0 = max(r0, top), max(c0, left)
    if r1 > a0 and c1 > b0:
        level = read_level((a0 - top, b0 - left, r1 - top, c1 - left))  # clipped to the level
        a1, b1 = a0 + level.shape[1], b0 + level.shape[2]
        if a1 > a0 and b1 > b0:
            values[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = level
            mask[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = 1
    return values, mask


def paste_known(
    pixels: torch.Tensor, box: Box, region: KnownRegion, reference_box, hole_box=None
) -> torch.Tensor:
    """A latent job's decoded output over ``box`` (C, h, w, model space) with the known pixels
    pasted back: the codec and the correspondence decode are not lossless, and the known region
    must come out as the reference. ``reference_box(box)`` reads the reference's pixels over a
    box of its own; ``hole_box(box)`` the inpainting hole (bool) over a box."""
    r0, c0, r1, c1 = box
    if region.kind == "masked":
        keep = ~hole_box(box)
        return torch.where(keep[None], reference_box(box), pixels)
    top, left = region.offset
    height, width = region.pixel_shape
    a0, b0, a1, b1 = max(r0, top), max(c0, left), min(r1, top + height), min(c1, left + width)
    if a1 <= a0 or b1 <= b0:
        return pixels
    pixels = pixels.clone()
    pixels[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = reference_box((a0 - top, b0 - left, a1 - top, b1 - left))
    return pixels


# --- the typed manifest ----------------------------------------------------------------------


@dataclass(frozen=True)
class JobPlan:
    """A job's fixed facts, as its store's manifest records them (shapes are sampling grids:
    pixels, or latent cells of ``factor`` px)."""

    config: JobConfig
    seed: int
    size: tuple[int, int]  # the pixel output (H, W)
    tile: int  # tile side on the sampling grid
    halo: int
    channels: int  # sampled channels (the codec's in latent jobs)
    image_channels: int
    factor: int
    output_tile: int  # chunk side of the pixel output
    reference_shapes: tuple[tuple[int, int], ...]
    pixel_reference_shapes: tuple[tuple[int, int], ...]
    output_shapes: tuple[tuple[int, int], ...]

    @classmethod
    def from_manifest(cls, manifest: dict) -> JobPlan:
        def shapes(key):
            return tuple(tuple(int(v) for v in s) for s in manifest[key])

        channels = int(manifest["channels"])
        return cls(
            config=from_mapping(JobConfig, manifest["config"]),
            seed=int(manifest["seed"]),
            size=tuple(manifest["size"]),
            tile=int(manifest["tile"]),
            halo=int(manifest["halo"]),
            channels=channels,
            image_channels=int(manifest.get("image_channels", channels)),
            factor=int(manifest.get("factor", 1)),
            output_tile=int(manifest.get("output_tile", manifest["tile"])),
            reference_shapes=shapes("reference_shapes"),
            pixel_reference_shapes=shapes("pixel_reference_shapes") if "pixel_reference_shapes" in manifest
            else shapes("reference_shapes"),
            output_shapes=shapes("output_shapes"),
        )

    @classmethod
    def whole(
        cls, config: JobConfig, seed: int, size: tuple[int, int], *, channels: int, image_channels: int,
        factor: int, reference_shapes, pixel_reference_shapes, output_shapes,
    ) -> JobPlan:
        """The plan of an in-memory job: one whole-image tile per scale, no halo."""
        return cls(
            config=config, seed=seed, size=tuple(size), tile=max(max(shape) for shape in output_shapes), halo=0,
            channels=channels, image_channels=image_channels, factor=factor, output_tile=max(size),
            reference_shapes=tuple(reference_shapes), pixel_reference_shapes=tuple(pixel_reference_shapes),
            output_shapes=tuple(output_shapes),
        )

    def manifest(self) -> dict:
        return {
            "config": to_mapping(self.config), "seed": self.seed, "size": list(self.size), "tile": self.tile,
            "halo": self.halo, "channels": self.channels, "image_channels": self.image_channels,
            "factor": self.factor, "output_tile": self.output_tile,
            "reference_shapes": [list(s) for s in self.reference_shapes],
            "pixel_reference_shapes": [list(s) for s in self.pixel_reference_shapes],
            "output_shapes": [list(s) for s in self.output_shapes],
            "dataset": self.dataset,
        }

    @property
    def application(self) -> Application:
        return application(self.config)

    def usage_balance(self, scale: int) -> UsageBalance | None:
        """Scale ``scale``'s usage balancing: the coarsest scale's (:func:`usage_balance`), None elsewhere."""
        if scale != len(self.output_shapes) - 1:
            return None
        return usage_balance(self.config, self.output_shapes[-1], self.reference_shapes[-1])

    @property
    def periodic(self) -> tuple[bool, bool]:
        """(rows, columns) that wrap around."""
        return wraps(self.config)

    @property
    def dataset(self) -> str:
        """The reference arrays the denoisers read: pixels, or their latents."""
        return "reference" if self.factor == 1 else "latent"

    @property
    def correspondence(self) -> bool:
        """A latent job decoded by folding the reference's pixels at the last step's matches."""
        return self.factor > 1 and self.config.latent.decode == "correspondence"
