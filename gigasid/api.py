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
    structure: str | os.PathLike[str] | None = None,
    mask: str | os.PathLike[str] | None = None,
    references: list[str | os.PathLike[str]] | None = None,
    prompt: str | None = None,
) -> Job:
    """Create the store of a new job at ``path`` (``.zarr``) from the reference ``image`` (a file).

    The applications' inputs, as the command line's: ``structure`` the layout image of an analogy
    (``--structure``), ``mask`` inpaint's mask image (``--mask``; white = regenerate),
    ``references`` more reference images drawn from with ``image`` (``--ref``); an outpaint's
    placement is the ``place`` setting (``overrides=["place=left"]``); ``prompt`` the text a
    ``text-style`` job restyles toward (``--prompt``).

    ``pipeline`` is a preset's name (``gigasid/pipelines``), a YAML file or a JobConfig;
    ``overrides`` are ``"key=value"`` settings as ``--set``; ``size`` is (rows, cols) of the output
    (default: the preset's); ``tile`` as ``--tile`` (px, or latent cells of 8 px in a latent job;
    default 1024 px or 512 cells). The reference and the disk are checked as ``gigasid generate``
    does (``force``: start anyway); the memory of the tasks is not, as the executor is not known
    yet. Nothing is sampled until :meth:`Job.submit`."""
    from gigasid.graph import engine

    settings = None if prompt is None else {"clip": {"prompt": prompt}}
    if isinstance(pipeline, JobConfig):
        config = pipeline
        if overrides or settings:
            tree = _merge(to_mapping(config), parse_overrides(overrides or []))
            config = from_mapping(JobConfig, _merge(tree, settings or {}))
    else:
        config = load_pipeline(str(pipeline), overrides, settings)
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
    from gigasid.plan import check_mask_given, check_structure, default_size

    check_structure(config, structure is not None)
    check_mask_given(config, mask is not None)
    hole = None
    if mask is not None:
        from gigasid.io.images import read_image

        try:
            hole = read_image(Path(mask)).mean(axis=2) >= 0.5
        except InputError as error:
            raise InputError(f"mask {mask}: {error}") from None
    shape = image_shape(image)
    reference, excluded = image, None
    if references:
        reference, excluded = _canvas(image, [Path(p) for p in references], config, structure, mask)
        size = size or default_size(*shape[:2], config)  # the first image's, not the canvas's
        shape = (*reference.shape[1:], shape[2])
    limits.check_job_store(image, shape, config, force=force)
    store = engine.create_job(
        path, reference, config, size=size, seed=seed, tile=tile or default_tile(config), source=str(image),
        force=force, structure=None if structure is None else Path(structure), mask=hole, excluded=excluded,
    )
    store.release_lock()  # taken again by whoever runs it
    return Job(path)


def _canvas(image: Path, references: list[Path], config: JobConfig, structure, mask):
    """``image`` and ``references`` on one canvas (``plan.reference_atlas``), as ``--ref`` does."""
    import torch

    from gigasid import plan as job_plan
    from gigasid.io.images import read_image

    if structure is not None or mask is not None or job_plan.known_kind(config) is not None:
        raise InputError(f"references: several references to draw from; the {config.application} application takes one")
    images = []
    for path in [image, *references]:
        try:
            pixels = read_image(path)
        except InputError as error:
            raise InputError(f"reference {path}: {error}") from None
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0)
    return job_plan.reference_atlas(images, config)
