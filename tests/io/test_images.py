"""Tests for gigasid.io.images: round trips, colourspaces, bit depth, orientation, user errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import pyvips
from PIL import Image, ImageOps

from gigasid.errors import GigasidError, InputError
from gigasid.io import images
from gigasid.io.images import check_writable_output, list_images, read_image, write_image


def _rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """A random 8-bit-exact float RGB image."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3)).astype(np.float32) / 255


def _smooth_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    """Gradients that JPEG keeps closely."""
    rows = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    return np.stack([rows * np.ones_like(cols), cols * np.ones_like(rows), 0.5 * (rows + cols)], -1)


def _assert_one_line(error: pytest.ExceptionInfo[InputError], *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".PNG"])
def test_lossless_round_trip(tmp_path: Path, suffix: str) -> None:
    image = _rgb()
    path = tmp_path / f"out{suffix}"
    write_image(path, image)
    back = read_image(path)
    assert back.dtype == np.float32
    assert back.shape == (24, 32, 3)
    np.testing.assert_array_equal(back, image)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_round_trip_is_close(tmp_path: Path, suffix: str) -> None:
    image = _smooth_rgb()
    path = tmp_path / f"out{suffix}"
    write_image(path, image)
    back = read_image(str(path))
    assert back.shape == image.shape
    assert float(np.abs(back - image).mean()) < 0.01
    assert float(back.min()) >= 0.0 and float(back.max()) <= 1.0


def test_uint8_written_as_is(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    write_image(tmp_path / "u8.png", pixels)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "u8.png")), pixels)


def test_float_write_rounds_and_clips(tmp_path: Path) -> None:
    image = np.array([[[-0.5, 0.5, 1.5], [0.1, 0.002, 0.998]]], dtype=np.float32)
    write_image(tmp_path / "clip.png", image)
    stored = np.asarray(Image.open(tmp_path / "clip.png"))
    np.testing.assert_array_equal(stored, [[[0, 128, 255], [26, 1, 254]]])


def test_grey_round_trip_stays_one_channel(tmp_path: Path) -> None:
    grey = _rgb()[:, :, :1]
    for suffix in (".png", ".tif"):
        write_image(tmp_path / f"grey{suffix}", grey)
        back = read_image(tmp_path / f"grey{suffix}")
        assert back.shape == (24, 32, 1)
        np.testing.assert_array_equal(back, grey)
    write_image(tmp_path / "flat.png", grey[:, :, 0])  # (H, W) is grey too
    assert read_image(tmp_path / "flat.png").shape == (24, 32, 1)
    write_image(tmp_path / "grey.jpg", grey)
    assert read_image(tmp_path / "grey.jpg").shape == (24, 32, 1)


def test_pillow_grey_png_reads_one_channel(tmp_path: Path) -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(pixels, mode="L").save(tmp_path / "l.png")
    back = read_image(tmp_path / "l.png")
    assert back.shape == (3, 4, 1)
    np.testing.assert_array_equal(back[:, :, 0], pixels / np.float32(255))


# --- alpha, colourspaces, bit depth --------------------------------------------------------


def test_rgba_drops_alpha_and_keeps_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent row: its colours must survive
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    back = read_image(tmp_path / "rgba.png")
    assert back.shape == (6, 5, 3)
    np.testing.assert_array_equal(back, rgba[:, :, :3] / np.float32(255))


def test_grey_alpha_drops_alpha(tmp_path: Path) -> None:
    la = np.zeros((4, 3, 2), dtype=np.uint8)
    la[..., 0] = 77
    la[..., 1] = 0
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    back = read_image(tmp_path / "la.png")
    assert back.shape == (4, 3, 1)
    np.testing.assert_array_equal(back, np.full((4, 3, 1), 77 / np.float32(255)))


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")  # no ink: white
    back = read_image(tmp_path / "cmyk.jpg")
    assert back.shape == (6, 8, 3)
    assert float(back.min()) > 0.9


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("interpretation", ["grey16", "rgb16"])
def test_sixteen_bit_keeps_full_precision(tmp_path: Path, suffix: str, interpretation: str) -> None:
    channels = 1 if interpretation == "grey16" else 3
    values = np.full((3, 4, channels), 1000, dtype=np.uint16)
    values[1] = 1001
    values[2] = 65535
    path = tmp_path / f"deep{suffix}"
    pyvips.Image.new_from_array(values, interpretation=interpretation).write_to_file(str(path))
    back = read_image(path)
    assert back.shape == (3, 4, channels)
    assert back[0, 0, 0] == np.float32(1000) / np.float32(65535)
    assert back[1, 0, 0] > back[0, 0, 0]  # 1001 is not rounded onto 1000 (not 8-bit)
    assert back[2, 0, 0] == 1.0


def test_float_tiff_is_clipped(tmp_path: Path) -> None:
    values = np.array([[-0.5, 0.25, 1.5]], dtype=np.float32)
    pyvips.Image.new_from_array(values).write_to_file(str(tmp_path / "float.tif"))
    back = read_image(tmp_path / "float.tif")
    np.testing.assert_array_equal(back[:, :, 0], [[0.0, 0.25, 1.0]])


# --- EXIF orientation ----------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((32, 48, 3), dtype=np.uint8)  # 8x8 flat blocks survive JPEG closely
    stored[:16, :16] = (250, 10, 10)
    stored[:16, 32:] = (10, 250, 10)
    stored[16:, 16:32] = (10, 10, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=100, subsampling=0)

    back = read_image(tmp_path / "rot.jpg")
    assert back.shape == (48, 32, 3)
    expected = np.rot90(stored, k=-1) / np.float32(255)  # clockwise
    assert float(np.abs(back - expected).max()) < 0.02
    with Image.open(tmp_path / "rot.jpg") as opened:
        pillow = np.asarray(ImageOps.exif_transpose(opened)) / np.float32(255)
    assert float(np.abs(back - pillow).max()) < 0.01


def test_exif_orientation_on_a_large_jpeg(tmp_path: Path) -> None:
    """Rotation needs random access; a sequential load of a tall JPEG must still work."""
    stored = np.zeros((1024, 512, 3), dtype=np.uint8)  # plain autorot() fails on this one
    stored[:512] = 255
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees anticlockwise to display: the top edge goes left
    Image.fromarray(stored).save(tmp_path / "tall.jpg", exif=exif)
    back = read_image(tmp_path / "tall.jpg")
    assert back.shape == (512, 1024, 3)
    assert float(back[:, :500].mean()) > 0.95 and float(back[:, 524:].mean()) < 0.05


# --- read errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(InputError) as error:
        read_image(path)
    _assert_one_line(error, str(path), "does not exist")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        read_image(tmp_path)
    _assert_one_line(error, str(tmp_path), "folder")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image\nsecond line\n")
    with pytest.raises(InputError) as error:
        read_image(path)
    _assert_one_line(error, f"cannot read {path} as an image", "not a known file format")
    assert "VipsForeignLoad" not in str(error.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(InputError) as error:
        read_image(path)
    _assert_one_line(error, str(path), "empty")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"whole{suffix}"
    noise = np.random.default_rng(3).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as error:
        read_image(path)
    _assert_one_line(error, f"cannot read {path} as an image")


def test_errors_are_gigasid_value_errors() -> None:
    assert issubclass(InputError, GigasidError)
    assert issubclass(InputError, ValueError)


# --- write errors and atomicity ------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.bmp", "out", "out.webp"])
def test_unsupported_output_extension(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError) as error:
        write_image(tmp_path / name, _rgb())
    _assert_one_line(error, str(tmp_path / name), ".png", ".jpg", ".tif")
    assert os.listdir(tmp_path) == []


def test_missing_output_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "out.png"
    with pytest.raises(InputError) as error:
        check_writable_output(path)
    _assert_one_line(error, str(tmp_path / "missing"), "does not exist")
    with pytest.raises(InputError):
        write_image(path, _rgb())


def test_output_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError) as error:
        write_image(tmp_path / "dir.png", _rgb())
    _assert_one_line(error, "folder")


def test_unwritable_output_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images.os, "access", lambda *args, **kwargs: False)
    with pytest.raises(InputError) as error:
        write_image(tmp_path / "out.png", _rgb())
    _assert_one_line(error, str(tmp_path), "not writable")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(InputError) as error:
            check_writable_output(locked / "out.png")
        _assert_one_line(error, "not writable")
    finally:
        locked.chmod(0o755)


def test_check_writable_output_accepts_a_bare_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_writable_output("Result.JPG") == ".jpg"
    write_image("result.png", _rgb())
    assert os.listdir(tmp_path) == ["result.png"]


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    for suffix in (".png", ".jpg", ".tif"):
        write_image(tmp_path / f"a{suffix}", _rgb())
        write_image(tmp_path / f"a{suffix}", _rgb(seed=1))  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "a.png", "a.tif"]
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), _rgb(seed=1))


def test_failed_write_leaves_old_file_and_no_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "keep.png"
    write_image(target, _rgb())
    before = target.read_bytes()

    def half_write(self: pyvips.Image, filename: str, **options: object) -> None:
        Path(filename).write_bytes(b"\x89PNG half")
        raise pyvips.Error("unable to write to file", "VipsForeignSave: disk full\n")

    monkeypatch.setattr(pyvips.Image, "write_to_file", half_write)
    with pytest.raises(InputError) as error:
        write_image(target, _rgb(seed=1))
    _assert_one_line(error, str(target), "disk full")
    assert os.listdir(tmp_path) == ["keep.png"]
    assert target.read_bytes() == before


def test_bad_arrays_are_programming_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "a.png", np.full((4, 4, 3), np.nan))
    with pytest.raises(TypeError, match="dtype"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 3), dtype=np.int64))
    assert os.listdir(tmp_path) == []


# --- list_images ---------------------------------------------------------------------------


def test_list_images_sorted_and_filtered(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.tif", "d.jpeg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert list_images(tmp_path) == [tmp_path / n for n in ("a.JPG", "b.png", "c.tif", "d.jpeg")]


def test_list_images_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError) as error:
        list_images(tmp_path)
    _assert_one_line(error, "no images", str(tmp_path), ".png")
    with pytest.raises(InputError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(InputError, match="not a folder"):
        list_images(tmp_path / "notes.txt")
