"""The driver of a job: create its store, run its task graphs on an executor, resume it.

A job runs scale by scale, coarsest first. A scale is one task graph (:func:`scale_graph`): T + 1
steps of every tile (x_T, then one per sampler step), each step of a tile waiting only on the
steps of the tiles whose values it reads (its halo) or overwrites, never on a whole-stage barrier;
a tile step reads x_t from one ping-pong buffer and writes its core to the other
(``graph.tasks``, the step itself is ``tiling.step``). An in-memory job is the same graph on a
store held in memory, one whole-image tile per scale (:func:`run_in_memory`). The driver alone
writes the manifest and the done-grids, after each task reports, so what is marked done is
durable; a killed job resumes from the tile steps not done and produces the same pixels. Before
it does, ``resume`` reads back every chunk the done-grids claim (``gigasid.io.store_check``) and
marks what is missing or corrupt not done (:func:`repair`), so the damage is recomputed, not read
as zeros.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import torch

from gigasid import __version__
from gigasid import plan as job_plan
from gigasid.codecs import latent_shape
from gigasid.config import JobConfig, to_mapping
from gigasid.core.patches import grid_shape
from gigasid.errors import InputError
from gigasid.graph import tasks
from gigasid.graph.profiles import Profile, open_executor
from gigasid.io.disk import check_free_space, disk_full, is_disk_full
from gigasid.io.store import JobStore, exists_error
from gigasid.io.store_check import CheckReport, check_store, file_checksums, source_available
from gigasid.plan import JobPlan
from gigasid.tiling.geometry import halo, tile_ranges

# the pixel output's chunk side in latent jobs (their tiles are in latent cells, 8 px each)
LATENT_OUTPUT_TILE = 1024

Box = tuple[int, int, int, int]


def tile_boxes(shape: tuple[int, int], tile: int) -> list[tuple[tuple[int, int], Box]]:
    """((i, j), box) of every tile of a scale, row-major."""
    rows, cols = tile_ranges(shape[0], tile), tile_ranges(shape[1], tile)
    return [((i, j), (r0, c0, r1, c1)) for i, (r0, r1) in enumerate(rows) for j, (c0, c1) in enumerate(cols)]


def job_halo(config: JobConfig, shapes: list[tuple[int, int]]) -> int:
    """The largest halo a tile of this job reads beyond its core (before or after), any scale."""
    stride = config.index.search_stride if config.denoiser.backend == "knn" else 1
    return max(
        max(halo(length, patch_size=config.patch_size, search_stride=stride, blend=True))
        for shape in shapes
        for length in shape
    )


def ingest_reference(
    store: JobStore, source: torch.Tensor | str | Path, config: JobConfig, *, hole: torch.Tensor | None = None,
    rows: int = 256,
):
    """Write the reference pyramid into the store without holding the source image whole.

    A file is read in strips (pyvips, sequentially) into ``reference/0``; every coarser level is
    resampled band by band from the level above, with the same taps and arithmetic as
    ``plan.reference_pyramid``, so the values are those of the in-memory pyramid (with an
    inpainting ``hole``, the known pixels' pyramid as there).
    """
    return ingest_pyramid(
        store, "reference", source, lambda height, width: job_plan.pixel_reference_shapes(height, width, config),
        rows=rows, hole=hole,
    )


def ingest_pyramid(
    store: JobStore, name: str, source: torch.Tensor | str | Path, shapes_of, *, channels: int | None = None,
    rows: int = 256, hole: torch.Tensor | None = None,
):
    """Write an image's pyramid at ``shapes_of(height, width)`` into ``name/<level>`` (see
    :func:`ingest_reference`); ``channels``: converted to that many (``plan.match_channels``);
    ``hole``: the pyramid of the known pixels alone (``core.known.without_hole``)."""
    from gigasid.io.images import image_shape, read_strips

    if isinstance(source, torch.Tensor):
        height, width = source.shape[1:]
        strips = ((top, source[:, top : top + rows]) for top in range(0, height, rows))
    else:
        height, width, _ = image_shape(source)
        # model space [-1, 1]: the same elementwise op as the in-memory path
        strips = ((top, torch.from_numpy(strip.transpose(2, 0, 1) * 2.0 - 1.0)) for top, strip in read_strips(source, rows))
    if channels is not None:
        strips = ((top, job_plan.match_channels(strip, channels)) for top, strip in strips)
    shapes = shapes_of(height, width)
    shares = None
    if hole is not None:  # the pyramid of reference·share, then each level divided by the share's
        from gigasid.core.known import known_share

        shares = known_share(hole, shapes)
        strips = ((top, strip * shares[0][top : top + strip.shape[1]]) for top, strip in strips)
    level0 = None
    for top, strip in strips:
        if level0 is None:
            channels = strip.shape[0]
            level0 = store.create_array(f"{name}/0", (channels, height, width), (channels, rows, width), "float32")
        level0[:, top : top + strip.shape[1]] = strip.numpy().astype(np.float32)
    for scale in range(1, len(shapes)):
        _downsample_level(store, scale, shapes, channels, rows, name=name)
    if shares is not None:
        from gigasid.core.known import without_hole

        for scale, share in enumerate(shares[1:], start=1):  # level 0 is already its known pixels
            level = store.array(f"{name}/{scale}")
            for top in range(0, share.shape[0], rows):
                band = torch.from_numpy(level[:, top : top + rows])
                level[:, top : top + rows] = without_hole(band, share[top : top + rows]).numpy()
    return shapes, int(channels)


def _downsample_level(store: JobStore, scale: int, shapes, channels: int, rows: int, *, name: str = "reference") -> None:
    """name/scale from name/scale-1, ``rows`` output rows at a time."""
    from gigasid.core.pyramid import resample_axis, resample_taps

    in_h, (out_h, out_w) = shapes[scale - 1][0], shapes[scale]
    above = store.array(f"{name}/{scale - 1}")
    level = store.create_array(f"{name}/{scale}", (channels, out_h, out_w), (channels, rows, out_w), "float32")
    for top in range(0, out_h, rows):
        bottom = min(out_h, top + rows)
        taps, _ = resample_taps(in_h, out_h, out_range=(top, bottom))
        first, last = int(taps.min()), int(taps.max()) + 1
        band = torch.from_numpy(above[:, first:last])
        band = resample_axis(band, 1, out_h, in_len=in_h, src_start=first, out_range=(top, bottom))
        level[:, top:bottom] = resample_axis(band, 2, out_w).numpy()


def create_job(
    path: str | Path,
    image: torch.Tensor | str | Path,
    config: JobConfig,
    *,
    size: tuple[int, int] | None,
    seed: int,
    tile: int,
    source: str = "",
    force: bool = False,
    profile: Profile | None = None,
    structure: torch.Tensor | str | Path | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
) -> JobStore:
    """Make the store of a new job: manifest, reference pyramid, indexes, buffers. Locked.

    ``excluded``: pixels of ``image`` that are no reference, bool (H, W) (several references on
    one canvas: ``plan.reference_atlas``); their patches are no candidates (``excluded/<s>``).

    ``mask``: inpaint's region to regenerate, bool (H, W) the reference's size (True = regenerate).

    ``image`` is the reference: an image file (read in strips) or a (C, H, W) tensor in [-1, 1];
    ``structure`` the layout image of an analogy, likewise (its pyramid is kept in the store,
    ``structure/<level>``, and the default size is its own). The disk must have room for the
    plan's estimate of the store, and, with the ``profile`` it will run on, the memory for its
    tasks (``force``: start anyway).
    """
    from gigasid.io.images import image_shape

    job_plan.check_structure(config, structure is not None)
    job_plan.check_mask_given(config, mask is not None)
    if config.denoiser.backend == "knn" and config.index.coherence != "none":
        raise InputError("tiled jobs need index.coherence: none (coherence reads the whole image)")
    if isinstance(image, torch.Tensor):
        height, width = image.shape[1:]
    else:
        height, width, _ = image_shape(image)
    pixel_shapes = job_plan.pixel_reference_shapes(height, width, config)
    ref_shapes = job_plan.reference_shapes(height, width, config)
    structure_shapes = None
    if structure is not None:
        layout = tuple(structure.shape[1:]) if isinstance(structure, torch.Tensor) else image_shape(structure)[:2]
        size = job_plan.structure_size(layout, size, config)
        coarsest = job_plan.output_pyramid_shapes(pixel_shapes, *size)[-1]
        structure_shapes = job_plan.structure_shapes(*layout, coarsest)
    hole = None
    if mask is not None:
        job_plan.check_mask(np.asarray(mask), (height, width))
        hole = torch.as_tensor(np.asarray(mask, dtype=bool))
    if job_plan.known_kind(config) is not None:
        size = job_plan.known_size(config, (height, width), size)
    if excluded is not None and (hole is not None or job_plan.known_kind(config) is not None):
        raise InputError("several references (--ref) cannot be combined with a known region (outpaint, inpaint)")
    size = tuple(size or job_plan.default_size(height, width, config))
    if job_plan.application(config).text_guided:
        job_plan.check_style_size((height, width), size)
    out_shapes = job_plan.output_shapes(pixel_shapes, size, config)
    region = job_plan.known_region(config, (height, width), size, ref_shapes, out_shapes)
    if hole is not None:
        job_plan.known_holes(config, hole, pixel_shapes)  # a mask that leaves nothing to copy: refused now
    factor = job_plan.codec_factor(config)
    reach = job_halo(config, out_shapes)
    if tile <= reach:
        unit = "px" if factor == 1 else f"latent cells of {factor} px"
        raise InputError(
            f"--tile {tile} is not larger than this job's halo ({reach} {unit}); use --tile {reach + 1} or more"
        )
    job_plan.check_balanced_tile(config, out_shapes[-1], ref_shapes[-1], tile)
    manifest = {
        "version": __version__,
        # tells a worker that outlives jobs a store created again at the same path is another job
        "job_id": uuid.uuid4().hex,
        "config": to_mapping(config),
        "seed": seed,
        "size": list(size),
        "tile": tile,
        "channels": 0,  # set below, once the reference is read
        "source": source,
        "reference_shapes": [list(s) for s in ref_shapes],  # sampling grids (latent cells in latent jobs)
        "pixel_reference_shapes": [list(s) for s in pixel_shapes],
        "output_shapes": [list(s) for s in out_shapes],
        "factor": factor,
        # the pixel output's chunk: the tile itself in pixel space, a fixed size in latent jobs
        "output_tile": tile if factor == 1 else LATENT_OUTPUT_TILE,
        "dataset": "reference" if factor == 1 else "latent",
        "halo": reach,
        # the application's coarsest scale is written at creation, not sampled (`gigasid check`)
        "given_coarsest": job_plan.gives_coarsest(config),
        # several references on one canvas: the cells of ``excluded/<s>`` are no candidates
        "excluded_cells": excluded is not None,
        # analogy: the structure image's pixel pyramid (``structure/<level>``), its last level the
        # output's coarsest pixel grid; the given coarsest scale is rewritten from it (repair)
        **({"structure_shapes": [list(s) for s in structure_shapes]} if structure_shapes else {}),
        "scales_done": [],
        "output_done": False,
        "status": "created",
        "timings": {},
    }
    if region is not None:  # outpaint, inpaint: the known values and mask per scale, ``known/<s>``
        manifest["known"] = region.manifest()
    # built under a temporary name and renamed when complete: a kill during creation leaves no
    # half-made store at ``path`` (the next generate removes the leftover)
    path = Path(path)
    if path.exists():
        raise exists_error(path)
    building = path.with_name(f".{path.name}.creating")
    if building.exists():
        JobStore.remove_abandoned(building)
    if not isinstance(image, torch.Tensor):  # what `resume` reads again if the reference is damaged
        from gigasid.io.store_check import file_crc32c

        manifest["source_file"] = {"path": str(Path(image).resolve()), "crc32c": file_crc32c(Path(image))}
    if structure is not None and not isinstance(structure, torch.Tensor):  # likewise for the structure
        from gigasid.io.store_check import file_crc32c

        manifest["structure_file"] = {"path": str(Path(structure).resolve()), "crc32c": file_crc32c(Path(structure))}
    # the image's channels are not read yet: count 3 (grey needs less); a latent job's are the codec's
    channels = 3 if factor == 1 else config.latent.channels
    check_free_space(path.parent, disk_estimate(manifest, channels, 3), force=force, what=f"the job store {path}")
    if profile is not None and not force:
        check_memory(manifest, config, channels, profile, what=f"the job {path}")
    try:
        store = JobStore.create(building, manifest)
        store.acquire_lock()
        return _build_job(store, building, path, image, config, manifest, structure, hole=hole, excluded=excluded)
    except BaseException as error:
        # a half-built store is of no use: remove it now rather than leave it filling the disk
        # (a kill, which runs no handler, leaves it for the next generate to remove)
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
        if not isinstance(error, KeyboardInterrupt) and is_disk_full(error):
            raise disk_full(path.parent) from None
        raise


def _build_job(
    store: JobStore, building: Path, path: Path, image, config: JobConfig, manifest: dict, structure=None,
    *, hole: torch.Tensor | None = None, excluded: torch.Tensor | None = None,
) -> JobStore:
    """Fill a new job store created at ``building`` and rename it to ``path``."""
    ref_shapes = manifest["reference_shapes"]
    pixel_shapes = [tuple(s) for s in manifest["pixel_reference_shapes"]]
    out_shapes = [tuple(s) for s in manifest["output_shapes"]]
    factor = manifest["factor"]
    setup = {}  # seconds per setup stage, for `gigasid info` and the benchmarks
    started = time.perf_counter()
    _, image_channels = ingest_reference(store, image, config, hole=hole)
    setup["ingest"] = time.perf_counter() - started
    channels = image_channels
    if factor > 1:
        started = time.perf_counter()
        channels = _encode_reference(store, config, pixel_shapes, image_channels)
        setup["codec fit + encode"] = time.perf_counter() - started
    store.update_manifest(channels=channels, image_channels=image_channels)
    if excluded is not None:  # before the indexes, which leave these cells' patches out
        holes = job_plan.excluded_cells(config, torch.as_tensor(excluded, dtype=torch.bool), pixel_shapes)
        for scale, cells in enumerate(holes):
            store.create_array(f"excluded/{scale}", cells.shape, cells.shape, "uint8")[...] = cells.numpy()
    if "known" in manifest:  # before the indexes: inpaint's leave out the hole's patches
        started = time.perf_counter()
        write_known(store, JobPlan.from_manifest(store.manifest), _read_dataset(store), hole)
        setup["known region"] = time.perf_counter() - started
    if config.denoiser.backend == "knn":  # built once here, opened by path in every worker
        started = time.perf_counter()
        for scale in range(len(ref_shapes)):
            _build_index(store, config, scale)
        setup["indexes"] = time.perf_counter() - started
        # read back by `gigasid check`: FAISS would read a damaged index file without noticing
        store.update_manifest(index_checksums={
            str(scale): file_checksums(store.index_dir(scale)) for scale in range(len(ref_shapes))
        })
    if structure is not None:
        started = time.perf_counter()
        _ingest_structure(store, structure)
        setup["structure"] = time.perf_counter() - started
    store.update_manifest(setup_timings=setup)
    create_buffers(store, JobPlan.from_manifest(store.manifest), output_dtype="uint8")
    if job_plan.gives_coarsest(config) and not job_plan.application(config).text_guided:
        # the coarsest scale is given, not sampled (text style's is computed by `execute`, step by step)
        started = time.perf_counter()
        _write_given_coarsest(store)
        setup["coarsest"] = time.perf_counter() - started
        store.update_manifest(setup_timings=setup, scales_done=[len(out_shapes) - 1])
    building.rename(path)
    return JobStore.open(path)  # still locked by us: the lock file moved with the directory


def create_buffers(store: JobStore, plan: JobPlan, *, output_dtype: str) -> None:
    """The arrays a job's tasks write: per scale the x_t ping-pong buffers, the finished scale and
    the done-grid, chunked like the tiles; the last step's matches (correspondence decode); the
    pixel output and its done-grid."""
    tile, channels, steps = plan.tile, plan.channels, plan.config.num_steps
    for scale, (height, width) in enumerate(plan.output_shapes):
        chunks = (channels, min(tile, height), min(tile, width))
        for name in ("x0", "x1"):  # noisy until the last steps: not worth compressing
            store.create_array(f"scales/{scale}/{name}", (channels, height, width), chunks, "float32", compress=False)
        store.create_array(f"scales/{scale}/final", (channels, height, width), chunks, "float32")
        grid = (len(tile_ranges(height, tile)), len(tile_ranges(width, tile)))
        store.create_array(f"scales/{scale}/done", (steps + 1, *grid), (1, *grid), "uint8")
    if plan.correspondence:
        # the last step's matches per query of the finest scale, chunked like its tiles
        grid_h, grid_w = grid_shape(*plan.output_shapes[0], plan.config.patch_size, periodic=plan.periodic)
        k = plan.config.index.k
        chunks = (min(tile, grid_h), min(tile, grid_w), k)
        store.create_array("scales/0/matches", (grid_h, grid_w, k), chunks, "int32", fill_value=-1)
        store.create_array("scales/0/weights", (grid_h, grid_w, k), chunks, "float32")
    height, width = plan.size if plan.factor > 1 else plan.output_shapes[0]
    out_tile = plan.output_tile
    chunks = (plan.image_channels, min(out_tile, height), min(out_tile, width))
    store.create_array("output", (plan.image_channels, height, width), chunks, output_dtype)
    grid = (len(tile_ranges(height, out_tile)), len(tile_ranges(width, out_tile)))
    store.create_array("output_done", grid, grid, "uint8")
    if plan.application.text_guided:  # its trajectory's state, two slots (see run_style)
        shape = (2, channels, *plan.output_shapes[0])
        for name in ("x", "memory"):
            store.create_array(f"style/{name}", shape, (1, *shape[1:]), "float32")


def run_style(store: JobStore, progress: Progress | None = None) -> None:
    """Text style's one scale (``plan.style_trip``), continued from the last step the store
    kept: after each step its state (x and the last guided estimate) is written to the slot
    ``style/*[(k + 1) % 2]`` and only then ``style_steps`` = k + 1 to the manifest, so a kill
    leaves the previous slot whole and ``resume`` goes on from it, value for value. Writes
    ``scales/0/final`` and marks the scale done.

    It runs alone, in the driver, with torch's threads pinned to the machine's cores for its
    duration: CLIP's reductions depend on torch's thread count, which executors change for their
    tasks, so pinning it makes a job, its in-memory twin and a resumed job give the same values
    on one machine (a resume on a machine of another core count may differ in the last bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        _run_style(store, progress)
    finally:
        torch.set_num_threads(threads)


def _run_style(store: JobStore, progress: Progress | None) -> None:
    path = str(store.path)
    plan = tasks.plan_of(path)
    level = torch.from_numpy(np.ascontiguousarray(tasks.finest_reference(path)))
    trip = job_plan.style_trip(level, tasks.scale_stepper(path, 0).denoiser, plan.config, plan.seed)
    done = int(store.manifest.get("style_steps", 0))
    if done == 0:
        x, memory = trip.begin(level), None
    else:
        x = torch.from_numpy(store.array("style/x")[done % 2])
        memory = torch.from_numpy(store.array("style/memory")[done % 2]) if trip.remembers(done) else None
    if progress is not None:
        progress.start(f"style ({trip.steps} steps)", trip.steps, done)
    started = time.perf_counter()
    for k in range(done, trip.steps):
        x, memory = trip.advance(k, x, memory)
        store.array("style/x")[(k + 1) % 2] = x.numpy()
        if memory is not None:
            store.array("style/memory")[(k + 1) % 2] = memory.numpy()
        store.update_manifest(style_steps=k + 1)
        if progress is not None:
            progress.tick()
    store.array("scales/0/final")[...] = x.numpy()
    timings = store.manifest["timings"]
    timings["0"] = timings.get("0", 0.0) + time.perf_counter() - started
    scales_done = [s for s in store.manifest["scales_done"] if s != 0] + [0]
    store.update_manifest(scales_done=scales_done, timings=timings)


def _read_dataset(store: JobStore):
    """read(scale, box): the stored reference level (pixels or latents) of a scale over a box."""
    dataset = store.manifest["dataset"]

    def read(scale: int, box: Box) -> torch.Tensor:
        return torch.from_numpy(store.array(f"{dataset}/{scale}")[:, box[0] : box[2], box[1] : box[3]])

    return read


def write_known(store: JobStore, plan: JobPlan, read_level, hole: torch.Tensor | None = None) -> None:
    """An output's known region (outpaint, inpaint; ``core.known``), written once at creation
    and read by the tile steps over their cores like x_t: per scale ``known/<s>/values`` (the
    reference's level placed on the output grid) and ``known/<s>/mask`` (uint8, 1 = held), chunked
    like the tiles; an inpainting mask also as ``known/hole`` (the finest pixels, 1 = regenerate),
    from which :func:`repair` writes the rest again. ``read_level(scale, box)`` reads the
    reference's level of a scale; ``hole`` is None to read ``known/hole`` back from the store."""
    region = job_plan.KnownRegion.from_manifest(store.manifest.get("known"))
    holes = None
    if region.kind == "masked":
        height, width = plan.pixel_reference_shapes[0]
        if hole is None:
            hole = torch.from_numpy(store.array("known/hole")[...] > 0)
        else:
            stored = store.create_array("known/hole", (height, width), (min(256, height), width), "uint8")
            stored[...] = hole.numpy().astype(np.uint8)
        holes = job_plan.known_holes(plan.config, hole, list(plan.pixel_reference_shapes))
    channels = plan.channels
    for scale, (height, width) in enumerate(plan.output_shapes):
        tile = (min(plan.tile, height), min(plan.tile, width))
        values = store.create_array(f"known/{scale}/values", (channels, height, width), (channels, *tile), "float32")
        mask = store.create_array(f"known/{scale}/mask", (1, height, width), (1, *tile), "uint8")
        for _, box in tile_boxes((height, width), plan.tile):
            known, held = job_plan.known_box(
                region, scale, partial(read_level, scale), channels, box, None if holes is None else holes[scale]
            )
            values[:, box[0] : box[2], box[1] : box[3]] = known.numpy()
            mask[:, box[0] : box[2], box[1] : box[3]] = held.numpy()


def _build_index(store: JobStore, config: JobConfig, scale: int) -> None:
    """Build scale ``scale``'s candidate index from the stored reference into ``index/<scale>``,
    beside a memory-mappable copy of the level its workers read."""
    dataset = store.manifest["dataset"]
    level = torch.from_numpy(store.array(f"{dataset}/{scale}")[...])
    job_plan.scale_denoiser(level, config, periodic=job_plan.wraps(config), index_dir=store.index_dir(scale),
                            excluded=tasks.excluded_cells(store, scale),
                            balance=JobPlan.from_manifest(store.manifest).usage_balance(scale))
    store.write_level_copy(dataset, scale)


def _ingest_structure(store: JobStore, structure) -> None:
    """An analogy's structure pyramid, ``structure/<level>`` at the manifest's shapes with the
    reference's channels, and from its last level the given coarsest scale, kept as
    ``structure/given`` (``plan.structure_coarsest``: encoded with the stored codec in a latent
    job, inverted and sampled back with the reference's coarsest denoiser, as the in-memory job)."""
    manifest = store.manifest
    plan = JobPlan.from_manifest(manifest)
    shapes = [tuple(s) for s in manifest["structure_shapes"]]
    ingest_pyramid(store, "structure", structure, lambda height, width: shapes,
                   channels=manifest["image_channels"])
    codec = None
    if plan.factor > 1:
        from gigasid.codecs import from_state

        codec = from_state(store.load_codec_state())
    coarsest = len(plan.output_shapes) - 1
    style = torch.from_numpy(store.array(f"{plan.dataset}/{coarsest}")[...])
    index_dir = store.index_dir(coarsest) if plan.config.denoiser.backend == "knn" else None
    denoiser = job_plan.scale_denoiser(style, plan.config, periodic=plan.periodic, index_dir=index_dir)
    level = torch.from_numpy(store.array(f"structure/{len(shapes) - 1}")[...])
    values = job_plan.structure_coarsest(level, codec, denoiser, plan.config).numpy()
    store.create_array("structure/given", values.shape, values.shape, "float32")[...] = values


def pixel_layout(config: JobConfig, seed: int, level: torch.Tensor, shape: tuple[int, int], codec) -> torch.Tensor:
    """A latent job's coarsest scale from the pixel-space sampler (``latent.layout=pixel``): the
    paper's sampler (``plan.layout_config``) run on ``level``, the reference's coarsest pixel
    level, to the output's coarsest grid ``shape`` times the codec's factor in pixels, then encoded
    with ``codec``. The same engine, on a store in memory, whole; deterministic for a seed, so
    that a store job, its repair and an in-memory job write the same values."""
    layout = job_plan.layout_config(config)
    levels = job_plan.reference_pyramid(level, layout)
    pixel_shapes = [tuple(int(v) for v in lvl.shape[-2:]) for lvl in levels]
    size = (shape[0] * codec.factor, shape[1] * codec.factor)
    periodic = job_plan.wraps(layout)
    denoisers = [job_plan.scale_denoiser(lvl, layout, periodic=periodic) for lvl in levels]
    channels = int(level.shape[0])
    plan = JobPlan.whole(
        layout, seed, size, channels=channels, image_channels=channels, factor=1, reference_shapes=pixel_shapes,
        pixel_reference_shapes=pixel_shapes, output_shapes=job_plan.output_shapes(pixel_shapes, size, layout),
    )
    sample = torch.from_numpy(run_in_memory(plan, denoisers).array("scales/0/final")[...])
    return job_plan.encode_level(codec, sample)


def _write_given_coarsest(store: JobStore) -> None:
    """The coarsest scale written at creation: retarget's, the coarsest reference level resized
    to the output's; analogy's, the values kept in ``structure/given``; a pixel layout's
    (:func:`pixel_layout`), sampled from the stored coarsest pixel level."""
    plan = JobPlan.from_manifest(store.manifest)
    coarsest = len(plan.output_shapes) - 1
    if plan.application.structure:
        values = torch.from_numpy(store.array("structure/given")[...])
    elif plan.application.text_guided:  # its kept state may be what was damaged: from the start
        store.update_manifest(style_steps=0)
        run_style(store)
        return
    elif job_plan.pixel_layout(plan.config):
        from gigasid.codecs import from_state

        level = torch.from_numpy(store.array(f"reference/{len(plan.pixel_reference_shapes) - 1}")[...])
        values = pixel_layout(plan.config, plan.seed, level, plan.output_shapes[-1],
                              from_state(store.load_codec_state()))
    else:
        level = torch.from_numpy(store.array(f"{plan.dataset}/{len(plan.reference_shapes) - 1}")[...])
        values = job_plan.given_coarsest(level, plan.output_shapes[-1], plan.periodic)
    store.array(f"scales/{coarsest}/final")[...] = values.numpy()


def run_in_memory(
    plan: JobPlan,
    denoisers: list,
    *,
    codec=None,
    pixel_reference: np.ndarray | None = None,
    given_coarsest: torch.Tensor | None = None,
    known: tuple | None = None,
) -> JobStore:
    """Run a job whose denoisers are built, in this process, on a store held in memory: one
    whole-image tile per scale and the synchronous executor. The same tasks as any store job;
    the output is float32 in [-1, 1] (``output``), beside every finished scale. ``known``: an
    output's known region, (``plan.KnownRegion``, the reference's levels, the inpainting hole)."""
    manifest = {**plan.manifest(), "version": __version__, "scales_done": [], "output_done": False,
                "status": "created", "timings": {}}
    if known is not None:
        manifest["known"] = known[0].manifest()
    store = JobStore.in_memory(manifest)
    create_buffers(store, plan, output_dtype="float32")
    if known is not None:
        levels = known[1]
        write_known(store, plan, lambda s, b: levels[s][:, b[0] : b[2], b[1] : b[3]], known[2])
    if given_coarsest is not None:
        coarsest = len(plan.output_shapes) - 1
        store.array(f"scales/{coarsest}/final")[...] = given_coarsest.numpy()
        store.update_manifest(scales_done=[coarsest])
    key = tasks.register_memory_job(tasks.MemoryJob(store, denoisers, codec, pixel_reference))
    try:
        with open_executor(Profile(kind="sync")) as executor:
            execute(store, executor, progress=Progress(quiet=True))
    finally:
        tasks.forget(key)
    return store


def _read_reference(store: JobStore):
    def read(level, box):
        return torch.from_numpy(store.array(f"reference/{level}")[:, box[0] : box[2], box[1] : box[3]])

    return read


def _encode_reference(store: JobStore, config: JobConfig, pixel_shapes, image_channels: int) -> int:
    """Fit the job's codec on the stored pixel pyramid, keep it in the store, and write the
    latents of every level (``latent/<s>``); returns the latent channels."""
    codec = job_plan.build_codec(config, _read_reference(store), pixel_shapes, image_channels)
    store.save_codec(codec.state())
    _write_latents(store, codec, pixel_shapes, range(len(pixel_shapes)))
    return codec.channels


def _write_latents(store: JobStore, codec, pixel_shapes, scales) -> None:
    """``latent/<s>`` of the given levels, encoded band by band and written a whole chunk (256
    latent rows) at a time: a write never reads back a chunk (nor finds a damaged one)."""
    from gigasid.codecs import encode_bands

    read = _read_reference(store)
    for scale in scales:
        shape = pixel_shapes[scale]
        rows, cols = latent_shape(*shape, codec.factor)
        latents = store.create_array(
            f"latent/{scale}", (codec.channels, rows, cols), (codec.channels, min(rows, 256), cols), "float32"
        )
        step = latents.chunks[1]
        pending, top = [], 0
        for _, band in encode_bands(codec, lambda b, scale=scale: read(scale, b), shape):
            pending.append(band.numpy())
            filled = sum(piece.shape[1] for piece in pending)
            if filled >= step or top + filled == rows:
                block = np.concatenate(pending, axis=1)
                latents[:, top : top + block.shape[1]] = block
                pending, top = [], top + block.shape[1]


def plan_text(store: JobStore) -> str:
    """What the job will do and roughly what it costs, before it starts."""
    manifest = store.manifest
    plan = JobPlan.from_manifest(manifest)
    config = plan.config
    tile, steps, channels = manifest["tile"], config.num_steps, manifest["channels"]
    unit = "px" if manifest.get("factor", 1) == 1 else f"latent cells ({manifest['factor']} px each)"
    lines = [f"plan: {len(manifest['output_shapes'])} scales x {steps} steps, tile {tile} {unit}, halo {manifest['halo']}"]
    if config.latent.codec != "pixel":
        lines.append(f"  latent space: {config.latent.codec}, {channels} channels, decode: {config.latent.decode}")
    if config.denoiser.backend == "knn" and config.index.kind == "auto":
        from gigasid.index.search import auto_thresholds

        lines.append(f"  {auto_thresholds()}")
    pixel_steps = 0.0
    coarsest = len(manifest["output_shapes"]) - 1
    balanced = plan.usage_balance(coarsest) is not None
    for scale, (height, width) in enumerate(manifest["output_shapes"]):
        count = len(tile_boxes((height, width), tile))
        note = f", usage-balanced ({config.balance.k} candidates)" if balanced and scale == coarsest else ""
        lines.append(f"  scale {scale}: {height}x{width}, {count} tile(s) x {steps + 1} stages{note}")
        pixel_steps += height * width * steps
    disk = disk_estimate(manifest, channels, manifest.get("image_channels", channels))
    # rough rates measured on a 2-core CPU (bench/scaling.py): knn ~0.13 Mpx·step/s, exact far slower
    rate = 1.3e5 if config.denoiser.backend == "knn" else 2.0e3
    memory = task_memory(manifest)
    lines.append(
        f"  estimate: about {_duration(pixel_steps / rate)} on 2 cores, {disk / 2**30:.2f} GiB on disk, "
        f"{memory / 2**20:.0f} MiB per task plus the reference index"
    )
    return "\n".join(lines)


def task_memory(manifest: dict, channels: int | None = None) -> int:
    """Rough peak bytes of one tile task: ~40 float32 planes of the tile with its halo."""
    side = manifest["tile"] + 2 * manifest["halo"]
    return 40 * (channels or manifest["channels"]) * side * side * 4 + 64 * 2**20


def check_memory(manifest: dict, config: JobConfig, channels: int, profile: Profile, *, what: str) -> None:
    """Refuse a job whose tasks, run ``profile``'s way on this machine, would need more memory
    than is available: the tasks in flight at once, plus one scale's reference index per process
    that holds one. A ``cluster`` runs elsewhere: not checked."""
    from gigasid.limits import available_memory, working_set

    if profile.kind == "cluster":
        return
    parallel = 1 if profile.kind == "sync" else (profile.workers or os.cpu_count() or 1)
    height, width = manifest["reference_shapes"][0]
    index = working_set((height, width, channels), None, config)
    holders = 1 if profile.kind == "threads" else parallel  # the index is cached once per process
    needed, free = parallel * task_memory(manifest, channels) + holders * index, available_memory()
    if needed > free:
        raise InputError(
            f"{what}: {parallel} task(s) at once ({profile.kind}) need about {needed / 2**30:.1f} GiB of "
            f"memory and {free / 2**30:.1f} GiB is available; use a smaller --tile, a profile with fewer "
            "workers, or pass --force to start anyway"
        )


def disk_estimate(manifest: dict, channels: int, image_channels: int) -> int:
    """Bytes a job's store holds at most, before compression: the float32 reference pyramid, three
    float32 buffers per scale (x0, x1, final) and the uint8 output."""
    reference = sum(h * w for h, w in manifest["pixel_reference_shapes"] + manifest.get("structure_shapes", []))
    reference *= image_channels * 4
    buffers = sum(3 * channels * h * w * 4 for h, w in manifest["output_shapes"])
    height, width = manifest["size"]
    return reference + buffers + image_channels * height * width


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """One line per scale (and the output), refreshed at most once a second: tile steps done, rate, ETA."""

    line_open = False  # is a progress line waiting for its carriage return to be overwritten?

    def __init__(self, stream=None, *, quiet: bool = False):
        self.stream = stream if stream is not None else sys.stderr  # the stderr of now, not of import
        self.quiet = quiet

    def start(self, label: str, total: int, done: int) -> None:
        self.label, self.total, self.done = label, total, done
        self.started = self.last = time.perf_counter()
        self.first = done
        self._print(final=False)

    def tick(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= 1.0 or self.done == self.total:
            self.last = now
            self._print(final=self.done == self.total)

    def _print(self, *, final: bool) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.nan
        eta_text = "" if final or math.isnan(eta) else f", ETA {_duration(eta)}"
        end = "\n" if final else "\r"
        self.stream.write(f"  {self.label}: {self.done}/{self.total} tile steps, {rate:.1f} tiles/s{eta_text}   {end}")
        self.stream.flush()
        Progress.line_open = not final  # a message printed now starts on a new line (cli)


def execute(store: JobStore, profile, *, progress: Progress | None = None) -> None:
    """Run (or continue) every tile step not yet done, then the pixel output.

    ``profile`` is a :class:`Profile`, a ``distributed.Client`` (left open) or an open executor
    (``graph.profiles``). Each scale is one task graph (:func:`scale_graph`), coarsest first; the
    output's tiles are one more."""
    progress = progress or Progress()
    if hasattr(profile, "run_graph"):
        _execute(store, profile, progress)
        return
    with open_executor(profile) as executor:
        _execute(store, executor, progress)


def _execute(store: JobStore, executor, progress: Progress) -> None:
    path = str(store.path)
    manifest = store.update_manifest(status="running")
    tasks.forget(path, keep_memory_job=True)  # nothing cached from an earlier job at this path
    plan = tasks.plan_of(path)
    steps = plan.config.num_steps
    for scale in reversed(range(len(plan.output_shapes))):
        if scale in store.manifest["scales_done"]:
            continue
        if plan.application.text_guided:  # one scale, stepped whole (CLIP sees the whole image)
            run_style(store, progress)
            continue
        started = time.perf_counter()
        computing = [0.0]
        done = store.array(f"scales/{scale}/done")
        boxes = tile_boxes(plan.output_shapes[scale], plan.tile)
        where = {box: ij for ij, box in boxes}
        grid = done[...]
        graph = scale_graph(path, scale, boxes, grid)
        progress.start(f"scale {scale} ({steps + 1} stages)", grid.size, grid.size - len(graph))

        def finished(result, done=done, computing=computing, where=where):
            i, j = where[result.box]
            computing[0] += result.seconds
            done[result.stage, i, j] = 1  # after the chunk is written: durable before counted
            progress.tick()

        if graph:
            executor.run_graph(graph, finished, parallel=len(boxes))
        timings = store.manifest["timings"]
        timings[str(scale)] = timings.get(str(scale), 0.0) + time.perf_counter() - started
        compute = store.manifest.get("compute_seconds", {})
        compute[str(scale)] = compute.get(str(scale), 0.0) + computing[0]
        store.update_manifest(
            scales_done=store.manifest["scales_done"] + [scale], timings=timings, compute_seconds=compute
        )
    if not store.manifest["output_done"]:
        done = store.array("output_done")
        boxes = tile_boxes(store.array("output").shape[1:], manifest["output_tile"])
        where = {box: ij for ij, box in boxes}
        grid = done[...]
        graph = {f"output-{i}-{j}": (partial(tasks.write_output_tile, path, box, manifest.get("job_id")), [])
                 for (i, j), box in boxes if not grid[i, j]}
        progress.start("output", len(boxes), len(boxes) - len(graph))

        def written(result):
            i, j = where[result.box]
            done[i, j] = 1
            progress.tick()

        started = time.perf_counter()
        if graph:
            executor.run_graph(graph, written, parallel=len(boxes))
        timings = store.manifest["timings"]
        timings["output"] = timings.get("output", 0.0) + time.perf_counter() - started
        store.update_manifest(output_done=True, timings=timings)
    store.update_manifest(status="complete")


def scale_graph(path: str, scale: int, boxes, done: np.ndarray) -> dict[str, tuple]:
    """The tile steps of one scale not yet ``done``, as a task graph: key → (task, keys it waits on).

    Step k of tile (i, j) waits on step k - 1 of every tile whose core it reads (its halo, and the
    mirror images' boxes of a symmetric output), and — because steps k - 1 and k + 1 write the
    same ping-pong buffer — on step k - 1 of every tile that reads its core, so no tile overwrites
    values a neighbour has still to read. No barrier between steps: a tile runs as soon as its
    neighbourhood is ready. Done steps are not in the graph (what they wrote is durable)."""
    stepper = tasks.scale_stepper(path, scale)
    job = tasks.open_store(path).manifest.get("job_id")
    steps = stepper.num_steps
    shape = stepper.shape
    tile_rows, tile_cols = tile_ranges(shape[0], _side(boxes, 0)), tile_ranges(shape[1], _side(boxes, 1))

    def read_tiles(box, t) -> set[tuple[int, int]]:
        found = set()
        for r0, c0, r1, c1 in stepper.reads(box, t):
            rows = _tiles_over((r0, r1), tile_rows, shape[0])
            cols = _tiles_over((c0, c1), tile_cols, shape[1])
            found.update((i, j) for i in rows for j in cols)
        return found

    # what each tile reads, for the two kinds of step (with and without the blend)
    def kind(t):  # the last step does not blend; every other step reads alike
        return 1 if t == 1 else min(2, steps)

    reads = {t: {ij: read_tiles(box, t) for ij, box in boxes} for t in {1, min(2, steps)}}
    readers = {t: {} for t in reads}
    for t, table in reads.items():
        for ij, sources in table.items():
            for source in sources:
                readers[t].setdefault(source, set()).add(ij)

    def key(stage, ij):
        return f"s{scale}-k{stage}-{ij[0]}-{ij[1]}"

    def pending(stage, ij):
        return not done[stage, ij[0], ij[1]]

    graph = {}
    for ij, box in boxes:
        for stage in range(steps + 1):
            if not pending(stage, ij):
                continue
            waits = set()
            if stage >= 1:
                t = steps - stage + 1
                waits = {ij} | reads[kind(t)][ij]
            if stage >= 2:  # the previous step's readers of this core (they read what this overwrites)
                waits |= readers[kind(t + 1)].get(ij, set())
            deps = [key(stage - 1, n) for n in sorted(waits) if pending(stage - 1, n)]
            graph[key(stage, ij)] = (partial(tasks.run_tile, path, scale, stage, box, job), deps)
    return graph


def _side(boxes, axis: int) -> int:
    """The tile side along an axis (the first tile's; only the last one is shorter)."""
    first = boxes[0][1]
    return first[axis + 2] - first[axis]


def _tiles_over(span: tuple[int, int], ranges: list[tuple[int, int]], length: int) -> set[int]:
    """Indices of the tile ranges a (possibly wrapping, unwrapped) span overlaps."""
    lo, hi = span
    if hi - lo >= length:
        return set(range(len(ranges)))
    side = ranges[0][1] - ranges[0][0]
    found = set()
    for start, stop in ((lo, hi),) if 0 <= lo and hi <= length else _wrapped(lo, hi, length):
        found.update(range(start // side, (stop - 1) // side + 1))
    return found


def _wrapped(lo: int, hi: int, length: int):
    """A span of an unwrapped periodic axis as pieces inside [0, length)."""
    position = lo
    while position < hi:
        start = position % length
        stop = min(length, start + (hi - position))
        yield start, stop
        position += stop - start


def resume(path: str | Path, profile: Profile, *, progress: Progress | None = None, log=None) -> JobStore:
    """Continue a stopped job from what is durable in its store.

    Every chunk the done-grids claim is read back first (``check_store``); damaged ones are marked
    not done (:func:`repair`) and recomputed, so the result is the undamaged run's, bit for bit. A
    finished, undamaged store is only read: it needs no lock (and may be read-only).
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    store = JobStore.open(path)
    if _finished(store.manifest) and check_store(store).ok:
        return store
    store.acquire_lock()
    try:
        removed = store.clean_partials()
        if removed:
            log(f"removed {removed} unfinished chunk file(s) left by the stopped run")
        report = check_store(store)
        log(f"checked {report.checked} chunk(s): {'no damage' if report.ok else f'{len(report.damaged)} damaged'}")
        if not report.ok:
            repair(store, report, log=log)
        execute(store, profile, progress=progress)
    finally:
        store.release_lock()
    _rebuild_pyramid(store)
    return store


def _rebuild_indexes(store: JobStore, scales: list[int], log) -> dict:
    """Build the damaged scales' indexes again from the reference, as ``create_job`` did; the
    manifest's checksums of the result (returned). The FAISS build is seeded: the same file."""
    config = JobPlan.from_manifest(store.manifest).config
    manifest = store.manifest
    sums = dict(manifest["index_checksums"])
    for scale in scales:
        folder = store.index_dir(scale)
        shutil.rmtree(folder, ignore_errors=True)
        _build_index(store, config, scale)
        fresh = file_checksums(folder)
        if fresh.get("index.bin") != sums[str(scale)].get("index.bin"):
            log(f"scale {scale}: the rebuilt index differs from the original one: tiles computed from now on "
                "may differ from an undamaged run's")
        sums[str(scale)] = fresh
        log(f"scale {scale}: index rebuilt")
    return sums


def _finished(manifest: dict) -> bool:
    pyramid = manifest.get("output_pyramid")
    pyramid_done = not pyramid or pyramid.get("levels_done") == len(pyramid.get("shapes", []))
    return manifest.get("status") == "complete" and bool(manifest.get("output_done")) and pyramid_done


def _rebuild_pyramid(store: JobStore) -> None:
    """An output pyramid an export had built, and that :func:`repair` cut back, is built again."""
    pyramid = store.manifest.get("output_pyramid")
    if pyramid and pyramid.get("levels_done") != len(pyramid.get("shapes", [])):
        from gigasid.io.output_pyramid import ensure_output_pyramid

        ensure_output_pyramid(store)


def repair(store: JobStore, report: CheckReport, *, log=None) -> None:
    """Mark what ``report`` found damaged as not done, so that :func:`execute` recomputes it.

    A damaged chunk a stage wrote: that stage of that tile again. Damage in what a stage reads
    (the previous stage's buffer) or in a done-grid: the whole scale again (its earlier values
    are overwritten by then). The output's tiles and pyramid levels likewise. Sampling is a
    function of (seed, position), so the recomputed chunks are the lost ones, bit for bit. A
    damaged index is rebuilt from the reference, damaged latents are encoded again with the stored
    codec, a damaged reference (or an analogy's structure pyramid) is read again from its image if
    that is still there unchanged; anything else (the codec, the reference without its source)
    raises instead.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    if report.fatal:
        raise report.error()
    manifest = store.manifest
    # the inputs first: what the scales are recomputed from
    if report.reference:
        source = source_available(manifest)
        hole = None
        if (manifest.get("known") or {}).get("kind") == "masked":  # inpaint: the known pixels' pyramid
            hole = torch.from_numpy(store.array("known/hole")[...] > 0)
        ingest_reference(store, source, JobPlan.from_manifest(store.manifest).config, hole=hole)
        log(f"reference: read again from {source}")
    if report.structure:
        source = source_available(manifest, "structure_file")
        _ingest_structure(store, source)
        log(f"structure: read again from {source}")
    if report.latents:
        from gigasid.codecs import from_state

        pixel_shapes = [tuple(s) for s in manifest["pixel_reference_shapes"]]
        _write_latents(store, from_state(store.load_codec_state()), pixel_shapes, sorted(report.latents))
        log(f"latents: encoded level(s) {', '.join(map(str, sorted(report.latents)))} again")
    if report.known:  # from the (now intact) reference levels and the stored inpainting mask
        write_known(store, JobPlan.from_manifest(store.manifest), _read_dataset(store))
        log("known region: written again from the reference")
    if report.indexes:
        store.update_manifest(index_checksums=_rebuild_indexes(store, sorted(report.indexes), log))
    scales_done = list(manifest["scales_done"])
    for scale, damage in sorted(report.scales.items()):
        done = store.array(f"scales/{scale}/done")
        if damage.given:
            _write_given_coarsest(store)
            log(f"scale {scale}: rewrote its given coarsest values")
            continue
        if damage.restart:
            done[...] = 0  # whole-array write: a damaged done-grid chunk is never read
            what = "its done-grid" if damage.grid else f"the values its stage {damage.stage} reads"
            log(f"scale {scale}: {what} damaged: recomputing the whole scale")
        else:
            for i, j in sorted(damage.tiles):
                done[damage.stage, i, j] = 0
            log(f"scale {scale}: recomputing {len(damage.tiles)} tile(s) of stage {damage.stage}")
        if scale in scales_done:
            scales_done.remove(scale)
    changes = {"scales_done": scales_done}
    if report.output_grid or report.output_tiles:
        done = store.array("output_done")
        if report.output_grid:
            done[...] = 0
        for i, j in sorted(report.output_tiles):
            done[i, j] = 0
        changes["output_done"] = False
        log(f"output: recomputing {'every tile' if report.output_grid else f'{len(report.output_tiles)} tile(s)'}")
    if report.pyramid_levels_ok is not None:
        changes["output_pyramid"] = {**manifest["output_pyramid"], "levels_done": report.pyramid_levels_ok}
        log(f"output pyramid: rebuilding from level {report.pyramid_levels_ok + 1}")
    if changes.get("output_done") is False or scales_done != manifest["scales_done"]:
        changes["status"] = "repairing"
    store.update_manifest(**changes)


def read_output(store: JobStore) -> np.ndarray:
    """The finished uint8 image (C, H, W)."""
    if store.manifest.get("status") != "complete":
        raise InputError(f"{store.path} is not finished (status {store.manifest.get('status')}); run `gigasid resume`")
    return store.array("output")[...]
