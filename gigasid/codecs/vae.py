"""The ``vae`` codec: a pretrained diffusers autoencoder, loaded from disk, as a latent space.

Two architectures, chosen by the ``_class_name`` of the model folder's ``config.json``:

* ``AutoencoderKL`` — the FLUX.1 VAE layout (16 latent channels, 8× per side). Encoding takes the
  posterior MEAN, not a sample, so that encoding is deterministic; latents are normalised as the
  FLUX pipelines do, ``(mean − shift_factor) · scaling_factor``, and decoding undoes it.
* ``AutoencoderTiny`` — TAESD-style (e.g. ``taef1`` for FLUX latents). Its encoder already emits
  the normalised latents, and its config says so with ``scaling_factor = 1`` and
  ``shift_factor = 0``; the same normalisation code serves both classes. (``latent_magnitude`` and
  ``latent_shift`` in its config only pack latents into uint8 images; we never do that.)

:func:`load_vae` finds the weights in a local folder or in an EXISTING Hugging Face cache and never
touches the network (``local_files_only`` always: this machine and CI have no hub access, so
``HF_HUB_OFFLINE`` holds whatever it is set to). :class:`VaeCodec` wraps the model in the codec
contract of :mod:`gigasid.codecs`: (C, H, W) pixels in [-1, 1] in, (K, ⌈H/8⌉, ⌈W/8⌉) float32
latents out, and back.

What it is not: a downloader, a trainer, or local. A VAE's convolutions see far, its GroupNorm
statistics are taken over the whole crop and its mid-block attention is global, so the tiled
:func:`~gigasid.codecs.encode_box` / :func:`~gigasid.codecs.decode_box` only approximate the
whole-image result; the halos below buy that approximation (see ``ENCODE_HALO``). Diffusers is
imported lazily, so that pixel and PCA jobs never pay for it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gigasid.errors import ConfigError, InputError, WeightsNotFoundError
from gigasid.weights import REPO_ID, cached_folder

__all__ = ["VaeCodec", "load_vae"]

SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderTiny")

# Halos: how much context a tile crop reads beyond its box. A real VAE sees beyond any halo we
# can afford — its convolutions reach hundreds of pixels, its GroupNorm statistics and (in
# AutoencoderKL) its mid-block attention span the whole crop — so a halo trades a tile's extra
# work, (T + 2h)² cells for a T-cell tile, against the gap to the whole-image result. For scale,
# diffusers' own tiled AutoencoderKL runs 1024-px tiles overlapping by 25 % (256 px, cross-faded
# over 32 latent cells: ≈128 px of context at a seam, 1.78× the work) and its tiled
# AutoencoderTiny 512-px tiles overlapping by 12.5 % (64 px). Ours are halos, not cross-fades:
# every cell is cut from inside a crop. On a tiny random FLUX-layout AutoencoderKL (a 384-px image
# in 24-cell tiles; tests/codecs/test_vae.py measures a smaller case) the mean |tiled − whole|
# relative to the latents' std went 0.20 → 0.076 → 0.061 → 0.024 for encode halos of 0, 32, 64,
# 128 px, and for the decoded pixels 0.28 → 0.072 → 0.045 for decode halos of 0, 8, 16 cells;
# attention was not the main cause (without it the gaps were the same or larger). Encoding (the
# reference) is the cheap direction, so it gets 64 px; decoding a large output is the dear one, so
# it gets 8 cells (64 px): on 128-cell tiles each costs 1.27× the untiled work. Callers wanting
# closer agreement pass larger halos to :func:`load_vae`; they are remembered in the codec's state.
ENCODE_HALO = 64  # pixels; a multiple of the factor
DECODE_HALO = 8  # latent cells

class VaeCodec:
    """A diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` behind the codec contract.

    ``location`` is only remembered (in :meth:`state`), so that a resumed job reloads the same
    VAE; build codecs with :func:`load_vae` rather than by hand. Grayscale images
    (``image_channels = 1``) are repeated to the network's RGB on encode and decoded back as the
    mean of its RGB output.
    """

    name = "vae"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        location: str,
        image_channels: int = 3,
        encode_halo: int = ENCODE_HALO,
        decode_halo: int = DECODE_HALO,
    ):
        self.class_name = type(model).__name__
        if self.class_name not in SUPPORTED_CLASSES:
            raise ValueError(f"VaeCodec wraps {' or '.join(SUPPORTED_CLASSES)}, not {self.class_name}")
        config = model.config
        self.model = model.eval().requires_grad_(False)
        self.location = location
        self.factor = _downsampling_factor(self.class_name, config)
        self.channels = int(config.latent_channels)
        self._network_channels = int(config.in_channels)
        if image_channels not in (1, self._network_channels):
            raise ConfigError(
                f"the VAE at {location} takes {self._network_channels}-channel images;"
                f" it cannot encode {image_channels}-channel ones (1 or {self._network_channels})"
            )
        self.image_channels = image_channels
        # SD-1.x-era configs have no shift; None and absent both mean 0
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        if encode_halo < 0 or encode_halo % self.factor or decode_halo < 0:
            raise ConfigError(
                f"VAE halos: encode_halo must be a non-negative multiple of {self.factor} pixels"
                f" (got {encode_halo}), decode_halo a non-negative number of cells (got {decode_halo})"
            )
        self.encode_halo = encode_halo
        self.decode_halo = decode_halo
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 3 or pixels.shape[0] != self.image_channels:
            raise ValueError(f"expected ({self.image_channels}, H, W) pixels, got {tuple(pixels.shape)}")
        height, width = pixels.shape[1:]
        f = self.factor
        batch = pixels.to(torch.float32)[None]
        # replicate the last row/column up to whole f×f blocks: the contract treats the crop's edges
        # as the image's, and a partial block becomes one whole latent cell
        batch = F.pad(batch, (0, -width % f, 0, -height % f), mode="replicate")
        batch = batch.expand(-1, self._network_channels, -1, -1).to(self.device, self.dtype)
        with torch.inference_mode():
            if self.class_name == "AutoencoderKL":
                raw = self.model.encode(batch).latent_dist.mean
            else:
                raw = self.model.encode(batch).latents
            latents = (raw - self.shift_factor) * self.scaling_factor
        # copied outside inference mode, so the caller gets an ordinary tensor it may edit in place
        return latents[0].to(pixels.device, torch.float32, copy=True)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 3 or latents.shape[0] != self.channels:
            raise ValueError(f"expected ({self.channels}, h, w) latents, got {tuple(latents.shape)}")
        batch = latents[None].to(self.device, self.dtype)
        with torch.inference_mode():
            pixels = self.model.decode(batch / self.scaling_factor + self.shift_factor).sample
            if self.image_channels == 1 and pixels.shape[1] != 1:
                pixels = pixels.mean(dim=1, keepdim=True)
        # not clamped: "roughly [-1, 1]" is the contract; exporters clamp
        return pixels[0].to(latents.device, torch.float32, copy=True)

    def state(self) -> dict:
        return {
            "name": self.name,
            "location": self.location,
            "class_name": self.class_name,
            "image_channels": self.image_channels,
            "channels": self.channels,
            "factor": self.factor,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "encode_halo": self.encode_halo,
            "decode_halo": self.decode_halo,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_state(cls, state: dict, *, device: str | torch.device = "cpu") -> VaeCodec:
        """Reload the VAE a job was started with, and check that it is still the same model."""
        codec = load_vae(
            state["location"],
            device=device,
            dtype=getattr(torch, state["dtype"]),
            image_channels=state["image_channels"],
            encode_halo=state["encode_halo"],
            decode_halo=state["decode_halo"],
        )
        changed = [key for key, value in codec.state().items() if state.get(key) != value]
        if changed:
            raise InputError(
                f"the VAE at {state['location']} is not the one this job was started with"
                f" (changed: {', '.join(changed)}); restore it or start a new job"
            )
        return codec


def load_vae(
    location: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    image_channels: int = 3,
    encode_halo: int = ENCODE_HALO,
    decode_halo: int = DECODE_HALO,
) -> VaeCodec:
    """The VAE at ``location``: a folder, or a Hugging Face repo id already in the local cache.

    The folder (or the cached snapshot) may be the VAE's own — ``config.json`` and weights — or a
    pipeline's root with the VAE under ``vae/``, as the FLUX repos keep it. Nothing is downloaded;
    absent weights raise :class:`~gigasid.errors.WeightsNotFoundError` naming where we looked.
    """
    folder, remembered = _resolve(str(location))
    class_name = _class_name(folder)
    try:
        import diffusers
    except ImportError as error:
        raise ConfigError(
            "the vae codec needs diffusers: `pip install 'diffusers>=0.30'`, or choose another codec"
        ) from error
    model_class = getattr(diffusers, class_name)
    # without accelerate, diffusers falls back to an ordinary load anyway, after a warning
    low_memory = importlib.util.find_spec("accelerate") is not None
    try:
        model = model_class.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=low_memory
        )
    except OSError as error:  # diffusers' "no file named diffusion_pytorch_model.safetensors ..."
        raise WeightsNotFoundError(
            f"no {class_name} weights in {folder} ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}). {_how_to_fix(remembered)}"
        ) from error
    return VaeCodec(
        model.to(device),
        location=remembered,
        image_channels=image_channels,
        encode_halo=encode_halo,
        decode_halo=decode_halo,
    )


def _resolve(location: str) -> tuple[Path, str]:
    """The folder holding the VAE's ``config.json``, and the location string to remember.

    An existing folder wins (remembered by its absolute path, so that a resumed job does not
    depend on the working directory); otherwise a repo-id-shaped string is looked up in the hub
    cache (remembered as the repo id).
    """
    folder, cached = cached_folder(location, "VAE", _how_to_fix(location))
    return _vae_folder(folder), location if cached else str(folder.resolve())


def _vae_folder(folder: Path) -> Path:
    """``folder`` itself if its config.json describes a supported VAE, else its ``vae/``."""
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file() and _class_name(candidate) in SUPPORTED_CLASSES:
            return candidate
    raise WeightsNotFoundError(
        f"no config.json of an {' or '.join(SUPPORTED_CLASSES)} in {folder} or {folder / 'vae'}."
        f" {_how_to_fix(str(folder))}"
    )


def _class_name(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _how_to_fix(location: str) -> str:
    from huggingface_hub import constants

    # a FLUX repo as the example when the location names no repo
    repo = location if REPO_ID.fullmatch(location) else "black-forest-labs/FLUX.1-dev"
    return (
        f"To fix: on a machine with internet, download it (`hf download {repo} --local-dir DIR`,"
        " with `--include 'vae/*'` for a pipeline repo such as FLUX's) and set latent.vae_path to"
        f" DIR here, or copy a Hugging Face cache that holds it into {constants.HF_HUB_CACHE}"
        " (HF_HUB_CACHE)."
    )


def _downsampling_factor(class_name: str, config) -> int:
    """Pixels per latent cell: every block but the last halves (AutoencoderKL) or strides by 2
    (AutoencoderTiny's encoder); its decoder must undo exactly that."""
    if class_name == "AutoencoderKL":
        return 2 ** (len(config.block_out_channels) - 1)
    encode = 2 ** (len(config.encoder_block_out_channels) - 1)
    decode = int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
    if encode != decode:
        raise InputError(f"this AutoencoderTiny encodes at 1/{encode} but decodes at {decode}×")
    return encode
