"""The lapped PCA codec: exact reconstruction with the full basis, tiles equal to the whole, a
bounded-memory fit that sees every pyramid level, and a state that round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigasid.codecs import decode_box, encode_box, from_state, latent_shape
from gigasid.codecs.lapped_pca import BlockCovariance, LappedPCACodec, fit_lapped_pca, sine_window


def _image(channels=3, height=77, width=93, seed=0):
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, channels, height + 6, width + 6, generator=generator), 7, 1)
    return (smooth[0] * 2 - 1) * 4.0 + 0.02 * torch.randn(channels, height, width, generator=generator)


def _fit(image, k, max_blocks=100_000):
    def read(level, box):
        return image[:, box[0] : box[2], box[1] : box[3]]

    return fit_lapped_pca(read, [tuple(image.shape[1:])], k, image_channels=image.shape[0], max_blocks=max_blocks)


def test_sine_window_is_power_complementary():
    window = sine_window(8)
    np.testing.assert_allclose((window[:8] ** 2 + window[8:] ** 2).numpy(), 1.0, atol=1e-15)


@pytest.mark.parametrize("channels", [1, 3])
def test_full_basis_reconstructs_exactly(channels):
    image = _image(channels)  # 77x93: partial last blocks on both axes
    codec = _fit(image, channels * 256)
    latents = codec.encode(image)
    assert latents.shape == (channels * 256, *latent_shape(77, 93, 8))
    decoded = codec.decode(latents)[:, :77, :93]
    assert (decoded - image).abs().max() < 1e-4


def test_fewer_channels_reconstruct_worse_but_closely():
    image = _image()
    errors = []
    for k in (8, 32, 128):
        codec = _fit(image, k)
        errors.append(float((codec.decode(codec.encode(image))[:, :77, :93] - image).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.15 * float(image.var())


def test_latents_have_the_pixel_rms():
    image = _image()
    codec = _fit(image, 32)
    rms = float(codec.encode(image).pow(2).mean().sqrt())
    assert rms == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("box", [(0, 0, 10, 12), (3, 5, 9, 12), (4, 0, 10, 7), (2, 2, 3, 3)])
def test_encode_box_equals_whole_encoding(box):
    image = _image()
    codec = _fit(image, 32)
    whole = codec.encode(image)
    tile = encode_box(codec, lambda b: image[:, b[0] : b[2], b[1] : b[3]], (77, 93), box)
    r0, c0, r1, c1 = box
    assert torch.equal(tile, whole[:, r0:r1, c0:c1])


@pytest.mark.parametrize("box", [(0, 0, 77, 93), (5, 9, 40, 61), (33, 0, 77, 17), (8, 8, 16, 16)])
def test_decode_box_equals_whole_decoding(box):
    image = _image()
    codec = _fit(image, 32)
    latents = codec.encode(image)
    whole = codec.decode(latents)
    tile = decode_box(codec, lambda b: latents[:, b[0] : b[2], b[1] : b[3]], tuple(latents.shape[1:]), box)
    r0, c0, r1, c1 = box
    assert (tile - whole[:, r0:r1, c0:c1]).abs().max() < 1e-6


def test_fit_samples_a_lattice_within_the_budget_and_every_level():
    image = _image(height=160, width=200)
    coarse = torch.nn.functional.avg_pool2d(image[None], 2)[0]
    levels = [image, coarse]
    seen = []

    def read(level, box):
        seen.append(level)
        return levels[level][:, box[0] : box[2], box[1] : box[3]]

    codec = fit_lapped_pca(read, [(160, 200), (80, 100)], 16, image_channels=3, max_blocks=1000)
    assert set(seen) == {0, 1}
    assert codec.channels == 16
    # the sampled fit is close to a fit on every block: the first direction agrees
    full = BlockCovariance(768)
    for level in levels:
        full.add(_windowed_blocks(level))
    _, basis, _ = full.principal(1)
    assert abs(float(basis[:, 0] @ codec.basis[:, 0])) > 0.99


def _windowed_blocks(image):
    from gigasid.codecs.lapped_pca import _blocks, block_window

    blocks = _blocks(image.to(torch.float64), 8) * block_window(8, image.shape[0])
    return blocks.reshape(blocks.shape[0], -1).T


@pytest.mark.parametrize("rows,cols", [(range(0, 5, 2), range(0, 7, 3)), (range(2, 5, 2), range(1, 7, 5)),
                                       (range(4, 5), range(6, 7))])
def test_the_fit_cuts_exactly_the_lattice_blocks(rows, cols):
    """The fit cuts only the sampled cells' blocks: the same values as cutting every block and
    picking, edges (replicated past the image) included; the read covers just their rows."""
    from gigasid.codecs.lapped_pca import _blocks, _lattice_blocks

    image = torch.rand(3, 37, 53, dtype=torch.float64) * 2 - 1  # 5 x 7 cells, partial at the edges
    reads = []

    def read(box):
        reads.append(box)
        return image[:, box[0] : box[2], box[1] : box[3]]

    got = _lattice_blocks(read, (37, 53), 8, rows, cols)
    every = _blocks(image, 8)
    assert torch.equal(got, every[:, list(rows)][:, :, list(cols)])
    assert reads[0][0] == max(0, 8 * rows[0] - 4) and reads[0][2] == min(37, 8 * rows[-1] + 12)


def test_state_round_trip():
    image = _image()
    codec = _fit(image, 24)
    again = from_state(codec.state())
    assert torch.equal(again.encode(image), codec.encode(image))


def test_bad_channel_count_is_refused():
    covariance = BlockCovariance(256)
    covariance.add(torch.randn(300, 256, dtype=torch.float64))
    with pytest.raises(ValueError, match="latent channels"):
        LappedPCACodec.fit(covariance, 257, image_channels=1)


def test_the_texture_channel_is_the_residual_norm_and_the_decoder_ignores_it():
    image = _image()
    read = lambda level, box: image[:, box[0] : box[2], box[1] : box[3]]
    plain = fit_lapped_pca(read, [tuple(image.shape[1:])], 12, image_channels=3, max_blocks=100_000)
    textured = fit_lapped_pca(read, [tuple(image.shape[1:])], 12, image_channels=3, max_blocks=100_000, texture=True)
    latents = textured.encode(image)
    assert textured.channels == 13 and latents.shape[0] == 13
    torch.testing.assert_close(latents[:12], plain.encode(image), rtol=0, atol=0)
    torch.testing.assert_close(textured.decode(latents), plain.decode(latents[:12]), rtol=0, atol=0)
    # the channel is what the coefficients leave out: with the full basis it vanishes
    full = fit_lapped_pca(read, [tuple(image.shape[1:])], 768, image_channels=3, max_blocks=100_000, texture=True)
    assert float(full.encode(image)[-1].abs().max()) < 1e-3
    assert float(latents[-1].min()) >= 0.0 and float(latents[-1].mean()) > 0.05
    # the state keeps it
    assert from_state(textured.state()).channels == 13


def test_the_texture_channel_tells_a_texture_from_a_smooth_surface_of_its_colour():
    """Fine noise and a flat surface of the same mean have nearly the same few coefficients;
    the texture channel is what sets them apart."""
    generator = torch.Generator().manual_seed(3)
    smooth = torch.zeros(3, 64, 64)
    rough = 0.5 * torch.sign(torch.randn(3, 64, 64, generator=generator))
    both = torch.cat([smooth, rough], 2)
    read = lambda level, box: both[:, box[0] : box[2], box[1] : box[3]]
    codec = fit_lapped_pca(read, [(64, 128)], 4, image_channels=3, max_blocks=100_000, texture=True)
    a, b = codec.encode(smooth), codec.encode(rough)
    coefficient_gap = float((a[:4, 2:-2, 2:-2] - b[:4, 2:-2, 2:-2]).pow(2).sum(0).mean())
    texture_gap = float((a[4, 2:-2, 2:-2] - b[4, 2:-2, 2:-2]).pow(2).mean())
    assert texture_gap > 4 * coefficient_gap
