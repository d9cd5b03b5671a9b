"""The Zarr v3 job store: one group per job, the single source of truth for resume and export.

Layout (DESIGN.md §5)::

    OUT.zarr/
      zarr.json                 group; attrs["gigasid"] = the manifest (driver-written only)
      reference/<s>             float32 (C, h, w): the reference's pixels at scale s
      codec/                    a latent job's fitted codec (arrays; the rest in attrs["codec"])
      latent/<s>                float32 (K, h/f, w/f): the latents of reference/<s> (latent jobs)
      index/<s>/                the scale's candidate index files (knn jobs)
      scales/<s>/x0, x1         float32 (C, H, W) ping-pong buffers of x_t, chunk = tile
      scales/<s>/final          float32 (C, H, W): the finished scale
      scales/<s>/done           uint8 (T + 1, tiles_r, tiles_c): stage k done for tile (i, j)
      scales/0/matches, weights int32 / float32 (grid_h, grid_w, k): the last step's candidates
                                and weights per query (correspondence decode of latent jobs)
      output                    uint8 (C, H, W): the pixel image, chunk = output tile
      .lock                     the writer's pid while a process writes the store

Stage k of a scale: k = 0 writes x_T into x0; k = 1..T is the step from t = T - k + 1, reading
buffer (k - 1) % 2 and writing buffer k % 2, the last step writing ``final``. A tile of a stage
counts as done only when its chunk is durable and the driver has set its ``done`` entry, so a
killed job redoes at most the tiles in flight. Zarr's LocalStore writes ``*.partial`` files and
renames them: a chunk is never torn, and :meth:`JobStore.clean_partials` removes leftovers.
Formats only: no Dask, no sampling.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from gigasid.errors import InputError

FORMAT = 1  # bump when the layout changes; older stores are refused with a clear message
_COMPRESSORS = [ZstdCodec(level=1)]  # natural-image floats barely compress: keep it cheap


class JobStore:
    """An open job store."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    # ---- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> JobStore:
        path = Path(path)
        if path.exists():
            raise InputError(f"{path} already exists; remove it, or continue it with `gigasid resume {path}`")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise InputError(f"cannot create {path}: directory {parent} does not exist or is not writable")
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        store = cls(path, group)
        store.write_manifest({**manifest, "format": FORMAT})
        return store

    @classmethod
    def open(cls, path: str | Path) -> JobStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise InputError(f"{path} is not a gigasid job store (no zarr.json)")
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        manifest = group.attrs.get("gigasid")
        if not isinstance(manifest, dict):
            raise InputError(f"{path} is a Zarr group but not a gigasid job store (no manifest)")
        if manifest.get("format") != FORMAT:
            raise InputError(
                f"{path} was written by a gigasid with store format {manifest.get('format')}; this version "
                f"reads format {FORMAT}: rerun the job with this version"
            )
        return cls(path, group)

    # ---- manifest (driver only) -----------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return dict(self.group.attrs["gigasid"])

    def write_manifest(self, manifest: dict) -> None:
        self.group.attrs["gigasid"] = json.loads(json.dumps(manifest))

    def update_manifest(self, **changes) -> dict:
        manifest = self.manifest
        manifest.update(changes)
        self.write_manifest(manifest)
        return manifest

    # ---- single writer --------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Refuse a second writer: a live process holding ``.lock`` is an error, a dead one's lock
        is taken over."""
        lock = self.path / ".lock"
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                host, _, pid = lock.read_text().strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                    raise InputError(f"{self.path} is being written by another gigasid process (pid {pid})") from None
                lock.unlink(missing_ok=True)  # stale: its writer died
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(me)
            return
        raise InputError(f"could not lock {self.path}")

    @staticmethod
    def remove_abandoned(path: Path) -> None:
        """Delete a store that a killed ``generate`` left half-created, unless its writer lives."""
        import shutil

        lock = path / ".lock"
        if lock.is_file():
            host, _, pid = lock.read_text().strip().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                raise InputError(f"{path} is being created by another gigasid process (pid {pid})")
        shutil.rmtree(path)

    def release_lock(self) -> None:
        (self.path / ".lock").unlink(missing_ok=True)

    def clean_partials(self) -> int:
        """Remove ``*.partial`` files a killed writer left behind; returns how many."""
        count = 0
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
            count += 1
        return count

    # ---- arrays ---------------------------------------------------------------------------
    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def create_array(self, name: str, shape, chunks, dtype, *, fill_value=0) -> zarr.Array:
        return self.group.create_array(
            name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=fill_value,
            compressors=_COMPRESSORS, overwrite=True,
        )

    def save_codec(self, state: dict) -> None:
        """A latent codec's state: its arrays under ``codec/``, the rest in the group's attrs."""
        plain = {}
        for key, value in state.items():
            if isinstance(value, np.ndarray):
                self.group.create_array(f"codec/{key}", data=value, overwrite=True)
            else:
                plain[key] = value
        self.group.attrs["codec"] = json.loads(json.dumps(plain))

    def load_codec_state(self) -> dict | None:
        """What :meth:`save_codec` kept, or None for a pixel-space job."""
        plain = self.group.attrs.get("codec")
        if plain is None:
            return None
        state = dict(plain)
        if "codec" in self.group:
            for key, array in self.group["codec"].arrays():
                state[key] = array[...]
        return state

    def index_dir(self, scale: int) -> Path:
        return self.path / "index" / str(scale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_box(array: zarr.Array, box: tuple[int, int, int, int], *, periodic: bool) -> np.ndarray:
    """(C, …) values of a (C, H, W) array over a half-open box that may wrap on a periodic image."""
    r0, c0, r1, c1 = box
    _, height, width = array.shape
    if not periodic:
        return array[:, r0:r1, c0:c1]
    rows = np.arange(r0, r1) % height
    cols = np.arange(c0, c1) % width
    return array.oindex[:, rows, cols]
