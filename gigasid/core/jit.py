"""numba, set up once for gigasid's compiled CPU kernels; ``numba`` is None where it is missing.

Every module with a kernel imports numba from here, so the set-up below runs before any kernel
loads. This file is only that set-up: the kernels live next to the torch code they speed up, and
the torch code stays the reference (and the CUDA path).
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

try:  # optional: without numba every kernel's torch path runs
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None


def _configure() -> None:
    # torch and faiss already bring an OpenMP runtime each; numba's own pool must not be a third
    numba.config.THREADING_LAYER = "workqueue"
    # Loading the first kernel (even from numba's disk cache) imports numba's NumPy lowering,
    # which probes for BLAS by importing scipy.linalg where scipy is installed: 0.3–0.4 s of a
    # 3-s CLI run (measured at 186x248, see bench/paper_size.py). No gigasid kernel calls
    # np.dot or np.linalg, so that probe is run here with scipy.linalg held out of reach (numba
    # then records "no BLAS"), and scipy stays importable as usual afterwards.
    blocked = [name for name in ("scipy.linalg", "scipy.linalg.cython_blas") if name not in sys.modules]
    if len(blocked) < 2:  # scipy.linalg is already loaded: the probe costs nothing
        return
    for name in blocked:
        sys.modules[name] = None  # an import of it now raises ImportError at once
    try:
        importlib.import_module("numba.np.arraymath")  # runs the probe
    finally:
        for name in blocked:
            del sys.modules[name]


def available() -> bool:
    return numba is not None


_sole = threading.local()


@contextmanager
def sole_task() -> Iterator[None]:
    """Mark the calling thread as running the only task of its process (an executor that runs one
    task at a time says so around each task): its kernels may then use numba's parallel pool."""
    before = getattr(_sole, "active", False)
    _sole.active = True
    try:
        yield
    finally:
        _sole.active = before


def parallel_kernels() -> bool:
    """Whether a compiled kernel may run its parallel twin from this thread. numba's workqueue
    pool must never be entered from two threads at once, so only the main thread may, or a task
    thread that :func:`sole_task` marks as the only one running (a one-tile scale on the threads
    scheduler has the machine to itself: the serial twins would leave all but one core idle);
    and only with more than one numba thread."""
    if numba is None or numba.get_num_threads() == 1:
        return False
    return threading.current_thread() is threading.main_thread() or getattr(_sole, "active", False)


if numba is not None:
    _configure()
