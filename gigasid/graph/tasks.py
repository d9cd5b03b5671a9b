"""What a worker runs: one tile of one stage, reading and writing the job store by key.

Tasks carry the store's key (its path) and a tile box, never arrays or the index (DESIGN.md §4.4).
Each worker process opens a scale's stepper — the mapped reference level, the index (read, or
mapped when large) — once and keeps it (:func:`scale_stepper`). A task writes only its own chunk,
so running it twice is harmless.

An in-memory job (``jobs.run``) is a store on a zarr ``MemoryStore`` whose denoisers and codec are
already built: :func:`register_memory_job` makes them known under the store's key in this process,
where the synchronous executor runs its tasks; :func:`forget` drops them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from gigasid import plan as job_plan
from gigasid.codecs import Codec, decode_box
from gigasid.codecs import from_state as codec_from_state
from gigasid.codecs.correspondence import pad_reference, query_span
from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.noise_schedule import make_noise_schedule
from gigasid.io.store import JobStore, read_box, stage_buffers
from gigasid.plan import JobPlan
from gigasid.tiling.step import ScaleStepper

Box = tuple[int, int, int, int]


@dataclass
class TileResult:
    """What a finished task reports to the driver."""

    scale: int  # -1 for an output tile
    stage: int
    box: Box
    seconds: float  # spent computing (the rest of the task's time is reading, writing, scheduling)


@dataclass
class MemoryJob:
    """What an in-memory job brings instead of building it from the store."""

    store: JobStore
    denoisers: list[ImageDenoiser]
    codec: Codec | None = None
    pixel_reference: np.ndarray | None = None  # the finest pixel level (correspondence decode, text style)


_MEMORY: dict[str, MemoryJob] = {}
_CACHE: OrderedDict = OrderedDict()  # (what, key, ...) → opened store / stepper / codec / reference
_CACHE_SIZE = 24
_LOCK = threading.Lock()
_BUILDING: dict[tuple, threading.Lock] = {}  # entry → held while one thread builds it


def register_memory_job(job: MemoryJob) -> str:
    key = str(job.store.path)
    _MEMORY[key] = job
    return key


def forget(key: str, *, keep_memory_job: bool = False) -> None:
    """Drop what this process holds for a store (cached steppers, its in-memory job)."""
    if not keep_memory_job:
        _MEMORY.pop(key, None)
    with _LOCK:
        for entry in [entry for entry in _CACHE if entry[1] == key]:
            del _CACHE[entry]


def _cached(entry: tuple, build):
    """``build()``'s value, made once per process: a thread that asks while another builds the
    same entry waits for it (two output tiles would otherwise both read the whole reference)."""
    with _LOCK:
        if entry in _CACHE:
            _CACHE.move_to_end(entry)
            return _CACHE[entry]
        building = _BUILDING.setdefault(entry, threading.Lock())
    with building:
        with _LOCK:
            if entry in _CACHE:
                _CACHE.move_to_end(entry)
                return _CACHE[entry]
        try:
            value = build()
        except BaseException:
            with _LOCK:
                _BUILDING.pop(entry, None)
            raise
        with _LOCK:
            _CACHE[entry] = value
            _BUILDING.pop(entry, None)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return value


_JOBS: dict[str, str] = {}  # path → the job whose cached values this process holds for it


def _same_job(path: str, job: str | None) -> None:
    """Drop what this process cached for ``path`` when the store there is another job now (one
    removed and created again at the same path, on workers that outlive jobs: a cluster, the
    Python API's client) — else a cached stepper would sample with the old job's seed or index."""
    if job is None:
        return
    with _LOCK:
        same = _JOBS.get(path) == job
    if not same:
        forget(path, keep_memory_job=True)
        with _LOCK:
            _JOBS[path] = job


def open_store(path: str) -> JobStore:
    memory = _MEMORY.get(path)
    if memory is not None:
        return memory.store
    return _cached(("store", path), lambda: JobStore.open(path))


def plan_of(path: str) -> JobPlan:
    return _cached(("plan", path), lambda: JobPlan.from_manifest(open_store(path).manifest))


def scale_stepper(path: str, scale: int) -> ScaleStepper:
    """The scale's stepper, built once per worker process from what the store holds."""
    return _cached(("stepper", path, scale), lambda: _build_stepper(path, scale))


def _build_stepper(path: str, scale: int) -> ScaleStepper:
    plan = plan_of(path)
    config = plan.config
    memory = _MEMORY.get(path)
    if memory is not None:
        denoiser = memory.denoisers[scale]
    else:
        store = open_store(path)
        level = torch.from_numpy(store.mapped_level(plan.dataset, scale))
        denoiser = job_plan.scale_denoiser(level, config, periodic=plan.periodic, index_dir=store.index_dir(scale),
                                           excluded=excluded_cells(store, scale), balance=plan.usage_balance(scale))
    shapes = plan.output_shapes
    alphas, sigmas = make_noise_schedule(config.noise_schedule, config.num_steps)
    return ScaleStepper(
        denoiser=denoiser,
        shape=shapes[scale],
        coarser_shape=shapes[scale + 1] if scale + 1 < len(shapes) else None,
        alphas=alphas,
        sigmas=sigmas,
        eta=config.eta,
        seed=plan.seed,
        scale=scale,
        channels=plan.channels,
        periodic=plan.periodic,
        search_stride=job_plan.search_stride(config),
        symmetry=job_plan.symmetry(config),
    )


def excluded_cells(store: JobStore, scale: int) -> torch.Tensor | None:
    """The cells of a scale's reference grid whose patches are no candidates: inpaint's hole (the
    reference's grid is the output's), or the gaps between several references; None otherwise."""
    manifest = store.manifest
    if manifest.get("excluded_cells"):  # several references: the gaps between them
        return torch.from_numpy(store.array(f"excluded/{scale}")[...] > 0)
    known = manifest.get("known")
    if not known or known["kind"] != "masked":
        return None
    return torch.from_numpy(store.array(f"known/{scale}/mask")[0] == 0)


def run_tile(path: str, scale: int, stage: int, box: Box, job: str | None = None) -> TileResult:
    """Compute one tile of one stage and write its chunk (``job``: the store's job id)."""
    _same_job(path, job)
    store = open_store(path)
    stepper = scale_stepper(path, scale)
    num_steps = stepper.num_steps
    read, write = stage_buffers(scale, stage, num_steps)
    r0, c0, r1, c1 = box
    known = _known(path, store, scale, box)
    started = time.perf_counter()
    if stage == 0:
        values = stepper.initial(box, known)
    else:
        t = num_steps - stage + 1
        source = store.array(read)
        x_reads = [torch.from_numpy(_read_x(path, scale, stage - 1, source, b, stepper)) for b in stepper.reads(box, t)]
        coarse = None
        coarse_box = stepper.plan(box, t).coarse_box
        if coarse_box is not None:
            coarser = store.array(f"scales/{scale + 1}/final")
            coarse = torch.from_numpy(read_box(coarser, coarse_box, periodic=stepper.periodic))
        started = time.perf_counter()
        values = stepper.step(box, t, x_reads[0], coarse, x_reads[1:], known)
        if t == 1 and scale == 0 and store.has("scales/0/matches"):
            _write_matches(store, stepper, box, x_reads[0])
    computing = time.perf_counter() - started
    values = values.numpy()
    store.array(write)[:, r0:r1, c0:c1] = values
    with _LOCK:
        _CACHE[("written", path)] = (scale, stage, box, values)  # one array a job: the latest
    return TileResult(scale, stage, box, computing)


def _read_x(path: str, scale: int, stage: int, source, box: Box, stepper: ScaleStepper) -> np.ndarray:
    """x over ``box`` as stage ``stage`` wrote it: the values this process last wrote when they are
    that stage's whole box (a one-tile scale reads back exactly what its previous step wrote, so
    the read is skipped), else read from the store. Both are the same bits — the sampler is
    deterministic and its buffers are stored losslessly — and the step does not write into its
    reads."""
    with _LOCK:
        written = _CACHE.get(("written", path))
    if written is not None and written[:3] == (scale, stage, box):
        return written[3]
    return read_box(source, box, periodic=stepper.periodic)


def known_region(path: str) -> job_plan.KnownRegion | None:
    """The job's known region (outpaint, inpaint), read once per worker."""
    return _cached(("known", path), lambda: job_plan.KnownRegion.from_manifest(open_store(path).manifest.get("known")))


def _known(path: str, store: JobStore, scale: int, box: Box):
    """The known values and mask over a core (outpaint, inpaint), or None."""
    if known_region(path) is None:
        return None
    r0, c0, r1, c1 = box
    values = torch.from_numpy(store.array(f"known/{scale}/values")[:, r0:r1, c0:c1])
    return values, torch.from_numpy(store.array(f"known/{scale}/mask")[:, r0:r1, c0:c1])


def _write_matches(store: JobStore, stepper: ScaleStepper, box: Box, x_read: torch.Tensor) -> None:
    """The last step's candidates and weights of the queries whose patches start in the core."""
    found = stepper.matches(box, x_read)
    if found is None:
        return
    (r0, c0, r1, c1), positions, weights = found
    store.array("scales/0/matches")[r0:r1, c0:c1] = positions.numpy().astype("int32")
    store.array("scales/0/weights")[r0:r1, c0:c1] = weights.numpy()


def write_output_tile(path: str, box: Box, job: str | None = None) -> TileResult:
    """One chunk of the pixel output: the finest scale's values in pixel jobs; in latent jobs the
    correspondence decode of the last step's matches, or the codec's decoder. uint8, except in an
    in-memory job's float32 output (the caller converts)."""
    _same_job(path, job)
    store = open_store(path)
    plan = plan_of(path)
    r0, c0, r1, c1 = box
    if plan.factor == 1:
        pixels = store.array("scales/0/final")[:, r0:r1, c0:c1]
    elif plan.correspondence:
        pixels = _correspondence_tile(path, store, plan, box)
    else:
        codec = _codec(path)
        final = store.array("scales/0/final")
        pixels = decode_box(
            codec, lambda b: torch.from_numpy(final[:, b[0] : b[2], b[1] : b[3]]), final.shape[1:], box
        ).numpy()
    region = known_region(path)
    if region is not None and plan.factor > 1:  # the codec is not lossless: the known pixels pasted back
        pixels = job_plan.paste_known(
            torch.as_tensor(np.asarray(pixels, dtype=np.float32)), box, region,
            lambda b: torch.from_numpy(np.asarray(_reference_pixels(path, b), dtype=np.float32)),
            lambda b: torch.from_numpy(store.array("known/hole")[b[0] : b[2], b[1] : b[3]] > 0),
        ).numpy()
    output = store.array("output")
    output[:, r0:r1, c0:c1] = pixels if output.dtype == np.float32 else job_plan.to_pixels(pixels)
    return TileResult(-1, -1, box, 0.0)


def _codec(path: str) -> Codec:
    memory = _MEMORY.get(path)
    if memory is not None:
        return memory.codec
    return _cached(("codec", path), lambda: codec_from_state(open_store(path).load_codec_state()))


def _finest_reference(path: str, factor: int) -> np.ndarray:
    """The reference's finest pixels, read and padded once per worker (the correspondence
    decode's source)."""
    return _cached(("reference", path), lambda: pad_reference(finest_reference(path), factor))


def finest_reference(path: str) -> np.ndarray:
    """The reference's finest pixels, whole (model space): the correspondence decode's source, text
    style's input."""
    memory = _MEMORY.get(path)
    return memory.pixel_reference if memory is not None else open_store(path).array("reference/0")[...]


def _reference_pixels(path: str, box: Box) -> np.ndarray:
    """The reference's finest pixels over a box (model space)."""
    memory = _MEMORY.get(path)
    if memory is not None:
        return memory.pixel_reference[:, box[0] : box[2], box[1] : box[3]]
    return open_store(path).array("reference/0")[:, box[0] : box[2], box[1] : box[3]]


def _correspondence_tile(path: str, store: JobStore, plan: JobPlan, box: Box) -> np.ndarray:
    config, factor, periodic = plan.config, plan.factor, plan.periodic
    matches, weights = store.array("scales/0/matches"), store.array("scales/0/weights")
    grid_h, grid_w = matches.shape[:2]
    q_r0, q_r1 = query_span((box[0], box[2]), factor, config.patch_size, grid_h, periodic=periodic[0])
    q_c0, q_c1 = query_span((box[1], box[3]), factor, config.patch_size, grid_w, periodic=periodic[1])
    if any(periodic):
        rows = np.arange(q_r0, q_r1) % grid_h if periodic[0] else slice(q_r0, q_r1)
        cols = np.arange(q_c0, q_c1) % grid_w if periodic[1] else slice(q_c0, q_c1)
        positions, found = matches.oindex[rows, cols], weights.oindex[rows, cols]
    else:
        positions, found = matches[q_r0:q_r1, q_c0:q_c1], weights[q_r0:q_r1, q_c0:q_c1]
    return job_plan.correspondence_decode(
        config, _finest_reference(path, factor), plan.reference_shapes[0], plan.output_shapes[0],
        positions, found, box=box, query_origin=(q_r0, q_c0),
    )
