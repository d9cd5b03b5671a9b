"""The Python API of jobs (``gigasid.api``): create, submit to a client or a profile, follow,
resume, and read the output and its pyramid back as dask arrays.

The jobs are the ``smoke`` preset on a real photograph (186x248, 2 scales x 3 steps) with 64 px
tiles: 12 tiles at the finest scale, so the progress moves in many small steps.
"""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from PIL import Image

from gigasid.api import Job, JobProgress, create_job, job_progress, open_job, open_output, resume_job
from gigasid.errors import ConfigError, InputError
from gigasid.graph import engine
from gigasid.graph.profiles import Profile
from gigasid.io.output_pyramid import downsample_2x2
from gigasid.io.store import JobStore
from gigasid.io.testing import deny_writes

REPO = Path(__file__).resolve().parent.parent
ROCKET = REPO / "examples" / "rocket.png"  # 186 rows x 248 columns, RGB
SHAPE = (3, 186, 248)
JOB = {"pipeline": "smoke", "tile": 64, "seed": 3}


@pytest.fixture(scope="module")
def client():
    """A 2-worker LocalCluster (processes) and a client of it, as a user would open them."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def finished(client, tmp_path_factory) -> tuple[Path, list[JobProgress]]:
    """A job submitted to the client and followed until done: its store and the progress seen."""
    path = tmp_path_factory.mktemp("api") / "job.zarr"
    job = create_job(path, ROCKET, **JOB)
    assert isinstance(job, Job) and not job.running and not job.done
    seen = [job.progress()]
    assert job.submit(client) is job
    deadline = time.monotonic() + 300
    while job.running and time.monotonic() < deadline:
        seen.append(job.progress())
        time.sleep(0.02)
    job.wait(timeout=60)
    seen.append(job.progress())
    return path, seen


def test_a_new_job_has_done_nothing(tmp_path) -> None:
    job = create_job(tmp_path / "new.zarr", ROCKET, **JOB)
    progress = job.progress()
    # the coarsest scale (93x124: 2x2 tiles) comes first; 4 stages (x_T and 3 steps) per tile
    assert progress == JobProgress(status="created", scales=2, scales_done=0, scale=1, tiles_done=0,
                                   tiles_total=4 * 4, fraction=0.0)
    assert not progress.complete and not job.done and job.error is None
    assert job.manifest["seed"] == 3 and job.manifest["tile"] == 64
    assert open_job(tmp_path / "new.zarr").progress() == progress  # read from the store alone
    assert "0% done" in repr(job)


def test_submitted_to_a_client_progress_is_monotone_and_ends_complete(client, finished) -> None:
    path, seen = finished
    fractions = [p.fraction for p in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(a <= b for a, b in pairwise(fractions)), fractions
    assert len(set(fractions)) > 3  # followed while it ran, not only before and after
    scales_done = [p.scales_done for p in seen]
    assert all(a <= b for a, b in pairwise(scales_done))
    last = seen[-1]
    assert last.complete and last.scales_done == 2 and last.scale is None
    assert last.tiles_done == last.tiles_total == 12  # the output's tiles, 3 x 4
    assert client.status == "running"  # the caller's client is left open
    assert open_job(path).done


def test_the_output_as_a_dask_array_is_the_exported_image(finished, tmp_path) -> None:
    from gigasid.io.exporters import export

    path, _ = finished
    image = open_output(path)
    assert isinstance(image, da.Array)
    assert image.dtype == np.uint8 and image.shape == SHAPE and image.chunksize == (3, 64, 64)
    pixels = image.compute()  # on the module's client: the chunks are read in the workers
    assert np.array_equal(pixels, engine.read_output(JobStore.open(path)))
    export(path, tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as written:
        assert np.array_equal(np.asarray(written).transpose(2, 0, 1), pixels)


def test_pyramid_levels_as_dask_arrays(finished) -> None:
    path, _ = finished
    level0 = open_output(path).compute()
    level1 = open_output(path, level=1)
    assert level1.shape == (3, 93, 124) and level1.dtype == np.uint8
    assert np.array_equal(level1.compute(), downsample_2x2(level0))
    assert open_output(path, level=2).shape == (3, 47, 62)
    assert open_output(path, level=8).shape == (3, 1, 1)  # 248 → 124 → … → 1
    with pytest.raises(InputError, match="level must be an integer from 0 .* to 8"):
        open_output(path, level=9)
    with pytest.raises(InputError, match="level"):
        open_output(path, level=-1)


def test_profiles_by_name_and_resume_give_the_clients_pixels(finished, tmp_path, monkeypatch) -> None:
    path, _ = finished
    expected = open_output(path).compute()
    job = create_job(tmp_path / "sync.zarr", ROCKET, **JOB).submit("sync")
    assert job.wait().done
    assert np.array_equal(open_output(job.path).compute(), expected)
    # a job stopped before its output: the store says what is left, resume_job writes it
    store = JobStore.open(job.path)
    store.array("output_done")[...] = 0
    store.update_manifest(status="running", output_done=False)
    stopped = job_progress(job.path)
    assert stopped.scale is None and stopped.tiles_done == 0 and stopped.tiles_total == 12
    assert 0.5 < stopped.fraction < 1.0
    with pytest.raises(InputError, match="not finished"):
        open_output(job.path)
    resumed = resume_job(job.path, Profile(kind="threads", workers=2))
    assert resumed.wait(timeout=120).done
    assert any("checked" in line for line in resumed.log)
    assert np.array_equal(open_output(job.path).compute(), expected)
    # a finished store that has no pyramid yet and cannot be written: level 0 only
    deny_writes(monkeypatch, job.path)
    assert open_output(job.path).shape == SHAPE
    with pytest.raises(InputError, match="not writable"):
        open_output(job.path, level=1)


def test_bad_inputs_are_clear_errors(tmp_path, client) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_job(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not a gigasid job store"):
        open_job(tmp_path / "folder")
    with pytest.raises(InputError, match="not a gigasid job store"):
        open_output(ROCKET)
    with pytest.raises(ConfigError, match="unknown pipeline 'nonesuch'"):
        create_job(tmp_path / "a.zarr", ROCKET, pipeline="nonesuch")
    with pytest.raises(InputError, match="seed"):
        create_job(tmp_path / "a.zarr", ROCKET, pipeline="smoke", seed=-1)
    with pytest.raises(InputError, match="size"):
        create_job(tmp_path / "a.zarr", ROCKET, pipeline="smoke", size=(0, 64))
    with pytest.raises(InputError, match="tile"):
        create_job(tmp_path / "a.zarr", ROCKET, pipeline="smoke", tile=0)
    job = create_job(tmp_path / "a.zarr", ROCKET, **JOB)
    with pytest.raises(InputError, match="exists"):
        create_job(tmp_path / "a.zarr", ROCKET, **JOB)
    with pytest.raises(InputError, match="not finished"):
        open_output(job.path)
    with pytest.raises(ConfigError, match="distributed.Client"):
        job.submit(42)
    with pytest.raises(ConfigError, match="unknown scheduler profile 'nonesuch'"):
        job.submit("nonesuch")
    assert job.progress().status == "created" and not job.running  # nothing was started


def test_the_applications_inputs_through_the_api(tmp_path) -> None:
    """references (``--ref``), structure (``--structure``) and mask (``--mask``) as the command
    line takes them: the same pixels as ``gigasid generate`` into a store, and the same refusals."""
    from gigasid.cli import main

    coffee = REPO / "examples" / "coffee.png"
    job = create_job(tmp_path / "two.zarr", ROCKET, pipeline="smoke", tile=64, seed=3, references=[coffee])
    job.submit("sync").wait()
    assert main(["generate", str(ROCKET), "--ref", str(coffee), "-o", str(tmp_path / "cli.zarr"), "--pipeline",
                 "smoke", "--tile", "64", "--seed", "3"]) == 0
    cli_output = engine.read_output(JobStore.open(tmp_path / "cli.zarr"))
    assert np.array_equal(open_output(tmp_path / "two.zarr").compute(), cli_output)
    with pytest.raises(InputError, match="structure"):
        create_job(tmp_path / "a.zarr", ROCKET, pipeline="analogy")  # analogy without its layout
    with pytest.raises(InputError, match="mask"):
        create_job(tmp_path / "b.zarr", ROCKET, pipeline="inpaint")
    with pytest.raises(InputError, match="one"):
        create_job(tmp_path / "c.zarr", ROCKET, pipeline="inpaint", mask=ROCKET, references=[coffee])
    with pytest.raises(InputError, match="missing.png"):
        create_job(tmp_path / "d.zarr", ROCKET, pipeline="smoke", references=[tmp_path / "missing.png"])
