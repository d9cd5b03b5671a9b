"""The out-of-core engine (DESIGN.md §4.1, §4.3, §8): a job run tile by tile through the Zarr store
gives the in-memory sampler's pixels, whatever the tile size, the application or the profile.

Small jobs on a 48x64 crop of the rocket example: ``exact`` (float32, P = 5) and ``knn`` (IVF,
search stride 2, P = 7), 3 scales (48x64, 24x32, 12x16), T = 3, eta = 0.5 (fresh noise keyed by position at
every step). The distributed tests share one 2-worker LocalCluster (module fixture) built from the
same ``Profile`` the ``local-cluster`` scheduler file describes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigasid import jobs
from gigasid.config import JobConfig, from_mapping
from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.errors import InputError
from gigasid.graph import engine, profiles
from gigasid.graph.profiles import DistributedExecutor, Profile

REPO = Path(__file__).resolve().parents[2]
ROCKET = REPO / "examples" / "rocket.png"
SEED = 3

BACKENDS = {
    "exact": (
        (48, 64),
        {"patch_size": 5, "min_short_side": 12, "denoiser": {"backend": "exact", "compute_dtype": "float32"}},
    ),
    "knn": (
        (48, 64),
        {
            "patch_size": 7,
            "min_short_side": 12,
            "denoiser": {"backend": "knn"},
            "index": {"kind": "ivf", "search_stride": 2},
        },
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def rocket(height: int, width: int) -> torch.Tensor:
    pixels = np.asarray(Image.open(ROCKET).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels[:height, :width]).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def job_config(backend: str, application: str) -> JobConfig:
    _, settings = BACKENDS[backend]
    # "symmetric-both": both mirror axes; "uncond-horizontal": the left and right edges wrap (360°)
    application, _, option = application.partition("-")
    data = {"application": application, "num_steps": 3, "num_scales": 3, "eta": 0.5, **settings}
    if option:
        data["symmetry" if application == "symmetric" else "wrap"] = option
    return from_mapping(JobConfig, data)


def job_size(backend: str, application: str) -> tuple[int, int] | None:
    (height, width), _ = BACKENDS[backend]
    return (height, width * 3 // 2) if application.startswith("retarget") else None


@functools.cache
def in_memory(backend: str, application: str):
    """The in-memory sampler's result (every scale) on one torch thread."""
    (height, width), _ = BACKENDS[backend]
    torch.set_num_threads(1)
    prepared = jobs.prepare(
        rocket(height, width), job_config(backend, application), size=job_size(backend, application)
    )
    return jobs.run(prepared, seed=SEED)


def make_store(tmp_path: Path, backend: str, application: str, tile: int, name: str = "job.zarr"):
    (height, width), _ = BACKENDS[backend]
    return engine.create_job(
        tmp_path / name,
        rocket(height, width),
        job_config(backend, application),
        size=job_size(backend, application),
        seed=SEED,
        tile=tile,
    )


def run_store(store, profile: Profile) -> None:
    try:
        with open(os.devnull, "w") as quiet:
            engine.execute(store, profile, progress=engine.Progress(quiet))
    finally:
        store.release_lock()
        torch.set_num_threads(1)


def finals(store) -> list[np.ndarray]:
    return [store.array(f"scales/{s}/final")[...] for s in range(len(store.manifest["output_shapes"]))]


# --- 1. tiled == in-memory -------------------------------------------------------------------


@pytest.mark.parametrize(
    "application",
    ["uncond", "retarget", "tileable", "symmetric", "symmetric-both", "uncond-horizontal", "retarget-vertical"],
)
@pytest.mark.parametrize("backend", ["exact", "knn"])
def test_tiled_run_equals_the_in_memory_sampler(tmp_path: Path, backend: str, application: str) -> None:
    """Bit for bit, every scale, for a tile just above the halo, one that divides nothing and one
    tile covering the image (the in-memory run is one whole-image tile of the same engine; a
    symmetric tile reads its mirror partners' boxes). exact runs on ``sync`` and knn on ``threads`` (2 workers), both with
    one compute thread like the reference: the thread count changes a float32 matmul's round-off
    (1.3e-5 at P = 7), the tile size does not."""
    reference = in_memory(backend, application)
    shape = tuple(reference.image.shape[-2:])
    halo = engine.job_halo(job_config(backend, application), [shape])
    tiles = [halo + 1, 2 * halo - 3, max(shape)]
    assert all(shape[0] % tile and shape[1] % tile for tile in tiles[:2])  # none divides the image
    profile = (
        Profile(kind="sync", compute_threads=1)
        if backend == "exact"
        else Profile(kind="threads", workers=2, compute_threads=1)
    )
    expected_output = jobs.to_pixels(reference.image)
    for tile in tiles:
        store = make_store(tmp_path, backend, application, tile, name=f"tile{tile}.zarr")
        assert store.manifest["halo"] == halo
        run_store(store, profile)
        assert store.manifest["status"] == "complete"
        for scale, (got, want) in enumerate(zip(finals(store), reference.scales)):
            assert got.dtype == np.float32 and got.shape == tuple(want.shape)
            assert np.array_equal(got, want.numpy()), (tile, scale, float(np.abs(got - want.numpy()).max()))
        output = engine.read_output(store)
        assert output.dtype == np.uint8 and np.array_equal(output, expected_output), tile


def test_a_usage_balanced_job_tiled_equals_in_memory(tmp_path: Path) -> None:
    """Usage balancing weighs the coarsest scale's whole image: that scale runs as one tile while the
    finer ones are tiled, and the result is the in-memory sampler's bit for bit; a tile smaller than
    the coarsest scale is refused by name before anything is written."""
    (height, width), settings = BACKENDS["knn"]
    config = from_mapping(JobConfig, {"application": "uncond", "num_steps": 3, "num_scales": 3, "eta": 0.5,
                                      **settings, "balance": {"strength": 1.0, "k": 16, "min_share": 0.0}})
    torch.set_num_threads(1)
    prepared = jobs.prepare(rocket(height, width), config)
    assert prepared.denoisers[-1].balance is not None and all(d.balance is None for d in prepared.denoisers[:-1])
    reference = jobs.run(prepared, seed=SEED)
    plain = jobs.run(jobs.prepare(rocket(height, width), job_config("knn", "uncond")), seed=SEED)
    assert not np.array_equal(reference.scales[-1].numpy(), plain.scales[-1].numpy())  # it does something
    coarsest = tuple(reference.scales[-1].shape[-2:])
    halo = engine.job_halo(config, [tuple(reference.image.shape[-2:])])
    tile = max(halo + 1, max(coarsest))
    assert height % tile and width % tile and tile < max(height, width)
    store = engine.create_job(tmp_path / "balanced.zarr", rocket(height, width), config, size=None, seed=SEED, tile=tile)
    run_store(store, Profile(kind="threads", workers=2, compute_threads=1))
    for scale, (got, want) in enumerate(zip(finals(store), reference.scales)):
        assert np.array_equal(got, want.numpy()), (scale, float(np.abs(got - want.numpy()).max()))
    with pytest.raises(InputError, match=r"balance.strength needs the coarsest scale \(12x100\) in one tile"):
        engine.create_job(tmp_path / "small.zarr", rocket(height, width), config, size=(48, 400), seed=SEED,
                          tile=halo + 1)
    assert not (tmp_path / "small.zarr").exists()


# --- 2. same pixels on every profile ----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """One 2-worker LocalCluster for the module (as ``schedulers/local-cluster.yaml`` without its
    memory limit): building it is most of a small job's time."""
    executor = DistributedExecutor(Profile(kind="local-cluster", workers=2, threads_per_worker=1))
    yield executor
    executor.close()


@contextlib.contextmanager
def on_cluster(monkeypatch, executor):
    """Make ``engine.execute`` run on the shared cluster instead of starting its own."""

    @contextlib.contextmanager
    def shared(profile):
        if profile.kind != "local-cluster":
            with profiles.open_executor(profile) as own:
                yield own
            return
        yield executor

    with monkeypatch.context() as patch:
        patch.setattr(engine, "open_executor", shared)
        yield


LOCAL_CLUSTER = Profile(kind="local-cluster", workers=2, threads_per_worker=1)


@pytest.mark.parametrize("backend", ["knn", "exact"])
def test_every_profile_gives_the_same_pixels(tmp_path, monkeypatch, cluster, backend: str) -> None:
    """sync (1 worker, default compute threads), threads (2 workers), a 2-worker LocalCluster.

    knn is bit-identical everywhere. exact is compared to 1e-5 on the float finals (the profiles'
    default compute threads differ: 2 in sync, 1 per worker elsewhere); its uint8 outputs must match.
    exact on ``threads`` used to differ (a shared fold buffer): see
    test_a_shared_image_denoiser_is_thread_safe.
    """
    tile = 37  # does not divide 48 or 64; > halo (16 for exact, 18 for knn)
    results = {}
    for kind, profile in [
        ("sync", Profile(kind="sync")),
        ("threads", Profile(kind="threads", workers=2)),
        ("local-cluster", LOCAL_CLUSTER),
    ]:
        store = make_store(tmp_path, backend, "uncond", tile, name=f"{kind}.zarr")
        with on_cluster(monkeypatch, cluster):
            run_store(store, profile)
        results[kind] = (finals(store), engine.read_output(store))
    sync_finals, sync_output = results["sync"]
    for kind, (other_finals, output) in results.items():
        for scale, (a, b) in enumerate(zip(sync_finals, other_finals)):
            if backend == "knn":
                assert np.array_equal(a, b), (kind, scale)
            else:
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=f"{kind} scale {scale}")
        assert np.array_equal(output, sync_output), kind
    assert np.array_equal(sync_output, jobs.to_pixels(in_memory(backend, "uncond").image))


def test_a_store_created_again_at_a_path_is_a_new_job_for_the_workers(tmp_path, monkeypatch, cluster) -> None:
    """Workers outlive jobs (a cluster, the Python API's client) and cache a scale's stepper by the
    store's path: a job removed and created again at the same path with another seed must not
    sample with the cached one (the manifest's job id tells them apart)."""
    import shutil

    path = tmp_path / "again.zarr"
    for seed in (SEED, SEED + 1):
        shutil.rmtree(path, ignore_errors=True)
        store = engine.create_job(path, rocket(48, 64), job_config("knn", "uncond"), size=None, seed=seed, tile=37)
        with on_cluster(monkeypatch, cluster):
            run_store(store, LOCAL_CLUSTER)
    expected = jobs.run(jobs.prepare(rocket(48, 64), job_config("knn", "uncond")), seed=SEED + 1).image
    assert np.array_equal(engine.read_output(store), jobs.to_pixels(expected))


def test_a_shared_image_denoiser_is_thread_safe() -> None:
    """The ``threads`` profile runs tile tasks of one stage concurrently in one process, and they
    share the scale's ``ScaleStepper`` (``graph.tasks.scale_stepper`` is cached per process), so
    its ``ImageDenoiser`` must be reentrant.

    The bug this pins (fixed in 5734596, "Fold buffer per thread"): ``ImageDenoiser._buffer``
    handed every call the same ``self._columns`` tensor, so two concurrent calls folded each
    other's denoised patch columns. The interleaving is forced here: both calls write their first
    chunk of columns before either folds, so with one shared buffer one of A, B is always wrong.
    Through the engine it showed as ``exact`` on ``threads`` differing from the in-memory run by
    up to 0.5 (once 2.8e9) at scale 0, differently on every run (knn's compiled fold was safe).
    """
    (height, width), _ = BACKENDS["exact"]
    config = job_config("exact", "uncond")
    reference = rocket(height, width)
    base = jobs.scale_denoiser(reference, config, periodic=False).patch_denoiser
    b_started_second_chunk, a_finished = threading.Event(), threading.Event()
    calls = {"A": 0, "B": 0}

    class Interleaved:  # the real exact denoiser, with a forced schedule between two threads
        needs_candidates, chunk = False, 128

        def __call__(self, queries, alpha, sigma, candidates=None):
            name = threading.current_thread().name
            if name in calls:
                calls[name] += 1
                if name == "A" and calls[name] == 2:  # A has written chunk 1 into the buffer
                    b_started_second_chunk.wait(timeout=3)
                if name == "B" and calls[name] == 2:  # B has overwritten chunk 1 with its own
                    b_started_second_chunk.set()
                    a_finished.wait(timeout=3)
            return base(queries, alpha, sigma, candidates)

    shared = ImageDenoiser(Interleaved(), patch_size=config.patch_size, rho=config.rho)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "A": torch.randn(3, 24, 24, generator=generator),
        "B": torch.randn(3, 24, 24, generator=generator),
    }
    alone = {name: shared(x, 0.6, 0.4) for name, x in inputs.items()}  # one at a time (main thread)
    together = {}

    def work(name):
        together[name] = shared(inputs[name], 0.6, 0.4)
        if name == "A":
            a_finished.set()

    threads = [threading.Thread(target=work, args=(name,), name=name) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for name in ("A", "B"):
        assert torch.equal(together[name], alone[name]), (
            name,
            float((together[name] - alone[name]).abs().max()),
        )


# --- 4. a worker killed mid-stage ------------------------------------------------------------


def test_a_worker_killed_mid_stage_changes_nothing(tmp_path, monkeypatch, cluster) -> None:
    """SIGKILL one LocalCluster worker while scale 0's task graph runs (from the driver's finish
    callback, right after the first tile of its second step reports): its nanny restarts it, its tasks
    are retried, and the output is the uninterrupted one."""
    client = cluster.client
    killed = {}
    original_run_graph = cluster.run_graph

    def run_and_kill(graph, on_done, *, parallel):
        target = any(key.startswith("s0-") for key in graph)

        def finished(result):
            on_done(result)
            if target and result.stage == 2 and not killed:
                busy = {address for address, keys in client.processing().items() if keys}
                pids = client.run(os.getpid)
                address = min(busy) if busy else min(pids)
                killed.update(address=address, pid=pids[address], busy=bool(busy))
                os.kill(pids[address], signal.SIGKILL)

        original_run_graph(graph, finished, parallel=parallel)

    monkeypatch.setattr(cluster, "run_graph", run_and_kill)
    store = make_store(tmp_path, "knn", "uncond", 29)
    with on_cluster(monkeypatch, cluster):
        run_store(store, LOCAL_CLUSTER)
    assert killed and killed["busy"], killed  # a worker with tasks in flight was killed
    client.wait_for_workers(2, timeout=60)
    assert killed["pid"] not in client.run(os.getpid).values()  # it was replaced
    reference = in_memory("knn", "uncond")
    for got, want in zip(finals(store), reference.scales):
        assert np.array_equal(got, want.numpy())
    assert np.array_equal(engine.read_output(store), jobs.to_pixels(reference.image))
