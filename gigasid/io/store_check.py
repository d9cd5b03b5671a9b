"""Reading back what a job store claims: ``gigasid check``, and the first thing ``resume`` does.

A store's done-grids and manifest claim that chunks are durable; this module reads each claimed
chunk's bytes and checks its CRC-32C (``gigasid.io.store``), without decoding it, and reports what
is missing or corrupt in terms the driver can act on:

* the reference pyramid (read again from the source image when that is still there, unchanged:
  its CRC-32C is in the manifest) and an analogy's structure pyramid (likewise), its latents (encoded again with the stored codec) and the
  fitted codec (every chunk: any recomputation reads them; a damaged codec is not repairable),
  and the index files (their CRC-32C recorded in the manifest when they were built), which are
  rebuilt from the reference;
* an outpaint or inpaint job's known values and mask per scale (written again from the reference
  and the stored inpainting mask, ``known/hole``, which is not repairable), and the cells a job
  over several references leaves out (``excluded/<s>``, not repairable either);
* per scale, the chunks the next stage relies on: the buffer the stage in progress writes (its
  done tiles), the buffer it reads (every tile: the previous stage's values), ``final`` of a
  finished scale (and then the buffer of its last step, needed to recompute a final tile), the last
  step's ``matches``/``weights`` of a latent job, and the done-grid itself;
* the uint8 output's chunks that ``output_done`` marks, and the built output-pyramid levels.

Not here: repairing (``gigasid.graph.engine.repair``: the driver alone writes done-grids) or
reading through Zarr (``gigasid.io.store.VerifiedLocalStore`` does that check on every read).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np

from gigasid.errors import StoreDamagedError
from gigasid.io.store import JobStore, chunk_problem, stage_buffers

__all__ = ["CheckReport", "ScaleDamage", "check_store", "file_checksums", "file_crc32c", "source_available"]

Tile = tuple[int, int]


@dataclass
class ScaleDamage:
    """What is wrong with one scale's state, and so which of its stages must run again."""

    stage: int  # the stage whose damaged tiles are to be redone (num_steps for a finished scale)
    tiles: set[Tile] = field(default_factory=set)  # tiles whose chunk written by ``stage`` is damaged
    restart: bool = False  # the values ``stage`` reads are damaged (or the done-grid): redo the scale
    given: bool = False  # a given coarsest scale (retarget, analogy), written at creation: write it again
    grid: bool = False  # the done-grid itself is unreadable (and so ``restart``)


@dataclass
class CheckReport:
    path: Path
    checked: int = 0  # chunks (and index files) read
    damaged: list[str] = field(default_factory=list)  # "key (reason)", in the order found
    fatal: list[str] = field(default_factory=list)  # the damaged ones the store cannot recompute
    scales: dict[int, ScaleDamage] = field(default_factory=dict)
    output_tiles: set[Tile] = field(default_factory=set)
    output_grid: bool = False  # output_done itself is unreadable: every output tile is redone
    pyramid_levels_ok: int | None = None  # output-pyramid levels still good when one is damaged
    indexes: set[int] = field(default_factory=set)  # scales whose index files are damaged: rebuilt
    reference: bool = False  # the reference pyramid is damaged, and the source image is there
    latents: set[int] = field(default_factory=set)  # latent levels to encode again
    structure: bool = False  # an analogy's structure pyramid is damaged, and its image is there
    known: bool = False  # an outpaint/inpaint job's per-scale known values or mask: written again

    @property
    def ok(self) -> bool:
        return not self.damaged

    def error(self) -> StoreDamagedError:
        if self.fatal:
            return StoreDamagedError(str(self.path), self.fatal, repairable=False)
        return StoreDamagedError(str(self.path), self.damaged)


class _Reader:
    def __init__(self, store: JobStore, report: CheckReport):
        self.store, self.report = store, report

    def chunk(self, key: str, *, fatal: bool = False, absent_ok: bool = False) -> bool:
        """Read one chunk file and check it; False (and recorded) when it is damaged."""
        try:
            data = (self.store.path / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            if absent_ok:
                return True
            data = None
        self.report.checked += 1
        problem = chunk_problem(data)
        if problem is None:
            return True
        self.report.damaged.append(f"{key} ({problem})")
        if fatal:
            self.report.fatal.append(f"{key} ({problem})")
        return False

    def array(self, name: str):
        """The array, or None (recorded as unrepairable) when its metadata is unreadable."""
        try:
            return self.store.array(name)
        except StoreDamagedError as error:
            self.report.damaged.extend(error.damaged)
            self.report.fatal.extend(error.damaged)
            return None

    def chunks(self, name: str, coords=None, *, fatal: bool = False, absent_ok: bool = False) -> set[tuple[int, ...]]:
        """Check chunks of array ``name`` (all of them by default); the damaged coordinates.
        ``absent_ok``: a done-grid, whose chunks are written when the first entry is set."""
        array = self.array(name)
        if array is None:
            return set(coords) if coords is not None else {()}
        if coords is None:
            grid = [range(math.ceil(s / c)) for s, c in zip(array.shape, array.chunks)]
            coords = itertools.product(*grid)
        damaged = set()
        for coord in coords:
            if not self.chunk(f"{name}/{array.metadata.encode_chunk_key(tuple(coord))}", fatal=fatal, absent_ok=absent_ok):
                damaged.add(tuple(coord))
        return damaged


def file_crc32c(path: Path) -> str:
    """CRC-32C (hex) of a file's bytes, read 16 MiB at a time."""
    crc = 0
    with Path(path).open("rb") as handle:
        while block := handle.read(16 * 2**20):
            crc = google_crc32c.extend(crc, block)
    return f"{crc:08x}"


def file_checksums(folder: Path) -> dict[str, str]:
    """CRC-32C (hex) of every file under ``folder``, by path relative to it (index files)."""
    return {path.relative_to(folder).as_posix(): file_crc32c(path)
            for path in sorted(p for p in folder.rglob("*") if p.is_file())}


def source_available(manifest: dict, key: str = "source_file") -> Path | None:
    """The job's source image when it is still there, unchanged (its recorded CRC-32C): the
    reference pyramid can be read from it again (``key="structure_file"``: an analogy's
    structure image, for its pyramid)."""
    source = manifest.get(key)
    if not isinstance(source, dict) or not isinstance(source.get("path"), str):
        return None
    path = Path(source["path"])
    try:
        return path if path.is_file() and file_crc32c(path) == source.get("crc32c") else None
    except OSError:
        return None


def check_store(store: JobStore, *, output_only: bool = False) -> CheckReport:
    """Read and verify every chunk the store's manifest and done-grids claim (see the module
    docstring); ``output_only`` reads just the output and its pyramid (what an export reads)."""
    report = CheckReport(store.path)
    reader = _Reader(store, report)
    manifest = store.manifest
    if not output_only and "config" in manifest:
        _check_inputs(reader, manifest)
        for scale in range(len(manifest["output_shapes"])):
            _check_scale(reader, manifest, scale)
    if store.has("output"):
        _check_output(reader, store, manifest)
    return report


def _check_inputs(reader: _Reader, manifest: dict) -> None:
    store = reader.store
    report = reader.report
    found = len(report.damaged)
    for scale in range(len(manifest.get("pixel_reference_shapes", manifest["reference_shapes"]))):
        reader.chunks(f"reference/{scale}")
    if len(report.damaged) > found:  # read again from the source image, if it is still there
        if source_available(manifest) is not None:
            report.reference = True
        else:
            report.fatal.extend(report.damaged[found:])
    found = len(report.damaged)
    if "structure_shapes" in manifest:  # an analogy's layout image and the coarsest scale made of it
        for scale in range(len(manifest["structure_shapes"])):
            reader.chunks(f"structure/{scale}")
        reader.chunks("structure/given")
    if len(report.damaged) > found:
        if source_available(manifest, "structure_file") is not None:
            report.structure = True
        else:
            report.fatal.extend(report.damaged[found:])
    codec_damage = len(report.damaged)
    for key in store.codec_arrays():
        reader.chunks(f"codec/{key}", fatal=True)
    if manifest.get("dataset") == "latent":
        for scale in range(len(manifest["reference_shapes"])):
            if reader.chunks(f"latent/{scale}", fatal=len(report.damaged) > codec_damage):
                report.latents.add(scale)  # encoded again with the stored codec
    if manifest.get("excluded_cells"):  # several references: the gaps, from the atlas the CLI built
        for scale in range(len(manifest["reference_shapes"])):
            reader.chunks(f"excluded/{scale}", fatal=True)  # nothing in the store to write them from
    if manifest.get("known"):  # outpaint, inpaint: what the tile steps hold, written at creation
        if manifest["known"]["kind"] == "masked":  # the user's mask: nothing to write it again from
            reader.chunks("known/hole", fatal=True)
        found = len(report.damaged)
        for scale in range(len(manifest["output_shapes"])):
            reader.chunks(f"known/{scale}/values")
            reader.chunks(f"known/{scale}/mask")
        report.known = len(report.damaged) > found
    for scale, sums in manifest.get("index_checksums", {}).items():
        folder = store.index_dir(int(scale))
        files = file_checksums(folder) if folder.is_dir() else {}
        for name, crc in sums.items():
            report.checked += 1
            if files.get(name) != crc:
                problem = "missing" if name not in files else "checksum mismatch"
                report.damaged.append(f"index/{scale}/{name} ({problem})")
                report.indexes.add(int(scale))


def _tile_coords(tiles, depth: int = 3) -> list[tuple[int, ...]]:
    """Chunk coordinates of tiles (i, j) in a (C, H, W) buffer chunked like the tiles."""
    return [(0, i, j) if depth == 3 else (i, j, 0) for i, j in tiles]


def _check_spread_scale(reader: _Reader, scale: int, steps: int, done: np.ndarray, every) -> bool:
    """A scale stopped mid-graph, its tiles more than one step apart (the engine runs a scale's
    steps with no barrier): read each tile's last two written chunks; any damage, or done entries
    that are not a prefix of the steps, redoes the whole scale (a neighbour may already have
    overwritten what a single tile's step would read again). False: the tiles are at most one
    step apart, which the stage-by-stage check below handles."""
    counts = done.sum(0)
    prefix = np.cumprod(done, axis=0).sum(0)
    if int(counts.max()) - int(counts.min()) <= 1 and np.array_equal(prefix, counts):
        return False
    report = reader.report
    damaged = not np.array_equal(prefix, counts)
    for i, j in every:
        last = int(prefix[i, j]) - 1
        for stage in (last, last - 1):
            if stage >= 0 and not damaged:
                _, write = stage_buffers(scale, stage, steps)
                damaged = bool(reader.chunks(write, _tile_coords([(i, j)])))
    if damaged:
        report.scales[scale] = ScaleDamage(stage=0, restart=True)
    return True


def _check_scale(reader: _Reader, manifest: dict, scale: int) -> None:
    steps = int(manifest["config"]["num_steps"])
    report = reader.report
    grid = reader.array(f"scales/{scale}/done")
    if grid is None:
        return
    if reader.chunks(f"scales/{scale}/done", absent_ok=True):
        report.scales[scale] = ScaleDamage(stage=0, restart=True, grid=True)
        return
    done = grid[...].astype(bool)
    every = [(i, j) for i in range(done.shape[1]) for j in range(done.shape[2])]
    marked = scale in manifest["scales_done"]
    coarsest = scale == len(manifest["output_shapes"]) - 1
    if marked and coarsest and manifest.get("given_coarsest"):  # written at creation, not sampled
        if reader.chunks(f"scales/{scale}/final", _tile_coords(every)):
            report.scales[scale] = ScaleDamage(stage=steps, given=True)
        return
    # a stage's done-grid chunk is written with its first done tile, and stages run in order: one
    # missing while a later stage's is there (or the scale is finished) was lost, not never written
    keys = [f"scales/{scale}/done/{grid.metadata.encode_chunk_key((k, 0, 0))}" for k in range(steps + 1)]
    present = [(reader.store.path / key).is_file() for key in keys]
    lost = [k for k in range(steps + 1) if not present[k] and (marked or any(present[k + 1 :]))]
    if grid.chunks[0] == 1 and lost:
        report.damaged.append(f"{keys[lost[0]]} (missing)")
        report.scales[scale] = ScaleDamage(stage=0, restart=True, grid=True)
        return
    if not marked and _check_spread_scale(reader, scale, steps, done, every):
        return
    stage = steps + 1 if marked else next((k for k in range(steps + 1) if not done[k].all()), steps + 1)
    finished = stage > steps
    current = steps if finished else stage
    tiles = every if finished else [(i, j) for i, j in every if done[current, i, j]]
    _, write = stage_buffers(scale, current, steps)
    damaged = {(c[1], c[2]) for c in reader.chunks(write, _tile_coords(tiles))}
    if current == steps and scale == 0 and reader.store.has("scales/0/matches"):
        matches = reader.array("scales/0/matches")
        if matches is not None:
            rows, cols = (math.ceil(s / c) for s, c in zip(matches.shape[:2], matches.chunks[:2]))
            inside = [(i, j) for i, j in tiles if i < rows and j < cols]
            for name in ("scales/0/matches", "scales/0/weights"):
                damaged |= {(c[0], c[1]) for c in reader.chunks(name, _tile_coords(inside, depth=2))}
    restart = False
    # the previous stage's values: read whole by the stage in progress; for a finished scale only
    # needed (and so only read) when a final tile has to be recomputed
    if current >= 1 and (damaged or not finished):
        previous, _ = stage_buffers(scale, current, steps)
        restart = bool(reader.chunks(previous, _tile_coords(every)))
    if damaged or restart:
        report.scales[scale] = ScaleDamage(stage=current, tiles=damaged, restart=restart)


def _check_output(reader: _Reader, store: JobStore, manifest: dict) -> None:
    report = reader.report
    if store.has("output_done"):
        grid_key = "output_done/" + store.array("output_done").metadata.encode_chunk_key((0, 0))
        lost = manifest.get("output_done") and not (store.path / grid_key).is_file()
        if lost:
            report.damaged.append(f"{grid_key} (missing)")
        if lost or reader.chunks("output_done", absent_ok=True):
            report.output_grid = True
            return
        done = np.asarray(store.array("output_done")[...], bool)
        tiles = [(i, j) for i in range(done.shape[0]) for j in range(done.shape[1]) if done[i, j]]
        report.output_tiles = {(c[1], c[2]) for c in reader.chunks("output", _tile_coords(tiles))}
    elif manifest.get("output_done"):  # a store without done-grids (io.testing): the whole output
        report.output_tiles = {(c[1], c[2]) for c in reader.chunks("output")}
    pyramid = manifest.get("output_pyramid") or {}
    for level in range(1, int(pyramid.get("levels_done", 0)) + 1):
        if reader.chunks(f"output_pyramid/{level}"):
            report.pyramid_levels_ok = level - 1
            break
