"""Tests for gigasid.codecs.vae on tiny randomly initialised diffusers models of the real layouts.

No pretrained VAE can be installed here, so the models are the FLUX.1 AutoencoderKL layout (16
latent channels, four blocks → 8×, FLUX's scaling and shift factors) and a TAESD-style
AutoencoderTiny at toy widths, saved to disk and loaded back through ``load_vae`` exactly as real
weights would be: from a folder, a pipeline root with ``vae/``, or a Hugging Face cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gigasid.codecs import decode_box, encode_box, latent_shape
from gigasid.codecs.vae import DECODE_HALO, ENCODE_HALO, VaeCodec, load_vae
from gigasid.errors import ConfigError, InputError, WeightsNotFoundError

diffusers = pytest.importorskip("diffusers")

FLUX_SCALING, FLUX_SHIFT = 0.3611, 0.1159  # black-forest-labs/FLUX.1-dev vae/config.json


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny_kl() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=64,
        scaling_factor=FLUX_SCALING,
        shift_factor=FLUX_SHIFT,
        use_quant_conv=False,  # as FLUX's
        use_post_quant_conv=False,
    )


def _tiny_taesd() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=16,  # as taef1's
    )


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux_vae")
    _tiny_kl().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("taesd")
    _tiny_taesd().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kl(kl_dir) -> VaeCodec:
    return load_vae(kl_dir)


def _image(channels: int = 3, height: int = 61, width: int = 45, seed: int = 1) -> torch.Tensor:
    """A smooth random image in [-1, 1]: bicubic blow-up of coarse noise, like photo content."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, -(-height // 8), -(-width // 8), generator=generator) * 2 - 1
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return fine[0].clamp(-1, 1)


def _assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# --- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["kl", "taesd"])
@pytest.mark.parametrize(("height", "width"), [(64, 48), (61, 45), (5, 3)])
def test_shapes_and_dtype(request, which: str, height: int, width: int) -> None:
    codec = load_vae(request.getfixturevalue(f"{which}_dir"))
    assert (codec.factor, codec.channels, codec.image_channels) == (8, 16, 3)
    latents = codec.encode(_image(height=height, width=width))
    # a partial 8×8 block becomes one whole cell
    assert latents.shape == (16, *latent_shape(height, width, 8))
    assert latents.dtype == torch.float32
    pixels = codec.decode(latents)
    assert pixels.shape == (3, 8 * latents.shape[1], 8 * latents.shape[2])
    assert pixels.dtype == torch.float32
    # ordinary tensors, not inference-mode ones: callers may edit them in place
    latents += 1
    pixels.clamp_(-1, 1)


def test_class_is_read_from_config(kl, taesd_dir) -> None:
    assert kl.class_name == "AutoencoderKL"
    assert isinstance(kl.model, diffusers.AutoencoderKL)
    taesd = load_vae(taesd_dir)
    assert taesd.class_name == "AutoencoderTiny"
    # TAESD's encoder emits normalised latents; its config says so with the identity
    assert (taesd.scaling_factor, taesd.shift_factor) == (1.0, 0.0)


def test_encoding_is_deterministic(kl, kl_dir) -> None:
    image = _image()
    first = kl.encode(image)
    assert torch.equal(first, kl.encode(image))
    assert torch.equal(first, load_vae(kl_dir).encode(image))  # the posterior mean, never a sample


def test_scaling_and_shift_match_the_model_by_hand(kl) -> None:
    image = _image(height=64, width=48)
    model = _tiny_kl().eval()
    with torch.no_grad():
        mean = model.encode(image[None]).latent_dist.mean[0]
        expected = (mean - FLUX_SHIFT) * FLUX_SCALING
        latents = kl.encode(image)
        torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
        decoded = model.decode((latents / FLUX_SCALING + FLUX_SHIFT)[None]).sample[0]
    torch.testing.assert_close(kl.decode(latents), decoded, rtol=1e-5, atol=1e-6)
    assert (kl.scaling_factor, kl.shift_factor) == (FLUX_SCALING, FLUX_SHIFT)


def test_edges_are_replicated_to_whole_blocks(kl) -> None:
    image = _image(height=61, width=45)
    padded = torch.nn.functional.pad(image[None], (0, 3, 0, 3), mode="replicate")[0]
    torch.testing.assert_close(kl.encode(image), kl.encode(padded))


def test_grayscale_goes_through_rgb_and_back(kl_dir, kl) -> None:
    gray = load_vae(kl_dir, image_channels=1)
    assert gray.image_channels == 1 and gray.state()["image_channels"] == 1
    image = _image(channels=1)
    latents = gray.encode(image)
    torch.testing.assert_close(latents, kl.encode(image.expand(3, -1, -1)))
    pixels = gray.decode(latents)
    assert pixels.shape == (1, 64, 48)
    torch.testing.assert_close(pixels, kl.decode(latents).mean(dim=0, keepdim=True))
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        gray.encode(_image(channels=3))
    with pytest.raises(ConfigError, match="2-channel"):
        load_vae(kl_dir, image_channels=2)


# --- tiles ---------------------------------------------------------------------------------


def _tiles(length: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def _tiled_gaps(codec: VaeCodec, image: torch.Tensor, tile: int) -> tuple[torch.Tensor, ...]:
    """|tiled − whole| of encode and of decode, with ``tile``-cell (8·tile-pixel) boxes that do
    not divide the image."""
    height, width = image.shape[1:]
    grid = latent_shape(height, width, codec.factor)
    whole = codec.encode(image)
    tiled = torch.zeros_like(whole)
    for r0, r1 in _tiles(grid[0], tile):
        for c0, c1 in _tiles(grid[1], tile):
            tiled[:, r0:r1, c0:c1] = encode_box(
                codec, lambda b: image[:, b[0] : b[2], b[1] : b[3]], (height, width), (r0, c0, r1, c1)
            )
    decoded = codec.decode(whole)
    pieced = torch.zeros_like(decoded)
    size = codec.factor * tile
    for r0, r1 in _tiles(decoded.shape[1], size):
        for c0, c1 in _tiles(decoded.shape[2], size):
            pieced[:, r0:r1, c0:c1] = decode_box(
                codec, lambda b: whole[:, b[0] : b[2], b[1] : b[3]], grid, (r0, c0, r1, c1)
            )
    return (tiled - whole).abs(), whole, (pieced - decoded).abs(), decoded


def test_tiled_equals_whole_for_a_local_vae(taesd_dir) -> None:
    # this tiny AutoencoderTiny is pure convolution (no norm, no attention) with a receptive field
    # inside the default halos, so tiling must reproduce the whole image: any crop misalignment
    # would show as an O(1) difference
    codec = load_vae(taesd_dir)
    encode_gap, _, decode_gap, _ = _tiled_gaps(codec, _image(height=117, width=150), tile=6)
    assert encode_gap.max() < 1e-5
    assert decode_gap.max() < 1e-5


def test_tiled_approximates_whole_for_a_flux_layout_vae(kl_dir) -> None:
    # The FLUX layout is not local: GroupNorm statistics are per crop and the mid block attends
    # over the whole crop, so tiled ≠ whole; the halos buy closeness. Measured here (20 × 24-cell
    # image, 7-cell tiles), mean |tiled − whole| / std of the whole result, encode | decode:
    #   no halos 0.63 | 0.75;  32 px / 4 cells 0.23 | 0.37;  defaults (64 px / 8 cells) 0.094 |
    #   0.180, max 0.097 (latent std 0.122) | 1.8 (pixel std 0.30);  128 px / 16 cells 0.010 | 0.011.
    # A random-init network is the worst case — nothing in it was trained to be local, and its
    # decoder amplifies — so the bounds pin the measured values with ~1.4–1.6× margin rather than
    # state a quality goal; a misaligned crop gives gaps of the order of the std and fails them.
    image = _image(height=157, width=189)
    bare = load_vae(kl_dir, encode_halo=0, decode_halo=0)
    bare_encode, _, bare_decode, _ = _tiled_gaps(bare, image, tile=7)
    codec = load_vae(kl_dir)
    assert (codec.encode_halo, codec.decode_halo) == (ENCODE_HALO, DECODE_HALO) == (64, 8)
    encode_gap, latents, decode_gap, pixels = _tiled_gaps(codec, image, tile=7)
    encode_relative = encode_gap.mean() / latents.std()
    decode_relative = decode_gap.mean() / pixels.std()
    print(
        f"tiled vs whole, halos {ENCODE_HALO} px / {DECODE_HALO} cells: "
        f"encode max {encode_gap.max():.4f} mean {encode_gap.mean():.5f} (std {latents.std():.3f}); "
        f"decode max {decode_gap.max():.4f} mean {decode_gap.mean():.5f} (std {pixels.std():.3f})"
    )
    assert encode_relative < 0.15 and decode_relative < 0.25
    # the halos are what buys it
    assert encode_gap.mean() < 0.4 * bare_encode.mean()
    assert decode_gap.mean() < 0.4 * bare_decode.mean()


def test_halos_must_fit_the_grid(kl_dir) -> None:
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_vae(kl_dir, encode_halo=12)


# --- state ---------------------------------------------------------------------------------


def test_state_round_trip(kl, kl_dir) -> None:
    state = kl.state()
    assert json.loads(json.dumps(state)) == state  # plain values only: no weights
    assert state == {
        "name": "vae",
        "location": str(kl_dir.resolve()),
        "class_name": "AutoencoderKL",
        "image_channels": 3,
        "channels": 16,
        "factor": 8,
        "scaling_factor": FLUX_SCALING,
        "shift_factor": FLUX_SHIFT,
        "encode_halo": ENCODE_HALO,
        "decode_halo": DECODE_HALO,
        "dtype": "float32",
    }
    again = VaeCodec.from_state(state)
    assert again.state() == state
    image = _image()
    assert torch.equal(again.encode(image), kl.encode(image))


def test_state_notices_a_replaced_model(tmp_path) -> None:
    _tiny_kl().save_pretrained(tmp_path)
    state = load_vae(tmp_path).state()
    replaced = _tiny_kl()
    replaced.register_to_config(scaling_factor=0.5)
    replaced.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="scaling_factor") as error:
        VaeCodec.from_state(state)
    _assert_one_line(error, str(tmp_path.resolve()))


# --- finding the weights ---------------------------------------------------------------------


def test_pipeline_root_with_a_vae_subfolder(tmp_path, kl_dir, kl) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    (tmp_path / "vae").symlink_to(kl_dir, target_is_directory=True)
    codec = load_vae(tmp_path)
    assert codec.location == str(tmp_path.resolve())
    image = _image()
    assert torch.equal(codec.encode(image), kl.encode(image))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline, as on this machine and in CI."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import; we read it at call
    return cache


def test_from_an_existing_hub_cache(hub_cache, kl_dir, kl, monkeypatch, tmp_path) -> None:
    # the cache's layout: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--tiny--flux"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (snapshot / "vae").mkdir(parents=True)
    for file in kl_dir.iterdir():
        (snapshot / "vae" / file.name).write_bytes(file.read_bytes())
    monkeypatch.chdir(tmp_path)  # so that "tiny/flux" is not also a folder by chance
    codec = load_vae("tiny/flux")
    assert codec.state()["location"] == "tiny/flux"
    image = _image()
    assert torch.equal(codec.encode(image), kl.encode(image))
    assert VaeCodec.from_state(codec.state()).state() == codec.state()


def test_missing_folder_says_where_it_looked(tmp_path) -> None:
    missing = tmp_path / "weights" / "flux-vae"
    with pytest.raises(WeightsNotFoundError) as error:
        load_vae(missing)
    _assert_one_line(error, str(missing), "latent.vae_path")


def test_missing_hub_cache_entry_says_where_it_looked(hub_cache, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as error:
        load_vae("black-forest-labs/FLUX.1-dev")
    _assert_one_line(
        error,
        str(hub_cache),
        "black-forest-labs/FLUX.1-dev",
        "hf download",
        "latent.vae_path",
        "HF_HUB_CACHE",
    )
    assert isinstance(error.value, InputError)  # the CLI's one-line user errors


def test_folder_without_weights_or_vae(tmp_path, kl_dir) -> None:
    (tmp_path / "config.json").write_text((kl_dir / "config.json").read_text())
    with pytest.raises(WeightsNotFoundError) as error:
        load_vae(tmp_path)
    _assert_one_line(error, "no AutoencoderKL weights", str(tmp_path))
    other = tmp_path / "transformer"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    with pytest.raises(WeightsNotFoundError) as error:
        load_vae(other)
    _assert_one_line(error, str(other), str(other / "vae"), "AutoencoderKL or AutoencoderTiny")
