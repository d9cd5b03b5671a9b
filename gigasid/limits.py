"""Resource limits decided before computing: the reference's pixels and working set against the
memory there is, and an image output against its format's limits.

The working set is an estimate from the config (bytes per reference pixel and per output pixel of
what the in-memory path holds: the image pyramid, the knn features and index or the dense
backends' unfolded patches, the sampler's buffers), not a measurement; it is there to refuse in a
second what would otherwise allocate for minutes and fail (or swap the machine to a halt), and to
point at ``-o JOB.zarr``, which streams the reference and holds one tile at a time.

Not here: a job store's disk estimate (``gigasid.graph.engine.disk_estimate``, checked by
``gigasid.io.disk.check_free_space``) or the exports' own limits (``gigasid.io.exporters``).
"""

from __future__ import annotations

import os
from pathlib import Path

from gigasid.errors import InputError

__all__ = [
    "MAX_REFERENCE_PIXELS", "available_memory", "check_image_output", "check_in_memory", "check_job_store",
    "working_set",
]

# Beyond any reference the index can be built over in memory (a decompression bomb is a few KB of
# PNG declaring this many pixels): refused from the header, before a byte is decoded.
MAX_REFERENCE_PIXELS = 2**30


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: do not refuse


def working_set(reference: tuple[int, int, int], output: tuple[int, int] | None, config) -> int:
    """Estimated peak bytes of sampling (H, W, C) ``reference`` into ``output`` (None: tiled, the
    output held one tile at a time) with ``config``."""
    height, width, channels = reference
    dims = config.index.search_dims or channels * config.patch_size**2
    patch = 4 * channels * config.patch_size**2
    knn = config.denoiser.backend == "knn"
    # pyramid (~4/3 of the image, plus a resampled copy) and, per backend, the search structures:
    # knn: features + index vectors + the training copy; dense: the unfolded patches (float32, and
    # centred in the compute dtype with its transpose) and the score chunks
    per_reference = 4 * channels * 3 + (12 * dims if knn else 2 * patch + 1024)
    total = height * width * per_reference
    if output is not None:
        per_output = 4 * channels * 6 + (8 * dims + 12 * config.index.k if knn else patch)
        total += output[0] * output[1] * per_output
    return total


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _check_pixels(path: Path, height: int, width: int) -> None:
    if height * width > MAX_REFERENCE_PIXELS:
        raise InputError(
            f"{path} is {height}x{width} ({height * width / 1e6:.0f} megapixels), above gigasid's limit of "
            f"{MAX_REFERENCE_PIXELS / 1e6:.0f} megapixels for a reference; give a downscaled copy"
        )


def check_in_memory(
    path: Path, shape: tuple[int, int, int], size: tuple[int, int], config, *, tiled: bool, force: bool = False
) -> None:
    """Refuse a reference too large to sample in memory (or at all), with what to do instead;
    ``force`` skips the estimate (never the pixel limit)."""
    height, width, _ = shape
    _check_pixels(path, height, width)
    needed = working_set(shape, None if tiled else size, config)
    free = available_memory()
    if needed > free and not force:
        advice = (
            "write a job store instead (-o JOB.zarr), which streams the reference from the file and "
            "holds one tile at a time"
        )
        if working_set(shape, None, config) > free:
            advice = "give a downscaled copy of the reference (its patch index alone would not fit)"
        raise InputError(
            f"{path} ({height}x{width}) into {size[0]}x{size[1]} needs about {_gib(needed)} of memory in "
            f"memory, and {_gib(free)} is available; {advice} (or pass --force to start anyway)"
        )


def check_job_store(path: Path, shape: tuple[int, int, int], config, *, force: bool = False) -> None:
    """The reference of a job store: read in strips, but each scale's index is built whole."""
    height, width, _ = shape
    _check_pixels(path, height, width)
    needed, free = working_set(shape, None, config), available_memory()
    if needed > free and not force:
        raise InputError(
            f"{path} ({height}x{width}) needs about {_gib(needed)} of memory to index, and {_gib(free)} is "
            "available; give a downscaled copy of the reference (or pass --force to start anyway)"
        )


def check_image_output(path: Path, size: tuple[int, int], channels: int) -> None:
    """Refuse an image output its format cannot hold, or too large to write from memory."""
    from gigasid.io.exporters.flat import JPEG_MAX_SIDE, WHOLE_IMAGE_MAX_BYTES

    height, width = size
    if path.suffix.lower() in (".jpg", ".jpeg") and max(height, width) > JPEG_MAX_SIDE:
        raise InputError(
            f"{path}: a JPEG holds at most {JPEG_MAX_SIDE} pixels a side, and the output is {height}x{width}; "
            "write a .png or .tif, or a job store (-o JOB.zarr) and export it to a tiled format"
        )
    if height * width * channels > WHOLE_IMAGE_MAX_BYTES:
        raise InputError(
            f"{path}: a {height}x{width} image output is written from memory ({_gib(height * width * channels)}), "
            f"more than the {_gib(WHOLE_IMAGE_MAX_BYTES)} gigasid holds for one image; write a job store "
            "(-o JOB.zarr) and export it (`gigasid export JOB.zarr OUT.tif`), which streams"
        )
