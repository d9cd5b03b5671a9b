"""PNG and JPEG: the whole image, or a downscaled preview, as one ordinary image file.

A whole-image export is held in memory once (read from the store band by band into one (H, W, C)
array, then encoded by libvips), so it is refused above ``WHOLE_IMAGE_MAX_BYTES`` with a message
pointing at ``--preview`` and the tiled formats. JPEG also has a hard limit: libjpeg encodes at
most 65 500 pixels a side (its JPEG_MAX_DIMENSION, below the format's 65 535). PNG has no side
limit of its own that matters here (libvips writes up to 10 million pixels a side).

A preview of long side N reads the smallest output-pyramid level whose long side is still at least
N (less than 2N unless it is the full image) and resizes it with libvips (lanczos3) to exactly
that size; the short side is rounded, at least 1 pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyvips
import zarr

from gigasid.errors import ConfigError, InputError
from gigasid.io.exporters.base import Exporter, ExportOptions, Log
from gigasid.io.exporters.files import atomic_file
from gigasid.io.output_pyramid import band_rows, iter_row_bands, pyramid_shapes

__all__ = ["JPEG_MAX_SIDE", "WHOLE_IMAGE_MAX_BYTES", "JpegExporter", "PngExporter", "preview_shape"]

JPEG_MAX_SIDE = 65_500
WHOLE_IMAGE_MAX_BYTES = 512 * 2**20  # pixels held in memory for one PNG/JPEG (e.g. 13 000² RGB)


def preview_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(rows, cols) of a preview whose long side is ``long_side``, keeping the aspect ratio."""
    if height >= width:
        return long_side, max(1, round(width * long_side / height))
    return max(1, round(height * long_side / width)), long_side


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class _FlatExporter(Exporter):
    options = frozenset({"quality", "compression", "preview"})
    max_side: int | None = None

    @staticmethod
    def _source_level(shapes: Sequence[tuple[int, int]], preview: int | None) -> int:
        """Which pyramid level to read: 0 for the whole image, else the smallest one whose long side
        is still at least the preview's."""
        if preview is None:
            return 0
        return max(k for k, shape in enumerate(shapes) if max(shape) >= preview)

    def check_image(self, shape: tuple[int, int, int], settings: ExportOptions) -> None:
        channels, height, width = shape
        preview = settings.preview
        if preview is not None and preview > max(height, width):
            raise ConfigError(
                f"--preview {preview} is larger than the image ({height}x{width}); "
                f"give at most {max(height, width)}, or omit --preview for the whole image"
            )
        rows, cols = (height, width) if preview is None else preview_shape(height, width, preview)
        if self.max_side is not None and max(rows, cols) > self.max_side:
            raise InputError(
                f"the image is {rows}x{cols}, larger than {self.name} allows ({self.max_side} pixels a side); "
                f"write a downscaled copy with --preview N (N <= {self.max_side}) or a tiled format "
                "(.tif, .dzi, .ome.zarr)"
            )
        shapes = pyramid_shapes(height, width)
        rows, cols = shapes[self._source_level(shapes, preview)]
        needed = rows * cols * channels
        if needed > WHOLE_IMAGE_MAX_BYTES:
            what = "the whole image" if preview is None else f"a {preview}-px preview"
            raise InputError(
                f"{what} of this {height}x{width} image needs {_gib(needed)} in memory, more than the "
                f"{_gib(WHOLE_IMAGE_MAX_BYTES)} a {self.name} export may use; write a smaller preview with "
                "--preview N or a tiled format (.tif, .dzi, .ome.zarr)"
            )

    def write(self, levels: Sequence[zarr.Array], path: Path, settings: ExportOptions, log: Log) -> list[tuple[int, int]]:
        source = levels[self._source_level([tuple(level.shape[1:]) for level in levels], settings.preview)]
        channels, height, width = source.shape
        pixels = np.empty((height, width, channels), np.uint8)
        for top, bottom, band in iter_row_bands(source, band_rows(source, 1)):
            pixels[top:bottom] = band.transpose(1, 2, 0)
        image = pyvips.Image.new_from_array(pixels, interpretation="b-w" if channels == 1 else "srgb")
        if settings.preview is not None:
            _, full_height, full_width = levels[0].shape
            rows, cols = preview_shape(full_height, full_width, settings.preview)
            if (rows, cols) != (height, width):
                image = image.thumbnail_image(cols, height=rows, size="force")
        with atomic_file(path) as temporary:
            try:
                image.write_to_file(str(temporary), **self.save_options(settings))
            except pyvips.Error as error:
                reason = (error.detail or error.message).strip().splitlines()[-1]
                raise InputError(f"cannot write {path}: {reason}") from None
        return [(image.height, image.width)]

    def save_options(self, settings: ExportOptions) -> dict:
        raise NotImplementedError


class PngExporter(_FlatExporter):
    name = "PNG"
    suffixes = (".png",)
    compressions = ("deflate",)
    defaults = ExportOptions(compression="deflate")

    def save_options(self, settings: ExportOptions) -> dict:
        return {"compression": 6}


class JpegExporter(_FlatExporter):
    name = "JPEG"
    suffixes = (".jpg", ".jpeg")
    compressions = ("jpeg",)
    defaults = ExportOptions(compression="jpeg", quality=90)
    max_side = JPEG_MAX_SIDE

    def save_options(self, settings: ExportOptions) -> dict:
        return {"Q": settings.quality}
