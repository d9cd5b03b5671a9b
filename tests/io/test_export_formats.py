"""Round trips of every export format, read back by the tools people use: tifffile and pyvips for the
pyramidal OME BigTIFF, pyvips and PIL for DeepZoom tiles (geometry checked against pyvips
``dzsave``), ome-zarr and ome-zarr-models for OME-Zarr, PIL for PNG/JPEG and previews.

The stores are synthetic (gigasid.io.testing) with sizes and chunks that divide nothing: 300×500
RGB in 64-px chunks, and 150×211 grey in 48-px chunks.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import pyvips
import tifffile
import zarr
from PIL import Image

from gigasid.io.exporters import ExportOptions, export
from gigasid.io.exporters.deepzoom import max_level
from gigasid.io.output_pyramid import ensure_output_pyramid
from gigasid.io.testing import write_synthetic_store


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    store = write_synthetic_store(tmp_path_factory.mktemp("rgb") / "job.zarr", 300, 500, tile=64)
    return store, [level[...] for level in ensure_output_pyramid(store)]


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    store = write_synthetic_store(tmp_path_factory.mktemp("grey") / "job.zarr", 150, 211, channels=1, tile=48)
    return store, [level[...] for level in ensure_output_pyramid(store)]


# mean absolute error of a JPEG (q90, 4:2:0) of the synthetic image, whose ±8 per-pixel noise JPEG
# smooths away: ~3.8 measured; a wrong or misplaced image is off by tens
JPEG_TOLERANCE = 5.0


def interleaved(planar: np.ndarray) -> np.ndarray:
    return planar[0] if planar.shape[0] == 1 else planar.transpose(1, 2, 0)


def assert_close(actual: np.ndarray, expected: np.ndarray, mean_tolerance: float) -> None:
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert float(difference.mean()) < mean_tolerance, float(difference.mean())


# --- pyramidal OME BigTIFF -----------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "deflate", "none"])
@pytest.mark.parametrize("image", ["rgb", "grey"])
def test_tiff_lossless_is_a_pixel_identical_pyramid(tmp_path, request, image, compression) -> None:
    store, levels = request.getfixturevalue(image)
    path = tmp_path / "out.ome.tif"
    tile = 64
    report = export(store.path, path, ExportOptions(compression=compression, tile=tile))
    # level 0, then every level until one fits a single 64-px tile
    expected = [lv for k, lv in enumerate(levels) if k == 0 or max(levels[k - 1].shape[1:]) > tile]
    assert report.resolutions == [lv.shape[1:] for lv in expected]
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_bigtiff and tiff.is_ome
        assert "<OME" in tiff.pages[0].description
        series = tiff.series[0]
        assert [level.shape for level in series.levels] == [interleaved(lv).shape for lv in expected]
        for level, oracle in zip(series.levels, expected):
            np.testing.assert_array_equal(level.asarray(), interleaved(oracle))
        first = tiff.pages[0]
        assert first.is_tiled and (first.tilelength, first.tilewidth) == (tile, tile)
        assert first.photometric == (tifffile.PHOTOMETRIC.RGB if image == "rgb" else tifffile.PHOTOMETRIC.MINISBLACK)
        assert len(first.subifds) == len(expected) - 1
        assert all(page.subfiletype == 1 for page in series.levels[1:] for page in page.pages)
    if compression == "zstd":
        return  # pyvips-binary's libtiff is built without zstd ("ZSTD compression support is not configured")
    # pyvips (libtiff) reads the full image and each reduced-resolution SubIFD
    assert_vips_equal(pyvips.Image.new_from_file(str(path)), interleaved(expected[0]))
    for index, oracle in enumerate(expected[1:]):
        assert_vips_equal(pyvips.Image.new_from_file(str(path), subifd=index), interleaved(oracle))


def assert_vips_equal(image: pyvips.Image, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(np.squeeze(image.numpy()), expected)


def test_tiff_jpeg_default_is_close_and_readable_everywhere(tmp_path, rgb) -> None:
    store, levels = rgb
    path = tmp_path / "out.tif"
    report = export(store.path, path)  # defaults: 256-px JPEG tiles, quality 90
    assert report.resolutions == [(300, 500), (150, 250)]
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_bigtiff and tiff.is_ome
        assert tiff.pages[0].compression == tifffile.COMPRESSION.JPEG
        assert (tiff.pages[0].tilelength, tiff.pages[0].tilewidth) == (256, 256)
        assert_close(tiff.series[0].levels[0].asarray(), interleaved(levels[0]), JPEG_TOLERANCE)
        assert_close(tiff.series[0].levels[1].asarray(), interleaved(levels[1]), JPEG_TOLERANCE)
    assert_close(np.squeeze(pyvips.Image.new_from_file(str(path), subifd=0).numpy()), interleaved(levels[1]), JPEG_TOLERANCE)
    ome = tifffile.xml2dict(tifffile.TiffFile(path).pages[0].description)["OME"]["Image"]["Pixels"]
    assert (ome["SizeX"], ome["SizeY"], ome["SizeC"]) == (500, 300, 3)


# --- DeepZoom --------------------------------------------------------------------------------


def read_descriptor(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    return {"format": root.get("Format"), "overlap": int(root.get("Overlap")), "tile": int(root.get("TileSize")),
            "width": int(size.get("Width")), "height": int(size.get("Height"))}


def tile_geometry(files: Path) -> dict[str, tuple[int, int]]:
    """'level/col_row' → (width, height) of every tile under a ``_files`` folder."""
    found = {}
    for tile in sorted(files.glob("*/*")):
        with Image.open(tile) as opened:
            found[f"{tile.parent.name}/{tile.stem}"] = opened.size
    return found


@pytest.mark.parametrize(("tile", "overlap"), [(64, 1), (100, 0), (128, 3)])
def test_deepzoom_png_tiles_rebuild_every_level_exactly(tmp_path, rgb, tile, overlap) -> None:
    store, levels = rgb
    path = tmp_path / "out.dzi"
    export(store.path, path, ExportOptions(compression="png", tile=tile, overlap=overlap))
    assert read_descriptor(path) == {"format": "png", "overlap": overlap, "tile": tile, "width": 500, "height": 300}
    files = tmp_path / "out_files"
    top = math.ceil(math.log2(500))
    assert top == max_level(300, 500) == 9
    assert sorted(int(p.name) for p in files.iterdir()) == list(range(top + 1))
    for level in range(top + 1):
        planar = levels[top - level]
        _, height, width = planar.shape
        cols, rows = math.ceil(width / tile), math.ceil(height / tile)
        names = sorted(p.name for p in (files / str(level)).iterdir())
        assert names == sorted(f"{c}_{r}.png" for c in range(cols) for r in range(rows))
        rebuilt = np.zeros((height, width, 3), np.uint8)
        for c in range(cols):
            for r in range(rows):
                pixels = np.asarray(Image.open(files / str(level) / f"{c}_{r}.png"))
                left, top_ = overlap if c else 0, overlap if r else 0
                core = pixels[top_ : top_ + tile, left : left + tile]
                expected_w = min(width, (c + 1) * tile + overlap) - max(0, c * tile - overlap)
                expected_h = min(height, (r + 1) * tile + overlap) - max(0, r * tile - overlap)
                assert pixels.shape[:2] == (expected_h, expected_w)
                np.testing.assert_array_equal(  # the overlap is the neighbour's pixels
                    pixels, interleaved(planar)[r * tile - top_ : r * tile - top_ + expected_h,
                                                c * tile - left : c * tile - left + expected_w])
                rebuilt[r * tile : r * tile + core.shape[0], c * tile : c * tile + core.shape[1]] = core
        np.testing.assert_array_equal(rebuilt, interleaved(planar))


def test_deepzoom_geometry_matches_pyvips_dzsave(tmp_path, rgb) -> None:
    store, levels = rgb
    export(store.path, tmp_path / "ours.dzi", ExportOptions(compression="png", tile=128, overlap=2))
    reference = pyvips.Image.new_from_array(interleaved(levels[0]), interpretation="srgb")
    reference.dzsave(str(tmp_path / "vips"), tile_size=128, overlap=2, suffix=".png", depth="onepixel")
    assert tile_geometry(tmp_path / "ours_files") == tile_geometry(tmp_path / "vips_files")
    ours, theirs = read_descriptor(tmp_path / "ours.dzi"), read_descriptor(tmp_path / "vips.dzi")
    assert ours == theirs


def test_deepzoom_jpeg_tiles_decode_with_pil_and_pyvips(tmp_path, rgb, grey) -> None:
    for name, (store, levels) in {"rgb": rgb, "grey": grey}.items():
        path = tmp_path / f"{name}.dzi"
        export(store.path, path)  # defaults: 256-px JPEG tiles, overlap 1
        assert read_descriptor(path)["format"] == "jpeg" and read_descriptor(path)["overlap"] == 1
        top = max_level(*levels[0].shape[1:])
        tile_path = tmp_path / f"{name}_files" / str(top) / "0_0.jpeg"
        with Image.open(tile_path) as opened:
            assert opened.format == "JPEG" and opened.mode == ("RGB" if name == "rgb" else "L")
            pil_pixels = np.asarray(opened)
        vips_pixels = np.squeeze(pyvips.Image.new_from_file(str(tile_path)).numpy())
        expected = interleaved(levels[0])[:257, :257]
        assert_close(pil_pixels, expected, JPEG_TOLERANCE)
        assert_close(vips_pixels, expected, JPEG_TOLERANCE)


# --- OME-Zarr --------------------------------------------------------------------------------


@pytest.mark.parametrize("image", ["rgb", "grey"])
def test_ome_zarr_multiscales_read_by_ome_zarr(tmp_path, request, image) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image as NgffImage

    store, levels = request.getfixturevalue(image)
    path = tmp_path / "out.ome.zarr"
    export(store.path, path, ExportOptions(tile=64))
    expected = [lv for k, lv in enumerate(levels) if k == 0 or max(levels[k - 1].shape[1:]) > 64]
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes, "ome_zarr found no image"
    node = nodes[0]
    assert [axis["name"] for axis in node.metadata["axes"]] == ["c", "y", "x"]
    assert [tuple(d.shape) for d in node.data] == [lv.shape for lv in expected]
    for data, oracle in zip(node.data, expected):
        np.testing.assert_array_equal(np.asarray(data), oracle)
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[1.0, 2.0**k, 2.0**k] for k in range(len(expected))]
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["ome"]["version"] == "0.5"
    assert group["0"].metadata.dimension_names == ("c", "y", "x")
    assert group["0"].chunks == (expected[0].shape[0], 64, 64)
    NgffImage.from_zarr(group)  # the NGFF 0.5 schema, strictly


# --- PNG / JPEG ------------------------------------------------------------------------------


def test_png_whole_image_is_exact_and_jpeg_close(tmp_path, rgb, grey) -> None:
    for name, (store, levels) in {"rgb": rgb, "grey": grey}.items():
        export(store.path, tmp_path / f"{name}.png")
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), interleaved(levels[0]))
        export(store.path, tmp_path / f"{name}.jpg", ExportOptions(quality=95))
        with Image.open(tmp_path / f"{name}.jpg") as opened:
            assert opened.format == "JPEG"
            assert_close(np.asarray(opened), interleaved(levels[0]), JPEG_TOLERANCE)


@pytest.mark.parametrize(("output", "long_side", "size"), [("p.png", 120, (120, 72)), ("p.jpg", 64, (64, 38)), ("p.png", 500, (500, 300))])
def test_preview_has_the_requested_long_side_and_the_image_colours(tmp_path, rgb, output, long_side, size) -> None:
    store, levels = rgb
    report = export(store.path, tmp_path / output, ExportOptions(preview=long_side))
    assert report.resolutions == [size[::-1]]
    with Image.open(tmp_path / output) as opened:
        assert opened.size == size  # (width, height)
        preview = np.asarray(opened.convert("RGB"))
    oracle = np.asarray(Image.fromarray(interleaved(levels[0])).resize(size, Image.Resampling.BOX))
    assert_close(preview, oracle, 6.0)


def test_export_replaces_a_previous_export_whole(tmp_path, rgb) -> None:
    store, _ = rgb
    for options in (ExportOptions(tile=64), ExportOptions(tile=128, compression="png")):
        export(store.path, tmp_path / "out.dzi", options)
        export(store.path, tmp_path / "out.ome.zarr", ExportOptions(tile=options.tile))
    assert read_descriptor(tmp_path / "out.dzi")["tile"] == 128
    assert {p.suffix for p in (tmp_path / "out_files").glob("*/*")} == {".png"}
    assert zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r")["0"].chunks == (3, 128, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dzi", "out.ome.zarr", "out_files"]
