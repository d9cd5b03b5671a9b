"""What a worker runs: one tile of one stage, reading and writing the job store by path.

Tasks carry the store's path and a tile box, never arrays or the index (DESIGN.md §4.4). Each
worker process opens a scale's denoiser — reference level, memory-mapped index — once and keeps
it (:func:`scale_stepper`). A task writes only its own chunk, so running it twice is harmless.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

from gigasid import jobs
from gigasid.config import JobConfig, from_mapping
from gigasid.core.noise_schedule import make_noise_schedule
from gigasid.io.store import JobStore, read_box
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
    level = torch.from_numpy(store.array(f"reference/{scale}")[...])
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


def buffer_names(scale: int, stage: int, num_steps: int) -> tuple[str | None, str]:
    """(read, write) array names of a stage: see ``io.store``."""
    write = f"scales/{scale}/final" if stage == num_steps else f"scales/{scale}/x{stage % 2}"
    read = None if stage == 0 else f"scales/{scale}/x{(stage - 1) % 2}"
    return read, write


def run_tile(path: str, scale: int, stage: int, box: Box) -> tuple[int, int, Box, float]:
    """Compute one tile of one stage and write its chunk; returns its identity and the seconds
    spent computing (the rest of the task's time is reading, writing and scheduling)."""
    store = open_store(path)
    stepper = scale_stepper(path, scale)
    num_steps = len(stepper.alphas) - 1
    read, write = buffer_names(scale, stage, num_steps)
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
    computing = time.perf_counter() - started
    store.array(write)[:, r0:r1, c0:c1] = values.numpy()
    return scale, stage, box, computing


def write_output_tile(path: str, box: Box) -> tuple[int, int, Box, float]:
    """The finest scale's final values in [-1, 1] → the uint8 output chunk."""
    store = open_store(path)
    r0, c0, r1, c1 = box
    store.array("output")[:, r0:r1, c0:c1] = jobs.to_pixels(store.array("scales/0/final")[:, r0:r1, c0:c1])
    return -1, -1, box, 0.0
