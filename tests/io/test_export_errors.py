"""Every way an export can go wrong is one clear line (exit 2 through the command line) and leaves
nothing behind that looks like a finished output; a failure halfway through, Ctrl-C included,
leaves neither the output nor a temporary, and keeps a previous export intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigasid.cli import main
from gigasid.io import exporters
from gigasid.io.exporters import EXPORTERS, ExportOptions, deepzoom, export, flat
from gigasid.io.testing import deny_writes, write_synthetic_store

EVERY_FORMAT = ["out.tif", "out.ome.tif", "out.dzi", "out.ome.zarr", "out.png", "out.jpg"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "job.zarr", 90, 130, tile=32).path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gigasid: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_the_command_exports_and_reports(tmp_path, capsys, store) -> None:
    code, out, err = run(capsys, "export", store, tmp_path / "a.dzi", "--tile", 64, "--overlap", 2)
    assert code == 0, err
    assert "a.dzi: DeepZoom, 9 resolution(s) 90x130 down to 1x1" in out
    assert visible(tmp_path) == ["a.dzi", "a_files"]


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("output", EVERY_FORMAT)
def test_missing_store(tmp_path, capsys, output) -> None:
    code, _, err = run(capsys, "export", tmp_path / "nowhere.zarr", tmp_path / output)
    assert_user_error(code, err, "nowhere.zarr does not exist")
    assert visible(tmp_path) == []


def test_a_folder_that_is_not_a_store(tmp_path, capsys) -> None:
    (tmp_path / "photos").mkdir()
    code, _, err = run(capsys, "export", tmp_path / "photos", tmp_path / "out.tif")
    assert_user_error(code, err, "not a gigasid job store")
    assert visible(tmp_path) == ["photos"]


@pytest.mark.parametrize("output", EVERY_FORMAT)
def test_unfinished_store(tmp_path, capsys, output) -> None:
    running = write_synthetic_store(tmp_path / "run.zarr", 40, 50, tile=32, status="running")
    code, _, err = run(capsys, "export", running.path, tmp_path / output)
    assert_user_error(code, err, "is not finished (status running", "gigasid resume")
    assert visible(tmp_path) == ["run.zarr"]
    assert "output_pyramid" not in running.manifest  # nothing was built from an unfinished image


@pytest.mark.parametrize("output", ["out.gif", "out", "out.zarr", "out.webp", ".tif"])
def test_unknown_extension(tmp_path, capsys, store, output) -> None:
    code, _, err = run(capsys, "export", store, tmp_path / output)
    assert_user_error(code, err, "is not an export format", ".ome.tif", ".dzi", ".ome.zarr", ".png", ".jpg")
    assert visible(tmp_path) == []


def test_jpeg_wider_than_the_format_allows(tmp_path, capsys) -> None:
    # a real 8 x 70 000 image: wider than libjpeg's 65 500 pixels, yet 1.7 MB
    wide = write_synthetic_store(tmp_path / "wide.zarr", 8, 70_000, tile=8192)
    code, _, err = run(capsys, "export", wide.path, tmp_path / "wide.jpg")
    assert_user_error(code, err, "8x70000", "65500 pixels a side", "--preview")
    assert visible(tmp_path) == ["wide.zarr"]
    # what the message suggests works, and a PNG of it is fine
    assert run(capsys, "export", wide.path, tmp_path / "small.jpg", "--preview", 4000)[0] == 0
    assert Image.open(tmp_path / "small.jpg").size == (4000, 1)
    assert run(capsys, "export", wide.path, tmp_path / "wide.png")[0] == 0
    assert Image.open(tmp_path / "wide.png").size == (70_000, 8)


def test_image_too_big_to_hold_in_memory(tmp_path, capsys, store, monkeypatch) -> None:
    # the limit itself is 512 MiB; a 90x130 RGB image is 35 100 bytes
    monkeypatch.setattr(flat, "WHOLE_IMAGE_MAX_BYTES", 30_000)
    code, _, err = run(capsys, "export", store, tmp_path / "big.png")
    assert_user_error(code, err, "needs", "in memory", "--preview N", ".tif")
    code, _, err = run(capsys, "export", store, tmp_path / "big.png", "--preview", 60)
    assert code == 0, err  # read from the 45x65 level
    assert visible(tmp_path) == ["big.png"]


def test_unwritable_destination(tmp_path, capsys, store, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    for output in EVERY_FORMAT:
        code, _, err = run(capsys, "export", store, locked / output)
        assert_user_error(code, err, "is not writable")
    code, _, err = run(capsys, "export", store, tmp_path / "no" / "such" / "out.tif")
    assert_user_error(code, err, "does not exist")
    assert visible(locked) == []


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["out.tif", "--compression", "lzw"], ["take --compression jpeg | zstd | deflate | none"]),
        (["out.ome.zarr", "--compression", "jpeg"], ["OME-Zarr outputs take --compression zstd"]),
        (["out.tif", "--overlap", "1"], ["--overlap does not apply to pyramidal OME-TIFF"]),
        (["out.dzi", "--preview", "10"], ["--preview does not apply to DeepZoom"]),
        (["out.tif", "--compression", "zstd", "--quality", "80"], ["--quality applies to JPEG compression only"]),
        (["out.jpg", "--quality", "0"], ["--quality must be between 1 and 100"]),
        (["out.tif", "--tile", "100"], ["multiple of 16"]),
        (["out.dzi", "--tile", "8"], ["--tile must be between 16 and 8192"]),
        (["out.dzi", "--tile", "64", "--overlap", "40"], ["--overlap must be between 0 and half the tile (32)"]),
        (["out.png", "--preview", "131"], ["--preview 131 is larger than the image (90x130)"]),
        (["out.png", "--preview", "0"], ["--preview must be a positive number"]),
    ],
)
def test_options_that_do_not_fit_the_format(tmp_path, capsys, store, args, needles) -> None:
    code, _, err = run(capsys, "export", store, tmp_path / args[0], *args[1:])
    assert_user_error(code, err, *needles)
    assert visible(tmp_path) == []


def test_never_replaces_what_is_not_a_previous_export(tmp_path, capsys, store) -> None:
    other_store = write_synthetic_store(tmp_path / "other.ome.zarr", 10, 10, tile=32)  # a job store
    code, _, err = run(capsys, "export", store, other_store.path)
    assert_user_error(code, err, "other.ome.zarr exists", "not a previous OME-Zarr export")
    (tmp_path / "notes_files").mkdir()
    (tmp_path / "notes_files" / "todo.txt").write_text("keep me")
    code, _, err = run(capsys, "export", store, tmp_path / "notes.dzi")
    assert_user_error(code, err, "notes_files exists")
    (tmp_path / "folder.tif").mkdir()
    code, _, err = run(capsys, "export", store, tmp_path / "folder.tif")
    assert_user_error(code, err, "folder.tif exists and is a folder")
    code, _, err = run(capsys, "export", store, store / "inside.tif")
    assert_user_error(code, err, "the job store itself or inside it")
    assert (tmp_path / "notes_files" / "todo.txt").read_text() == "keep me"
    assert (other_store.path / "zarr.json").is_file()


# --- failures halfway through -----------------------------------------------------------------


def _fail_after(calls: int, error: type[BaseException]):
    count = {"n": 0}

    def maybe_fail() -> None:
        count["n"] += 1
        if count["n"] > calls:
            raise error("injected failure")

    return maybe_fail


@pytest.mark.parametrize("output", EVERY_FORMAT)
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failure_halfway_leaves_nothing_and_keeps_the_previous_export(tmp_path, store, monkeypatch, output, error) -> None:
    export(store, tmp_path / output, ExportOptions(tile=32) if not output.endswith((".png", ".jpg")) else ExportOptions())
    before = visible(tmp_path)
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # fail inside the writer, after some of the output is written: reading the 3rd band of a level
    maybe_fail = _fail_after(2, error)
    real_bands = exporters.tiff.iter_row_bands

    def failing_bands(*args, **kwargs):
        for band in real_bands(*args, **kwargs):
            maybe_fail()
            yield band

    for module in (exporters.tiff, deepzoom, exporters.ome_zarr, flat):
        monkeypatch.setattr(module, "iter_row_bands", failing_bands)
    options = ExportOptions(tile=32, compression="deflate") if output.endswith(".tif") else ExportOptions()
    if output.endswith((".dzi", ".ome.zarr")):
        options = ExportOptions(tile=16)
    with pytest.raises(error):
        export(store, tmp_path / output, options)
    assert visible(tmp_path) == before  # no temporary, no half-written output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_every_exporter_is_registered_once() -> None:
    endings = [suffix for exporter in EXPORTERS for suffix in exporter.suffixes]
    assert len(endings) == len(set(endings))
    assert {".tif", ".ome.tif", ".dzi", ".ome.zarr", ".png", ".jpg", ".jpeg"} <= set(endings)
    assert np.all([exporter.name for exporter in EXPORTERS])
