"""Out-of-core jobs from Python: create, submit, resume and follow a job; read its output as Dask.

The same jobs as ``gigasid generate -o JOB.zarr`` and ``gigasid resume``, for a notebook or a
script, re-exported as :mod:`gigasid.api` (which adds ``create_job``: a front end's checks)::

    job = create_job("big.zarr", "photo.jpg", pipeline="gigapixel", size=(8192, 8192))
    job.submit(client)            # a distributed.Client, a profile name ("threads"), or a Profile
    job.progress()                # JobProgress(status='running', ..., fraction=0.42)
    job.wait()
    image = open_output("big.zarr")            # dask.array uint8 (C, H, W)
    thumb = open_output("big.zarr", level=4)   # the output pyramid's level 4: 1/16 a side

How the parts relate: ``gigasid.api.create_job`` writes the store (``engine.create_job``) and
leaves it unlocked; :meth:`Job.submit` runs ``engine.execute`` (a new job) or ``engine.resume`` (one that
ran before: its chunks are checked and the damaged ones recomputed) in a background thread of this
process, holding the store's lock, on the executor that ``profiles.open_executor`` makes of the
profile or client. :func:`job_progress` reads only the store (manifest and done-grids), so it
follows a job run by any process, the CLI's included. :func:`open_output` wraps the finished
output and the output pyramid (``gigasid.io.output_pyramid``) in ``dask.array.from_zarr``; chunks
are read through the store's checksums, so a damaged chunk raises rather than reading as zeros.

Not here: what a job computes (``graph.engine``, ``graph.tasks``) or exports (``io.exporters``).
A job runs in a thread of the process that submitted it: a process that exits stops it, and
:func:`resume_job` (or ``gigasid resume``) continues it from what is durable.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigasid.errors import ConfigError, InputError
from gigasid.io.store import JobStore

if TYPE_CHECKING:
    from typing import TypeAlias

    import dask.array
    from distributed import Client

    from gigasid.graph.profiles import Profile

    #: what a job runs on: a profile's name or YAML file, a Profile, a distributed.Client; None: threads
    Where: TypeAlias = str | os.PathLike[str] | Profile | Client | None

__all__ = ["Job", "JobProgress", "job_progress", "open_job", "open_output", "resume_job"]


@dataclass(frozen=True)
class JobProgress:
    """How far a job is, read from its store. Tile tasks are the unit: one per tile and stage."""

    #: the manifest's status: created, running, repairing or complete
    status: str
    #: the output's scales, and how many of them are sampled (coarsest first)
    scales: int
    scales_done: int
    #: the scale being sampled now; None once every scale is (then the output's tiles are written)
    scale: int | None
    #: tile tasks done and in all of the current scale (tiles × T + 1 stages), or of the output
    tiles_done: int
    tiles_total: int
    #: tile tasks done of the whole job (every stage of every scale, then the output), 0 … 1
    fraction: float

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def job_progress(path: str | os.PathLike[str]) -> JobProgress:
    """The progress of the job in the store at ``path``, whichever process runs it.

    Counts only what the driver has recorded as done (durable), so between two calls it never goes
    down while a job runs (a resume that repairs damage may take back what was lost)."""
    store = open_job_store(path)
    manifest = store.manifest
    scales_done = set(manifest["scales_done"])
    done_all = total_all = 0
    current: tuple[int | None, int, int] | None = None
    for scale in reversed(range(len(manifest["output_shapes"]))):  # the order a job runs them
        grid = store.array(f"scales/{scale}/done")
        total = int(grid.size)
        done = total if scale in scales_done else int(grid[...].astype(bool).sum())
        done_all, total_all = done_all + done, total_all + total
        if current is None and scale not in scales_done:
            current = (scale, done, total)
    grid = store.array("output_done")
    total = int(grid.size)
    done = total if manifest["output_done"] else int(grid[...].astype(bool).sum())
    done_all, total_all = done_all + done, total_all + total
    if current is None:
        current = (None, done, total)
    scale, tiles_done, tiles_total = current
    return JobProgress(
        status=str(manifest.get("status")), scales=len(manifest["output_shapes"]), scales_done=len(scales_done),
        scale=scale, tiles_done=tiles_done, tiles_total=tiles_total,
        fraction=done_all / total_all if total_all else 1.0,
    )


class Job:
    """A job store, and the run of it this process started (if any).

    Made by ``gigasid.api.create_job``, :func:`open_job` or :func:`resume_job`; holds only the
    path, so it can be made again from the path in another process."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.log: list[str] = []  # what the run reported (resume's check and repairs)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        try:
            state = f"{self.progress().fraction:.0%} done" + (", running" if self.running else "")
        except InputError as error:
            state = str(error)
        return f"<Job {self.path}: {state}>"

    # ---- running ----------------------------------------------------------------------------
    def submit(self, where: Where = None, *, echo: bool = False) -> Job:
        """Run the job (or what is left of it) in a background thread; returns at once.

        ``where``: a ``distributed.Client`` (used as it is, left open), a profile's name or YAML
        file (``gigasid/schedulers``), a :class:`~gigasid.graph.profiles.Profile`, or None for
        ``threads``. ``echo`` prints the CLI's progress lines on stderr. A job already finished is
        only checked. Follow it with :meth:`progress`, :attr:`done` and :meth:`wait`."""
        if self.running:
            raise InputError(f"{self.path} is already running in this process; wait() for it first")
        target = _executor_target(where)  # a bad name or a closed client fails here, not in the thread
        open_job_store(self.path)
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(target, echo), name=f"gigasid job {self.path.name}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self, target, echo: bool) -> None:
        import sys

        from gigasid.graph import engine

        stream = sys.stderr if echo else io.StringIO()

        def log(message: str) -> None:
            self.log.append(message)
            if echo:
                print(message, file=sys.stderr, flush=True)

        try:
            store = JobStore.open(self.path)
            if store.manifest.get("status") == "created":  # never ran: nothing to check yet
                store.acquire_lock()  # a second writer is refused
                try:
                    engine.execute(store, target, progress=engine.Progress(stream))
                finally:
                    store.release_lock()
            else:  # resume locks it, checks what is claimed done, repairs, runs the rest
                engine.resume(self.path, target, progress=engine.Progress(stream), log=log)
        except BaseException as error:  # noqa: BLE001 - handed to the caller by wait()
            self._error = error

    def wait(self, timeout: float | None = None) -> Job:
        """Block until the run this process submitted ends; re-raise its error, if it failed.
        ``timeout`` (seconds) raises TimeoutError while it still runs."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"{self.path} is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def running(self) -> bool:
        """Is this process running the job now?"""
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> bool:
        """Is the output written (and this process's run of it over)?"""
        return not self.running and self.progress().complete

    @property
    def error(self) -> BaseException | None:
        """What stopped this process's run of the job, if it failed."""
        return None if self.running else self._error

    # ---- reading ----------------------------------------------------------------------------
    def progress(self) -> JobProgress:
        return job_progress(self.path)

    @property
    def manifest(self) -> dict:
        """The store's manifest: config, seed, sizes, status, timings."""
        return open_job_store(self.path).manifest

    def output(self, level: int = 0) -> dask.array.Array:
        """:func:`open_output` of this job."""
        return open_output(self.path, level)


def open_job(path: str | os.PathLike[str]) -> Job:
    """The job of an existing store (any status): to follow, submit, or read."""
    open_job_store(path)
    return Job(path)


def resume_job(path: str | os.PathLike[str], where: Where = None, *, echo: bool = False) -> Job:
    """Continue a stopped job from what is durable in its store, as ``gigasid resume``; submitted
    (see :meth:`Job.submit`), so call :meth:`Job.wait` for it to finish."""
    return open_job(path).submit(where, echo=echo)


def open_output(path: str | os.PathLike[str], level: int = 0) -> dask.array.Array:
    """The finished image of a job store as a ``dask.array``: uint8 (C, H, W), chunked as stored.

    ``level`` 0 is the output itself; level k ≥ 1 is the output pyramid's level k (each the 2×2
    box mean of the one above, ceil-halved, down to 1×1), built in the store first if missing,
    as the first export does, which needs the store to be writable."""
    import dask.array as da

    from gigasid.io.output_pyramid import ensure_output_pyramid, open_finished_store, pyramid_shapes

    store = open_finished_store(_existing(path))
    _, height, width = store.array("output").shape
    top = len(pyramid_shapes(height, width)) - 1
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= top:
        raise InputError(f"level must be an integer from 0 (the {height}x{width} output) to {top} (1x1), got {level!r}")
    array = store.array("output") if level == 0 else ensure_output_pyramid(store)[level]
    return da.from_zarr(array)


# ---- helpers --------------------------------------------------------------------------------
def open_job_store(path: str | os.PathLike[str]) -> JobStore:
    return JobStore.open(_existing(path))


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"job store {path} does not exist; check the path")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a gigasid job store (a .zarr folder)")
    return path


def _executor_target(where: Any) -> Profile | Client:
    """What ``engine.execute`` runs on: a Profile (read from a name or file) or a client."""
    from gigasid.graph.profiles import Profile, as_client, load_profile

    if where is None:
        return load_profile("threads")
    if isinstance(where, Profile):
        return where
    if isinstance(where, str | os.PathLike):
        return load_profile(os.fspath(where))
    try:
        return as_client(where)
    except ConfigError:
        raise ConfigError(
            "submit() takes a distributed.Client, a scheduler profile's name or YAML file, or a Profile, "
            f"got {type(where).__name__}"
        ) from None
