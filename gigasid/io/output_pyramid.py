"""The finished image of a job store as a multi-resolution source: the output pyramid.

Every exporter (TIFF, DeepZoom, OME-Zarr, previews) and the viewer read the job's image through
this module. It checks that the store's job is finished, builds the output pyramid once inside the
store, and hands out its levels as Zarr arrays:

    OUT.zarr/output                 level 0: uint8 (C, H, W), written by the job
    OUT.zarr/output_pyramid/<k>     level k = 1..L: uint8 (C, ceil(H / 2^k), ceil(W / 2^k))

Level k + 1 is the 2×2 box mean of level k (a missing last row or column is the replicated edge),
rounded half up; the last level is 1×1, so every consumer finds the levels it needs: DeepZoom's
level n is pyramid level ``L - n`` exactly (the spec's repeated ceil-halving), and a TIFF or
OME-Zarr pyramid stops at the first level that fits one tile.

Built out of core, level from level: one task per destination chunk reads the 2×2 source chunks
under it and writes that chunk only (whole write units: safe on concurrent threads), so memory is a
few chunks whatever the image size. The manifest entry ``output_pyramid`` counts the finished
levels; it is written by the process building the pyramid while it holds the store's lock (the one
writer of the attributes), after each level is durable: a killed build resumes at the first
unfinished level, and a finished pyramid is reused as it is.

Not here: how levels are encoded into files (``gigasid.io.exporters``) or served (``viewer``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from gigasid.errors import InputError
from gigasid.io.store import JobStore

__all__ = [
    "PYRAMID_GROUP",
    "band_rows",
    "downsample_2x2",
    "ensure_output_pyramid",
    "iter_row_bands",
    "open_finished_store",
    "pyramid_shapes",
]

PYRAMID_GROUP = "output_pyramid"
# Memory a reader of a level may hold in one band of rows (see `band_rows`).
BAND_BYTES = 128 * 2**20


def open_finished_store(path: str | os.PathLike[str]) -> JobStore:
    """Open a job store whose image is finished, or raise an InputError saying what to do."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"job store {path} does not exist; check the path")
    store = JobStore.open(path)
    manifest = store.manifest
    status = manifest.get("status")
    if status != "complete" or not manifest.get("output_done"):
        written = "written" if manifest.get("output_done") else "not written yet"
        raise InputError(
            f"{path} is not finished (status {status}, output {written}); "
            f"finish it with `gigasid resume {path}` first"
        )
    if not store.has("output"):
        raise InputError(f"{path} has no output image; rerun the job with this version of gigasid")
    output = store.array("output")
    if output.ndim != 3 or output.dtype != np.uint8 or output.shape[0] not in (1, 3):
        raise InputError(f"{path}: output is {output.dtype} {output.shape}, expected uint8 (C, H, W) with C = 1 or 3")
    return store


def pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(rows, cols) of level 0..L: each level the ceil-half of the one above, down to 1×1."""
    shapes = [(height, width)]
    while max(shapes[-1]) > 1:
        rows, cols = shapes[-1]
        shapes.append(((rows + 1) // 2, (cols + 1) // 2))
    return shapes


def downsample_2x2(block: np.ndarray) -> np.ndarray:
    """2×2 box mean of a uint8 (C, h, w) block, rounded half up; an odd last row or column is
    averaged with a copy of itself (the edge replicated), so an edge pixel keeps its own mean."""
    _, rows, cols = block.shape
    if rows % 2 or cols % 2:
        block = np.pad(block, ((0, 0), (0, rows % 2), (0, cols % 2)), mode="edge")
    total = block[:, 0::2, 0::2].astype(np.uint16)
    total += block[:, 1::2, 0::2]
    total += block[:, 0::2, 1::2]
    total += block[:, 1::2, 1::2]
    total += 2
    total >>= 2
    return total.astype(np.uint8)


def _record(store: JobStore) -> dict | None:
    return store.manifest.get(PYRAMID_GROUP)


def _plan(store: JobStore) -> dict:
    output = store.array("output")
    _, height, width = output.shape
    chunk = int(max(output.chunks[1:]))
    return {"chunk": chunk, "shapes": [list(s) for s in pyramid_shapes(height, width)[1:]]}


def _same_plan(record: dict | None, plan: dict) -> bool:
    return bool(record) and record.get("chunk") == plan["chunk"] and record.get("shapes") == plan["shapes"]


def _finished(record: dict | None, plan: dict) -> bool:
    return _same_plan(record, plan) and record.get("levels_done") == len(plan["shapes"])


def _levels(store: JobStore, count: int) -> list[zarr.Array]:
    return [store.array("output")] + [store.array(f"{PYRAMID_GROUP}/{k}") for k in range(1, count + 1)]


def ensure_output_pyramid(
    store: JobStore, *, workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> list[zarr.Array]:
    """Levels 0..L of the finished image (see the module docstring), building what is missing.

    A finished pyramid is returned without touching the store. Otherwise the store is locked (a
    second writer is refused with a clear error) and the levels not yet recorded as done are built
    from the level above; ``progress(level, levels)`` is called after each one.
    """
    plan = _plan(store)
    levels = len(plan["shapes"])
    if _finished(_record(store), plan):
        return _levels(store, levels)
    if not os.access(store.path, os.W_OK):
        raise InputError(
            f"{store.path} has no output pyramid yet and is not writable, so it cannot be built; "
            "make it writable or export from a writable copy"
        )
    store.acquire_lock()
    try:
        record = _record(store)  # re-read under the lock: another process may have finished it
        done = int(record["levels_done"]) if _same_plan(record, plan) else 0
        if not _same_plan(record, plan):
            store.update_manifest(**{PYRAMID_GROUP: {**plan, "levels_done": 0}})
        store.clean_partials()  # a killed build may have left unfinished chunk files
        workers = workers or min(4, os.cpu_count() or 1)
        for level in range(done + 1, levels + 1):
            source = store.array("output") if level == 1 else store.array(f"{PYRAMID_GROUP}/{level - 1}")
            _build_level(store, source, level, plan["shapes"][level - 1], plan["chunk"], workers)
            store.update_manifest(**{PYRAMID_GROUP: {**plan, "levels_done": level}})
            if progress is not None:
                progress(level, levels)
    finally:
        store.release_lock()
    return _levels(store, levels)


def _build_level(store: JobStore, source: zarr.Array, level: int, shape, chunk: int, workers: int) -> None:
    channels = source.shape[0]
    rows, cols = shape
    target = store.create_array(
        f"{PYRAMID_GROUP}/{level}", (channels, rows, cols), (channels, min(chunk, rows), min(chunk, cols)), "uint8"
    )
    step_r, step_c = target.chunks[1:]

    def one_chunk(origin: tuple[int, int]) -> None:
        top, left = origin
        bottom, right = min(rows, top + step_r), min(cols, left + step_c)
        # one source row/column short only at an odd image edge, which downsample_2x2 replicates
        target[:, top:bottom, left:right] = downsample_2x2(source[:, 2 * top : 2 * bottom, 2 * left : 2 * right])

    origins = [(r, c) for r in range(0, rows, step_r) for c in range(0, cols, step_c)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(one_chunk, origins):
            pass


def band_rows(array: zarr.Array, multiple: int, *, budget: int = BAND_BYTES) -> int:
    """How many rows of a (C, H, W) level to read at once when cutting it into ``multiple``-row
    pieces: the chunk height rounded up to ``multiple`` (each chunk decoded once) while a band of
    that many full-width rows fits ``budget`` bytes, else the most multiples of ``multiple`` that
    fit (at least one). Memory then stays bounded however wide the image is."""
    channels, height, width = array.shape
    row_bytes = max(1, channels * width * array.dtype.itemsize)
    aligned = math.lcm(int(array.chunks[1]), multiple)
    if aligned * row_bytes <= budget:
        return min(aligned, max(multiple, height))
    return max(multiple, (budget // row_bytes) // multiple * multiple)


def iter_row_bands(array: zarr.Array, rows: int, *, margin: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, last row + 1, band) of a (C, H, W) array in ``rows``-row bands, top to bottom.

    Each band also holds up to ``margin`` rows above and below (clipped at the image), for readers
    that need a neighbour's rows (DeepZoom overlap): band row 0 is image row ``max(0, first - margin)``.
    """
    height = array.shape[1]
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        yield top, bottom, array[:, max(0, top - margin) : min(height, bottom + margin), :]
