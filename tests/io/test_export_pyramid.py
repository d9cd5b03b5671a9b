"""The output pyramid (gigasid.io.output_pyramid): built out of core equal to the in-memory oracle on
awkward chunkings, recorded in the manifest, reused, resumed after a kill, and refused to a second
writer; band reads stay within their memory budget."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from gigasid.errors import InputError
from gigasid.io import output_pyramid
from gigasid.io.output_pyramid import (
    PYRAMID_GROUP,
    band_rows,
    downsample_2x2,
    ensure_output_pyramid,
    iter_row_bands,
    open_finished_store,
    pyramid_shapes,
)
from gigasid.io.store import JobStore
from gigasid.io.testing import synthetic_pixels, write_synthetic_store


def oracle_pyramid(image: np.ndarray) -> list[np.ndarray]:
    """The pyramid in memory, by float means over explicit 2×2 (edge-replicated) neighbourhoods."""
    levels = [image]
    while max(levels[-1].shape[1:]) > 1:
        above = levels[-1].astype(np.float64)
        _, rows, cols = above.shape
        r = np.minimum(np.arange(0, rows + rows % 2), rows - 1)
        c = np.minimum(np.arange(0, cols + cols % 2), cols - 1)
        padded = above[:, r][:, :, c]
        mean = (padded[:, 0::2, 0::2] + padded[:, 1::2, 0::2] + padded[:, 0::2, 1::2] + padded[:, 1::2, 1::2]) / 4
        levels.append(np.floor(mean + 0.5).astype(np.uint8))  # half up, as the integer (sum + 2) >> 2
    return levels


def test_downsample_2x2_rounds_half_up_and_replicates_odd_edges() -> None:
    block = np.array([[[0, 1, 10], [1, 1, 30], [100, 200, 7]]], np.uint8)
    # (0+1+1+1)/4 = 0.75 -> 1; (10+10+30+30)/4 = 20; (100+200+100+200)/4 = 150; 7 alone
    np.testing.assert_array_equal(downsample_2x2(block), [[[1, 20], [150, 7]]])


def test_pyramid_shapes_halve_with_ceil_down_to_one_pixel() -> None:
    assert pyramid_shapes(5, 12) == [(5, 12), (3, 6), (2, 3), (1, 2), (1, 1)]
    assert pyramid_shapes(1, 1) == [(1, 1)]
    height, width = 20000, 14336
    assert len(pyramid_shapes(height, width)) - 1 == int(np.ceil(np.log2(max(height, width))))


@pytest.mark.parametrize(("height", "width", "tile", "channels"), [(150, 211, 32, 3), (37, 300, 64, 1), (64, 64, 64, 3)])
def test_pyramid_equals_the_in_memory_oracle(tmp_path, height, width, tile, channels) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", height, width, channels=channels, tile=tile)
    levels = ensure_output_pyramid(store, workers=2)
    expected = oracle_pyramid(store.array("output")[...])
    assert len(levels) == len(expected)
    for built, oracle in zip(levels, expected):
        np.testing.assert_array_equal(built[...], oracle)
    record = JobStore.open(store.path).manifest[PYRAMID_GROUP]
    assert record["levels_done"] == len(expected) - 1
    assert record["shapes"] == [list(level.shape[1:]) for level in expected[1:]]
    assert not (store.path / ".lock").exists()


def test_finished_pyramid_is_reused_without_writing(tmp_path, monkeypatch) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", 90, 70, tile=32)
    ensure_output_pyramid(store)

    def fail(*args, **kwargs):
        raise AssertionError("a finished pyramid was rebuilt")

    monkeypatch.setattr(output_pyramid, "_build_level", fail)
    monkeypatch.setattr(JobStore, "acquire_lock", fail)
    assert len(ensure_output_pyramid(JobStore.open(store.path))) == 8


def test_killed_build_resumes_at_the_first_unfinished_level(tmp_path, monkeypatch) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", 100, 60, tile=32)
    built: list[int] = []
    real_build = output_pyramid._build_level

    def build_then_die(store_, source, level, *args):
        real_build(store_, source, level, *args)
        built.append(level)
        if level == 3:
            raise KeyboardInterrupt  # killed after level 3 is written, before it is recorded

    monkeypatch.setattr(output_pyramid, "_build_level", build_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_output_pyramid(store)
    assert JobStore.open(store.path).manifest[PYRAMID_GROUP]["levels_done"] == 2
    assert not (store.path / ".lock").exists()
    # a stray unfinished chunk file, as a SIGKILL inside a zarr write leaves
    (store.path / PYRAMID_GROUP / "3" / "c").mkdir(parents=True, exist_ok=True)
    (store.path / PYRAMID_GROUP / "3" / "c" / "x.partial").write_bytes(b"torn")

    built.clear()
    monkeypatch.setattr(output_pyramid, "_build_level", lambda *a: (real_build(*a), built.append(a[2])))
    levels = ensure_output_pyramid(JobStore.open(store.path))
    assert built == [3, 4, 5, 6, 7]
    assert not list(store.path.rglob("*.partial"))
    for level, oracle in zip(levels, oracle_pyramid(store.array("output")[...])):
        np.testing.assert_array_equal(level[...], oracle)


def test_a_second_writer_is_refused(tmp_path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", 40, 40, tile=32)
    (store.path / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live writer
    with pytest.raises(InputError, match="being written by another gigasid process"):
        ensure_output_pyramid(store)


def test_open_finished_store_refuses_unfinished_and_foreign_stores(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_finished_store(tmp_path / "missing.zarr")
    running = write_synthetic_store(tmp_path / "run.zarr", 40, 40, tile=32, status="running")
    with pytest.raises(InputError, match=r"not finished \(status running, output not written yet\).*gigasid resume"):
        open_finished_store(running.path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a gigasid job store"):
        open_finished_store(tmp_path / "plain")


def test_band_rows_stay_within_budget_and_cover_the_image(tmp_path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", 300, 500, tile=64)
    level = store.array("output")
    assert band_rows(level, 256) == 256 * 1  # lcm(64, 256) fits the default budget
    assert band_rows(level, 48) == 192  # lcm(64, 48): every chunk decoded once
    narrow = band_rows(level, 16, budget=3 * 500 * 40)  # 40 rows fit: 2 tiles of 16
    assert narrow == 32
    assert band_rows(level, 16, budget=1) == 16  # never less than one tile row
    rows = [(top, bottom, band.shape[1]) for top, bottom, band in iter_row_bands(level, 128, margin=2)]
    assert rows == [(0, 128, 130), (128, 256, 132), (256, 300, 46)]
    np.testing.assert_array_equal(
        next(iter_row_bands(level, 128))[2][:, :5, :7], synthetic_pixels((0, 0, 5, 7), (300, 500))
    )
