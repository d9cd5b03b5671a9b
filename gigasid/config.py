"""Typed job configuration: what to compute, read from a pipeline preset plus ``--set`` overrides.

A config is a tree of frozen dataclasses. :func:`from_mapping` builds one from plain data (YAML)
and raises :class:`~gigasid.errors.ConfigError` naming the key for an unknown key, a value of the
wrong type, or one out of range; nothing is silently clamped. Each field's comment says what it
does; its ``metadata`` holds the valid range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

from gigasid.errors import ConfigError

# the presets ship inside the package (``gigasid/pipelines/*.yaml``, package data), so an installed
# wheel finds them; the repository's top-level ``pipelines`` is a link to that folder
PIPELINES_DIR: Traversable = files("gigasid") / "pipelines"


def _range(lo: float | None = None, hi: float | None = None, *, odd: bool = False) -> dict:
    return {"range": (lo, hi), "odd": odd}


@dataclass(frozen=True)
class DenoiserConfig:
    """Which closed-form denoiser computes D(x), and in what precision."""

    #: exact (chunked matmul), fused (scaled-dot-product attention) or knn (index candidates)
    backend: Literal["exact", "fused", "knn"] = "knn"
    #: precision of the dense backends' matmuls; bfloat16 is the paper's choice and 2× faster
    compute_dtype: Literal["float32", "bfloat16", "float64"] = "bfloat16"


@dataclass(frozen=True)
class IndexConfig:
    """Nearest-neighbour candidates for the knn backend (see ``gigasid.index``)."""

    #: exact (torch brute force), flat (FAISS exact), ivf or ivfpq (FAISS approximate), or auto:
    #: chosen per scale by its number of patches (``gigasid.index.search.auto_kind``)
    kind: Literal["exact", "flat", "ivf", "ivfpq", "auto"] = "ivf"
    #: candidates per query whose exact weights are computed (paper: k = 5)
    k: int = field(default=5, metadata=_range(1, 1024))
    #: dimensions searched: PCA components + 1 residual norm; 0 searches raw patches
    search_dims: int = field(default=32, metadata=_range(0, 4096))
    #: IVF lists; null = 2·√N (balances the coarse search against the list scans at nprobe 4)
    nlist: int | None = field(default=None, metadata=_range(1, None))
    #: IVF lists probed per query
    nprobe: int = field(default=4, metadata=_range(1, 65536))
    #: add neighbours' candidates shifted by one pixel and the previous step's (PatchMatch-style)
    coherence: Literal["none", "neighbours", "previous", "both"] = "none"
    #: search the index for every n-th query per axis; the rest take their cell's searched
    #: query's candidates shifted by their offset (spatial coherence; 1 = search every query)
    search_stride: int = field(default=1, metadata=_range(1, 64))


@dataclass(frozen=True)
class LatentConfig:
    """The space the sampler runs in (DESIGN.md §6; see ``gigasid.codecs``)."""

    #: pixel (the image itself), pca (the embedded lapped-PCA codec fitted on the reference,
    #: 8× smaller per side) or vae (a diffusers autoencoder loaded from ``vae_path``)
    codec: Literal["pixel", "pca", "vae"] = "pixel"
    #: latent channels K of the pca codec (bench/codec.py measures reconstruction per K)
    channels: int = field(default=32, metadata=_range(1, 3072))
    #: how the pixel output is made: correspondence (fold the reference's own pixel patches at the
    #: last step's matches, with its weights; knn only) or codec (the codec's decoder)
    decode: Literal["correspondence", "codec"] = "correspondence"
    #: one more latent channel, the energy the coefficients leave out of each block, so that
    #: textures they do not resolve stay apart from smooth regions of the same colour (the pca
    #: codec's; the vae's latents are what its encoder gives and the pixel space has no residual)
    texture_channel: bool = False
    #: correspondence decode: the window's ρ over the matched pixel patches (null = ``rho``);
    #: smaller keeps each pixel closer to the one patch centred on it, so where neighbouring
    #: cells copy from different places the seam is narrower instead of a wide cross-fade
    decode_rho: float | None = field(default=None, metadata=_range(1e-6, math.inf))
    #: windowed blocks sampled from the reference pyramid to fit the pca codec
    fit_blocks: int = field(default=200_000, metadata=_range(1000, None))
    #: a diffusers VAE: a local directory, or a Hugging Face repo id already in the local cache
    vae_path: str | None = None
    #: how the coarsest latent scale is made: latent (sampled from noise in the latent space, like
    #: every scale) or pixel (the paper's pixel-space sampler run on the reference's coarsest pixel
    #: level at the output's coarsest pixel size, then encoded by the codec: a latent cell is a
    #: large piece of content there, and sampling whole cells loses the layout and repeats one
    #: cell on a lattice). Beyond the paper; the applications that sample their coarsest scale
    #: from noise only (uncond, tileable)
    layout: Literal["latent", "pixel"] = "latent"


@dataclass(frozen=True)
class BalanceConfig:
    """Usage balancing at the coarsest sampled scale (``core.usage_balance``): the denoiser's
    weights discount the reference patches the whole image over-uses, so a large output's layout
    is not one self-bordering texture repeated. Beyond the paper (0 = its uniform prior)."""

    #: u^(-strength) for a patch used u times its share; 0 turns balancing off
    strength: float = field(default=0.0, metadata=_range(0.0, 16.0))
    #: how many times the usage is measured and discounted
    rounds: int = field(default=3, metadata=_range(1, 50))
    #: candidates per query at the balanced scale (more gives the discount alternatives to pick)
    k: int = field(default=64, metadata=_range(1, 1024))
    #: how many times its share of the output a reference patch may be drawn on before it is
    #: discounted (its share: the output's patches over the reference's, at least 1)
    slack: float = field(default=1.0, metadata=_range(1.0, 1000.0))
    #: balance only where the output's coarsest scale has at least this many times the reference's
    #: patches (an output about the reference's size is a rearrangement of it: left alone)
    min_share: float = field(default=2.0, metadata=_range(0.0, 1e6))


@dataclass(frozen=True)
class ClipConfig:
    """Text-guided style (application ``style``): the CLIP model that scores the output against
    a prompt, and the paper's guidance rule (``core.guidance``)."""

    #: a folder holding a transformers CLIP model (config.json, weights, tokenizer files) or a
    #: Hugging Face repo id already in the local cache; nothing is downloaded (the paper: ViT-B/32)
    path: str = "openai/clip-vit-base-patch32"
    #: the text the output is pushed toward (--prompt), e.g. "Van Gogh style"
    prompt: str | None = None
    #: how far the input is DDIM-inverted before the guided sampling brings it back, as the
    #: fraction of noise σ/(α+σ) (paper's code: 0.3); higher gives the prompt more freedom
    noise: float = field(default=0.3, metadata=_range(1e-6, 1.0))
    #: γ, the step along the CLIP gradient, relative to the image's own magnitude; faded with σ_t
    strength: float = field(default=1.0, metadata=_range(0.0, 100.0))
    #: λ, the weight of the new clean estimate against the previous step's guided one
    momentum: float = field(default=0.1, metadata=_range(1e-6, 1.0))
    #: the fraction of pixels guided at each step: those where the gradient is strongest
    fill: float = field(default=0.5, metadata=_range(1e-6, 1.0))
    #: augmented views of the estimate CLIP scores at each step (crops, flips, small turns)
    views: int = field(default=16, metadata=_range(1, 256))


@dataclass(frozen=True)
class JobConfig:
    """One generation job. Defaults are the paper's pixel-space settings."""

    #: uncond, retarget (coarsest scale = resized input), symmetric, tileable, analogy
    #: (coarsest scale = the --structure image's layout, finer scales from the input's patches),
    #: outpaint (the input placed on a larger canvas, the rest generated), inpaint (--mask
    #: regenerated) or style (the input restyled toward a text --prompt with CLIP guidance)
    application: Literal[
        "uncond", "retarget", "symmetric", "tileable", "analogy", "outpaint", "inpaint", "style"
    ] = "uncond"
    #: flow_linear (paper default) or ve_edm
    noise_schedule: Literal["flow_linear", "ve_edm"] = "flow_linear"
    #: denoiser calls per scale (T)
    num_steps: int = field(default=10, metadata=_range(1, 1000))
    #: stochasticity of the step: 0 = deterministic DDIM, 1 = fresh noise each step
    eta: float = field(default=0.0, metadata=_range(0.0, 1.0))
    #: patch side P (odd); larger patches copy larger structures
    patch_size: int = field(default=15, metadata=_range(1, 255, odd=True))
    #: std of the Gaussian fold window over patch coordinates in [-1, 1]; .inf = flat
    rho: float = field(default=0.2, metadata=_range(1e-6, math.inf))
    #: short side of the coarsest sampling grid (pixels, or latent cells in a latent space);
    #: the pyramid depth is derived from it
    min_short_side: int = field(default=24, metadata=_range(1, None))
    #: pyramid depth; null derives it from min_short_side
    num_scales: int | None = field(default=None, metadata=_range(1, 32))
    #: output size relative to the input (rows, cols) when --size is not given
    output_scale: tuple[float, float] = (1.0, 1.0)
    #: mirror axis of the symmetric application
    symmetry: Literal["horizontal", "vertical", "both"] = "horizontal"
    #: which edges of the output meet with no seam: horizontal (left and right: a 360° panorama),
    #: vertical (top and bottom) or both (the tileable application); none = the application's own
    wrap: Literal["none", "horizontal", "vertical", "both"] = "none"
    #: analogy: how far the structure's coarsest level is DDIM-inverted (with its own patches)
    #: before the input's denoiser brings it back (paper's code: 0.5), as the fraction of noise
    #: σ/(α+σ) to stop at; 0 keeps the structure's own values (its colours), 1 inverts fully
    structure_noise: float = field(default=0.5, metadata=_range(0.0, 1.0))
    #: outpaint: where the reference sits on the canvas: center, left, right, top, bottom, or
    #: "x,y", its top-left corner in pixels (--place); latent jobs round it to the codec's cells
    place: str = "center"
    #: where the denoisers run: cpu (the numba kernels), cuda (their torch twins on the GPU, with
    #: a FAISS GPU index where faiss has one; refused where torch sees no CUDA device) or auto
    #: (cuda where torch sees one, else cpu); see ``core.device``
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    #: text-guided style (application style; ``--prompt``)
    clip: ClipConfig = field(default_factory=ClipConfig)
    #: usage balancing of the coarsest sampled scale
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def __post_init__(self) -> None:
        if self.min_short_side < self.patch_size:
            raise ConfigError(
                f"min_short_side={self.min_short_side} is smaller than patch_size={self.patch_size}: "
                "the coarsest scale must hold at least one patch"
            )
        if self.application == "tileable" and self.wrap not in ("none", "both"):
            raise ConfigError(
                f"wrap={self.wrap} with application=tileable: tileable wraps both axes; use application=uncond "
                f"(or retarget) with wrap={self.wrap}"
            )
        if self.wrap != "none" and self.application == "symmetric":
            raise ConfigError("wrap with application=symmetric is not supported: a mirror image does not wrap")
        if self.latent.codec != "pixel" and self.application in ("symmetric", "style"):
            raise ConfigError(f"the {self.application} application runs in pixel space: set latent.codec=pixel")
        if self.application == "style":
            if not (self.clip.prompt or "").strip():
                raise ConfigError("application=style needs a prompt: --prompt TEXT (or clip.prompt)")
            if self.num_scales != 1:
                raise ConfigError(
                    f"application=style samples one scale (CLIP guides the whole image at once): set "
                    f"num_scales=1, got {self.num_scales}"
                )
            if self.wrap != "none":
                raise ConfigError("wrap with application=style is not supported: the output is the input restyled")
        elif self.clip.prompt is not None:
            raise ConfigError(
                f"clip.prompt (--prompt) is for application=style (--pipeline text-style), not {self.application}"
            )
        if self.latent.codec == "vae" and not self.latent.vae_path:
            raise ConfigError("latent.codec=vae needs latent.vae_path: a diffusers VAE directory or cached repo id")
        if self.latent.decode == "correspondence" and self.latent.codec != "pixel" and self.denoiser.backend != "knn":
            raise ConfigError(
                "latent.decode=correspondence needs denoiser.backend=knn (it folds the matched "
                "candidates); set latent.decode=codec for the dense backends"
            )
        if self.latent.layout == "pixel":
            if self.latent.codec == "pixel":
                raise ConfigError("latent.layout=pixel is for latent jobs (latent.codec=pca or vae); "
                                  "a pixel job samples every scale in pixels already")
            if self.application not in ("uncond", "tileable"):
                raise ConfigError(
                    f"latent.layout=pixel with application={self.application}: the layout is sampled from noise "
                    "for uncond and tileable only; set latent.layout=latent"
                )
        if self.balance.strength > 0.0 and self.denoiser.backend != "knn":
            raise ConfigError(
                f"balance.strength={self.balance.strength} needs denoiser.backend=knn (it re-weights the candidates "
                "of every query); set balance.strength=0 for the dense backends"
            )
        for value in self.output_scale:
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"output_scale must be two positive factors, got {list(self.output_scale)}")


def _check_range(key: str, value: Any, meta: dict) -> None:
    lo, hi = meta.get("range", (None, None))
    if value is None:
        return
    if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and hi != math.inf)):
        raise ConfigError(f"{key}={value} is not a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key}={value} is out of range; valid: {bounds}")
    if meta.get("odd") and value % 2 == 0:
        raise ConfigError(f"{key}={value} must be odd (patches have a centre pixel)")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "+inf", "+.inf"):
            return math.inf
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if annotation is str:
        return str(value)
    raise TypeError(f"unsupported annotation for {key}: {annotation}")


def from_mapping(cls: type, data: dict, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating every key and value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; valid keys: {', '.join(prefix + name for name in fields)}"
        )
    values = {}
    for name, value in data.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_mapping(hint, value, prefix=key + ".")
            continue
        coerced = _coerce(key, value, hint)
        _check_range(key, coerced, dict(fields[name].metadata))
        values[name] = coerced
    return cls(**values)


def to_mapping(config: Any) -> dict:
    """Plain data (for manifests and printing)."""
    return dataclasses.asdict(config)


def parse_overrides(pairs: list[str]) -> dict:
    """``["index.k=10", "eta=1"]`` → nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set has an empty key in {pair!r}")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_names(directory: Traversable) -> list[str]:
    """The names of the YAML presets in a folder of the package (``NAME.yaml`` → ``NAME``)."""
    return sorted(p.name[: -len(".yaml")] for p in directory.iterdir() if p.name.endswith(".yaml") and p.is_file())


def read_preset(name_or_path: str, directory: Traversable, what: str) -> dict:
    """The mapping in a YAML preset, by name (``directory/NAME.yaml``) or by file path.

    ``directory`` is a folder of the installed package (``importlib.resources``); ``what`` names
    the kind of preset in error messages ("pipeline", "scheduler profile").
    """
    path: Path | Traversable = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{name_or_path}.yaml"
        if not path.is_file():
            names = ", ".join(preset_names(directory))
            raise ConfigError(f"unknown {what} {name_or_path!r}; available: {names} (or pass a .yaml file)")
    elif not path.is_file():
        raise ConfigError(f"{what} file {path} " + ("is a folder, not a YAML file" if path.is_dir() else "does not exist"))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of settings")
    return data


def available_pipelines() -> list[str]:
    """The preset names ``load_pipeline`` accepts."""
    return preset_names(PIPELINES_DIR)


def load_pipeline(
    name_or_path: str, overrides: list[str] | None = None, settings: dict | None = None
) -> JobConfig:
    """A preset by name (``gigasid/pipelines/NAME.yaml``) or a YAML file path, plus ``key=value``
    overrides, plus ``settings`` (a nested mapping whose values are taken as they are, not parsed
    as YAML: a prompt such as ``yes`` stays text)."""
    data = read_preset(name_or_path, PIPELINES_DIR, "pipeline")
    data = _merge(data, parse_overrides(overrides or []))
    data = _merge(data, settings or {})
    return from_mapping(JobConfig, data)
