"""Structural analogy (issue 14): the coarsest scale is the structure image's layout, given, not
sampled; every finer scale is sampled with the style's (the input's) patches.

Small jobs: the style a 48x64 crop of the coffee example, the structure a 48x64 crop of the rocket
example (RGB, or its grey), 3 scales, T = 3, eta = 0.5; ``exact`` (float32, P = 5) and ``knn``
(IVF, search stride 2, P = 7), and the latent preset on small settings. What is held: tiled ==
in-memory bit for bit, the given coarsest values kept in the store (``structure/given``),
checked and rewritten by ``resume``, a killed job resuming to the same pixels, and one line
(exit 2) for every bad input.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigasid import jobs, plan
from gigasid.cli import main
from gigasid.config import JobConfig, from_mapping, load_pipeline
from gigasid.errors import InputError
from gigasid.graph import engine
from gigasid.graph.profiles import Profile
from gigasid.io.store import JobStore

REPO = Path(__file__).resolve().parents[2]
ROCKET = REPO / "examples" / "rocket.png"
COFFEE = REPO / "examples" / "coffee.png"
SEED = 3

BACKENDS = {
    "exact": {"patch_size": 5, "min_short_side": 12, "denoiser": {"backend": "exact", "compute_dtype": "float32"}},
    "knn": {"patch_size": 7, "min_short_side": 12, "denoiser": {"backend": "knn"},
            "index": {"kind": "ivf", "search_stride": 2}},
}
# the CLI's small job (the analogy preset on the crops), for the store and command-line tests
SMALL = ["--pipeline", "analogy", "--set", "patch_size=7", "--set", "num_steps=3", "--set", "eta=0.5",
         "--set", "min_short_side=12"]


pytestmark = pytest.mark.usefixtures("one_thread")


def crop(path: Path, box: tuple[int, int, int, int], grey: bool = False) -> torch.Tensor:
    image = Image.open(path).convert("L" if grey else "RGB").crop(box)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if grey:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0


@functools.cache
def style() -> torch.Tensor:
    return crop(COFFEE, (100, 60, 164, 108))


@functools.cache
def structure(grey: bool = False) -> torch.Tensor:
    return crop(ROCKET, (60, 40, 124, 88), grey=grey)


def config(backend: str) -> JobConfig:
    return from_mapping(JobConfig, {"application": "analogy", "num_steps": 3, "num_scales": 3, "eta": 0.5,
                                    **BACKENDS[backend]})


@functools.cache
def in_memory(backend: str, grey: bool):
    torch.set_num_threads(1)
    return jobs.run(jobs.prepare(style(), config(backend), structure=structure(grey)), seed=SEED)


def finals(store) -> list[np.ndarray]:
    return [store.array(f"scales/{s}/final")[...] for s in range(len(store.manifest["output_shapes"]))]


def run_store(store, profile: Profile) -> None:
    try:
        with open(os.devnull, "w") as quiet:
            engine.execute(store, profile, progress=engine.Progress(quiet))
    finally:
        store.release_lock()
        torch.set_num_threads(1)


@pytest.mark.parametrize("grey", [False, True], ids=["rgb-structure", "grey-structure"])
@pytest.mark.parametrize("backend", ["exact", "knn"])
def test_tiled_analogy_equals_the_in_memory_run(tmp_path: Path, backend: str, grey: bool) -> None:
    """Bit for bit, every scale, for tiles that divide nothing and one covering the image; a grey
    structure is repeated into the style's RGB in both executors."""
    reference = in_memory(backend, grey)
    shape = tuple(reference.image.shape[-2:])
    assert shape == (48, 64)  # the structure's size
    halo = engine.job_halo(config(backend), [shape])
    profile = Profile(kind="sync", compute_threads=1) if backend == "exact" else Profile(
        kind="threads", workers=2, compute_threads=1)
    for tile in (halo + 1, 2 * halo - 3, max(shape)):
        store = engine.create_job(tmp_path / f"t{tile}.zarr", style(), config(backend), size=None, seed=SEED,
                                  tile=tile, structure=structure(grey))
        assert store.manifest["given_coarsest"] and 2 in store.manifest["scales_done"]
        run_store(store, profile)
        for scale, (got, want) in enumerate(zip(finals(store), reference.scales)):
            assert np.array_equal(got, want.numpy()), (tile, scale, float(np.abs(got - want.numpy()).max()))
        assert np.array_equal(engine.read_output(store), jobs.to_pixels(reference.image)), tile
        assert np.array_equal(store.array("structure/given")[...], reference.scales[-1].numpy())


def test_the_given_coarsest_scale_is_the_structures_layout() -> None:
    """structure_noise 0: the structure's own coarsest level (its pyramid on the output's coarsest
    grid); the default 0.5: that layout in the style's patches, still closer to it than the style's
    own coarsest level is."""
    settings = config("exact")
    kept = jobs.prepare(style(), from_mapping(JobConfig, {**plan.to_mapping(settings), "structure_noise": 0.0}),
                        structure=structure())
    coarsest = kept.output_shapes[-1]
    shapes = plan.structure_shapes(48, 64, coarsest)
    assert shapes[-1] == coarsest == (12, 16)
    assert torch.equal(kept.fixed_coarsest, plan.structure_pyramid(structure(), shapes)[-1])
    drawn = in_memory("exact", False).scales[-1]
    layout = kept.fixed_coarsest
    style_coarsest = plan.reference_pyramid(style(), settings)[-1]
    assert float((drawn - layout).abs().mean()) < float((style_coarsest - layout).abs().mean())


def test_a_latent_analogy_runs_tiled_as_in_memory(tmp_path: Path) -> None:
    """analogy-large on small settings: the structure encoded with the codec fitted on the style."""
    settings = load_pipeline("analogy-large", ["patch_size=5", "num_steps=3", "latent.channels=16",
                                               "min_short_side=5", "index.kind=auto"])
    big_style, big_structure = crop(COFFEE, (0, 0, 384, 256)), crop(ROCKET, (0, 0, 248, 186))
    expected = jobs.to_pixels(jobs.run(jobs.prepare(big_style, settings, structure=big_structure), seed=SEED).image)
    assert expected.shape == (3, 186, 248)
    store = engine.create_job(tmp_path / "latent.zarr", big_style, settings, size=None, seed=SEED, tile=18,
                              structure=big_structure)
    assert store.manifest["factor"] == 8
    run_store(store, Profile(kind="threads", workers=2, compute_threads=1))
    assert np.array_equal(engine.read_output(store), expected)


# --- the store: kept, checked, rewritten, resumed ------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("analogy")
    paths = {"style": folder / "style.png", "structure": folder / "structure.png", "grey": folder / "grey.png",
             "text": folder / "notes.png", "tall": folder / "tall.png"}
    Image.open(COFFEE).convert("RGB").crop((100, 60, 164, 108)).save(paths["style"])
    Image.open(ROCKET).convert("RGB").crop((60, 40, 124, 88)).save(paths["structure"])
    Image.open(ROCKET).convert("L").crop((60, 40, 124, 88)).save(paths["grey"])
    Image.open(ROCKET).convert("RGB").crop((60, 40, 108, 104)).save(paths["tall"])  # 64x48
    paths["text"].write_text("not an image")
    return paths


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    torch.set_num_threads(1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("gigasid: error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("finished") / "job.zarr"
    assert main(["generate", str(files["style"]), "--structure", str(files["structure"]), "-o", str(store),
                 "--tile", "24", *SMALL]) == 0
    torch.set_num_threads(1)
    return store


def test_image_and_store_outputs_agree_and_check_reads_the_structure(files, finished, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "generate", files["style"], "--structure", files["structure"],
                             "-o", tmp_path / "out.png", *SMALL)
    assert code == 0, err
    image = np.asarray(Image.open(tmp_path / "out.png")).transpose(2, 0, 1)
    assert np.array_equal(image, engine.read_output(JobStore.open(finished)))
    assert run_cli(capsys, "check", finished)[0] == 0
    manifest = JobStore.open(finished).manifest
    assert manifest["structure_file"]["path"] == str(files["structure"].resolve())
    assert manifest["structure_shapes"][-1] == manifest["output_shapes"][-1]


def test_damaged_given_values_and_structure_are_rewritten(files, finished, tmp_path, capsys) -> None:
    expected = engine.read_output(JobStore.open(finished))
    structure = tmp_path / "structure.png"
    shutil.copy(files["structure"], structure)
    store = tmp_path / "job.zarr"
    assert run_cli(capsys, "generate", files["style"], "--structure", structure, "-o", store, "--tile", "24",
                   *SMALL)[0] == 0
    coarsest = len(JobStore.open(store).manifest["output_shapes"]) - 1
    for key in (f"scales/{coarsest}/final/c/0/0/0", "scales/1/final/c/0/0/0", "structure/0/c/0/0/0",
                "structure/given/c/0/0/0"):
        data = bytearray((store / key).read_bytes())
        data[len(data) // 2] ^= 0x10
        (store / key).write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "check", store)
    assert code == 2 and "structure/given" in out and f"scales/{coarsest}/final" in out
    code, _, err = run_cli(capsys, "resume", store)
    assert code == 0 and "structure: read again from" in err and "given coarsest" in err, err
    assert np.array_equal(engine.read_output(JobStore.open(store)), expected)
    assert run_cli(capsys, "check", store)[0] == 0
    # the structure image changed since: its pyramid cannot be had back
    (store / "structure/0/c/0/0/0").unlink()
    Image.open(files["tall"]).save(structure)
    code, _, err = run_cli(capsys, "resume", store)
    one_line(code, err, "structure/0/c/0/0/0", "cannot be recomputed")


def test_a_killed_analogy_resumes_to_the_same_pixels(files, finished, tmp_path) -> None:
    expected = engine.read_output(JobStore.open(finished))
    killed = tmp_path / "killed.zarr"
    args = [sys.executable, "-m", "gigasid.cli", "generate", str(files["style"]), "--structure",
            str(files["structure"]), "-o", str(killed), "--tile", "24", "--scheduler", "sync", *SMALL]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 120
    started = killed / "scales" / "1" / "done" / "c"  # scale 1's first tile step is done (2 is given)
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert killed.exists(), "the kill landed before the store existed"
    assert JobStore.open(killed).manifest["status"] != "complete", "the kill landed after the job"
    done = subprocess.run([sys.executable, "-m", "gigasid.cli", "resume", str(killed)], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(engine.read_output(JobStore.open(killed)), expected)


# --- bad inputs: one line, exit 2 ----------------------------------------------------------------


def test_a_grey_structure_takes_the_styles_channels(files, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "generate", files["style"], "--structure", files["grey"], "-o",
                           tmp_path / "g.png", *SMALL)
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (48, 64, 3)
    # and an RGB structure of a grey style becomes its luma
    code, _, err = run_cli(capsys, "generate", files["grey"], "--structure", files["structure"], "-o",
                           tmp_path / "l.png", *SMALL)
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "l.png")).shape == (48, 64)


@pytest.mark.parametrize("case", ["missing", "unreadable", "folder", "not-analogy", "no-structure",
                                  "aspect", "aspect-store", "folder-input", "overwrites-structure"])
def test_bad_structure_inputs_are_one_line(files, tmp_path, capsys, case) -> None:
    out = tmp_path / "out.png"
    style, structure = files["style"], files["structure"]
    args = {
        "missing": ([style, "--structure", tmp_path / "nope.png", "-o", out, *SMALL],
                    ["structure image", "does not exist"]),
        "unreadable": ([style, "--structure", files["text"], "-o", out, *SMALL], ["notes.png"]),
        "folder": ([style, "--structure", tmp_path, "-o", out, *SMALL], ["structure image", "folder"]),
        "not-analogy": ([style, "--structure", structure, "-o", out, "--pipeline", "uncond"],
                        ["--structure", "analogy", "uncond"]),
        "no-structure": ([style, "-o", out, *SMALL], ["needs a structure image", "--structure"]),
        "aspect": ([style, "--structure", files["tall"], "-o", out, "--size", "48x64", *SMALL],
                   ["64x48", "aspect", "--size 48x36"]),
        "aspect-store": ([style, "--structure", structure, "-o", tmp_path / "j.zarr", "--size", "48x96", *SMALL],
                         ["aspect", "--size 48x64"]),
        "folder-input": ([files["style"].parent, "--structure", structure, "-o", tmp_path / "outs", *SMALL],
                         ["not a folder"]),
        "overwrites-structure": ([style, "--structure", structure, "-o", structure, *SMALL], ["destroy"]),
    }[case]
    before = {path: path.read_bytes() for path in files.values()}
    code, _, err = run_cli(capsys, "generate", *args[0])
    one_line(code, err, *args[1])
    assert not out.exists() and not (tmp_path / "j.zarr").exists()
    assert {path: path.read_bytes() for path in files.values()} == before


def test_the_api_refuses_a_mismatched_structure() -> None:
    with pytest.raises(InputError, match="needs a structure image"):
        jobs.prepare(style(), config("exact"))
    with pytest.raises(InputError, match="aspect"):
        jobs.prepare(style(), config("exact"), structure=structure(), size=(48, 48))
    uncond = from_mapping(JobConfig, {**plan.to_mapping(config("exact")), "application": "uncond"})
    with pytest.raises(InputError, match="--structure"):
        jobs.prepare(style(), uncond, structure=structure())
