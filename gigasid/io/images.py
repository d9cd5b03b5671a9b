"""Whole-image files in and out: PNG, JPEG and TIFF through pyvips.

This module reads one image into memory as an (H, W, C) float32 array in [0, 1] and writes one
back as 8-bit; it is for images that fit in memory (the exemplar, a preview, a small result).
Huge inputs are not read here: they are streamed in strips into the Zarr job store.

Parts: `read_image` (file -> array: EXIF orientation, colourspace, bit depth), `write_image`
(array -> file, atomically), `check_writable_output` (run it before a long computation so a bad
output path fails first), `list_images` (the image files of a folder). Every user mistake raises
`gigasid.errors.InputError` with a one-line message naming the path.

Arrays here follow the I/O convention (row, col, channel); C is 1 (grey) or 3 (RGB).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyvips

from gigasid.errors import InputError
from gigasid.io.disk import disk_full, is_disk_full, owner_tag, remove_stale

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "check_writable_output",
    "list_images",
    "read_image",
    "write_image",
]

StrPath = str | os.PathLike[str]

# File name endings `list_images` picks up (lower case); `read_image` itself tries any file.
READ_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# File name endings `write_image` can write, with the saver options used for each.
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    ".png": {"compression": 6},
    ".jpg": {"Q": 95},  # libvips keeps full-resolution chroma from Q >= 90
    ".jpeg": {"Q": 95},
    ".tif": {"compression": "deflate", "predictor": "horizontal"},
    ".tiff": {"compression": "deflate", "predictor": "horizontal"},
}
WRITE_SUFFIXES = tuple(sorted(_SAVE_OPTIONS))

# Interpretations whose bands are used as stored (1-2 bands: grey [+ alpha]; 3-4: RGB [+ alpha]).
_GREY_OR_RGB = {"b-w", "grey16", "srgb", "rgb", "rgb16"}
_AS_STORED = _GREY_OR_RGB | {"multiband", "matrix", "histogram", "fourier"}
# Full-scale value of each integer band format; float formats are clipped instead.
_FULL_SCALE = {
    "uchar": 255.0,
    "ushort": 65535.0,
    "uint": 4294967295.0,
    "char": 127.0,
    "short": 32767.0,
    "int": 2147483647.0,
}


def read_image(path: StrPath) -> npt.NDArray[np.float32]:
    """Read an image file as a float32 (H, W, C) array in [0, 1], C = 1 (grey) or 3 (RGB).

    The EXIF orientation is applied, so the array is the image as a viewer shows it. Grey images
    stay one channel; CMYK, Lab and other colourspaces are converted to sRGB. An alpha band is
    dropped, not composited over a background: the colours stored under transparent pixels are
    kept as they are. 8-bit samples are scaled by 1/255 and 16-bit ones by 1/65535 (full
    precision); float images are taken to be in [0, 1]: a little outside is clipped, values far
    outside (0-255 data, HDR) are refused rather than clipped to a white or black image. Embedded ICC profiles other than CMYK ones are
    ignored: RGB values are taken as sRGB. Any format libvips reads works; PNG, JPEG and TIFF are
    the tested ones. A truncated or corrupt file raises rather than loading as a partly grey image.
    """
    image, scale, path_str = _open(path)
    try:
        raw = image.numpy()
    except pyvips.Error as error:
        raise InputError(f"cannot read {path_str} as an image: {_short_reason(error, path_str)}") from None
    return _normalise(raw, scale)


def _open(path: StrPath) -> tuple[pyvips.Image, float | None, str]:
    """The image as libvips will stream it: oriented, grey or sRGB, with its full-scale value."""
    path_str = os.fspath(path)
    _check_readable_file(path_str)
    try:
        image = pyvips.Image.new_from_file(path_str, access="sequential", fail_on="error", revalidate=True)
        if image.format in ("float", "double"):
            # random access: the range is read in one pass, then the pixels in another
            image = pyvips.Image.new_from_file(path_str, fail_on="error", revalidate=True)
            _check_float_range(image, path_str)
        if _needs_autorot(image):
            # Rotating needs random access, which a sequential JPEG/PNG load cannot give.
            image = image.copy_memory().autorot()
        image = _grey_or_rgb(image, path_str)
    except pyvips.Error as error:
        raise InputError(f"cannot read {path_str} as an image: {_short_reason(error, path_str)}") from None
    scale = _FULL_SCALE.get(image.format)
    if scale is None and image.format not in ("float", "double"):
        raise InputError(
            f"cannot read {path_str}: its samples are {image.format}; gigasid reads integer or real-valued images"
        )
    if image.width == 0 or image.height == 0:
        raise InputError(f"{path_str} is an empty image (0 pixels); give a non-empty image")
    return image, scale, path_str


# Float samples are taken to be in [0, 1]; a little outside is clipped (filter overshoot), but
# values far outside mean another convention (0-255, HDR) that clipping would turn white or black.
_FLOAT_RANGE = (-1.0, 2.0)


def _check_float_range(image: pyvips.Image, path: str) -> None:
    """Refuse float samples far outside [0, 1] (or not finite), read in one pass over the file."""
    stats = image.stats()  # row 0: every band together; columns min, max, ...
    low, high = stats(0, 0)[0], stats(1, 0)[0]
    if not (np.isfinite(low) and np.isfinite(high)) or low < _FLOAT_RANGE[0] or high > _FLOAT_RANGE[1]:
        raise InputError(
            f"{path} has float samples from {low:g} to {high:g}; gigasid reads float images with values "
            "in [0, 1] (a little outside is clipped): scale it to [0, 1], or save it with 8 or 16-bit "
            "integer samples"
        )


def _normalise(raw: np.ndarray, scale: float | None) -> npt.NDArray[np.float32]:
    if raw.size == 0:
        raise InputError("the image is empty (0 pixels); give a non-empty image")
    if raw.ndim == 2:
        raw = raw[:, :, None]
    array = raw.astype(np.float32)
    if scale is not None:
        array /= np.float32(scale)
    np.clip(array, 0.0, 1.0, out=array)
    return array


def image_shape(path: StrPath) -> tuple[int, int, int]:
    """(H, W, C) of the image :func:`read_image` would return, without decoding its pixels."""
    image, _, _ = _open(path)
    return image.height, image.width, image.bands


def read_strips(path: StrPath, rows: int = 256) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
    """The image as :func:`read_image` returns it, in strips of ``rows`` rows, top to bottom:
    (first row, float32 (h, W, C)). A sequential read: peak memory is a strip, not the image."""
    image, scale, path_str = _open(path)
    region = pyvips.Region.new(image)
    dtype = _NUMPY_FORMATS[image.format]
    try:
        for top in range(0, image.height, rows):
            height = min(rows, image.height - top)
            data = region.fetch(0, top, image.width, height)
            raw = np.frombuffer(data, dtype=dtype).reshape(height, image.width, image.bands)
            yield top, _normalise(raw, scale)
    except pyvips.Error as error:
        raise InputError(f"cannot read {path_str} as an image: {_short_reason(error, path_str)}") from None


_NUMPY_FORMATS = {
    "uchar": np.uint8, "char": np.int8, "ushort": np.uint16, "short": np.int16,
    "uint": np.uint32, "int": np.int32, "float": np.float32, "double": np.float64,
}


def write_image(path: StrPath, image: npt.ArrayLike) -> None:
    """Write an (H, W, C) image, C = 1 or 3 (an (H, W) array is grey), as an 8-bit PNG/JPEG/TIFF.

    The format comes from the file name ending (see `WRITE_SUFFIXES`). A float image is taken to
    be in [0, 1]: values outside are clipped, then rounded to 8 bits; a uint8 image is written as
    is. The file is written to a temporary name in the same folder and renamed over `path`, so a
    failed write leaves neither a half-written file nor a temporary one.
    """
    path_str = os.fspath(path)
    suffix = check_writable_output(path_str)
    pixels = _to_uint8(image)
    interpretation = "b-w" if pixels.shape[2] == 1 else "srgb"
    vips_image = pyvips.Image.new_from_array(pixels, interpretation=interpretation)
    folder, name = os.path.split(path_str)
    remove_stale(Path(folder or "."), f".{name}.")  # left by a killed write of the same name
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.{owner_tag()}.tmp{suffix}")
    try:
        vips_image.write_to_file(temporary, **_SAVE_OPTIONS[suffix])
        os.replace(temporary, path_str)
    except pyvips.Error as error:
        if is_disk_full(error):
            raise disk_full(folder or ".") from None
        raise InputError(f"cannot write {path_str}: {_short_reason(error, temporary)}") from None
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def check_writable_output(path: StrPath) -> str:
    """Raise InputError unless an image can be written at `path`; return its lower-case suffix.

    Checks the file name ending and that the folder exists and is writable. Call it before a long
    computation so a bad output path fails in seconds, not after the work is done.
    """
    path_str = os.fspath(path)
    suffix = Path(path_str).suffix.lower()
    if suffix not in _SAVE_OPTIONS:
        shown = f"'{suffix}'" if suffix else "no extension"
        raise InputError(
            f"cannot write {path_str}: {shown} is not a supported image format; "
            f"end the name in one of {', '.join(WRITE_SUFFIXES)}"
        )
    if os.path.isdir(path_str):
        raise InputError(f"output {path_str} is a folder; give a file name instead")
    folder = os.path.dirname(path_str) or "."
    if not os.path.isdir(folder):
        raise InputError(f"output directory {folder} does not exist; create it or choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output directory {folder} is not writable; choose another output path")
    return suffix


def list_images(folder: StrPath) -> list[Path]:
    """The image files of `folder` (by name ending, see `READ_SUFFIXES`), sorted by name.

    Not recursive; hidden files (a leading dot, e.g. unfinished writes) are skipped.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"input folder {root} does not exist; check the path")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give a folder of images")
    found = sorted(
        entry
        for entry in root.iterdir()
        if entry.suffix.lower() in READ_SUFFIXES and not entry.name.startswith(".") and entry.is_file()
    )
    if not found:
        raise InputError(f"no images in {root}: expected files ending in {', '.join(READ_SUFFIXES)}")
    return found


def _check_readable_file(path: str) -> None:
    if not os.path.lexists(path):
        raise InputError(f"input image {path} does not exist; check the path")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not an image file; give an image file")
    if not os.path.exists(path):
        raise InputError(f"input image {path} is a broken link; check the path")
    if not os.access(path, os.R_OK):
        raise InputError(f"input image {path} is not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise InputError(f"input image {path} is empty (0 bytes); give a non-empty image file")


def _needs_autorot(image: pyvips.Image) -> bool:
    if image.get_typeof("orientation") == 0:
        return False
    return int(image.get("orientation")) not in (0, 1)


def _grey_or_rgb(image: pyvips.Image, path: str) -> pyvips.Image:
    """Drop an alpha band and convert to grey (1 band) or RGB (3 bands)."""
    interpretation = image.interpretation
    bands = image.bands
    if interpretation in _AS_STORED:
        colour_bands = 1 if bands <= 2 else 3
    elif interpretation == "cmyk":
        colour_bands = 4
    else:  # Lab, XYZ, scRGB, ...: three colour bands
        colour_bands = 3
    if bands not in (colour_bands, colour_bands + 1):
        raise InputError(
            f"cannot read {path}: it has {bands} bands ({interpretation}); gigasid reads grey, "
            "RGB or CMYK images with at most one alpha band"
        )
    if bands > colour_bands:
        image = image.extract_band(0, n=colour_bands)
    if interpretation not in _AS_STORED:
        image = image.colourspace("rgb16" if image.format == "ushort" else "srgb")
    return image


def _short_reason(error: pyvips.Error, path: str) -> str:
    """The first line of a libvips error, without its 'VipsForeignLoad: ' prefix or the path."""
    lines = [line.strip() for line in f"{error.detail or ''}\n{error.message}".splitlines()]
    reason = next((line for line in lines if line), "unknown libvips error")
    head, sep, tail = reason.partition(": ")
    if sep and " " not in head:
        reason = tail
    return reason.replace(f'"{path}"', "the file")


def _to_uint8(image: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, C) image with C = 1 or 3, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"cannot write an empty image of shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"expected a float image in [0, 1] or uint8, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("cannot write an image containing NaN or infinity")
    scaled = np.rint(np.clip(array, 0.0, 1.0) * 255.0)
    return np.ascontiguousarray(scaled.astype(np.uint8))
