"""Execution profiles (``gigasid/schedulers/*.yaml``): WHERE a job runs, never what it computes.

A profile names a kind — ``sync``, ``threads``, ``processes`` (Dask's local schedulers),
``local-cluster`` (a ``distributed.LocalCluster`` started here) or ``cluster`` (a running
scheduler's address) — and its sizes. :func:`open_executor` turns it into an executor whose
``map`` runs independent tile tasks and reports each one as it finishes, so the driver can record
durable progress task by task. Every kind gives the same pixels.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal

from gigasid.config import from_mapping, read_preset
from gigasid.errors import ConfigError, InputError

if TYPE_CHECKING:
    from distributed import Client

# package data, so that an installed wheel finds them (the repository's ``schedulers`` links here)
SCHEDULERS_DIR = files("gigasid") / "schedulers"


@dataclass(frozen=True)
class Profile:
    """Where the tile tasks run."""

    #: sync (one thread, for debugging), threads, processes, local-cluster or cluster
    kind: Literal["sync", "threads", "processes", "local-cluster", "cluster"] = "threads"
    #: worker threads or processes (threads/processes) or cluster workers (local-cluster); null = CPUs
    workers: int | None = field(default=None, metadata={"range": (1, 4096)})
    #: threads per cluster worker; keep 1 with torch/faiss, which use threads of their own
    threads_per_worker: int = field(default=1, metadata={"range": (1, 256)})
    #: torch/numba threads inside each task; null = CPUs / workers
    compute_threads: int | None = field(default=None, metadata={"range": (1, 256)})
    #: memory limit per cluster worker, e.g. "4GB"; null = Dask's default share
    memory_limit: str | None = None
    #: scheduler address for kind: cluster, e.g. tcp://10.0.0.5:8786
    address: str | None = None
    #: seconds to wait for the scheduler of kind: cluster to answer before giving up
    connect_timeout: float = field(default=10.0, metadata={"range": (0.1, 3600.0)})

    def __post_init__(self) -> None:
        if self.kind == "cluster" and not self.address:
            raise ConfigError("scheduler profile kind: cluster needs an address (tcp://HOST:8786)")


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (``gigasid/schedulers/NAME.yaml``) or a YAML file path."""
    return from_mapping(Profile, read_preset(name_or_path, SCHEDULERS_DIR, "scheduler profile"))


def _compute_threads(profile: Profile, parallel: int) -> int:
    if profile.compute_threads:
        return profile.compute_threads
    return max(1, (os.cpu_count() or 1) // max(1, parallel))


class LocalExecutor:
    """Dask's local schedulers; the finish callback runs in this (the driver's) process."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.scheduler = {"sync": "sync", "threads": "threads", "processes": "processes"}[profile.kind]
        self.workers = 1 if profile.kind == "sync" else (profile.workers or os.cpu_count() or 1)
        self.threads = _compute_threads(profile, self.workers)
        self._pool = None
        if self.scheduler == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")  # torch and OpenMP do not survive fork
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)

    def task_threads(self, parallel: int) -> int | None:
        """Threads inside each task when ``parallel`` tasks could run at once: the cores shared
        among the tasks that can actually run (a one-tile scale gets them all). ``sync`` leaves
        the calling process's setting alone unless the profile sets ``compute_threads``."""
        if self.scheduler == "sync":
            return self.profile.compute_threads
        return _compute_threads(self.profile, min(self.workers, max(1, parallel)))

    def run_graph(self, graph: dict[str, tuple], on_done: Callable[[Any], None], *, parallel: int) -> None:
        """Run a task graph (key → (task, keys it waits on)); ``on_done(result)`` runs here, in
        the driver, as each task finishes."""
        threads = self.task_threads(parallel)
        if self.scheduler == "sync":
            for key in _topological(graph):
                on_done(_with_threads(graph[key][0], threads))
            return
        import dask.multiprocessing
        import dask.threaded
        from dask.callbacks import Callback

        # one task at a time (one worker, or a chain such as a one-tile scale): its kernels may
        # use numba's parallel pool from the worker thread (core.jit.sole_task)
        sole = min(self.workers, max(1, parallel)) == 1
        dsk = {key: (_graph_task, task, threads, sole, *deps) for key, (task, deps) in graph.items()}
        with Callback(posttask=lambda key, result, dsk, state, worker: on_done(result)):
            if self.scheduler == "threads":
                dask.threaded.get(dsk, list(dsk), num_workers=self.workers)
            else:
                dask.multiprocessing.get(dsk, list(dsk), pool=self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


class DistributedExecutor:
    """A ``distributed`` client: a LocalCluster started here, a running scheduler, or the caller's
    own ``client`` (then ``profile`` is None, and the client is left open on close)."""

    def __init__(self, profile: Profile | None, *, client: Client | None = None):
        from distributed import Client, LocalCluster

        self.profile = profile
        self.cluster = None
        self.owns_client = client is None
        if client is not None:
            self.client = client
            parallel = sum(client.nthreads().values()) or 1
        elif profile.kind == "local-cluster":
            workers = profile.workers or os.cpu_count() or 1
            options = {"n_workers": workers, "threads_per_worker": profile.threads_per_worker,
                       "processes": True, "dashboard_address": None}
            if profile.memory_limit:
                options["memory_limit"] = profile.memory_limit
            self.cluster = LocalCluster(**options)
            self.client = Client(self.cluster)
            parallel = workers * profile.threads_per_worker
        else:
            try:
                self.client = Client(profile.address, timeout=profile.connect_timeout)
            except (OSError, TimeoutError, ValueError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise InputError(
                    f"cannot reach the Dask scheduler at {profile.address} within {profile.connect_timeout:g} s "
                    f"({reason[:160]}); check that it runs and the address, or raise connect_timeout in the "
                    "profile. Nothing was computed: a job store already created is kept for `gigasid resume`"
                ) from None
            parallel = sum(self.client.nthreads().values()) or 1
        self.parallel = parallel
        self.threads = _compute_threads(profile or Profile(), parallel)

    def task_threads(self, parallel: int) -> int:
        if self.profile is not None and self.profile.compute_threads:
            return self.profile.compute_threads
        return max(1, self.threads * self.parallel // max(1, min(self.parallel, parallel)))

    def run_graph(self, graph: dict[str, tuple], on_done: Callable[[Any], None], *, parallel: int) -> None:
        """As :meth:`LocalExecutor.run_graph`, on the cluster: the scheduler orders the tasks, a
        lost worker's tasks run again elsewhere."""
        from distributed import as_completed

        threads = self.task_threads(parallel)
        # workers of one thread run one task at a time (core.jit.sole_task)
        sole = all(count == 1 for count in self.client.nthreads().values())
        dsk = {key: (_graph_task, task, threads, sole, *deps) for key, (task, deps) in graph.items()}
        futures = self.client.get(dsk, list(dsk), sync=False)
        try:
            for future in as_completed(futures):
                on_done(future.result())
        finally:
            self.client.cancel(futures)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _topological(graph: dict[str, tuple]) -> list[str]:
    """The keys of a task graph, each after the keys it waits on (in insertion order otherwise)."""
    order, state = [], {}
    for root in graph:
        stack = [(root, False)]
        while stack:
            key, expanded = stack.pop()
            if expanded:
                order.append(key)
            elif key not in state:
                state[key] = True
                stack.append((key, True))
                stack.extend((dep, False) for dep in reversed(graph[key][1]) if dep not in state)
    return order


def _graph_task(task: Callable, threads: int | None, sole: bool, *waited):
    """A graph node: the task (the results it waited on only order it); ``sole``: no other task
    runs in this process meanwhile."""
    if not sole:
        return _with_threads(task, threads)
    from gigasid.core.jit import sole_task

    with sole_task():
        return _with_threads(task, threads)


def _with_threads(fn: Callable, threads: int | None, *args):
    """Run a task with the profile's thread budget for torch and numba in this worker (None:
    leave this process's setting)."""
    import torch

    if threads is None:
        return fn(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    try:
        return fn(*args)
    finally:
        _trim_memory()


# a task process hands its freed heap back to the OS every this many tasks (glibc): a tile's
# temporaries are freed but stay in the process's arenas otherwise, and peak RSS creeps up with the
# number of tasks. Not after every task: the next step of a scale allocates the same temporaries,
# and memory handed back comes again as fresh pages the kernel must zero
TRIM_EVERY = 16
_tasks_since_trim = 0
_TRIM_LOCK = threading.Lock()  # tasks finish on several threads
_LIBC = None
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    """glibc, or False elsewhere."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - absent outside glibc
            _LIBC.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _trim_memory() -> None:
    global _tasks_since_trim
    with _TRIM_LOCK:
        _tasks_since_trim += 1
        if _tasks_since_trim < TRIM_EVERY:
            return
        _tasks_since_trim = 0
    if _libc():
        _libc().malloc_trim(0)


def keep_freed_memory() -> None:
    """Ask glibc to keep large freed blocks in the heap for reuse (the ``gigasid`` command's own
    process, which runs a job's tasks): by default every block of 32 MiB or more (a 512² tile's
    x_t and its temporaries) is a fresh mapping the kernel faults in and zeroes page by page at
    every step. Measured on a 4096² ``gigapixel`` job, 2 cores: page faults 2.7 M -> 0.7 M, system
    CPU 10.9 -> 5.7 s, peak RSS 1.65 -> 1.86 GB; with the trims every ``TRIM_EVERY`` tasks instead
    of after each, wall 51.6 -> 46.9 s (medians of 2, interleaved). A library call does not do
    this to its caller's process."""
    libc = _libc()
    if libc:
        import ctypes

        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))


@contextlib.contextmanager
def open_executor(profile: Profile | Client) -> Iterator[LocalExecutor | DistributedExecutor]:
    """The executor of a profile, or of a ``distributed.Client`` the caller made (and closes)."""
    if not isinstance(profile, Profile):
        executor = DistributedExecutor(None, client=as_client(profile))
    elif profile.kind in ("local-cluster", "cluster"):
        executor = DistributedExecutor(profile)
    else:
        executor = LocalExecutor(profile)
    try:
        yield executor
    finally:
        executor.close()


def as_client(where: Any) -> Client:
    """``where`` if it is a ``distributed.Client``, else a ConfigError naming what is accepted."""
    from distributed import Client

    if not isinstance(where, Client):
        raise ConfigError(
            f"expected a scheduler profile (a name, a .yaml file or a Profile) or a distributed.Client, "
            f"got {type(where).__name__}"
        )
    if where.status != "running":
        raise InputError(f"the distributed.Client {where} is {where.status}, not running; open a new one")
    return where
