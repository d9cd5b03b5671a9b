"""Pyramidal tiled OME BigTIFF, written tile by tile with tifffile.

Layout: one OME-XML image; the full resolution in the first IFD, each reduced resolution (the
store's output pyramid, 2× apart, down to the first level that fits one tile) in a SubIFD of it
marked ``subfiletype=1`` (reduced image) — the layout Bio-Formats, QuPath, pyvips (``subifd=i``)
and tifffile (``series[0].levels``) read as a pyramid. Samples are interleaved (rows, cols, C),
photometric RGB or min-is-black; JPEG, zstd and deflate come from imagecodecs. Deflate is the
portable lossless choice: zstd files are smaller, but libtiff builds without zstd cannot read them
(pyvips-binary's is one).

Streaming: tifffile takes each level as an iterator of tiles in row-major order; the iterator reads
the level in bands of rows (``output_pyramid.band_rows``) and cuts them into tiles, so memory is one
band plus tifffile's compression buffer (``buffersize``), whatever the image size. Zarr keeps the
store planar (C, H, W); tiles are transposed one at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import zarr

from gigasid.errors import ConfigError
from gigasid.io.exporters.base import Exporter, ExportOptions, Log, levels_down_to_one_tile
from gigasid.io.exporters.files import atomic_file
from gigasid.io.output_pyramid import band_rows, iter_row_bands

__all__ = ["TiffExporter"]

# Bytes tifffile compresses in one pass: its default (~780 MB measured for a 1 GP JPEG pyramid)
# would dominate peak memory; 16 MiB keeps both threads busy.
BUFFER_BYTES = 16 * 2**20
# --compression → (tifffile compression, predictor): horizontal differencing helps lossless codecs
_CODECS = {"jpeg": ("jpeg", None), "zstd": ("zstd", "horizontal"), "deflate": ("zlib", "horizontal"), "none": (None, None)}


def level_tiles(level: zarr.Array, tile: int) -> Iterator[np.ndarray]:
    """The (rows, cols[, C]) tiles of a (C, H, W) level in row-major order; edge tiles are short
    (tifffile pads them)."""
    channels, _, width = level.shape
    for top, bottom, band in iter_row_bands(level, band_rows(level, tile)):
        for row in range(0, bottom - top, tile):
            for col in range(0, width, tile):
                piece = band[:, row : row + tile, col : col + tile]
                yield np.ascontiguousarray(piece[0] if channels == 1 else piece.transpose(1, 2, 0))


class TiffExporter(Exporter):
    name = "pyramidal OME-TIFF"
    suffixes = (".ome.tif", ".ome.tiff", ".tif", ".tiff")
    options = frozenset({"tile", "quality", "compression"})
    compressions = ("jpeg", "zstd", "deflate", "none")
    defaults = ExportOptions(tile=256, quality=90, compression="jpeg")

    def settings(self, options: ExportOptions) -> ExportOptions:
        settings = super().settings(options)
        if settings.tile % 16:
            raise ConfigError(f"TIFF tiles must be a multiple of 16 pixels, got --tile {settings.tile}")
        return settings

    def write(self, levels: Sequence[zarr.Array], path: Path, settings: ExportOptions, log: Log) -> list[tuple[int, int]]:
        import tifffile

        tile = settings.tile
        chosen = levels_down_to_one_tile(levels, tile)
        channels = chosen[0].shape[0]
        compression, predictor = _CODECS[settings.compression]
        common = {
            "dtype": np.uint8,
            "tile": (tile, tile),
            "photometric": "rgb" if channels == 3 else "minisblack",
            "compression": compression,
            "compressionargs": {"level": settings.quality} if compression == "jpeg" else None,
            "predictor": predictor,
            "maxworkers": os.cpu_count() or 1,
            "buffersize": BUFFER_BYTES,
        }
        with atomic_file(path) as temporary, tifffile.TiffWriter(temporary, bigtiff=True, ome=True) as tiff:
            for index, level in enumerate(chosen):
                _, height, width = level.shape
                shape = (height, width, channels) if channels == 3 else (height, width)
                extra = (
                    {"subifds": len(chosen) - 1, "metadata": {"axes": "YXS" if channels == 3 else "YX", "Name": path.name}}
                    if index == 0
                    else {"subfiletype": 1, "metadata": None}
                )
                tiff.write(level_tiles(level, tile), shape=shape, **common, **extra)
                log(f"  level {index}: {height}x{width}")
        return [tuple(level.shape[1:]) for level in chosen]
