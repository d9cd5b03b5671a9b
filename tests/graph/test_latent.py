"""The latent path through the engine (issue 4): a latent job run tile by tile gives the in-memory
job's pixels — reference encoding, sampling, correspondence or codec decode — and a killed latent
job resumes to the same pixels.

Jobs on the coffee example (256x384) with the lapped PCA codec (K = 16), P = 5 latent cells, T = 3,
eta = 1, 2 latent scales: small enough for seconds, large enough for several tiles per stage.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gigasid import jobs
from gigasid.config import load_pipeline
from gigasid.graph import engine
from gigasid.graph.profiles import Profile
from gigasid.io.images import read_image

REPO = Path(__file__).resolve().parents[2]
COFFEE = REPO / "examples" / "coffee.png"
SMALL = ["patch_size=5", "num_steps=3", "min_short_side=10", "latent.channels=16", "index.kind=auto"]
SEED = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def coffee() -> torch.Tensor:
    return torch.from_numpy(read_image(COFFEE)).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def _in_memory(image, config, size):
    return jobs.to_pixels(jobs.run(jobs.prepare(image, config, size=size), seed=SEED).image)


def _tiled(path, image, config, size, tile, kind="threads"):
    store = engine.create_job(path, image, config, size=size, seed=SEED, tile=tile)
    try:
        engine.execute(store, Profile(kind=kind, workers=2))
    finally:
        store.release_lock()
    return engine.read_output(store)


CASES = {
    "uncond-correspondence": ("gigapixel", [], (200, 296)),
    "uncond-codec": ("gigapixel", ["latent.decode=codec"], (200, 296)),
    # the large-output options: the texture channel, a narrower decode window
    "uncond-texture": ("gigapixel", ["latent.texture_channel=true", "latent.decode_rho=0.1"], (200, 296)),
    "tileable-correspondence": ("texture", [], (192, 320)),
    "retarget-correspondence": ("panorama", [], (256, 600)),
    # a 360° panorama: the columns wrap (latent grid, resampling and the correspondence decode)
    "wrap-correspondence": ("panorama-360", [], (256, 600)),
    # the coarsest scale from the pixel-space sampler, encoded (written at creation, then tiled)
    "uncond-pixel-layout": ("gigapixel", ["latent.layout=pixel"], (200, 296)),
    "tileable-pixel-layout": ("texture", ["latent.layout=pixel"], (192, 320)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tile", [18, 23])
def test_tiled_latent_job_equals_in_memory(tmp_path, coffee, case, tile):
    preset, extra, size = CASES[case]
    config = load_pipeline(preset, SMALL + extra)
    expected = _in_memory(coffee, config, size)
    got = _tiled(tmp_path / "job.zarr", coffee, config, size, tile)
    assert got.shape == (3, *size)
    assert np.array_equal(got, expected)


def test_latent_store_holds_codec_latents_and_matches(tmp_path, coffee):
    config = load_pipeline("gigapixel", SMALL)
    store = engine.create_job(tmp_path / "job.zarr", coffee, config, size=(200, 296), seed=SEED, tile=18)
    store.release_lock()
    manifest = store.manifest
    # 16 coefficients and the preset's texture channel
    assert manifest["factor"] == 8 and manifest["channels"] == 17 and manifest["image_channels"] == 3
    assert store.array("latent/0").shape == (17, 32, 48)
    assert store.load_codec_state()["basis"].shape == (3 * 256, 16)
    assert store.load_codec_state()["texture"] is True
    assert store.array("scales/0/matches").shape == (25 - 5 + 1, 37 - 5 + 1, 5)
    assert store.array("output").shape == (3, 200, 296)


def test_tileable_latent_output_wraps(coffee):
    config = load_pipeline("texture", SMALL)
    image = jobs.run(jobs.prepare(coffee, config, size=(192, 320)), seed=SEED).image
    # the seam across the wrap is no stronger than the image's own neighbour differences
    inner = (image[:, :, 1:] - image[:, :, :-1]).abs().mean()
    across = (image[:, :, 0] - image[:, :, -1]).abs().mean()
    assert across < 1.5 * inner


def test_a_tileable_latent_size_must_be_whole_cells(coffee):
    from gigasid.errors import InputError

    with pytest.raises(InputError, match="multiple of 8"):
        jobs.prepare(coffee, load_pipeline("texture", SMALL), size=(190, 320))


def test_correspondence_decode_needs_knn():
    from gigasid.errors import ConfigError

    with pytest.raises(ConfigError, match="latent.decode=codec"):
        load_pipeline("gigapixel", ["denoiser.backend=exact"])


def test_a_killed_latent_job_resumes_to_the_same_pixels(tmp_path, coffee):
    crop = tmp_path / "coffee.png"
    crop.write_bytes(COFFEE.read_bytes())
    args = ["generate", str(crop), "--pipeline", "gigapixel", "--size", "200x296", "--tile", "18",
            "--seed", str(SEED), *sum((["--set", s] for s in SMALL), [])]
    baseline = tmp_path / "baseline.zarr"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "gigasid.cli", *args, "-o", str(baseline)], check=True,
                   capture_output=True, cwd=tmp_path)
    seconds = time.monotonic() - started
    expected = engine.read_output(engine.JobStore.open(baseline))
    killed = tmp_path / "killed.zarr"
    process = subprocess.Popen([sys.executable, "-m", "gigasid.cli", *args, "-o", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (killed / "zarr.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3 * seconds)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert killed.exists(), "the kill landed before the store existed"
    done = subprocess.run([sys.executable, "-m", "gigasid.cli", "resume", str(killed)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(engine.read_output(engine.JobStore.open(killed)), expected)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A randomly initialised AutoencoderKL of the FLUX.1 layout (16 channels, 8x), tiny widths:
    real weights cannot be downloaded here."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
        scaling_factor=0.3611, shift_factor=0.1159,
    )
    folder = tmp_path_factory.mktemp("vae") / "tiny-flux-vae"
    model.save_pretrained(folder)
    return folder


def test_vae_job_end_to_end_tiled_equals_in_memory(tmp_path, coffee, tiny_vae):
    """The vae codec through the whole job: encoding the reference pyramid, latent sampling, and
    the correspondence decode (no VAE decoder involved, so tiles are exact)."""
    config = load_pipeline("gigapixel", [*SMALL, "latent.codec=vae", f"latent.vae_path={tiny_vae}"])
    expected = _in_memory(coffee, config, (200, 296))
    got = _tiled(tmp_path / "job.zarr", coffee, config, (200, 296), 18)
    assert np.array_equal(got, expected)


def test_vae_job_with_the_vae_decoder(tmp_path, coffee, tiny_vae):
    config = load_pipeline(
        "gigapixel", [*SMALL, "latent.codec=vae", f"latent.vae_path={tiny_vae}", "latent.decode=codec"]
    )
    got = _tiled(tmp_path / "job.zarr", coffee, config, (200, 296), 18)
    assert got.shape == (3, 200, 296)
    assert engine.JobStore.open(tmp_path / "job.zarr").load_codec_state()["name"] == "vae"


def test_a_vae_job_without_weights_says_where_it_looked(tmp_path, capsys):
    from gigasid.cli import main

    missing = tmp_path / "no-such-vae"
    code = main(["generate", str(COFFEE), "-o", str(tmp_path / "out.png"), "--pipeline", "gigapixel",
                 "--set", "latent.codec=vae", "--set", f"latent.vae_path={missing}"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and err.count("\n") == 1


def test_a_pixel_layout_is_the_pixel_samplers_and_follows_the_seed(coffee):
    """latent.layout=pixel: the coarsest latent scale is the codec's encoding of the paper's pixel
    sampler run on the reference's coarsest pixel level (not the latent sampler's), and a new seed
    gives a new layout."""
    config = load_pipeline("gigapixel", SMALL + ["latent.layout=pixel"])
    job = jobs.prepare(coffee, config, size=(200, 296))
    first = jobs.run(job, seed=SEED)
    coarsest = len(job.output_shapes) - 1
    layout = engine.pixel_layout(config, SEED, job.layout_level, job.output_shapes[-1], job.codec)
    assert torch.equal(first.scales[coarsest], layout)
    latent = jobs.run(jobs.prepare(coffee, load_pipeline("gigapixel", SMALL), size=(200, 296)), seed=SEED)
    assert not torch.equal(latent.scales[coarsest], layout)
    other = jobs.run(job, seed=SEED + 1)
    assert (other.scales[coarsest] - first.scales[coarsest]).abs().mean() > 0.05


@pytest.mark.parametrize("settings, message", [
    (["latent.layout=pixel"], "for latent jobs"),  # uncond's own codec: pixel
    (["latent.codec=pca", "application=retarget", "latent.layout=pixel"], "application=retarget"),
    (["latent.codec=pca", "application=outpaint", "latent.layout=pixel"], "set latent.layout=latent"),
])
def test_a_pixel_layout_where_it_cannot_apply_is_refused(settings, message):
    from gigasid.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_pipeline("uncond", settings)
