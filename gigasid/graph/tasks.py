"""What a worker runs: one tile of one stage, reading and writing the job store by path.

Tasks carry the store's path and a tile box, never arrays or the index (DESIGN.md §4.4). Each
worker process opens a scale's denoiser — reference level, memory-mapped index — once and keeps
it (:func:`scale_stepper`). A task writes only its own chunk, so running it twice is harmless.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch

from gigasid import jobs
from gigasid.codecs import decode_box
from gigasid.codecs import from_state as codec_from_state
from gigasid.config import JobConfig, from_mapping
from gigasid.core.noise_schedule import make_noise_schedule
from gigasid.io.store import JobStore, read_box, stage_buffers
from gigasid.tiling.tile_step import ScaleStepper

Box = tuple[int, int, int, int]


@lru_cache(maxsize=8)
def open_store(path: str) -> JobStore:
    return JobStore.open(path)


def job_config(store: JobStore) -> JobConfig:
    return from_mapping(JobConfig, store.manifest["config"])


@lru_cache(maxsize=16)
def scale_stepper(path: str, scale: int) -> ScaleStepper:
    """The scale's stepper, built once per worker process from what the store holds."""
    store = open_store(path)
    manifest = store.manifest
    config = job_config(store)
    periodic = config.application == "tileable"
    level = torch.from_numpy(store.array(f"{manifest.get('dataset', 'reference')}/{scale}")[...])
    denoiser = jobs.scale_denoiser(level, config, periodic=periodic, index_dir=store.index_dir(scale))
    shapes = [tuple(s) for s in manifest["output_shapes"]]
    alphas, sigmas = make_noise_schedule(config.noise_schedule, config.num_steps)
    return ScaleStepper(
        denoiser=denoiser,
        shape=shapes[scale],
        coarser_shape=shapes[scale + 1] if scale + 1 < len(shapes) else None,
        alphas=alphas,
        sigmas=sigmas,
        eta=config.eta,
        seed=manifest["seed"],
        scale=scale,
        channels=manifest["channels"],
        periodic=periodic,
        search_stride=config.index.search_stride if config.denoiser.backend == "knn" else 1,
    )


def run_tile(path: str, scale: int, stage: int, box: Box) -> tuple[int, int, Box, float]:
    """Compute one tile of one stage and write its chunk; returns its identity and the seconds
    spent computing (the rest of the task's time is reading, writing and scheduling)."""
    store = open_store(path)
    stepper = scale_stepper(path, scale)
    num_steps = len(stepper.alphas) - 1
    read, write = stage_buffers(scale, stage, num_steps)
    r0, c0, r1, c1 = box
    started = time.perf_counter()
    if stage == 0:
        values = stepper.initial(box)
    else:
        t = num_steps - stage + 1
        plan = stepper.plan(box, t)
        x_read = torch.from_numpy(read_box(store.array(read), plan.read_box, periodic=stepper.periodic))
        coarse = None
        if plan.coarse_box is not None:
            coarser = store.array(f"scales/{scale + 1}/final")
            coarse = torch.from_numpy(read_box(coarser, plan.coarse_box, periodic=stepper.periodic))
        started = time.perf_counter()
        values = stepper.step(box, t, x_read, coarse)
        if t == 1 and scale == 0 and store.has("scales/0/matches"):
            _write_matches(store, stepper, plan, box, x_read)
    computing = time.perf_counter() - started
    store.array(write)[:, r0:r1, c0:c1] = values.numpy()
    return scale, stage, box, computing


def _write_matches(store: JobStore, stepper: ScaleStepper, plan, box: Box, x_read: torch.Tensor) -> None:
    """The last step's candidates and weights of the queries whose patches start in the core."""
    matches, weights = store.array("scales/0/matches"), store.array("scales/0/weights")
    grid_h, grid_w = matches.shape[:2]
    rr0, rc0 = plan.read_box[:2]
    positions, found = stepper.denoiser.matches(
        x_read, float(stepper.alphas[1]), float(stepper.sigmas[1]), step=1, origin=(rr0, rc0),
        global_grid=(grid_h, grid_w),
    )
    r0, c0, r1, c1 = box[0], box[1], min(box[2], grid_h), min(box[3], grid_w)
    if r1 <= r0 or c1 <= c0:  # a core below or right of the last patch: no query starts here
        return
    cut = (slice(r0 - rr0, r1 - rr0), slice(c0 - rc0, c1 - rc0))
    matches[r0:r1, c0:c1] = positions[cut].numpy().astype("int32")
    weights[r0:r1, c0:c1] = found[cut].numpy()


def write_output_tile(path: str, box: Box) -> tuple[int, int, Box, float]:
    """One chunk of the uint8 pixel output: the finest scale's values in pixel jobs; in latent
    jobs the correspondence decode of the last step's matches, or the codec's decoder."""
    store = open_store(path)
    manifest = store.manifest
    r0, c0, r1, c1 = box
    if manifest.get("factor", 1) == 1:
        pixels = store.array("scales/0/final")[:, r0:r1, c0:c1]
    elif store.has("scales/0/matches"):
        pixels = _correspondence_tile(store, box)
    else:
        codec = store_codec(path)
        final = store.array("scales/0/final")
        pixels = decode_box(
            codec, lambda b: torch.from_numpy(final[:, b[0] : b[2], b[1] : b[3]]), final.shape[1:], box
        ).numpy()
    store.array("output")[:, r0:r1, c0:c1] = jobs.to_pixels(pixels)
    return -1, -1, box, 0.0


@lru_cache(maxsize=4)
def store_codec(path: str):
    return codec_from_state(open_store(path).load_codec_state())


@lru_cache(maxsize=4)
def finest_reference(path: str):
    """The reference's finest pixels, read and padded once per worker (the correspondence
    decode's source)."""
    from gigasid.codecs.correspondence import pad_reference

    store = open_store(path)
    return pad_reference(store.array("reference/0")[...], store.manifest["factor"])


def _correspondence_tile(store: JobStore, box: Box):
    from gigasid.codecs.correspondence import query_span

    manifest = store.manifest
    config = job_config(store)
    factor, periodic = manifest["factor"], config.application == "tileable"
    matches, weights = store.array("scales/0/matches"), store.array("scales/0/weights")
    grid_h, grid_w = matches.shape[:2]
    q_r0, q_r1 = query_span((box[0], box[2]), factor, config.patch_size, grid_h, periodic=periodic)
    q_c0, q_c1 = query_span((box[1], box[3]), factor, config.patch_size, grid_w, periodic=periodic)
    if periodic:
        rows, cols = np.arange(q_r0, q_r1) % grid_h, np.arange(q_c0, q_c1) % grid_w
        positions, found = matches.oindex[rows, cols], weights.oindex[rows, cols]
    else:
        positions, found = matches[q_r0:q_r1, q_c0:q_c1], weights[q_r0:q_r1, q_c0:q_c1]
    return jobs.correspondence_decode(
        config, finest_reference(str(store.path)), tuple(manifest["reference_shapes"][0]),
        tuple(manifest["output_shapes"][0]), positions, found, box=box, query_origin=(q_r0, q_c0),
    )
