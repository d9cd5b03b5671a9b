"""The exporter contract: options, their checks, and the interface every output format implements.

An exporter turns the levels of a finished job's output pyramid (uint8 (C, H, W) Zarr arrays,
``gigasid.io.output_pyramid``) into files other tools open. Its life is three calls, made in this
order by ``gigasid.io.exporters.export``: ``settings`` (the user's options checked, defaults filled:
fails in milliseconds), ``check_image`` (can this image be written in this format at all: fails
before any pyramid is built), ``write`` (streams the levels into place atomically). Options that do
not apply to a format are refused, not ignored.

Not here: the formats themselves (one module each beside this one) or the registry (the package).
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zarr

from gigasid.errors import ConfigError, InputError

__all__ = ["COMPRESSIONS", "ExportOptions", "Exporter", "Log", "levels_down_to_one_tile"]

COMPRESSIONS = ("jpeg", "png", "zstd", "deflate", "none")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for; None = the format's default (see each exporter's ``defaults``)."""

    tile: int | None = None  # tile (TIFF, DeepZoom) or chunk (OME-Zarr) side in pixels
    quality: int | None = None  # JPEG quality 1..100
    compression: str | None = None  # one of COMPRESSIONS the format supports
    overlap: int | None = None  # DeepZoom: pixels each tile shares with its neighbours
    preview: int | None = None  # PNG/JPEG: write a downscaled preview with this long side


def levels_down_to_one_tile(levels: Sequence[zarr.Array], tile: int) -> list[zarr.Array]:
    """Level 0 and the reduced levels after it, stopping at the first that fits one tile."""
    chosen = [levels[0]]
    for level in levels[1:]:
        if max(chosen[-1].shape[1:]) <= tile:
            break
        chosen.append(level)
    return chosen


class Exporter(ABC):
    """One output format. Subclasses set the class attributes and implement ``write``."""

    name: str  # for messages: "pyramidal OME-TIFF"
    suffixes: tuple[str, ...]  # lower-case file name endings, e.g. (".ome.tif", ".tif")
    options: frozenset[str]  # which ExportOptions fields apply
    compressions: tuple[str, ...] = ()  # the --compression values it takes
    defaults: ExportOptions = ExportOptions()

    def settings(self, options: ExportOptions) -> ExportOptions:
        """The options checked against this format, with its defaults filled in."""
        for field in dataclasses.fields(options):
            if getattr(options, field.name) is not None and field.name not in self.options:
                raise ConfigError(f"--{field.name} does not apply to {self.name} outputs")
        given = {k: v for k, v in dataclasses.asdict(options).items() if v is not None}
        settings = dataclasses.replace(self.defaults, **given)
        if settings.compression is not None and settings.compression not in self.compressions:
            raise ConfigError(
                f"{self.name} outputs take --compression {' | '.join(self.compressions)}, "
                f"not {settings.compression}"
            )
        if options.quality is not None:
            if not 1 <= options.quality <= 100:
                raise ConfigError(f"--quality must be between 1 and 100, got {options.quality}")
            if settings.compression != "jpeg":
                raise ConfigError(f"--quality applies to JPEG compression only (this output is {settings.compression})")
        if settings.tile is not None and not 16 <= settings.tile <= 8192:
            raise ConfigError(f"--tile must be between 16 and 8192 pixels, got {settings.tile}")
        if settings.preview is not None and settings.preview < 1:
            raise ConfigError(f"--preview must be a positive number of pixels, got {settings.preview}")
        return settings

    def outputs(self, path: Path) -> list[Path]:
        """Every path the export writes (replaced when it exists)."""
        return [path]

    def replaceable(self, path: Path) -> bool:
        """May an existing ``path`` among ``outputs`` be replaced? Files yes, folders no."""
        return not path.is_dir()

    def check_destination(self, path: Path) -> None:
        """Raise unless the export can be written to ``path``: a writable folder, nothing there
        that should not be replaced."""
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError(f"output directory {folder} does not exist; create it or choose another output path")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"output directory {folder} is not writable; choose another output path")
        for target in self.outputs(path):
            if os.path.lexists(target) and not self.replaceable(target):
                kind = "a folder" if target.is_dir() else "a file"
                raise InputError(
                    f"{target} exists and is {kind}, not a previous {self.name} export; "
                    "remove it or choose another output name"
                )

    def check_image(self, shape: tuple[int, int, int], settings: ExportOptions) -> None:
        """Raise if a (C, H, W) image cannot be written in this format; most formats take any."""

    @abstractmethod
    def write(self, levels: Sequence[zarr.Array], path: Path, settings: ExportOptions, log: Log) -> list[tuple[int, int]]:
        """Write the export from the pyramid ``levels`` (level 0 first); return the (rows, cols)
        of each resolution written."""
