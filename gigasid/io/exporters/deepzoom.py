"""DeepZoom (``.dzi`` descriptor + ``NAME_files/<level>/<col>_<row>.<format>`` tiles), cut straight
from the store's output pyramid.

DeepZoom facts this follows: level ``n`` of an image whose long side is M is the image scaled by
``2^(n - N)``, N = ceil(log2 M), with sides ceil(side / 2^(N - n)) — level N is full size and level
0 is 1×1. That is exactly output-pyramid level ``N - n``, so no resampling happens here. A level is
cut into ``tile``-px cells in row-major (col, row) names; every tile also carries ``overlap`` pixels
of each neighbour it has (none past the image edge), so edge tiles are smaller.

Streaming: a level is read in bands of tile rows (plus the overlap rows above and below) and the
tiles of a band are encoded (imagecodecs JPEG / PNG, which release the GIL) on a thread pool; memory
is one band. The viewer serves single tiles on demand with the same ``tile_pixels`` / ``encode_tile``
and ``descriptor``, so an export and a served store are the same pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from gigasid.errors import ConfigError
from gigasid.io.exporters.base import Exporter, ExportOptions, Log
from gigasid.io.exporters.files import atomic_directory, atomic_file
from gigasid.io.output_pyramid import band_rows, iter_row_bands

__all__ = ["DeepZoomExporter", "descriptor", "encode_tile", "files_folder", "max_level", "tile_pixels"]

TILE_FORMATS = {"jpeg": "jpeg", "png": "png"}  # --compression → DeepZoom Format (and file ending)
PNG_LEVEL = 3  # zlib level of PNG tiles: ~2× faster than 6 for a few % larger files


def max_level(height: int, width: int) -> int:
    """DeepZoom's N: the level holding the full-size image."""
    return math.ceil(math.log2(max(height, width))) if max(height, width) > 1 else 0


def files_folder(descriptor_path: Path) -> Path:
    """``NAME.dzi`` → ``NAME_files``, where DeepZoom readers look for the tiles."""
    return descriptor_path.with_name(descriptor_path.name[: -len(".dzi")] + "_files")


def descriptor(height: int, width: int, tile: int, overlap: int, tile_format: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{tile_format}" '
        f'Overlap="{overlap}" TileSize="{tile}">\n'
        f'  <Size Width="{width}" Height="{height}"/>\n'
        "</Image>\n"
    )


def _span(index: int, tile: int, overlap: int, length: int) -> tuple[int, int]:
    """Half-open pixel range of cell ``index`` along one axis, with the overlap it has."""
    return max(0, index * tile - overlap), min(length, (index + 1) * tile + overlap)


def tile_pixels(level: zarr.Array, col: int, row: int, tile: int, overlap: int) -> np.ndarray:
    """Tile (col, row) of a (C, H, W) level as (rows, cols[, C]) uint8 (grey stays 2-D)."""
    _, height, width = level.shape
    r0, r1 = _span(row, tile, overlap, height)
    c0, c1 = _span(col, tile, overlap, width)
    return _interleave(level[:, r0:r1, c0:c1])


def _interleave(piece: np.ndarray) -> np.ndarray:
    """(C, rows, cols) → a fresh (rows, cols[, C]) array. Fresh, not ``ascontiguousarray``: that
    keeps odd strides on length-1 axes, which imagecodecs' encoders reject."""
    view = piece[0] if piece.shape[0] == 1 else piece.transpose(1, 2, 0)
    out = np.empty(view.shape, np.uint8)
    out[...] = view
    return out


def encode_tile(pixels: np.ndarray, tile_format: str, quality: int) -> bytes:
    import imagecodecs

    if tile_format == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(pixels, level=quality))
    return bytes(imagecodecs.png_encode(pixels, level=PNG_LEVEL))


class DeepZoomExporter(Exporter):
    name = "DeepZoom"
    suffixes = (".dzi",)
    options = frozenset({"tile", "quality", "compression", "overlap"})
    compressions = tuple(TILE_FORMATS)
    defaults = ExportOptions(tile=256, quality=90, compression="jpeg", overlap=1)

    def settings(self, options: ExportOptions) -> ExportOptions:
        settings = super().settings(options)
        if not 0 <= settings.overlap <= settings.tile // 2:
            raise ConfigError(f"--overlap must be between 0 and half the tile ({settings.tile // 2}), got {settings.overlap}")
        return settings

    def outputs(self, path: Path) -> list[Path]:
        return [path, files_folder(path)]

    def replaceable(self, path: Path) -> bool:
        # a previous export's tile folder holds only numbered level folders
        if path.is_dir():
            return all(child.is_dir() and child.name.isdigit() for child in path.iterdir())
        return True

    def write(self, levels: Sequence[zarr.Array], path: Path, settings: ExportOptions, log: Log) -> list[tuple[int, int]]:
        _, height, width = levels[0].shape
        top_level = max_level(height, width)
        assert len(levels) == top_level + 1, "the output pyramid goes down to 1x1"
        tile_format = TILE_FORMATS[settings.compression]
        # the descriptor is renamed into place last: a reader never finds it before its tiles
        with atomic_file(path) as temporary_descriptor, atomic_directory(files_folder(path)) as temporary_files:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for depth, level in enumerate(levels):
                    folder = temporary_files / str(top_level - depth)
                    folder.mkdir()
                    self._write_level(level, folder, settings, tile_format, pool)
                    if depth < 3 or depth == len(levels) - 1:
                        log(f"  level {top_level - depth}: {level.shape[1]}x{level.shape[2]}")
            temporary_descriptor.write_text(descriptor(height, width, settings.tile, settings.overlap, tile_format))
        return [tuple(level.shape[1:]) for level in levels]

    @staticmethod
    def _write_level(level: zarr.Array, folder: Path, settings: ExportOptions, tile_format: str, pool) -> None:
        tile, overlap = settings.tile, settings.overlap
        _, height, width = level.shape
        cols = math.ceil(width / tile)

        def one(job: tuple[np.ndarray, int, int]) -> None:
            piece, col, row = job
            encoded = encode_tile(_interleave(piece), tile_format, settings.quality)
            (folder / f"{col}_{row}.{tile_format}").write_bytes(encoded)

        for top, bottom, band in iter_row_bands(level, band_rows(level, tile), margin=overlap):
            band_top = max(0, top - overlap)  # image row of band row 0
            jobs = []
            for row in range(top // tile, math.ceil(bottom / tile)):
                r0, r1 = _span(row, tile, overlap, height)
                for col in range(cols):
                    c0, c1 = _span(col, tile, overlap, width)
                    jobs.append((band[:, r0 - band_top : r1 - band_top, c0:c1], col, row))  # a view
            for _ in pool.map(one, jobs):
                pass
