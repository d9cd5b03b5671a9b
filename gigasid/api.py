"""The Python API of out-of-core jobs: create, submit, resume and follow a job store, and read
its finished output (every pyramid level) as a ``dask.array``.

A front end, as ``cli`` is: :func:`create_job` checks what ``gigasid generate -o JOB.zarr`` checks
and has its defaults; the rest is :mod:`gigasid.graph.api`, re-exported here, because only
``gigasid.graph`` imports Dask (DESIGN.md §3). Example (see the README, "Python API")::

    from distributed import Client
    from gigasid.api import create_job, open_output

    job = create_job("big.zarr", "photo.jpg", pipeline="gigapixel", size=(8192, 8192)).submit(Client())
    job.progress()     # JobProgress(status='running', scales=4, scales_done=1, ..., fraction=0.3)
    job.wait()
    image = open_output("big.zarr")   # uint8 (C, H, W)
"""

from __future__ import annotations

import os
from pathlib import Path

from gigasid import limits
from gigasid.cli import MAX_SEED, default_tile
from gigasid.config import JobConfig, _merge, from_mapping, load_pipeline, parse_overrides, to_mapping
from gigasid.errors import InputError
from gigasid.graph.api import Job, JobProgress, job_progress, open_job, open_output, resume_job
from gigasid.io.images import image_shape

__all__ = ["Job", "JobProgress", "create_job", "job_progress", "open_job", "open_output", "resume_job"]


def create_job(
    path: str | os.PathLike[str],
    image: str | os.PathLike[str],
    *,
    pipeline: str | JobConfig = "gigapixel",
    size: tuple[int, int] | None = None,
    seed: int = 0,
    tile: int | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> Job:
    """Create the store of a new job at ``path`` (``.zarr``) from the reference ``image`` (a file).

    ``pipeline`` is a preset's name (``gigasid/pipelines``), a YAML file or a JobConfig;
    ``overrides`` are ``"key=value"`` settings as ``--set``; ``size`` is (rows, cols) of the output
    (default: the preset's); ``tile`` as ``--tile`` (px, or latent cells of 8 px in a latent job;
    default 1024 px or 512 cells). The reference and the disk are checked as ``gigasid generate``
    does (``force``: start anyway); the memory of the tasks is not, as the executor is not known
    yet. Nothing is sampled until :meth:`Job.submit`."""
    from gigasid.graph import engine

    if isinstance(pipeline, JobConfig):
        config = pipeline
        if overrides:
            config = from_mapping(JobConfig, _merge(to_mapping(config), parse_overrides(overrides)))
    else:
        config = load_pipeline(str(pipeline), overrides)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise InputError(f"seed must be an integer between 0 and 2^63 - 1, got {seed!r}")
    if size is not None:
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size):
            raise InputError(f"size must be (rows, cols), two positive integers, got {size!r}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise InputError(f"tile must be a positive integer, got {tile!r}")
    image, path = Path(image), Path(path)
    if path.exists() and os.path.realpath(path) == os.path.realpath(image):
        raise InputError(f"the job store {path} is the reference {image}; choose another path")
    limits.check_job_store(image, image_shape(image), config, force=force)
    store = engine.create_job(
        path, image, config, size=size, seed=seed, tile=tile or default_tile(config), source=str(image), force=force,
    )
    store.release_lock()  # taken again by whoever runs it
    return Job(path)
