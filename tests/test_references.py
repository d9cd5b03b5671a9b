"""Several references (``--ref``): one patch set per scale drawn from every image and from nothing
else (``plan.reference_atlas``: the images side by side, the gaps between them left out of the
candidates like an inpainting hole).

Small jobs: the rocket example (186x248) with the coffee example (256x384) as a second reference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from gigasid import jobs
from gigasid.cli import main
from gigasid.config import load_pipeline
from gigasid.core.known import allowed_patches
from gigasid.graph import engine
from gigasid.graph.profiles import Profile
from gigasid.io.images import read_image
from gigasid.io.store import JobStore
from gigasid.plan import reference_atlas

REPO = Path(__file__).resolve().parent.parent
ROCKET, COFFEE = REPO / "examples" / "rocket.png", REPO / "examples" / "coffee.png"
PIXEL = ["num_steps=3", "num_scales=2", "min_short_side=24", "patch_size=7", "eta=0.5"]
LATENT = ["patch_size=5", "num_steps=3", "min_short_side=10", "latent.channels=16", "index.kind=auto"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def model(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def test_the_canvas_holds_every_image_apart() -> None:
    config = load_pipeline("uncond", PIXEL)
    canvas, outside = reference_atlas([model(ROCKET), model(COFFEE)], config)
    assert canvas.shape[1] == 256 and canvas.shape[2] > 248 + 384
    assert torch.equal(canvas[:, :186, :248], model(ROCKET))
    assert torch.equal(canvas[:, :, -384:], model(COFFEE))
    assert int((~outside).sum()) == 186 * 248 + 256 * 384  # exactly the images' pixels count
    gap = canvas.shape[2] - 248 - 384
    assert gap >= config.patch_size  # no finest-scale patch spans it (coarser scales: below)


def test_tiled_equals_in_memory_and_no_patch_spans_a_gap(tmp_path) -> None:
    config = load_pipeline("uncond", PIXEL)
    canvas, outside = reference_atlas([model(ROCKET), model(COFFEE)], config)
    job = jobs.prepare(canvas, config, size=(186, 248), excluded=outside)
    for denoiser in job.denoisers:  # every candidate source leaves the gap's patches out
        source = denoiser.candidate_source
        assert source.allowed is not None and not bool(source.allowed.all())
    expected = jobs.to_pixels(jobs.run(job, seed=4).image)
    store = engine.create_job(tmp_path / "two.zarr", canvas, config, size=(186, 248), seed=4, tile=40,
                              excluded=outside)
    try:
        engine.execute(store, Profile(kind="sync"), progress=engine.Progress(quiet=True))
    finally:
        store.release_lock()
    assert np.array_equal(engine.read_output(JobStore.open(store.path)), expected)
    # the gaps are read back by `gigasid check`: a damaged chunk is reported, and not repairable
    assert main(["check", str(store.path)]) == 0
    chunk = next(path for path in (store.path / "excluded" / "1").rglob("*") if path.is_file() and path.name != "zarr.json")
    chunk.write_bytes(b"garbage")
    assert main(["check", str(store.path)]) != 0
    with pytest.raises(Exception, match="excluded/1"):
        engine.resume(store.path, Profile(kind="sync"), progress=engine.Progress(quiet=True))


def test_a_job_draws_from_both_references(tmp_path, capsys) -> None:
    """The latent job's last-step matches (its correspondence map): both images are copied from,
    and no match is a patch touching a gap."""
    out = tmp_path / "two.zarr"
    settings = [arg for setting in LATENT for arg in ("--set", setting)]
    code = main(["generate", str(ROCKET), "--ref", str(COFFEE), "-o", str(out), "--pipeline", "gigapixel",
                 "--size", "256x640", "--tile", "40", *settings])
    assert code == 0, capsys.readouterr().err
    store = JobStore.open(out)
    matches = store.array("scales/0/matches")[...]
    ref_w = store.manifest["reference_shapes"][0][1]
    grid_w = ref_w - 5 + 1
    found = matches[matches >= 0]
    columns = found % grid_w * 8  # the matched patches' left pixel column on the canvas
    rocket, coffee = columns < 248, columns >= store.array("reference/0").shape[2] - 384
    assert rocket.mean() > 0.01 and coffee.mean() > 0.01, (rocket.mean(), coffee.mean())  # 4.5 % and 95 % today
    excluded = torch.from_numpy(store.array("excluded/0")[...] > 0)
    allowed = allowed_patches(excluded, 5).flatten()
    assert bool(allowed[torch.from_numpy(found)].all())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ref", "missing.png"], "missing.png"),
        (["--ref", "ROCKET", "--pipeline", "inpaint", "--mask", "ROCKET"], "--ref"),
        (["--ref", "ROCKET", "--structure", "COFFEE", "--pipeline", "analogy"], "--ref"),
    ],
)
def test_bad_references_are_one_line(tmp_path, capsys, extra, message) -> None:
    extra = [str(ROCKET) if arg == "ROCKET" else str(COFFEE) if arg == "COFFEE" else arg for arg in extra]
    code = main(["generate", str(COFFEE), "-o", str(tmp_path / "out.png"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out.png").exists()


def test_references_to_a_folder_and_overwriting_a_reference_are_refused(tmp_path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(ROCKET.read_bytes())
    assert main(["generate", str(folder), "--ref", str(COFFEE), "-o", str(tmp_path / "out")]) == 2
    assert "not to a folder" in capsys.readouterr().err
    copy = tmp_path / "coffee.png"
    copy.write_bytes(COFFEE.read_bytes())
    assert main(["generate", str(ROCKET), "--ref", str(copy), "-o", str(copy)]) == 2
    assert copy.read_bytes() == COFFEE.read_bytes()


class _StopAfter(engine.Progress):
    """Interrupts the job after ``count`` tile steps (a stopped run)."""

    def __init__(self, count: int):
        super().__init__(quiet=True)
        self.count = count

    def tick(self) -> None:
        self.count -= 1
        if self.count == 0:
            raise KeyboardInterrupt
        super().tick()


def test_a_stopped_job_over_two_references_resumes_to_the_same_pixels(tmp_path) -> None:
    config = load_pipeline("uncond", PIXEL)
    canvas, outside = reference_atlas([model(ROCKET), model(COFFEE)], config)
    expected = jobs.to_pixels(jobs.run(jobs.prepare(canvas, config, size=(186, 248), excluded=outside), seed=6).image)
    store = engine.create_job(tmp_path / "stopped.zarr", canvas, config, size=(186, 248), seed=6, tile=40,
                              excluded=outside)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.execute(store, Profile(kind="sync"), progress=_StopAfter(30))
    finally:
        store.release_lock()
    engine.resume(store.path, Profile(kind="sync"), progress=engine.Progress(quiet=True), log=lambda message: None)
    assert np.array_equal(engine.read_output(JobStore.open(store.path)), expected)
