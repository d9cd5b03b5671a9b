"""Properties of the network-free metrics in gigasid.metrics, on small synthetic textures.

Each test states a property the benchmarks rely on (a copy scores 0 SWD, noise scores far more
than a perturbed copy, a two-crop collage scores its larger crop...) rather than golden numbers
of an implementation; hand-computed values are used where the answer is small enough to derive.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from gigasid import metrics
from gigasid.errors import ConfigError
from gigasid.metrics import (
    largest_copied_region,
    patch_swd,
    patch_swd_levels,
    pixel_diversity,
)


def texture(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smoothed noise at three scales, stretched to [0, 1]: textured at every pyramid level."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape)
    for sigma in (1.0, 3.0, 8.0):
        out += sigma * ndimage.gaussian_filter(rng.standard_normal(shape), (sigma, sigma, 0))
    out = (out - out.min()) / (out.max() - out.min())
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    return texture((128, 128, 3), seed=0)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(100).random((128, 128, 3)).astype(np.float32)


def perturbed(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# patch_swd


def test_swd_of_reference_with_itself_is_zero(ref):
    # 128×128: every level has fewer patches than patches_per_level, so all are used: exactly 0.
    levels = patch_swd_levels(ref, ref)
    assert len(levels) == 4  # 128, 64, 32, 16: the next (8) is below min_size=16
    assert levels == [0.0, 0.0, 0.0, 0.0]
    assert patch_swd(ref, ref) == 0.0


def test_swd_ranks_perturbed_copy_below_new_texture_below_noise(ref, noise):
    near = patch_swd(perturbed(ref, 0.02, seed=1), ref)
    same_process = patch_swd(texture((128, 128, 3), seed=1), ref)
    unrelated = patch_swd(noise, ref)
    assert 0.0 < near < 0.25 * same_process
    assert same_process < 0.5 * unrelated
    assert unrelated > 10 * near


def test_swd_uint8_equals_its_float_conversion(ref):
    u8 = np.rint(ref * 255).astype(np.uint8)
    other = texture((128, 128, 3), seed=2)
    assert patch_swd(u8, other) == pytest.approx(patch_swd(u8.astype(np.float32) / 255, other))


def test_swd_is_deterministic_given_seed_and_varies_little_across_seeds(ref):
    # 192×160: level 0 has 186·154 > 16384 patches, so patches are really sampled.
    img = texture((192, 160, 3), seed=3)
    first = patch_swd(img, ref, seed=7)
    assert patch_swd(img, ref, seed=7) == first
    other_seed = patch_swd(img, ref, seed=8)
    assert other_seed != first
    assert other_seed == pytest.approx(first, rel=0.25)


def test_swd_is_roughly_symmetric(ref):
    # Not exactly: the descriptors are normalised by the second argument's statistics.
    other = texture((128, 128, 3), seed=4)
    ratio = patch_swd(other, ref) / patch_swd(ref, other)
    assert 2 / 3 < ratio < 3 / 2


def test_swd_compares_images_of_different_sizes(ref):
    # The level count follows the smaller short side: 40 -> 40, 20 (10 < 16 stops).
    assert len(patch_swd_levels(texture((40, 300, 3), seed=5), ref)) == 2
    big = texture((192, 160, 3), seed=5)
    big_noise = np.random.default_rng(6).random((192, 160, 3)).astype(np.float32)
    assert len(patch_swd_levels(big, ref)) == 4
    assert patch_swd(big, ref) < 0.5 * patch_swd(big_noise, ref)


def test_swd_sees_a_brightness_shift_only_in_the_low_pass_level(ref):
    # Band-pass levels of (a + x) and (b + x) are identical; Karras's own-statistics
    # normalisation would also hide the shift in the low-pass level, ours must not.
    levels = patch_swd_levels(0.8 * ref + 0.15, 0.8 * ref + 0.05)
    assert max(levels[:-1]) < 1e-4
    assert levels[-1] > 0.5


def test_swd_quantiles_repeat_each_value_when_upsampling():
    sorted_proj = np.array([[0.0, 1.0, 2.0, 3.0]])
    assert metrics._quantiles(sorted_proj, 8).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]
    assert metrics._quantiles(sorted_proj, 4) is sorted_proj


def test_swd_of_unequal_patch_counts_is_near_zero_for_one_distribution(ref):
    # The reference tiled 2×1 has each reference patch twice (plus seam patches): 30500
    # patches against 14884, compared through quantiles, must look like the same distribution.
    tiled = np.concatenate([ref, ref], axis=1)
    assert patch_swd(tiled, ref, patches_per_level=10**6) < 0.05 * patch_swd(
        np.random.default_rng(9).random(tiled.shape).astype(np.float32), ref
    )


def test_swd_bad_inputs_raise(ref):
    with pytest.raises(ValueError, match="channel"):
        patch_swd(ref[..., :1], ref)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        patch_swd(ref[..., 0], ref)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        patch_swd(np.zeros((32, 32, 2), np.float32), ref)
    with pytest.raises(ValueError, match="dtype"):
        patch_swd((ref * 1000).astype(np.int16), ref)
    with pytest.raises(ValueError, match="NaN"):
        patch_swd(np.full_like(ref, np.nan), ref)
    with pytest.raises(ValueError, match="min_size"):
        patch_swd(ref[:10], ref)
    with pytest.raises(ConfigError, match="min_size"):
        patch_swd(ref, ref, min_size=5)  # smaller than patch_size=7
    with pytest.raises(ConfigError, match="num_projections"):
        patch_swd(ref, ref, num_projections=0)


# --------------------------------------------------------------------------------------------
# pixel_diversity


def test_diversity_of_identical_samples_is_zero(ref):
    assert pixel_diversity([ref, ref.copy(), ref.copy()], ref) == 0.0


def test_diversity_matches_hand_computation_gray():
    s1 = np.array([[0.0, 0.2], [0.4, 1.0]], np.float32)[..., None]
    s2 = np.array([[0.0, 0.6], [0.4, 0.0]], np.float32)[..., None]
    reference = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)[..., None]
    # Per-pixel population std of two values is |a - b| / 2: 0, 0.2, 0, 0.5 -> mean 0.175;
    # the reference's std is 0.5.
    assert pixel_diversity([s1, s2], reference) == pytest.approx(0.175 / 0.5)


def test_diversity_uses_luma_weights_for_rgb():
    red = np.zeros((4, 4, 3), np.float32)
    red[..., 0] = 1.0
    black = np.zeros((4, 4, 3), np.uint8)
    reference = np.zeros((4, 6, 3), np.uint8)  # a different size is fine
    reference[:, :3] = 255
    # Gray 0.299 vs 0 at every pixel -> std 0.1495; the reference's gray is half 1, half 0 -> 0.5.
    assert pixel_diversity([red, black], reference) == pytest.approx(0.299)


def test_diversity_grows_linearly_with_sample_variation(ref):
    rng = np.random.default_rng(10)
    noises = [rng.normal(0.0, 1.0, ref.shape).astype(np.float32) for _ in range(4)]
    small = pixel_diversity([ref + 0.01 * n for n in noises], ref)
    large = pixel_diversity(np.stack([ref + 0.02 * n for n in noises]), ref)
    assert small > 0
    assert large == pytest.approx(2 * small, rel=1e-4)


def test_diversity_of_independent_noise_is_near_its_expected_value(ref):
    rng = np.random.default_rng(11)
    samples = [rng.random((128, 128, 1)).astype(np.float32) for _ in range(16)]
    gray_ref = ref @ np.array([0.299, 0.587, 0.114], np.float32)
    # Uniform noise: per-pixel std about sqrt(1/12), slightly less for the ddof=0 estimate.
    expected = np.sqrt(1 / 12) / gray_ref.std()
    assert pixel_diversity(samples, ref) == pytest.approx(expected, rel=0.1)


def test_diversity_bad_inputs_raise(ref):
    with pytest.raises(ValueError, match="at least 2"):
        pixel_diversity([ref], ref)
    with pytest.raises(ValueError, match="one shape"):
        pixel_diversity([ref, ref[:64]], ref)
    with pytest.raises(ValueError, match="sequence"):
        pixel_diversity(ref, ref)  # one image, not a sequence of images
    with pytest.raises(ValueError, match="flat"):
        pixel_diversity([ref, ref], np.full((8, 8, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        pixel_diversity([ref, ref.astype(np.int32)], ref)


# --------------------------------------------------------------------------------------------
# largest_copied_region


def test_copy_of_the_reference_itself_is_its_full_area(ref):
    assert largest_copied_region(ref, ref) == 128 * 128
    u8 = np.rint(ref * 255).astype(np.uint8)
    assert largest_copied_region(u8, u8) == 128 * 128


def test_copy_in_noise_is_zero(ref, noise):
    assert largest_copied_region(noise, ref) == 0


def test_copy_of_two_shifted_crops_is_the_larger_crop(ref):
    left = ref[10:106, 5:77]  # 96×72, offset (10, 5)
    right = ref[20:116, 60:116]  # 96×56, offset (20, -12)
    collage = np.concatenate([left, right], axis=1)
    area = largest_copied_region(collage, ref)
    assert abs(area - 96 * 72) <= 7 * 96
    # The larger crop casts the most votes, so verifying only the top offset finds it.
    assert largest_copied_region(collage, ref, max_offsets=1) == area


def test_copy_of_a_tiled_reference_is_one_tile(ref):
    # Two exact copies at offsets (0, 0) and (0, -128); the seam patches match neither.
    assert largest_copied_region(np.concatenate([ref, ref], axis=1), ref) == 128 * 128


def test_copy_counts_whole_patch_footprints(ref, noise):
    # An 8×8 crop holds four 7×7 patches whose union is the crop; a 5×5 crop holds none.
    img = noise[:64, :64].copy()
    img[20:28, 30:38] = ref[50:58, 60:68]
    assert largest_copied_region(img, ref) == 64
    img = noise[:64, :64].copy()
    img[20:25, 30:35] = ref[50:55, 60:65]
    assert largest_copied_region(img, ref) == 0


def test_copy_tolerates_float_round_off_but_not_noise(ref):
    rng = np.random.default_rng(12)
    round_off = ref + rng.normal(0.0, 1e-6, ref.shape).astype(np.float32)
    assert largest_copied_region(round_off, ref) == 128 * 128
    assert largest_copied_region(perturbed(ref, 3 / 255, seed=13), ref) == 0


def test_copy_is_not_fooled_by_a_mirror_image(ref):
    assert largest_copied_region(ref[::-1], ref) == 0
    assert largest_copied_region(ref[:, ::-1], ref) == 0


def test_copy_of_flat_images_is_found_although_every_patch_is_ambiguous():
    flat = np.full((32, 40, 1), 0.25, np.float32)
    assert largest_copied_region(flat, np.full((64, 64, 1), 0.25, np.float32)) == 32 * 40


def test_copy_chunked_lookup_equals_single_chunk(ref, monkeypatch):
    collage = np.concatenate([ref[10:106, 5:77], ref[20:116, 60:116]], axis=1)
    whole = largest_copied_region(collage, ref)
    monkeypatch.setattr(metrics, "_LOOKUP_CHUNK", 1000)  # 89·122 patches -> 11 awkward chunks
    assert largest_copied_region(collage, ref) == whole


def test_copy_bad_inputs_raise(ref):
    with pytest.raises(ValueError, match="channel"):
        largest_copied_region(ref, ref[..., :1])
    with pytest.raises(ValueError, match="patch_size"):
        largest_copied_region(ref[:5], ref)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        largest_copied_region(ref[0], ref)
    with pytest.raises(ConfigError, match="tolerance"):
        largest_copied_region(ref, ref, tolerance=-1.0)
    with pytest.raises(ConfigError, match="patch_size"):
        largest_copied_region(ref, ref, patch_size=0)
    with pytest.raises(ConfigError, match="max_offsets"):
        largest_copied_region(ref, ref, max_offsets=True)


# --------------------------------------------------------------------------------------------
# detail_retention, fog_map, source_usage


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A 256×384 'photo': a smooth sky (a vertical gradient, no fine detail) over a textured
    ground, as the real photos these metrics are for have both."""
    ground = texture((160, 384, 3), seed=3)
    rows = np.linspace(0.55, 0.8, 96, dtype=np.float32)[:, None, None]
    sky = np.broadcast_to(rows * np.array([0.6, 0.75, 1.0], dtype=np.float32), (96, 384, 3))
    return np.concatenate([sky, ground]).astype(np.float32)


def test_detail_of_the_reference_is_one_and_a_blurred_copy_scores_low(scene):
    assert metrics.detail_retention(scene, scene) == pytest.approx(1.0)
    blurred = ndimage.gaussian_filter(scene, (2, 2, 0))
    assert metrics.detail_retention(blurred, scene) < 0.6
    # a sample of another size rearranging the same content keeps its detail
    assert metrics.detail_retention(np.concatenate([scene, scene], axis=1), scene) == pytest.approx(1.0, abs=0.02)


def test_detail_bad_inputs_raise(scene):
    with pytest.raises(ValueError, match="flat"):
        metrics.detail_retention(scene, np.full((32, 32, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match="channel"):
        metrics.detail_retention(scene[..., :1], scene)


def test_fog_is_found_where_it_was_planted_and_nowhere_else(scene):
    fogged = scene.copy()
    r0, r1, c0, c1 = 128, 256, 160, 320  # inside the textured ground
    fogged[r0:r1, c0:c1] = ndimage.gaussian_filter(scene, (12, 12, 0))[r0:r1, c0:c1]
    found = metrics.fog_map(fogged, scene, block=16)
    planted = np.zeros(found.fogged.shape, dtype=bool)
    planted[r0 // 16 : r1 // 16, c0 // 16 : c1 // 16] = True
    # most of the planted region is found; outside it (one block of smoothing margin) nothing is
    assert found.fogged[planted].mean() > 0.7
    margin = ndimage.binary_dilation(planted, iterations=1)
    assert not found.fogged[~margin].any()
    assert 0.0 < found.fraction < 0.3


def test_fog_ignores_smooth_regions_the_reference_also_has(scene):
    assert metrics.fog_map(scene, scene, block=16).fraction == 0.0
    # a sample that is mostly sky is not fogged: the reference's sky is smooth too
    sky_heavy = np.concatenate([scene[:96], scene[:96], scene[96:160]])
    assert metrics.fog_map(sky_heavy, scene, block=16).fraction == 0.0


def test_fog_bad_options_raise(scene):
    with pytest.raises(ConfigError, match="block"):
        metrics.fog_map(scene, scene, block=15)
    with pytest.raises(ConfigError, match="ratio"):
        metrics.fog_map(scene, scene, ratio=-1.0)
    with pytest.raises(ValueError, match="smaller than block"):
        metrics.fog_map(scene[:8], scene, block=16)


def test_source_usage_of_the_reference_is_even_and_a_tiled_crop_is_concentrated(scene):
    ground = texture((256, 256, 3), seed=5)
    itself = metrics.source_usage(ground, ground, samples=4000, reduce=2, cell=32, min_shift=32)
    assert itself.top_share < 0.1  # 64 cells: the top 1 % is one cell, ~1/64 of the draws
    assert itself.coverage > 0.8
    assert itself.cell_counts.shape == (8, 8) and itself.cell_counts.sum() == 4000
    tiled = np.tile(ground[96:160, 96:160], (4, 4, 1))
    repeated = metrics.source_usage(tiled, ground, samples=4000, reduce=2, cell=32, min_shift=32)
    assert repeated.top_share > 0.2  # every draw lands in the 2×2 cells the crop came from
    assert repeated.coverage < 0.2  # ~4 of 64 cells, plus the patches straddling the tiles' joins
    assert repeated.repetition > 0.9
    assert itself.repetition < 0.5


def test_source_usage_is_deterministic_and_validates(scene):
    a = metrics.source_usage(scene, scene, samples=500, reduce=2, cell=32, seed=3)
    b = metrics.source_usage(scene, scene, samples=500, reduce=2, cell=32, seed=3)
    assert a.top_share == b.top_share and np.array_equal(a.cell_counts, b.cell_counts)
    with pytest.raises(ConfigError, match="samples"):
        metrics.source_usage(scene, scene, samples=0)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        metrics.source_usage(scene[:16], scene, reduce=4)


# --- known regions: border and fill ---------------------------------------------------------------


def test_border_gradient_ratio_is_one_for_the_reference_and_large_for_a_pasted_patch(ref):
    known = np.zeros(ref.shape[:2], bool)
    known[32:96, 40:100] = True
    assert abs(metrics.border_gradient_ratio(ref, known) - 1.0) < 0.2
    pasted = ref.copy()
    pasted[known] = np.clip(ref[known] + 0.3, 0, 1)  # a step in brightness along the border
    assert metrics.border_gradient_ratio(pasted, known) > 3.0
    with pytest.raises(ValueError, match="known is"):
        metrics.border_gradient_ratio(ref, known[:10])


def test_hole_detail_is_about_one_for_the_reference_and_low_for_a_fogged_hole(ref):
    hole = np.zeros(ref.shape[:2], bool)
    hole[40:88, 40:88] = True
    assert 0.8 < metrics.hole_detail(ref, ref, hole, ring=16) < 1.25
    fogged = ref.copy()
    fogged[hole] = ndimage.gaussian_filter(ref, (4, 4, 0))[hole]
    assert metrics.hole_detail(fogged, ref, hole, ring=16) < 0.4
    with pytest.raises(ValueError, match="empty"):
        metrics.hole_detail(ref, ref, np.zeros_like(hole))
    with pytest.raises(ValueError, match="differ"):
        metrics.hole_detail(ref, ref, hole[:64])
    with pytest.raises(ConfigError, match="ring"):
        metrics.hole_detail(ref, ref, hole, ring=0)
