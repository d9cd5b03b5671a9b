"""Synthetic finished job stores, for the export tests and benchmarks (the tool never uses this).

``write_synthetic_store`` makes a store that ``gigasid.io.output_pyramid.open_finished_store``
accepts — a manifest marked complete and a uint8 (C, H, W) ``output`` — without running a job, so a
gigapixel export can be measured in minutes. The pixels are a function of global position only
(smooth colour gradients, a few bars, and hashed noise for realistic compression), written chunk by
chunk: memory is one chunk whatever the size, and any chunking gives the same image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gigasid.io.store import JobStore

__all__ = ["deny_writes", "synthetic_pixels", "write_synthetic_store"]


def synthetic_pixels(box: tuple[int, int, int, int], shape: tuple[int, int], channels: int = 3) -> np.ndarray:
    """uint8 (C, r1 - r0, c1 - c0) pixels of the half-open box (r0, c0, r1, c1) of an image of
    ``shape`` (rows, cols): red grows to the right, green downwards, blue along the anti-diagonal,
    with vertical bars every 1/8 of the width and ±8 of hashed noise."""
    r0, c0, r1, c1 = box
    height, width = shape
    rows = np.arange(r0, r1, dtype=np.int64)[:, None]
    cols = np.arange(c0, c1, dtype=np.int64)[None, :]
    red = 32 + 192 * cols / max(1, width - 1) + 0 * rows
    green = 32 + 192 * rows / max(1, height - 1) + 0 * cols
    blue = 224 - 96 * (rows / max(1, height - 1) + cols / max(1, width - 1))
    bars = np.where((cols * 8 // max(1, width)) % 2 == 1, -24, 0)
    planes = [red + bars, green + bars, blue + bars] if channels == 3 else [(red + green) / 2 + bars]
    return np.stack([np.clip(np.rint(p + _noise(rows, cols, c)), 0, 255).astype(np.uint8) for c, p in enumerate(planes)])


def _noise(rows: np.ndarray, cols: np.ndarray, channel: int) -> np.ndarray:
    """Integers in [-8, 8) hashed from (row, col, channel): about as incompressible as the fine
    detail of a photograph (the store's zstd keeps ~70 % of the bytes)."""
    key = (rows.astype(np.uint64) * np.uint64(0x9E3779B1) + cols.astype(np.uint64) * np.uint64(0x85EBCA77)
           + np.uint64(channel * 0x27D4EB2F))
    key ^= key >> np.uint64(15)
    key *= np.uint64(0x2C1B3C6D)
    key ^= key >> np.uint64(12)
    return ((key >> np.uint64(20)) & np.uint64(15)).astype(np.int16) - 8


def write_synthetic_store(
    path: str | Path, height: int, width: int, *, channels: int = 3, tile: int = 1024, status: str = "complete"
) -> JobStore:
    """A job store at ``path`` whose ``output`` is the ``synthetic_pixels`` image, written one
    (C, tile, tile) chunk at a time. ``status`` other than "complete" makes an unfinished store."""
    finished = status == "complete"
    store = JobStore.create(
        path,
        {
            "version": "synthetic",
            "source": "synthetic",
            "size": [height, width],
            "tile": tile,
            "channels": channels,
            "output_done": finished,
            "status": status,
        },
    )
    output = store.create_array("output", (channels, height, width), (channels, min(tile, height), min(tile, width)), "uint8")
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            box = (top, left, min(height, top + tile), min(width, left + tile))
            output[:, box[0] : box[2], box[1] : box[3]] = synthetic_pixels(box, (height, width), channels)
    return store


def deny_writes(monkeypatch, folder: Path) -> None:
    """Make ``os.access`` report ``folder`` as not writable for the rest of a test (``monkeypatch`` is
    pytest's fixture). Tests run as root, where a chmod would not stop a write."""
    real_access = os.access
    locked = os.path.abspath(folder)

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(os.fspath(path)) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
