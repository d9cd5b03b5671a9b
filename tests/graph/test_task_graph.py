"""A scale's task graph (``engine.scale_graph``): any order the dependencies allow gives the same
pixels, and a job stopped with its tiles at different steps resumes to them.

Without stage barriers a tile may run several steps ahead of a distant one, and the two x_t
buffers are shared: a tile step must wait for the tiles it reads and for those that still have to
read what it overwrites. An executor that picks a *random* ready task (seeded) exercises orders
no real scheduler would promise; every one must give the in-memory run, bit for bit. Small jobs:
a 48x64 crop, knn (search stride 2, P = 7) and exact (P = 5), 3 scales, T = 3, eta = 0.5, tiles
just above the halo (6-12 tiles a scale).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigasid import jobs
from gigasid.config import JobConfig, from_mapping
from gigasid.graph import engine
from gigasid.graph.profiles import Profile
from gigasid.io.store import JobStore

ROCKET = Path(__file__).resolve().parents[2] / "examples" / "rocket.png"
SEED = 5
SETTINGS = {
    "knn": {"patch_size": 7, "denoiser": {"backend": "knn"}, "index": {"kind": "ivf", "search_stride": 2}},
    "exact": {"patch_size": 5, "denoiser": {"backend": "exact", "compute_dtype": "float32"}},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def rocket() -> torch.Tensor:
    pixels = np.asarray(Image.open(ROCKET).convert("RGB"), dtype=np.float32)[:48, :64] / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def config(backend: str, application: str) -> JobConfig:
    application, _, symmetry = application.partition("-")
    data = {"application": application, "num_steps": 3, "num_scales": 3, "eta": 0.5, "min_short_side": 12,
            **SETTINGS[backend]}
    if symmetry:
        data["symmetry"] = symmetry
    return from_mapping(JobConfig, data)


@functools.cache
def in_memory(backend: str, application: str) -> np.ndarray:
    return jobs.to_pixels(jobs.generate(rocket(), config(backend, application), seed=SEED))


class RandomOrder:
    """An executor running a graph one task at a time, each time a random one of those whose
    dependencies are done; ``stop_after`` tasks in all, then KeyboardInterrupt (a killed job)."""

    def __init__(self, seed: int, stop_after: int | None = None):
        self.random = random.Random(seed)
        self.left = stop_after
        self.ran = 0

    def run_graph(self, graph, on_done, *, parallel):
        waiting = {key: set(deps) for key, (_, deps) in graph.items()}
        finished = set()
        while waiting:
            ready = sorted(key for key, deps in waiting.items() if deps <= finished)
            assert ready, "a cycle in the task graph"
            key = self.random.choice(ready)
            if self.left is not None:
                if self.left == 0:
                    raise KeyboardInterrupt
                self.left -= 1
            on_done(graph[key][0]())
            self.ran += 1
            finished.add(key)
            del waiting[key]


def new_store(tmp_path: Path, backend: str, application: str, name: str) -> JobStore:
    halo = engine.job_halo(config(backend, application), [(48, 64)])
    return engine.create_job(tmp_path / name, rocket(), config(backend, application), size=None, seed=SEED,
                             tile=halo + 1)


@pytest.mark.parametrize("backend,application", [("knn", "uncond"), ("exact", "tileable"), ("knn", "symmetric-both")])
def test_any_order_the_graph_allows_gives_the_same_pixels(tmp_path, backend, application) -> None:
    for seed in range(2):
        store = new_store(tmp_path, backend, application, f"order{seed}.zarr")
        try:
            engine.execute(store, RandomOrder(seed), progress=engine.Progress(quiet=True))
        finally:
            store.release_lock()
        assert np.array_equal(engine.read_output(store), in_memory(backend, application)), seed


def test_the_graph_has_no_stage_barrier(tmp_path) -> None:
    """A tile's step waits only on its neighbourhood: with more than 3x3 tiles, some tile's
    second step is ready before every tile's first step is done."""
    store = new_store(tmp_path, "exact", "uncond", "graph.zarr")
    try:
        plan = engine.JobPlan.from_manifest(store.manifest)
        boxes = engine.tile_boxes(plan.output_shapes[0], plan.tile)
        grid = np.zeros((plan.config.num_steps + 1, *(np.array(boxes[-1][0]) + 1)), np.uint8)
        graph = engine.scale_graph(str(store.path), 0, boxes, grid)
    finally:
        store.release_lock()
    assert len(boxes) > 9
    first_steps = {key for key in graph if "-k1-" in key}
    corner = graph["s0-k2-0-0"][1]
    assert set(corner) < first_steps and len(corner) < len(first_steps)


@pytest.mark.parametrize("stop", [7, 23, 41])
def test_a_job_stopped_with_tiles_steps_apart_resumes_to_the_same_pixels(tmp_path, stop: int) -> None:
    store = new_store(tmp_path, "knn", "uncond", "stopped.zarr")
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.execute(store, RandomOrder(stop, stop_after=stop), progress=engine.Progress(quiet=True))
    finally:
        store.release_lock()
    engine.resume(store.path, Profile(kind="sync"), progress=engine.Progress(quiet=True), log=lambda message: None)
    assert np.array_equal(engine.read_output(JobStore.open(store.path)), in_memory("knn", "uncond"))


def test_a_damaged_chunk_of_a_spread_scale_recomputes_the_scale(tmp_path) -> None:
    """Stopped mid-scale with tiles at different steps, one of the chunks a tile wrote last is
    lost: the check finds it, the scale is redone, the pixels are the undamaged run's."""
    store = new_store(tmp_path, "knn", "uncond", "damaged.zarr")
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.execute(store, RandomOrder(3, stop_after=60), progress=engine.Progress(quiet=True))
    finally:
        store.release_lock()
    scale = min(set(range(3)) - set(JobStore.open(store.path).manifest["scales_done"]))
    done = JobStore.open(store.path).array(f"scales/{scale}/done")[...]
    counts = done.sum(0)
    assert counts.max() - counts.min() >= 2, counts  # tiles more than one step apart
    i, j = np.unravel_index(int(np.argmax(counts)), counts.shape)
    stage = int(counts[i, j]) - 1
    buffer = "final" if stage == 3 else f"x{stage % 2}"
    (store.path / f"scales/{scale}/{buffer}/c/0/{i}/{j}").unlink()
    messages = []
    engine.resume(store.path, Profile(kind="sync"), progress=engine.Progress(quiet=True), log=messages.append)
    assert any("recomputing the whole scale" in message for message in messages), messages
    assert np.array_equal(engine.read_output(JobStore.open(store.path)), in_memory("knn", "uncond"))
