"""Every numba kernel against its torch twin (the CUDA path), on the CPU.

The numba kernels are the CPU paths; the torch code next to each is the reference and what runs on
a GPU (``device: cuda``). CI has no GPU, so the twins are held equal here on the CPU, where the
torch code runs the same arithmetic as it does on CUDA; where a GPU is present the same tests also
run the torch code on it (the ``device`` parameter). What each comparison asserts:

* noise (``core.noise``): bit-exact. The same 64-bit integer hash (torch int64 wraps like uint64;
  logical shifts masked) and the same float64 Box–Muller. Tiles depend on it: noise is keyed by
  global position.
* resampling taps (``core.pyramid``): bit-exact. The same products, each rounded, summed in tap
  order (the torch path must not fuse them: ``addcmul_`` did, on CPUs with FMA).
* patch features (``index.candidates.PatchFeatures.project``): float32 round-off. The kernel sums
  in float32 in an order LLVM picks (vectorised, re-associated); the torch path multiplies in
  float64 and rounds once.
* strided search's spreading (``index.candidates._spread_matches``): exact (integers).
* knn fold (``core.knn_fold``): float32 round-off amplified by 1/σ² in the weights; compared in
  ``tests/core/test_denoisers.py`` (all backends' shapes, periodic, α = 0) and here for the row
  length the kernel is specialised for (P = 15 in RGB) and for a crop.
* correspondence decode (``codecs.correspondence``): both accumulate in float64 in different
  orders; equal after the float32 rounding to ~1e-6. The numba loop and its own plain-Python
  reading are bit-exact.
* lapped-PCA encoder (``codecs.lapped_pca``): float64 sums in other orders (the texture channel's
  energy expanded), rounded to float32: equal to ~1e-6 of the latents' scale; serial and
  parallel kernels bit-exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigasid.core import jit

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = [
    pytest.mark.skipif(not jit.available(), reason="numba is not installed: only the torch paths exist"),
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
]


# --- noise ---------------------------------------------------------------------------------------

NOISE_BOXES = [
    (0, 0, 37, 53),  # odd shape at the origin
    (-19, 7, 12, 40),  # negative rows: a periodic halo's global positions
    (70001, 123457, 70032, 123470),  # far from the origin
    (2**31 - 5, -(2**31) - 3, 2**31 + 4, -(2**31) + 6),  # across the int32 boundaries of row and column
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("box", NOISE_BOXES)
@pytest.mark.parametrize("seed,channels", [(0, 1), (12345, 3), (2**63 - 1, 4)])
def test_noise_torch_is_the_kernel_bit_for_bit(device, box, seed, channels) -> None:
    from gigasid.core import noise

    compiled = noise._noise_compiled(seed, 2, 7, channels, box)
    twin = noise._noise_torch(seed, 2, 7, channels, box, device=device)
    assert twin.device.type == device and twin.dtype == torch.float32
    assert torch.equal(compiled, twin.cpu())
    # what gaussian_noise picks on the device is the twin
    assert torch.equal(noise.gaussian_noise(seed, 2, 7, channels, box, device=device).cpu(), compiled)


def test_noise_serial_and_parallel_kernels_agree() -> None:
    from gigasid.core import noise

    keys = np.array([noise._stream_key(9, 1, 3, c) for c in range(3)], dtype=np.int64).view(np.uint64)
    serial = np.empty((3, 41, 29), dtype=np.float32)
    parallel = np.empty_like(serial)
    noise._noise_serial(keys, -5, 11, serial)
    noise._noise_parallel(keys, -5, 11, parallel)
    assert np.array_equal(serial, parallel)
    assert torch.equal(torch.from_numpy(serial), noise._noise_torch(9, 1, 3, 3, (-5, 11, 36, 40), device="cpu"))


# --- resampling ----------------------------------------------------------------------------------


def _torch_resample(monkeypatch, fn):
    """``fn()`` with the compiled resampling switched off: the torch path."""
    from gigasid.core import pyramid

    with monkeypatch.context() as patch:
        patch.setattr(pyramid, "numba", None)
        return fn()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("shape,axis", [((37, 53), 0), ((37, 53), 1), ((3, 37, 53), 1), ((3, 37, 53), 2),
                                        ((2, 3, 19, 23), 2), ((2, 3, 19, 23), 3)])
@pytest.mark.parametrize("ratio", [0.5, 0.37, 1.6, 2.0])
def test_resample_torch_is_the_kernel_bit_for_bit(monkeypatch, device, periodic, shape, axis, ratio) -> None:
    from gigasid.core.pyramid import resample_axis

    image = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 10 + axis))
    out_len = max(1, round(shape[axis] * ratio))
    compiled = resample_axis(image, axis, out_len, periodic=periodic)
    twin = _torch_resample(monkeypatch, lambda: resample_axis(image.to(device), axis, out_len, periodic=periodic))
    assert twin.device.type == device
    assert torch.equal(compiled, twin.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("in_len,out_len,out_range", [
    (53, 27, (5, 19)),  # down, a tile inside
    (53, 27, (0, 4)),  # down, at the start
    (27, 53, (40, 53)),  # up, at the end
    (31, 16, (-3, 6)),  # down, a periodic tile across the start (unwrapped positions)
    (16, 31, (25, 36)),  # up, across the end
])
def test_resample_of_a_held_part_torch_is_the_kernel_bit_for_bit(
    monkeypatch, device, periodic, in_len, out_len, out_range
) -> None:
    """A tile's call (``src_start``, ``out_range``, ``in_len``): both paths, and the whole axis's
    values at those positions."""
    from gigasid.core.pyramid import resample_axis, resample_taps

    if not periodic and (out_range[0] < 0 or out_range[1] > out_len):
        pytest.skip("unwrapped positions exist on periodic axes only")
    whole = torch.randn(3, in_len, 11, generator=torch.Generator().manual_seed(in_len + out_len))
    indices, _ = resample_taps(in_len, out_len, periodic=periodic, out_range=out_range, wrap=False)
    first, last = int(indices.min()) - 1, int(indices.max()) + 2  # the held part, one spare each side
    if not periodic:
        first, last = max(0, first), min(in_len, last)
    held = whole[:, torch.arange(first, last) % in_len]
    options = dict(periodic=periodic, in_len=in_len, src_start=first, out_range=out_range)
    compiled = resample_axis(held, 1, out_len, **options)
    twin = _torch_resample(monkeypatch, lambda: resample_axis(held.to(device), 1, out_len, **options))
    assert torch.equal(compiled, twin.cpu())
    full = resample_axis(whole, 1, out_len, periodic=periodic)
    assert torch.equal(compiled, full[:, torch.arange(*out_range) % out_len])


# --- patch features ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels,size,dims", [(3, 7, 15), (1, 3, 31), (4, 5, 13), (3, 5, 4)])
def test_project_torch_equals_the_kernel(device, channels, size, dims) -> None:
    """Every patch, and a strided subset not starting at the origin (as the strided search picks),
    of an odd-shaped image that is a crop (a view) of a larger one."""
    from gigasid.index.candidates import PatchFeatures

    generator = torch.Generator().manual_seed(channels * 100 + size)
    features = PatchFeatures(torch.rand(channels, 41, 38, generator=generator) * 2 - 1, size, dims)
    big = torch.rand(channels, 45, 60, generator=generator) * 2 - 1
    image = big[:, 3:36, 5:52]  # 33x47, not contiguous
    grid_h, grid_w = image.shape[1] - size + 1, image.shape[2] - size + 1
    for rows, cols in [(None, None), (torch.arange(1, grid_h, 3), torch.arange(2, grid_w, 3))]:
        compiled = features.project(image, rows, cols)
        rows_all = torch.arange(grid_h) if rows is None else rows
        cols_all = torch.arange(grid_w) if cols is None else cols
        twin = features._project_torch(image.to(device, torch.float32).contiguous(), rows_all, cols_all)
        assert twin.device.type == device and twin.shape == compiled.shape == (len(rows_all) * len(cols_all), features.dims)
        # float32 sums of C·P² products (up to 100 here) in LLVM's order against one rounding of
        # the float64 sum: measured at most 4.8e-7 (2 ulps of values up to ~2.6); 8x margin
        torch.testing.assert_close(twin.cpu(), compiled, rtol=0, atol=4e-6)
        if device != "cpu":  # project() off the CPU takes the twin
            assert torch.equal(features.project(image.to(device), rows, cols).cpu(), twin.cpu())


# --- the strided search's spreading --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("stride", [2, 3])
def test_spread_torch_equals_the_kernel_on_a_crop(monkeypatch, device, periodic, stride) -> None:
    """A tile's crop (``origin`` not at 0, ``global_grid``): the compiled spreading and the torch
    code give the same candidates, -1 slots included (whole images: tests/index/test_search.py)."""
    from gigasid.index import candidates
    from gigasid.index.candidates import ReferenceCandidates

    generator = torch.Generator().manual_seed(stride)
    reference = torch.rand(3, 26, 31, generator=generator) * 2 - 1
    size = 5
    source = ReferenceCandidates(reference, size, k=4, index="exact", search_dims=8, search_stride=stride)
    real_search = source.index.search

    def search_with_gaps(queries, k):  # empty slots, as an IVF with few lists returns
        found = real_search(queries, k)
        found[::5, -1] = -1
        return found

    source.index.search = search_with_gaps
    crop = torch.rand(3, 23, 29, generator=generator) * 2 - 1
    options = dict(periodic=periodic, origin=(7, 11), global_grid=(60, 70), crop=True)
    compiled = source(crop, 0.6, **options)
    monkeypatch.setattr(candidates, "_spread_matches", None)
    twin = source.to(device)(crop.to(device), 0.6, **options)
    assert twin.device.type == device
    assert torch.equal(compiled, twin.cpu())
    assert bool((compiled == -1).any())


# --- knn fold ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("periodic,origin", [(False, None), (True, None), (True, (4, 9))])
def test_knn_fold_torch_equals_the_specialised_kernel(device, periodic, origin) -> None:
    """P = 15 in RGB: the row length the kernel is also compiled for as a constant. With ``origin``
    the input is a tile's crop of a periodic image (denoised as a plain image)."""
    from gigasid.core.denoisers import KnnDenoiser
    from gigasid.core.image_denoiser import ImageDenoiser
    from gigasid.core.knn_fold import SPECIALISED_LANES, _lanes_for
    from gigasid.index.candidates import ReferenceCandidates

    size = 15
    assert _lanes_for(3 * size) == SPECIALISED_LANES
    generator = torch.Generator().manual_seed(15)
    reference = torch.rand(3, 30, 34, generator=generator) * 2 - 1
    x_t = torch.rand(3, 21, 26, generator=generator) * 2 - 1
    source = ReferenceCandidates(reference, size, k=3, index="exact", search_dims=12)
    placement = {} if origin is None else {"origin": origin, "global_grid": (40, 40)}
    results = []
    for compiled, where in ((True, "cpu"), (False, device)):
        denoiser = ImageDenoiser(
            KnnDenoiser(reference, size, compiled=compiled), patch_size=size, rho=0.3, periodic=periodic,
            candidate_source=source, band_queries=40, device=where,
        )
        results.append(denoiser(x_t, 0.7, 0.3, step=1, **placement))
    assert results[1].device == x_t.device  # back on the caller's device
    # float32 sums in other orders, amplified by 1/σ² in the weights (as in test_denoisers)
    torch.testing.assert_close(results[0], results[1], atol=2e-4, rtol=0)


# --- correspondence decode -----------------------------------------------------------------------

FACTOR, PATCH, RHO = 4, 3, 0.3


def _decode_case(periodic: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    reference = rng.random((3, 30, 26)).astype(np.float32)  # not a multiple of FACTOR
    ref_grid = (30 // FACTOR + 1 - PATCH + 1, 26 // FACTOR + 1 - PATCH + 1)
    latent = (10, 13)
    grid = latent if periodic else (latent[0] - PATCH + 1, latent[1] - PATCH + 1)
    positions = rng.integers(-1, ref_grid[0] * ref_grid[1], size=(*grid, 4))
    weights = rng.random((*grid, 4)).astype(np.float32)
    weights[1, 2, 0] = 5e-9  # below the weights the fold skips
    return reference, ref_grid, latent, positions, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("box", [(0, 0, 40, 52), (5, 7, 29, 33), (33, 41, 40, 52)])
def test_correspondence_fold_torch_equals_the_kernel(monkeypatch, device, periodic, box) -> None:
    from gigasid.codecs import correspondence
    from gigasid.codecs.correspondence import fold_matches, pad_reference, query_span

    reference, ref_grid, latent, positions, weights = _decode_case(periodic)
    out_shape = (latent[0] * FACTOR, latent[1] * FACTOR)
    grid = positions.shape[:2]
    # the queries touching the box, from a query origin that is not 0 (negative where periodic)
    r0, r1 = query_span((box[0], box[2]), FACTOR, PATCH, grid[0], periodic=periodic)
    c0, c1 = query_span((box[1], box[3]), FACTOR, PATCH, grid[1], periodic=periodic)
    rows, cols = np.arange(r0, r1) % grid[0], np.arange(c0, c1) % grid[1]
    options = dict(ref_grid_w=ref_grid[1], factor=FACTOR, patch_size=PATCH, rho=RHO, query_origin=(r0, c0),
                   box=box, out_shape=out_shape, periodic=periodic)
    padded = pad_reference(reference, FACTOR)
    sub_positions, sub_weights = positions[np.ix_(rows, cols)], weights[np.ix_(rows, cols)]
    compiled = fold_matches(padded, sub_positions, sub_weights, **options)
    with monkeypatch.context() as patch:
        if device == "cpu":  # the torch path on the CPU is the one without numba
            patch.setattr(correspondence, "numba", None)
        twin = fold_matches(padded, sub_positions, sub_weights, device=device, **options)
    assert twin.shape == compiled.shape == (3, box[2] - box[0], box[3] - box[1])
    # float64 sums of the same terms in other orders, rounded to float32: values in [0, 1]
    np.testing.assert_allclose(twin, compiled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("periodic", [False, True])
def test_correspondence_kernel_is_its_plain_python_reading(periodic) -> None:
    """The numba loop and the same function uncompiled (the path without numba before the torch
    twin existed): the same float64 sums in the same order."""
    from gigasid.codecs import correspondence
    from gigasid.codecs.correspondence import pad_reference
    from gigasid.core.patches import window_profile

    reference, ref_grid, latent, positions, weights = _decode_case(periodic, seed=1)
    positions, weights = positions[:4, :5], weights[:4, :5]  # plain Python is slow: a few queries
    padded = pad_reference(reference, FACTOR)
    window = window_profile(FACTOR * PATCH, RHO).numpy()
    results = []
    for kernel in (correspondence._fold_matches, correspondence._fold_matches.py_func):
        out = np.zeros((18, 23 * 3))
        coverage = np.zeros((18, 23))
        kernel(padded.reshape(padded.shape[0], -1), positions, weights, ref_grid[1], FACTOR, window, -1, 2,
               3, 5, out, coverage, latent[0] * FACTOR, latent[1] * FACTOR, periodic, periodic)
        results.append((out, coverage))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert results[0][1].any()


# --- lapped-PCA encoder ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("texture", [False, True])
@pytest.mark.parametrize("channels,shape", [(3, (45, 61)), (1, (16, 24)), (3, (8, 9))])
def test_lapped_pca_encode_torch_equals_the_kernel(device, texture, channels, shape) -> None:
    """Partial last blocks (45, 61, 9 are not multiples of 8) and a one-block-high image take the
    edge replication; the codec is fitted on a smooth image with texture added (latents ~0.5)."""
    from gigasid.codecs.lapped_pca import BlockCovariance, LappedPCACodec, _blocks

    generator = torch.Generator().manual_seed(channels * 100 + shape[0])
    rows = torch.linspace(-1, 1, shape[0])[:, None]
    cols = torch.linspace(-1, 1, shape[1])[None, :]
    smooth = torch.stack([torch.sin(3 * rows + (c + 1) * cols) for c in range(channels)])
    pixels = (0.7 * smooth + 0.3 * torch.rand(channels, *shape, generator=generator) - 0.15).clamp(-1, 1)
    covariance = BlockCovariance(channels * 256)
    window = torch.outer(*(2 * [torch.sin(torch.pi * (torch.arange(16) + 0.5) / 16)])).repeat(channels, 1, 1)
    covariance.add((_blocks(pixels.double(), 8) * window.reshape(-1, 1, 1)).reshape(channels * 256, -1).T)
    codec = LappedPCACodec.fit(covariance, 5, image_channels=channels, texture=texture)
    compiled = codec.encode(pixels)
    twin = codec._encode_torch(pixels.to(device)).cpu()
    assert compiled.shape == twin.shape == (5 + int(texture), -(-shape[0] // 8), -(-shape[1] // 8))
    assert compiled.dtype == twin.dtype == torch.float32
    torch.testing.assert_close(compiled, twin, rtol=0, atol=1e-6)
    # the serial and parallel kernels compute each cell alone: the same bits
    from gigasid.codecs import lapped_pca

    args = (pixels.numpy(), 8, codec._kernel_analysis, codec._mean_coef.numpy(), codec._kernel_weighted_mean,
            codec._kernel_window_sq, float(codec.mean.pow(2).sum()), texture, codec.scale)
    serial, parallel = np.empty(compiled.shape, np.float32), np.empty(compiled.shape, np.float32)
    lapped_pca._encode_serial(*args, serial)
    lapped_pca._encode_parallel(*args, parallel)
    assert np.array_equal(serial, parallel)
