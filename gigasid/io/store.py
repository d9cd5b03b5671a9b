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
      output_done               uint8 (tiles_r, tiles_c): output tile (i, j) written
      .lock                     the writer's pid while a process writes the store

Every chunk ends in a CRC-32C of its bytes (Zarr v3's ``crc32c`` codec, after zstd where there is
zstd: the x_t buffers are not compressed), and every chunk is written even when it holds only the
fill value (``write_empty_chunks``), so a chunk that should be there and is not is damage, not
zeros. A store opened with :meth:`JobStore.open` reads
through ``VerifiedLocalStore``: a missing chunk (other than a done-grid's, where absence means
"not done") or one whose checksum fails raises :class:`~gigasid.errors.StoreDamagedError` naming
it, instead of reading as the fill value. ``gigasid.io.store_check`` reads every chunk the
done-grids claim up front.

Stage k of a scale: k = 0 writes x_T into x0; k = 1..T is the step from t = T - k + 1, reading
buffer (k - 1) % 2 and writing buffer k % 2, the last step writing ``final``. A tile of a stage
counts as done only when its chunk is durable and the driver has set its ``done`` entry, so a
killed job redoes at most the tiles in flight. Zarr's LocalStore writes ``*.partial`` files and
renames them: a chunk is never torn by a kill, and :meth:`JobStore.clean_partials` removes
leftovers; what the disk itself loses or garbles the checksums catch. Formats only: no Dask, no
sampling.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np

from gigasid.errors import InputError, StoreDamagedError
from gigasid.io.disk import pid_alive

if TYPE_CHECKING:
    import zarr

# bump when the layout changes; older stores are refused with a clear message
# (2: every chunk carries a crc32c checksum and is written even when empty)
FORMAT = 2
# zstd: natural-image floats barely compress, keep it cheap; crc32c last, over the stored bytes.
# ``compress=False`` keeps only the checksum: for x_t (noise until the last steps) zstd saves ~8 %
# of the bytes for a compress and a decompress of every chunk at every step
def _compressors(compress: bool = True) -> list:
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=1), Crc32cCodec()] if compress else [Crc32cCodec()]


_ARRAY_CONFIG = {"write_empty_chunks": True}
# "<array path>/c/<i>/<j>/...": Zarr v3's default chunk key encoding
_CHUNK_KEY = re.compile(r"^(?P<array>.+)/c/\d+(/\d+)*$")


def chunk_array(key: str) -> str | None:
    """The array path of a chunk key, or None for a metadata key (``zarr.json``)."""
    match = _CHUNK_KEY.match(key)
    return match.group("array") if match else None


def may_be_absent(array: str) -> bool:
    """Done-grids are written one entry at a time: a chunk never written means "nothing done"."""
    return array == "output_done" or array.endswith("/done")


def chunk_problem(data: bytes | None) -> str | None:
    """Why a stored chunk cannot be trusted (None: it can): absent, too short, or its trailing
    CRC-32C does not match its bytes."""
    if data is None:
        return "missing"
    if len(data) < 4:
        return f"truncated ({len(data)} bytes)"
    if np.uint32(google_crc32c.value(data[:-4])).tobytes() != data[-4:]:
        return "checksum mismatch"
    return None


def verified_local_store(root, *, read_only: bool = False, strict: bool = True):
    """A ``VerifiedLocalStore`` (below). zarr is imported on the first store opened: an in-memory
    job never loads it."""
    return _verified_local_store_class()(root, read_only=read_only, strict=strict)


@functools.cache
def _verified_local_store_class():
    from zarr.storage import LocalStore

    class VerifiedLocalStore(LocalStore):
        """Zarr's LocalStore, except that reading a chunk that should exist and does not, or whose
        checksum fails, raises :class:`StoreDamagedError` instead of giving the fill value or a codec
        traceback. ``strict=False`` while a store is being created, when partial first writes may
        legitimately read chunks not yet written."""

        def __init__(self, root, *, read_only: bool = False, strict: bool = True):
            super().__init__(root, read_only=read_only)
            self.strict = strict

        def with_read_only(self, read_only: bool = False):
            return type(self)(self.root, read_only=read_only, strict=self.strict)

        def _verified(self, key: str, buffer, byte_range):
            array = chunk_array(key)
            if not self.strict or array is None:
                return buffer
            if buffer is None:
                problem = None if may_be_absent(array) else "missing"
            else:  # a byte range (sharded reads; none here) cannot be checked on its own
                problem = chunk_problem(buffer.to_bytes()) if byte_range is None else None
            if problem:
                raise StoreDamagedError(str(self.root), [f"{key} ({problem})"])
            return buffer

        async def get(self, key, prototype=None, byte_range=None):
            return self._verified(key, await super().get(key, prototype, byte_range), byte_range)

        def get_sync(self, key, *, prototype=None, byte_range=None):
            return self._verified(key, super().get_sync(key, prototype=prototype, byte_range=byte_range), byte_range)

    return VerifiedLocalStore


def stage_buffers(scale: int, stage: int, num_steps: int) -> tuple[str | None, str]:
    """(read, write) array names of a stage of a scale (see the module docstring)."""
    write = f"scales/{scale}/final" if stage == num_steps else f"scales/{scale}/x{stage % 2}"
    read = None if stage == 0 else f"scales/{scale}/x{(stage - 1) % 2}"
    return read, write


# manifest keys and the types they must have when present (a damaged or hand-edited manifest is
# refused here with its key's name, not by a TypeError deep in the engine)
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "version": (str,), "status": (str,), "source": (str,), "config": (dict,), "seed": (int,),
    "size": (list,), "tile": (int,), "halo": (int,), "channels": (int,), "image_channels": (int,),
    "factor": (int,), "output_tile": (int,), "dataset": (str,), "output_done": (bool,), "given_coarsest": (bool,), "excluded_cells": (bool,), "job_id": (str,),
    "scales_done": (list,), "output_shapes": (list,), "reference_shapes": (list,),
    "pixel_reference_shapes": (list,), "timings": (dict,), "setup_timings": (dict,),
    "compute_seconds": (dict,), "output_pyramid": (dict, type(None)), "index_checksums": (dict,),
    "source_file": (dict,), "structure_shapes": (list,), "structure_file": (dict,),
}
# what a job store (not the synthetic stores of io.testing) must hold
_JOB_KEYS = ("config", "seed", "size", "tile", "halo", "channels", "output_shapes", "reference_shapes",
             "scales_done", "output_done", "status")


def _check_manifest(path: Path, manifest: dict) -> None:
    def bad(key: str, expected: str) -> InputError:
        return InputError(
            f"{path}: the manifest's {key!r} is {manifest.get(key)!r}, expected {expected}; the store's "
            "zarr.json is damaged or was edited: restore it, or run the job again"
        )

    for key, types in _MANIFEST_TYPES.items():
        value = manifest.get(key)
        if key in manifest and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise bad(key, " or ".join("null" if t is type(None) else t.__name__ for t in types))
    for key in ("timings", "setup_timings", "compute_seconds"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in manifest.get(key, {}).values()):
            raise bad(key, "seconds by name")
    pyramid = manifest.get("output_pyramid")
    if pyramid is not None and not (
        isinstance(pyramid.get("levels_done"), int) and isinstance(pyramid.get("chunk"), int)
        and isinstance(pyramid.get("shapes"), list)
        and all(isinstance(shape, list) and len(shape) == 2 for shape in pyramid["shapes"])
    ):
        raise bad("output_pyramid", "{levels_done, chunk, shapes}")
    sums = manifest.get("index_checksums", {})
    if not all(key.isdigit() and isinstance(files, dict) and all(isinstance(c, str) for c in files.values())
               for key, files in sums.items()):
        raise bad("index_checksums", "checksums by scale and file")
    if "config" in manifest:
        for key in _JOB_KEYS:
            if key not in manifest:
                raise InputError(f"{path}: the manifest has no {key!r}; the store's zarr.json is damaged: run the job again")
        def counts(values, length=None) -> bool:
            return isinstance(values, list) and (length is None or len(values) == length) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)

        if not counts(manifest["size"], 2):
            raise bad("size", "[rows, cols]")
        if not counts(manifest["scales_done"]):
            raise bad("scales_done", "a list of scale numbers")
        for key in ("output_shapes", "reference_shapes", "pixel_reference_shapes"):
            if key in manifest and not (manifest[key] and all(counts(shape, 2) for shape in manifest[key])):
                raise bad(key, "a list of [rows, cols]")
        steps = manifest["config"].get("num_steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise bad("config", "a job config with num_steps (read from the store's zarr.json)")


class JobStore:
    """An open job store."""

    def __init__(self, path: str | Path, group: zarr.Group, *, memory: bool = False):
        self.path = Path(path)
        self.group = group
        #: held in this process's memory (``in_memory``): no files, no checksums, no lock
        self.memory = memory

    # ---- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> JobStore:
        path = Path(path)
        if path.exists():
            raise exists_error(path)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise InputError(f"cannot create {path}: directory {parent} does not exist or is not writable")
        import zarr

        group = zarr.open_group(store=verified_local_store(path, strict=False), mode="w", zarr_format=3)
        store = cls(path, group)
        store.write_manifest({**manifest, "format": FORMAT})
        return store

    @classmethod
    def in_memory(cls, manifest: dict) -> JobStore:
        """A store held in memory, for an in-memory job: the same layout, arrays and tasks as on
        disk (numpy arrays behind the part of zarr's array interface the engine uses: no codecs,
        no event loop to start for a thumbnail), under a key no other store has."""
        group = _MemoryGroup()
        store = cls(f"memory://{id(group):x}-{os.urandom(4).hex()}", group, memory=True)
        store.write_manifest({**manifest, "format": FORMAT})
        return store

    @classmethod
    def open(cls, path: str | Path) -> JobStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise InputError(f"{path} is not a gigasid job store (no zarr.json)")
        try:
            meta = json.loads((path / "zarr.json").read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(
                f"{path}/zarr.json (the store's manifest) is not valid JSON ({type(error).__name__}: "
                f"{str(error).splitlines()[0]}); it is damaged and cannot be repaired: run the job again"
            ) from None
        except OSError as error:
            raise InputError(f"cannot read {path}/zarr.json: {error.strerror}") from None
        if not isinstance(meta, dict) or meta.get("node_type") != "group":
            raise InputError(f"{path} is not a gigasid job store (its zarr.json is not a Zarr group's)")
        try:
            import zarr

            group = zarr.open_group(store=verified_local_store(path), mode="r+", zarr_format=3)
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"{path}/zarr.json is not a readable Zarr v3 group ({error}); run the job again") from None
        manifest = group.attrs.get("gigasid")
        if not isinstance(manifest, dict):
            raise InputError(f"{path} is a Zarr group but not a gigasid job store (no manifest)")
        if manifest.get("format") != FORMAT:
            raise InputError(
                f"{path} was written by a gigasid with store format {manifest.get('format')}; this version "
                f"reads format {FORMAT}: rerun the job with this version"
            )
        _check_manifest(path, manifest)
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
                host, _, pid = lock.read_text(errors="replace").strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and pid_alive(int(pid)):
                    raise InputError(f"{self.path} is being written by another gigasid process (pid {pid})") from None
                lock.unlink(missing_ok=True)  # stale: its writer died
                continue
            except OSError as error:
                if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise InputError(
                        f"{self.path} is not writable ({error.strerror}), so it cannot be changed; "
                        "make it writable, or copy it somewhere writable"
                    ) from None
                raise
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
            host, _, pid = lock.read_text(errors="replace").strip().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and pid_alive(int(pid)):
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
    def has(self, name: str) -> bool:
        """Is there a node ``name``? Its metadata file decides, read or not: unreadable metadata
        counts as there, so that :meth:`array` reports it as damage."""
        if self.memory:
            return name in self.group
        return (self.path / name / "zarr.json").is_file()

    def array(self, name: str) -> zarr.Array:
        try:
            array = self.group[name]
        except KeyError:
            raise StoreDamagedError(str(self.path), [f"{name}/zarr.json (missing)"], repairable=False,
                                    reason="missing") from None
        except (ValueError, TypeError) as error:  # unreadable array metadata
            raise StoreDamagedError(str(self.path), [f"{name}/zarr.json ({type(error).__name__})"],
                                    repairable=False, reason="unreadable") from None
        return array.with_config(_ARRAY_CONFIG)

    def create_array(self, name: str, shape, chunks, dtype, *, fill_value=0, compress: bool = True) -> zarr.Array:
        """A new array (replacing one of the same name); ``compress=False``: checksummed, not
        compressed (data that does not compress, rewritten often)."""
        options = {} if self.memory else {"compressors": _compressors(compress), "overwrite": True,
                                          "config": _ARRAY_CONFIG}
        return self.group.create_array(
            name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=fill_value, **options
        )

    # ---- a reference level, memory-mapped ---------------------------------------------------
    _LEVEL = "level.npy"

    def write_level_copy(self, dataset: str, scale: int) -> None:
        """An uncompressed copy of ``dataset/scale`` beside the scale's index, which workers map
        (:meth:`mapped_level`) instead of each decompressing the whole level into its own memory."""
        level = self.array(f"{dataset}/{scale}")
        folder = self.index_dir(scale)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{self._LEVEL}.partial"
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=level.shape)
        step = level.chunks[1]
        for top in range(0, level.shape[1], step):
            out[:, top : top + step] = level[:, top : top + step]
        out.flush()
        del out
        partial.rename(folder / self._LEVEL)

    def mapped_level(self, dataset: str, scale: int) -> np.ndarray:
        """``dataset/scale`` as a read-mostly array: the memory-mapped copy beside the index
        (copy-on-write: pages are shared by every worker on a machine and read on demand) when
        the job made one, else the level read whole."""
        copy = self.index_dir(scale) / self._LEVEL
        if not self.memory and copy.is_file():
            return np.load(copy, mmap_mode="c")
        return self.array(f"{dataset}/{scale}")[...]

    def save_codec(self, state: dict) -> None:
        """A latent codec's state: its arrays under ``codec/``, the rest in the group's attrs."""
        plain = {}
        for key, value in state.items():
            if isinstance(value, np.ndarray):
                self.group.create_array(f"codec/{key}", data=value, overwrite=True, compressors=_compressors(),
                                        config=_ARRAY_CONFIG)
            else:
                plain[key] = value
        self.group.attrs["codec"] = json.loads(json.dumps(plain))

    def load_codec_state(self) -> dict | None:
        """What :meth:`save_codec` kept, or None for a pixel-space job."""
        plain = self.group.attrs.get("codec")
        if plain is None:
            return None
        state = dict(plain)
        if self.has("codec"):
            for key in self.codec_arrays():
                state[key] = self.array(f"codec/{key}")[...]
        return state

    def codec_arrays(self) -> list[str]:
        """The names of the arrays under ``codec/`` (a latent job's fitted codec)."""
        folder = self.path / "codec"
        return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file()) if folder.is_dir() else []

    def index_dir(self, scale: int) -> Path:
        return self.path / "index" / str(scale)


def exists_error(path: Path) -> InputError:
    """Why a new job cannot be written at an existing ``path``; ``resume`` is offered only for a
    gigasid job store."""
    try:
        meta = json.loads((path / "zarr.json").read_bytes())
        is_store = isinstance(meta, dict) and "gigasid" in meta.get("attributes", {})
    except (OSError, ValueError):
        is_store = False
    if is_store:
        return InputError(f"{path} already exists; remove it, or continue it with `gigasid resume {path}`")
    kind = "folder" if path.is_dir() else "file"
    return InputError(f"{path} already exists and is a {kind}, not a gigasid job store; choose another name or remove it")


def read_box(array: zarr.Array, box: tuple[int, int, int, int], *, periodic: bool | tuple[bool, bool]) -> np.ndarray:
    """(C, …) values of a (C, H, W) array over a half-open box that may wrap around the periodic
    axes of the image (``periodic``: both, or (rows, columns))."""
    r0, c0, r1, c1 = box
    _, height, width = array.shape
    wrap_rows, wrap_cols = (periodic, periodic) if isinstance(periodic, bool) else periodic
    if not (wrap_rows or wrap_cols):
        return array[:, r0:r1, c0:c1]
    rows = np.arange(r0, r1) % height if wrap_rows else slice(r0, r1)
    cols = np.arange(c0, c1) % width if wrap_cols else slice(c0, c1)
    return array.oindex[:, rows, cols]


class _MemoryArray:
    """A numpy array behind the slice of zarr's array interface the engine uses: ``[...]`` reads
    (copies, as zarr's do) and writes, ``oindex``, ``shape``, ``dtype``, ``chunks``."""

    def __init__(self, data: np.ndarray, chunks: tuple[int, ...]):
        self.data, self.chunks = data, chunks

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self.data[key])

    def __setitem__(self, key, values) -> None:
        self.data[key] = values

    @property
    def oindex(self):
        data = self.data

        class _Orthogonal:  # each index applies along its own axis, as zarr's oindex
            def __getitem__(self, key):
                out = data
                for axis, index in enumerate(key if isinstance(key, tuple) else (key,)):
                    out = np.take(out, index, axis=axis) if isinstance(index, np.ndarray) else out[(slice(None),) * axis + (index,)]
                return np.array(out)

        return _Orthogonal()

    def with_config(self, config) -> _MemoryArray:
        return self


class _MemoryGroup:
    """The arrays and attributes of an in-memory store (see :meth:`JobStore.in_memory`)."""

    def __init__(self):
        self.attrs: dict = {}
        self.arrays: dict[str, _MemoryArray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __getitem__(self, name: str) -> _MemoryArray:
        return self.arrays[name]

    def create_array(self, name, *, shape, chunks, dtype, fill_value=0, compress=True) -> _MemoryArray:
        self.arrays[name] = _MemoryArray(np.full(shape, fill_value, dtype=dtype), tuple(chunks))
        return self.arrays[name]
