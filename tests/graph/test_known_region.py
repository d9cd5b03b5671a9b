"""Known regions (outpaint, inpaint): one mechanism, held at every scale and step by the one step.

Small jobs on a 48x64 crop of the rocket example, 2-3 scales, T = 3, eta = 0.5 (fresh noise at
every step: the known cells' noise mixes x_T's and the step's), knn (IVF, search stride 2) and
exact backends: the known pixels come out as the reference, the hole's patches are no candidates,
a tiled run equals the in-memory run bit for bit, a stopped or damaged job resumes to the same
pixels, and every bad input is one line with exit code 2.
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
from gigasid import plan as job_plan
from gigasid.cli import main
from gigasid.config import JobConfig, from_mapping
from gigasid.core.known import allowed_patches, hole_pyramid, latent_hole
from gigasid.graph import engine
from gigasid.graph.profiles import Profile
from gigasid.index.candidates import ReferenceCandidates
from gigasid.io.store import JobStore

REPO = Path(__file__).resolve().parents[2]
ROCKET = REPO / "examples" / "rocket.png"
SEED = 5
CANVAS = (64, 112)  # outpaint's canvas around the 48x64 crop


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def rocket() -> torch.Tensor:
    pixels = np.asarray(Image.open(ROCKET).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels[:48, :64]).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def hole() -> np.ndarray:
    mask = np.zeros((48, 64), bool)
    mask[18:29, 22:37] = True
    return mask


BACKENDS = {
    "knn": {"patch_size": 5, "denoiser": {"backend": "knn"}, "index": {"kind": "ivf", "search_stride": 2}},
    "exact": {"patch_size": 5, "denoiser": {"backend": "exact", "compute_dtype": "float32"}},
}


def config(backend: str, application: str, **extra) -> JobConfig:
    scales = 2 if application == "inpaint" else 3
    data = {"application": application, "num_steps": 3, "num_scales": scales, "eta": 0.5, "min_short_side": 12,
            **BACKENDS[backend], **extra}
    return from_mapping(JobConfig, data)


def size(application: str):
    return CANVAS if application == "outpaint" else None


def mask(application: str):
    return hole() if application == "inpaint" else None


@functools.cache
def in_memory(backend: str, application: str):
    job = jobs.prepare(rocket(), config(backend, application), size=size(application), mask=mask(application))
    return job, jobs.run(job, seed=SEED)


def new_store(tmp_path: Path, backend: str, application: str, tile: int, name: str) -> JobStore:
    return engine.create_job(tmp_path / name, rocket(), config(backend, application), size=size(application),
                             seed=SEED, tile=tile, mask=mask(application))


def run(store: JobStore, profile) -> None:
    try:
        engine.execute(store, profile, progress=engine.Progress(quiet=True))
    finally:
        store.release_lock()
        torch.set_num_threads(1)


def known_pixels(application: str, shape: tuple[int, int], region) -> np.ndarray:
    known = np.zeros(shape, bool)
    if application == "inpaint":
        return ~hole()
    top, left = region.offset
    known[top : top + 48, left : left + 64] = True
    return known


# --- what is held -----------------------------------------------------------------------------


@pytest.mark.parametrize("application", ["outpaint", "inpaint"])
@pytest.mark.parametrize("backend", ["knn", "exact"])
def test_the_known_pixels_come_out_as_the_reference(backend: str, application: str) -> None:
    job, result = in_memory(backend, application)
    image = jobs.to_pixels(result.image)
    region = job.known[0]
    known = known_pixels(application, image.shape[1:], region)
    reference = jobs.to_pixels(rocket())
    if application == "outpaint":
        top, left = region.offset
        assert image.shape[1:] == CANVAS and (top, left) == (8, 24)  # centred
        assert np.array_equal(image[:, top : top + 48, left : left + 64], reference)
    else:
        assert np.array_equal(image[:, known], reference[:, known])
        assert np.abs(image[:, ~known].astype(int) - reference[:, ~known]).mean() > 2  # regenerated
    # every scale holds its known cells exactly at the end (alpha_0 = 1, sigma_0 = 0)
    for scale, final in enumerate(result.scales):
        values, held = (torch.from_numpy(a) for a in _known_arrays(job, scale))
        keep = held[0].bool()
        assert torch.equal(final[:, keep], values[:, keep])


def _known_arrays(job, scale):
    region, levels, hole_mask = job.known
    holes = None if hole_mask is None else job_plan.known_holes(job.config, hole_mask, job.pixel_shapes)
    shape = job.output_shapes[scale]
    values, held = job_plan.known_box(
        region, scale, lambda b: levels[scale][:, b[0] : b[2], b[1] : b[3]], job.channels, (0, 0, *shape),
        None if holes is None else holes[scale],
    )
    return values.numpy(), held.numpy()


def test_the_place_options_put_the_reference_where_they_say() -> None:
    cfg = config("knn", "outpaint")
    for place, corner in [("center", (8, 24)), ("left", (8, 0)), ("right", (8, 48)), ("top", (0, 24)),
                          ("bottom", (16, 24)), ("10,3", (3, 10))]:
        assert job_plan.place_reference(
            from_mapping(JobConfig, {**job_plan.to_mapping(cfg), "place": place}), (48, 64), CANVAS
        ) == corner, place
    latent = from_mapping(JobConfig, {**job_plan.to_mapping(cfg), "place": "13,5",
                                      "latent": {"codec": "pca"}})
    assert job_plan.place_reference(latent, (48, 64), CANVAS) == (8, 16)  # whole 8-px cells


# --- the hole is not copied from itself ---------------------------------------------------------


def test_the_holes_patches_are_no_candidates() -> None:
    """Every candidate the index gives (strided search: shifted candidates too) is a patch that
    touches no hole cell, at every scale of the hole."""
    cfg = config("knn", "inpaint")
    levels = job_plan.reference_pyramid(rocket(), cfg, torch.from_numpy(hole()))
    holes = job_plan.known_holes(cfg, torch.from_numpy(hole()), [tuple(level.shape[-2:]) for level in levels])
    for level, cells in zip(levels, holes):
        source = ReferenceCandidates(level, 5, k=5, index="flat", search_stride=2, excluded=cells)
        allowed = allowed_patches(cells, 5).flatten()
        noisy = level + 0.3 * torch.randn(level.shape, generator=torch.Generator().manual_seed(0))
        found = source(noisy, 0.9, periodic=False)
        valid = found[found >= 0]
        assert valid.numel() > 0 and bool(allowed[valid].all())
        assert bool((found >= 0).any(1).all())  # every query keeps a candidate


def test_the_removed_content_reaches_no_level_and_the_hole_keeps_its_size() -> None:
    """An inpainting reference is pyramided from its known pixels alone: whatever the hole holds,
    every level is the same (the object a mask removes leaks into no coarse cell), and the hole
    covers about its own share of every level (it does not grow by the resampling taps' reach at
    each level, as the excluded cells of several references do)."""
    cfg = config("knn", "inpaint", num_scales=3, min_short_side=12)
    cells = torch.from_numpy(hole())
    painted = rocket().clone()
    painted[:, cells] = 1.0  # a white object where the mask is
    levels = job_plan.reference_pyramid(rocket(), cfg, cells)
    for level, other in zip(levels, job_plan.reference_pyramid(painted, cfg, cells)):
        assert torch.equal(level, other)
    shapes = [tuple(level.shape[-2:]) for level in levels]
    holes = job_plan.known_holes(cfg, cells, shapes)
    share = float(cells.float().mean())
    for shape, level in zip(shapes, holes):
        assert 0.5 * share <= float(level.float().mean()) <= 2.0 * share, shape
    assert float(hole_pyramid(cells, shapes)[-1].float().mean()) > 2.0 * share  # the dilation rule grows
    # known cells far from the hole keep the plain pyramid's values
    plain = job_plan.reference_pyramid(rocket(), cfg)
    assert torch.allclose(levels[-1][:, :2], plain[-1][:, :2], atol=1e-5)


def test_a_latent_hole_covers_every_cell_whose_block_touches_it() -> None:
    pixels = torch.zeros(40, 48, dtype=torch.bool)
    pixels[20, 30] = True  # cells whose block [8i - 4, 8i + 12) holds row 20: i = 2, 3; col 30: 3, 4
    cells = latent_hole(pixels, 8)
    assert cells.shape == (5, 6)
    assert torch.nonzero(cells).tolist() == [[2, 3], [2, 4], [3, 3], [3, 4]]


# --- the engine: tiled == in memory, resume, repair ----------------------------------------------


@pytest.mark.parametrize("application", ["outpaint", "inpaint"])
@pytest.mark.parametrize("backend", ["knn", "exact"])
def test_tiled_run_equals_the_in_memory_run(tmp_path, backend: str, application: str) -> None:
    """Bit for bit, every scale and the output, for a tile just above the halo and one that
    divides nothing (knn on 2 threads)."""
    _, result = in_memory(backend, application)
    shape = tuple(result.image.shape[-2:])
    halo = engine.job_halo(config(backend, application), [shape])
    profile = Profile(kind="threads", workers=2, compute_threads=1) if backend == "knn" else Profile(kind="sync")
    for tile in (halo + 1, halo + 7):
        store = new_store(tmp_path, backend, application, tile, f"tile{tile}.zarr")
        run(store, profile)
        for scale, want in enumerate(result.scales):
            got = store.array(f"scales/{scale}/final")[...]
            assert np.array_equal(got, want.numpy()), (tile, scale, float(np.abs(got - want.numpy()).max()))
        assert np.array_equal(engine.read_output(store), jobs.to_pixels(result.image)), tile


class StopAfter:
    """Runs a graph one task at a time in a seeded random ready order; KeyboardInterrupt (a
    killed job) after ``left`` tasks."""

    def __init__(self, seed: int, left: int):
        self.random, self.left = random.Random(seed), left

    def run_graph(self, graph, on_done, *, parallel):
        waiting = {key: set(deps) for key, (_, deps) in graph.items()}
        finished = set()
        while waiting:
            key = self.random.choice(sorted(k for k, deps in waiting.items() if deps <= finished))
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            on_done(graph[key][0]())
            finished.add(key)
            del waiting[key]


@pytest.mark.parametrize("application,stop", [("outpaint", 31), ("inpaint", 17)])
def test_a_stopped_job_resumes_to_the_same_pixels(tmp_path, application: str, stop: int) -> None:
    _, result = in_memory("knn", application)
    halo = engine.job_halo(config("knn", application), [tuple(result.image.shape[-2:])])
    store = new_store(tmp_path, "knn", application, halo + 1, "stopped.zarr")
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.execute(store, StopAfter(stop, stop), progress=engine.Progress(quiet=True))
    finally:
        store.release_lock()
    engine.resume(store.path, Profile(kind="sync"), progress=engine.Progress(quiet=True), log=lambda message: None)
    assert np.array_equal(engine.read_output(JobStore.open(store.path)), jobs.to_pixels(result.image))


def test_damaged_known_arrays_are_found_and_written_again(tmp_path) -> None:
    """`gigasid check` reads the known values and masks; resume writes them again from the
    reference and the stored mask and gives the undamaged run's pixels; a damaged inpainting
    mask itself cannot be had back."""
    _, result = in_memory("knn", "inpaint")
    store = new_store(tmp_path, "knn", "inpaint", 40, "damaged.zarr")
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.execute(store, StopAfter(1, 9), progress=engine.Progress(quiet=True))
    finally:
        store.release_lock()
    (store.path / "known/0/values/c/0/0/1").write_bytes(b"garbage")
    (store.path / "known/1/mask/c/0/0/0").unlink()
    assert main(["check", str(store.path)]) == 2
    messages = []
    engine.resume(store.path, Profile(kind="sync"), progress=engine.Progress(quiet=True), log=messages.append)
    assert any("known region" in message for message in messages), messages
    assert np.array_equal(engine.read_output(JobStore.open(store.path)), jobs.to_pixels(result.image))
    assert main(["check", str(store.path)]) == 0
    (store.path / "known/hole/c/0/0").write_bytes(b"garbage")
    with pytest.raises(Exception, match="known/hole"):
        engine.resume(store.path, Profile(kind="sync"), progress=engine.Progress(quiet=True), log=messages.append)


# --- latent outpainting: the known pixels pasted back ---------------------------------------------


def test_a_latent_outpaint_keeps_the_reference_and_tiles_like_the_in_memory_run(tmp_path) -> None:
    image = rocket().repeat(1, 2, 2)[:, :96, :128].contiguous()  # 12x16 latent cells
    cfg = from_mapping(JobConfig, {
        "application": "outpaint", "num_steps": 2, "num_scales": 2, "eta": 1.0, "patch_size": 5,
        "min_short_side": 6, "place": "5,3", "denoiser": {"backend": "knn"},
        "index": {"kind": "flat", "search_stride": 2, "search_dims": 0},
        "latent": {"codec": "pca", "channels": 8, "fit_blocks": 1000, "decode_rho": 0.1},
    })
    job = jobs.prepare(image, cfg, size=(112, 200))
    assert job.known[0].offset == (0, 8)  # 5,3 rounded to whole cells
    expected = jobs.to_pixels(jobs.run(job, seed=SEED).image)
    reference = jobs.to_pixels(image)
    assert np.array_equal(expected[:, 0:96, 8:136], reference)
    store = engine.create_job(tmp_path / "latent.zarr", image, cfg, size=(112, 200), seed=SEED, tile=18)
    run(store, Profile(kind="sync"))
    assert np.array_equal(engine.read_output(store), expected)


# --- bad input: one line, exit code 2 ----------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    reference = folder / "ref.png"
    Image.fromarray(jobs.to_pixels(rocket()).transpose(1, 2, 0)).save(reference)
    paths = {"ref": reference}
    for name, values in [("mask", hole()), ("small", np.ones((10, 10), bool)), ("empty", np.zeros((48, 64), bool)),
                         ("full", np.ones((48, 64), bool))]:
        paths[name] = folder / f"{name}.png"
        Image.fromarray((values * 255).astype(np.uint8)).save(paths[name])
    paths["text"] = folder / "notes.png"
    paths["text"].write_text("not an image")
    return paths


SMALL = ["--set", "num_steps=2", "--set", "patch_size=5", "--set", "min_short_side=12", "--set", "num_scales=2"]


@pytest.mark.parametrize("case,arguments,message", [
    ("wrong size", ["--pipeline", "inpaint", "--mask", "small"], "the mask is 10x10 but the reference is 48x64"),
    ("not an image", ["--pipeline", "inpaint", "--mask", "text"], "--mask"),
    ("empty", ["--pipeline", "inpaint", "--mask", "empty"], "nothing to regenerate"),
    ("full", ["--pipeline", "inpaint", "--mask", "full"], "white everywhere"),
    ("no mask", ["--pipeline", "inpaint"], "needs --mask"),
    ("mask elsewhere", ["--pipeline", "uncond", "--mask", "mask"], "--mask is for --pipeline inpaint"),
    ("place outside", ["--pipeline", "outpaint", "--size", "64x112", "--place", "60,0"], "outside the 64x112 canvas"),
    ("bad place", ["--pipeline", "outpaint", "--size", "64x112", "--place", "middle"], "--place must be one of"),
    ("small canvas", ["--pipeline", "outpaint", "--size", "40x112"], "smaller than the 48x64 reference"),
    ("inpaint size", ["--pipeline", "inpaint", "--mask", "mask", "--size", "64x64"], "keeps the reference's size"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, files, capsys, case, arguments, message) -> None:
    arguments = [str(files[a]) if a in files else a for a in arguments]
    for output in (tmp_path / "out.png", tmp_path / "out.zarr"):
        code = main(["generate", str(files["ref"]), "-o", str(output), *arguments, *SMALL])
        err = capsys.readouterr().err
        assert code == 2, (case, err)
        assert message in err and len(err.strip().splitlines()) == 1, (case, err)
        assert not output.exists()


def test_the_cli_runs_both_and_keeps_the_known_pixels(tmp_path, files) -> None:
    reference = np.asarray(Image.open(files["ref"]))
    out = tmp_path / "inpainted.png"
    assert main(["generate", str(files["ref"]), "-o", str(out), "--pipeline", "inpaint", "--mask",
                 str(files["mask"]), *SMALL]) == 0
    got = np.asarray(Image.open(out))
    assert np.array_equal(got[~hole()], reference[~hole()])
    out = tmp_path / "outpainted.png"
    assert main(["generate", str(files["ref"]), "-o", str(out), "--pipeline", "outpaint", "--size", "64x112",
                 "--place", "left", "--tile", "40", *SMALL]) == 0
    got = np.asarray(Image.open(out))
    assert got.shape[:2] == (64, 112) and np.array_equal(got[8:56, 0:64], reference)


def test_a_damaged_inpainting_reference_is_read_again_without_its_hole(tmp_path, files) -> None:
    """Resume reads a damaged reference level again from its file, as the known pixels' pyramid
    (with the stored mask), builds the level's lost index from it and gives the undamaged job's
    pixels."""
    store = tmp_path / "inpaint.zarr"
    assert main(["generate", str(files["ref"]), "-o", str(store), "--pipeline", "inpaint", "--mask",
                 str(files["mask"]), "--tile", "40", *SMALL]) == 0
    want = engine.read_output(JobStore.open(store))
    level = store / "reference" / "1"
    for chunk in (level / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    for built in (store / "index" / "1").iterdir():
        built.unlink()  # the index and the sampled copy of the level are built again from it
    for done in [*(store / "scales").glob("*/done/c/**/*"), *(store / "output_done").glob("c/**/*")]:
        if done.is_file():
            done.unlink()  # every scale is sampled again from the read-back reference, and exported
    assert main(["check", str(store)]) == 2
    assert main(["resume", str(store)]) == 0
    assert np.array_equal(engine.read_output(JobStore.open(store)), want)
