"""Quality metrics that need no downloaded network: fidelity, diversity, copying, detail, usage.

The questions a single-image generator must answer, one function each:

- fidelity: ``patch_swd`` (per level: ``patch_swd_levels``), the multi-scale patch sliced
  Wasserstein distance of Karras et al. 2018 ("Progressive Growing of GANs", Sec. 5 and App. D):
  do the sample's 7×7 patches follow the reference's patch distribution at every pyramid scale?
- diversity: ``pixel_diversity``, the pixel diversity of SinGAN (Shaham et al. 2019, Sec. 4.1):
  per-pixel std across samples of different seeds, relative to the reference's own contrast.
- copying: ``largest_copied_region``, the area of the largest region of a sample that is a
  verbatim crop of the reference (one source offset for the whole region). A low SWD with a
  huge copied region is memorisation, not generation.
- detail: ``detail_retention``, the mean gradient magnitude of the sample's gray over the
  reference's. The method only rearranges the reference's patches, so a sample well below 1 is
  blurred; ``fog_map`` says where: regions whose fine detail is far below what the reference holds
  for similar coarse content (the reference's own smooth regions — sky, water — set a low
  expectation and never count as fog).
- source usage: ``source_usage``, how evenly a sample draws on the reference — the share of the
  sample matched to the reference's 1 % most-used regions, the reference coverage, and the
  strongest periodic repetition in the sample's autocorrelation. A large output built from one
  small region repeated on a lattice has collapsed even when every patch is sharp.
- known regions (outpainting, inpainting): ``border_gradient_ratio``, does the border of the
  kept pixels show; ``hole_detail``, is an inpainted fill as detailed as what surrounds it.

What this is not: no learned features (no SIFID, LPIPS, NIQE: they need network weights), no file
I/O, no tiling or streaming. Everything runs in memory on whole images on the CPU with numpy and
scipy (source usage's exact nearest-patch search uses a FAISS flat index), sized for tests and
benchmarks: a 256×256 pair takes well under a second per metric, a 16 MP sample against a 4 MP
photo a few seconds.
Not torch: on CPU, scipy's separable filters and numpy's row sorts are 10-50x faster than torch's
depthwise conv2d and column sorts, which are the whole cost here.

Arrays follow the I/O convention, (row, col, channel) with C = 1 or 3, either float in [0, 1] or
uint8 (divided by 255); ``_as_image`` validates and converts them once, and everything inside
stays (H, W, C). A patch descriptor is a P×P×C patch flattened in (row, col, channel) order, as
in ``gigasid.core``. Bad images raise ``ValueError``; bad options raise
``gigasid.errors.ConfigError`` (itself a ``ValueError``) naming the option and its valid range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from gigasid.errors import ConfigError

__all__ = [
    "FogMap",
    "SourceUsage",
    "border_gradient_ratio",
    "detail_retention",
    "fog_map",
    "largest_copied_region",
    "patch_swd",
    "patch_swd_levels",
    "pixel_diversity",
    "source_usage",
]

# ITU-R BT.601 luma weights, the usual "gray" of an RGB image (and SinGAN's diversity input).
_LUMA = np.array([0.299, 0.587, 0.114])

# 5-tap binomial filter, Burt & Adelson's Laplacian-pyramid kernel (a = 3/8), as in Karras's SWD.
_BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / 16.0

# Copy detection: a patch whose quantised value appears more often than this in the reference
# (flat sky, periodic texture) says little about where it came from; it votes for only this many
# evenly spaced occurrences, so a flat image cannot enumerate N_out × N_ref candidate pairs.
_MAX_VOTES_PER_PATCH = 8
# Copy detection: image patches hashed and looked up per chunk, bounding the temporary arrays.
_LOOKUP_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------
# validation


def _as_image(x: npt.ArrayLike, name: str) -> np.ndarray:
    """Validate an (H, W, C) image, C in {1, 3}, and return it as float32 in [0, 1] units.

    Values outside [0, 1] are allowed: a perturbed or denoised sample may overshoot slightly and
    every metric here stays well defined; only non-finite values are refused.
    """
    arr = np.asarray(x)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"{name} must be an (H, W, C) array with C = 1 or 3, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be float (values in [0, 1]) or uint8 (0..255), got dtype {arr.dtype}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fits(img: np.ndarray, name: str, size: int, what: str) -> None:
    if min(img.shape[:2]) < size:
        raise ValueError(
            f"{name} is {img.shape[0]}x{img.shape[1]}, smaller than {what}={size} on its short side"
        )


def _check_channels(image: np.ndarray, reference: np.ndarray) -> None:
    if image.shape[2] != reference.shape[2]:
        raise ValueError(
            f"image has {image.shape[2]} channel(s) but reference has {reference.shape[2]}; "
            "convert both to gray or both to RGB"
        )


# --------------------------------------------------------------------------------------------
# fidelity: multi-scale patch sliced Wasserstein distance


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable 5-tap binomial blur of an (H, W, C) array, mirrored at the edges (d c b|a b c d).

    Mirror, as in Karras's code and cv2.pyrUp, keeps the even/odd pattern of a zero-inserted
    image across the edge, so a constant survives down-then-up exactly and has no band-pass
    energy; replicating the edge would put a spurious band at the border.
    """
    y = ndimage.correlate1d(x, _BINOMIAL_5, axis=0, mode="mirror")
    return ndimage.correlate1d(y, _BINOMIAL_5, axis=1, mode="mirror")


def _pyr_down(x: np.ndarray) -> np.ndarray:
    return _blur(x)[::2, ::2]


def _pyr_up(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-insertion upsampling to (height, width), then blur ×4 (the zeros carry 3/4 of it)."""
    z = np.zeros((height, width, x.shape[2]), dtype=x.dtype)
    z[::2, ::2] = x
    return 4.0 * _blur(z)


def _num_levels(height: int, width: int, min_size: int) -> int:
    """Levels whose short side is still >= min_size; level l has short side ⌈s / 2^l⌉."""
    short, n = min(height, width), 0
    while short >= min_size:
        n += 1
        short = (short + 1) // 2
    return n


def _laplacian_pyramid(x: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """Band-pass levels finest first; the last level is the remaining low-pass image."""
    levels = []
    for _ in range(num_levels - 1):
        low = _pyr_down(x)
        levels.append(x - _pyr_up(low, x.shape[0], x.shape[1]))
        x = low
    levels.append(x)
    return levels


def _patch_descriptors(
    level: np.ndarray, patch_size: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """(N, P, P, C) patches of an (H, W, C) level: all of them, or ``count`` drawn without repeats.

    Patches are gathered by index, never unfolded, so memory is N·P²·C whatever the level size.
    """
    h, w, _ = level.shape
    cols = w - patch_size + 1
    total = (h - patch_size + 1) * cols
    if total <= count:
        flat = np.arange(total)
    else:
        flat = np.sort(rng.choice(total, size=count, replace=False))
    # A (H', W', P, P, C) view of every window; indexing it copies only the chosen ones.
    windows = np.lib.stride_tricks.sliding_window_view(level, (patch_size, patch_size), axis=(0, 1))
    return windows.transpose(0, 1, 3, 4, 2)[flat // cols, flat % cols]


def _sorted_projections(desc: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(num_projections, N) projections of (N, D) descriptors, each row sorted.

    Computed as dirs.T @ desc.T so the result is (P, N) in C order and the sort runs along
    memory: sorting the columns of (N, P) instead is several times slower, and the sort is most
    of the metric's time.
    """
    return np.sort(directions.T @ desc.T, axis=1)


def _quantiles(sorted_proj: np.ndarray, m: int) -> np.ndarray:
    """The empirical quantile function of each row at the m midpoints (k + 0.5) / m.

    For m equal to the row length this is the identity; otherwise it lets two sets of different
    sizes be compared point by point (the 1-D Wasserstein distance is ∫|F⁻¹ − G⁻¹|).
    """
    n = sorted_proj.shape[1]
    if n == m:
        return sorted_proj
    idx = np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.int64), n - 1)
    return sorted_proj[:, idx]


def patch_swd_levels(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    *,
    patch_size: int = 7,
    num_projections: int = 128,
    patches_per_level: int = 16384,
    min_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """Patch sliced Wasserstein distance at every Laplacian level, finest first (Karras 2018).

    Both images get the same number of levels: as many as the smaller short side allows while
    staying >= ``min_size``, so level l is the same frequency band in both and the last level is
    the low-pass of both. At each level, up to ``patches_per_level`` random ``patch_size``²
    patches are taken from each image (all of them when there are fewer), normalised per channel
    by the reference level's mean and std, projected on ``num_projections`` random unit
    directions; the level's distance is the mean over directions of the 1-D Wasserstein-1
    distance between the sorted projections. Deterministic for a given ``seed``. The default
    16384 patches uses every patch of an image up to 134×134 and keeps a 256×256 pair near
    0.2 s. Across seeds the result moves by up to ~10 %, mostly through the random directions
    at the coarse levels (few patches there): compare runs at one seed.

    Departures from Karras's code, deliberately: (1) both descriptor sets are normalised with the
    *reference's* statistics, not each with its own, so a global brightness or contrast change
    of a band is measured rather than normalised away; (2) no ×10³ scaling of the result;
    (3) unequal patch counts are compared by quantile interpolation instead of being equal by
    construction; (4) one set of directions per level instead of 4 repeats of 512.
    """
    img = _as_image(image, "image")
    ref = _as_image(reference, "reference")
    _check_channels(img, ref)
    patch_size = _check_int(patch_size, "patch_size", 1)
    num_projections = _check_int(num_projections, "num_projections", 1)
    patches_per_level = _check_int(patches_per_level, "patches_per_level", 1)
    min_size = _check_int(min_size, "min_size", max(2, patch_size))
    seed = _check_int(seed, "seed", 0)
    _check_fits(img, "image", min_size, "min_size")
    _check_fits(ref, "reference", min_size, "min_size")

    num_levels = min(_num_levels(*img.shape[:2], min_size), _num_levels(*ref.shape[:2], min_size))
    pyr_img = _laplacian_pyramid(img, num_levels)
    pyr_ref = _laplacian_pyramid(ref, num_levels)

    distances = []
    for level, (band_img, band_ref) in enumerate(zip(pyr_img, pyr_ref, strict=True)):
        # One independent stream per (seed, level, role): adding a level or changing one image's
        # size never changes the draws of the others.
        desc_img = _patch_descriptors(
            band_img, patch_size, patches_per_level, np.random.default_rng([seed, level, 0])
        )
        desc_ref = _patch_descriptors(
            band_ref, patch_size, patches_per_level, np.random.default_rng([seed, level, 1])
        )
        # Per-channel statistics over all patches and positions (Karras's normalisation).
        # Sums as float64 matrix-vector products: numpy's column reductions of a narrow (M, C)
        # array are several times slower, and E[x²] − E[x]² is safe in float64.
        per_channel = desc_ref.reshape(-1, desc_ref.shape[-1]).astype(np.float64)
        ones = np.full(len(per_channel), 1.0 / len(per_channel))
        mean = ones @ per_channel
        std = np.sqrt(np.maximum(ones @ (per_channel * per_channel) - mean * mean, 0.0))
        # A flat reference channel (std 0) has no scale to normalise by: leave it unscaled.
        std = np.where(std > 1e-8, std, 1.0)
        flat_img = desc_img.reshape(len(desc_img), -1)
        flat_ref = desc_ref.reshape(len(desc_ref), -1)
        for flat in (flat_img, flat_ref):  # in place: the descriptors are fresh copies
            flat -= np.tile(mean, patch_size * patch_size).astype(np.float32)
            flat /= np.tile(std, patch_size * patch_size).astype(np.float32)

        dirs = np.random.default_rng([seed, level, 2]).standard_normal((flat_ref.shape[1], num_projections))
        dirs = (dirs / np.linalg.norm(dirs, axis=0, keepdims=True)).astype(np.float32)
        proj_img = _sorted_projections(flat_img, dirs)
        proj_ref = _sorted_projections(flat_ref, dirs)
        m = max(proj_img.shape[1], proj_ref.shape[1])
        diff = _quantiles(proj_img, m) - _quantiles(proj_ref, m)
        distances.append(float(np.abs(diff, out=diff).mean()))
    return distances


def patch_swd(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    *,
    patch_size: int = 7,
    num_projections: int = 128,
    patches_per_level: int = 16384,
    min_size: int = 16,
    seed: int = 0,
) -> float:
    """Multi-scale patch SWD between a sample and its reference: the mean of `patch_swd_levels`.

    Exactly 0 for identical images small enough that every patch is used (up to 134×134 with
    the defaults), small for a sample with the reference's patch statistics, large for unrelated
    content. In units of the reference's per-level patch std.
    """
    levels = patch_swd_levels(
        image,
        reference,
        patch_size=patch_size,
        num_projections=num_projections,
        patches_per_level=patches_per_level,
        min_size=min_size,
        seed=seed,
    )
    return float(np.mean(levels))


# --------------------------------------------------------------------------------------------
# diversity


def _gray(img: np.ndarray) -> np.ndarray:
    """(H, W) float64 luma of a float (H, W, C) image; a 1-channel image is its own gray."""
    if img.shape[2] == 1:
        return img[..., 0].astype(np.float64)
    return img.astype(np.float64) @ _LUMA


def pixel_diversity(samples: Sequence[npt.ArrayLike], reference: npt.ArrayLike) -> float:
    """SinGAN's pixel diversity: mean over pixels of the std across samples, / std of reference.

    Images are reduced to luma (0.299 R + 0.587 G + 0.114 B; gray stays gray). Stds are
    population stds (ddof = 0). 0 when all samples are identical; about 1 when samples vary per
    pixel as much as the reference varies across its pixels. ``samples`` is a sequence of at
    least two images of one shape (or an (N, H, W, C) array); the reference may differ in size.
    """
    if isinstance(samples, np.ndarray) and samples.ndim != 4:
        raise ValueError(
            f"samples must be a sequence of (H, W, C) images or an (N, H, W, C) array, "
            f"got an array of shape {samples.shape}"
        )
    images = [_as_image(s, f"samples[{i}]") for i, s in enumerate(samples)]
    if len(images) < 2:
        raise ValueError(f"pixel_diversity needs at least 2 samples, got {len(images)}")
    for i, s in enumerate(images[1:], start=1):
        if s.shape != images[0].shape:
            raise ValueError(
                f"samples[{i}] has shape {s.shape} but samples[0] has {images[0].shape}; "
                "all samples must have one shape"
            )
    ref_std = float(_gray(_as_image(reference, "reference")).std())
    if ref_std == 0.0:
        raise ValueError("reference is flat (its gray std is 0): diversity has no scale")
    # Std is shift-invariant: measuring from the first sample makes identical samples exactly 0
    # (a float mean of equal values need not equal them) and avoids cancellation.
    gray = [_gray(s) for s in images]
    per_pixel_std = np.stack([g - gray[0] for g in gray]).std(axis=0)
    return float(per_pixel_std.mean() / ref_std)


# --------------------------------------------------------------------------------------------
# copying


def _mix64(v: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: scrambles per-pixel codes so the polynomial hash is not linear."""
    v = (v + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    v ^= v >> np.uint64(31)
    return v * np.uint64(0x94D049BB133111EB)


def _patch_hashes(q: np.ndarray, patch_size: int) -> np.ndarray:
    """A 64-bit hash of every patch_size² window of a quantised (H, W, C) uint8 image.

    Rolling polynomial hash along rows, then along columns, in wrapping uint64 arithmetic:
    (H - P + 1, W - P + 1) hashes for 2·P vectorised passes. Collisions only add candidates.
    """
    h, w, c = q.shape
    code = np.zeros((h, w), dtype=np.uint64)
    for ch in range(c):  # exact: 3 × 8 bits fit in one uint64
        code = (code << np.uint64(8)) | q[..., ch].astype(np.uint64)
    code = _mix64(code)
    p = patch_size
    rows = np.zeros((h, w - p + 1), dtype=np.uint64)
    for j in range(p):
        rows = rows * np.uint64(1_000_003) + code[:, j : j + w - p + 1]
    out = np.zeros((h - p + 1, w - p + 1), dtype=np.uint64)
    for i in range(p):
        out = out * np.uint64(0x100000001B3) + rows[i : i + h - p + 1]
    return out


def _quantise(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _candidate_offsets(
    img: np.ndarray, ref: np.ndarray, patch_size: int, max_offsets: int
) -> list[tuple[int, int]]:
    """Source offsets (ref − image position) voted for by patches that match after quantisation.

    Ranked by vote count; the top ``max_offsets`` are returned, plus (0, 0) always, so that an
    image equal to (an aligned part of) the reference is found even when it is flat and every
    patch is ambiguous. Patches that appear many times in the reference vote for a few evenly
    spaced occurrences only (``_MAX_VOTES_PER_PATCH``).
    """
    hi, wi = img.shape[:2]
    wr = ref.shape[1]
    cols_i = wi - patch_size + 1
    cols_r = wr - patch_size + 1
    hash_img = _patch_hashes(_quantise(img), patch_size).ravel()
    hash_ref = _patch_hashes(_quantise(ref), patch_size).ravel()
    order = np.argsort(hash_ref, kind="stable")
    sorted_ref = hash_ref[order]
    # An offset (dr, dc) is encoded as one non-negative int64: dr ∈ (-hi, hr), dc ∈ (-wi, wr).
    stride = wi + wr
    keys, votes = [], []
    for start in range(0, len(hash_img), _LOOKUP_CHUNK):
        h = hash_img[start : start + _LOOKUP_CHUNK]
        lo = np.searchsorted(sorted_ref, h, side="left")
        n = np.searchsorted(sorted_ref, h, side="right") - lo
        take = np.minimum(n, _MAX_VOTES_PER_PATCH)
        total = int(take.sum())
        if total == 0:
            continue
        first = np.cumsum(take) - take
        rank = np.arange(total) - np.repeat(first, take)
        # The rank-th of `take` evenly spaced picks among the n occurrences of this hash.
        ref_idx = order[np.repeat(lo, take) + rank * np.repeat(n, take) // np.repeat(take, take)]
        img_idx = np.repeat(np.arange(start, start + len(h)), take)
        dr = ref_idx // cols_r - img_idx // cols_i
        dc = ref_idx % cols_r - img_idx % cols_i
        k, v = np.unique((dr + hi) * stride + (dc + wi), return_counts=True)
        keys.append(k)
        votes.append(v)
    ranked: list[tuple[int, int]] = []
    if keys:
        all_keys, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        all_votes = np.bincount(inverse, weights=np.concatenate(votes))
        # Most votes first; ties by key so the order does not depend on the sort's stability.
        best = np.lexsort((all_keys, -all_votes))[:max_offsets]
        ranked = [(int(k // stride - hi), int(k % stride - wi)) for k in all_keys[best]]
    if (0, 0) not in ranked:
        ranked.append((0, 0))
    return ranked


def _window_sums(a: np.ndarray, size: int) -> np.ndarray:
    """Sums over every size×size window of a 2-D array ('valid' mode), by an integral image."""
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1, out=s[1:, 1:])
    return s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]


def _largest_region_at(
    img: np.ndarray, ref: np.ndarray, dr: int, dc: int, patch_size: int, tolerance: float
) -> int:
    """Largest 4-connected area covered by patches of img that equal ref shifted by (dr, dc).

    Exact: every patch of the overlap is compared within ``tolerance``, not only those that voted.
    """
    hi, wi = img.shape[:2]
    hr, wr = ref.shape[:2]
    r0, r1 = max(0, -dr), min(hi, hr - dr)
    c0, c1 = max(0, -dc), min(wi, wr - dc)
    if r1 - r0 < patch_size or c1 - c0 < patch_size:
        return 0
    a = img[r0:r1, c0:c1]
    b = ref[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
    mismatch = (np.abs(a - b) > tolerance).any(axis=2)
    matched = _window_sums(mismatch, patch_size) == 0  # by top-left corner
    if not matched.any():
        return 0
    # A pixel is covered when some matched patch contains it: a window sum over the corners.
    covered = _window_sums(np.pad(matched, patch_size - 1), patch_size) > 0
    labels, count = ndimage.label(covered)  # default structure: 4-connectivity
    return int(np.bincount(labels.ravel(), minlength=count + 1)[1:].max())


def largest_copied_region(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    *,
    patch_size: int = 7,
    tolerance: float = 0.5 / 255.0,
    max_offsets: int = 64,
) -> int:
    """Area in pixels of the largest region of ``image`` copied verbatim from ``reference``.

    A patch_size² patch of the image is copied from source offset (dr, dc) when the reference's
    patch at (row + dr, col + dc) equals it within ``tolerance`` on every pixel and channel. For
    each candidate offset, the union of the footprints of all its copied patches is split into
    4-connected regions; the answer is the largest region over all offsets. An image equal to
    the reference scores H·W, a collage of shifted crops scores its largest crop, noise scores 0.

    Candidate offsets come from hashing the uint8-quantised patches of both images; each is then
    verified densely in float with ``tolerance``, so a region is found as long as *some* of its
    patches quantise identically: true for uint8 copies and for float copies with round-off, not
    for copies under a uniform shift close to the tolerance. The default tolerance, half a uint8
    step, means bit-exact for uint8 images and absorbs float round-off. Only the ``max_offsets``
    most voted offsets (plus (0, 0)) are verified; a copied region casts about one vote per
    pixel, so this only bounds the cost on collages of very many small pieces. Flat areas match
    anywhere flat: a uniform background shared with the reference counts as copied.
    """
    img = _as_image(image, "image")
    ref = _as_image(reference, "reference")
    _check_channels(img, ref)
    patch_size = _check_int(patch_size, "patch_size", 1)
    max_offsets = _check_int(max_offsets, "max_offsets", 1)
    if not isinstance(tolerance, (int, float, np.floating)) or not (
        math.isfinite(tolerance) and tolerance >= 0
    ):
        raise ConfigError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    _check_fits(img, "image", patch_size, "patch_size")
    _check_fits(ref, "reference", patch_size, "patch_size")

    best = 0
    for dr, dc in _candidate_offsets(img, ref, patch_size, max_offsets):
        # The region lies inside the overlap: skip offsets that cannot beat the best so far.
        overlap = max(0, min(img.shape[0], ref.shape[0] - dr) - max(0, -dr)) * max(
            0, min(img.shape[1], ref.shape[1] - dc) - max(0, -dc)
        )
        if overlap > best:
            best = max(best, _largest_region_at(img, ref, dr, dc, patch_size, tolerance))
    return best


# --------------------------------------------------------------------------------------------
# detail: how much of the reference's fine detail survives, and where it was lost


def _gradient_magnitude(gray: np.ndarray) -> np.ndarray:
    """(H-1, W-1) |∇| of a 2-D array from forward differences (the finest scale an image has)."""
    dy = np.diff(gray, axis=0)[:, :-1]
    dx = np.diff(gray, axis=1)[:-1, :]
    return np.hypot(dx, dy)


def detail_retention(image: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """Mean |∇| of the image's gray over the reference's: 1.0 keeps the reference's fine detail.

    Gray is luma; |∇| the magnitude of forward differences. The sampler only rearranges the
    reference's patches, so a sample well below 1 has been blurred (averaged patches, fog); well
    above 1 means seams or noise. Sizes may differ.
    """
    img = _as_image(image, "image")
    ref = _as_image(reference, "reference")
    _check_channels(img, ref)
    _check_fits(img, "image", 2, "a gradient's support")
    _check_fits(ref, "reference", 2, "a gradient's support")
    ref_detail = float(_gradient_magnitude(_gray(ref)).mean())
    if ref_detail == 0.0:
        raise ValueError("reference is flat (its gradient is 0 everywhere): detail has no scale")
    return float(_gradient_magnitude(_gray(img)).mean()) / ref_detail


@dataclass(frozen=True)
class FogMap:
    """Where a sample lost the fine detail its coarse content calls for, per ``block``-px block.

    ``fogged[i, j]`` marks block (i, j) (pixels [block·i, block·(i+1)) × [block·j, block·(j+1)));
    ``detail`` is the block's mean |∇| and ``expected`` the mean |∇| the reference holds where its
    coarse content looks like the block's, both smoothed over the 3×3 neighbouring blocks.
    """

    fogged: np.ndarray
    detail: np.ndarray
    expected: np.ndarray
    block: int

    @property
    def fraction(self) -> float:
        """The fogged share of the measured area (whole blocks)."""
        return float(self.fogged.mean())


def _block_grid(x: np.ndarray, block: int, stride: int) -> np.ndarray:
    """(n_r, n_c, ...) windows of ``block`` px at ``stride`` over the leading two axes, as views."""
    windows = np.lib.stride_tricks.sliding_window_view(x, (block, block), axis=(0, 1))
    return windows[::stride, ::stride]


def _summed_area(x: np.ndarray) -> np.ndarray:
    """The summed-area table of ``x`` over its leading two axes, with a zero first row and column."""
    sat = np.zeros((x.shape[0] + 1, x.shape[1] + 1, *x.shape[2:]))
    sat[1:, 1:] = x.astype(np.float64).cumsum(0).cumsum(1)
    return sat


def _box_means(sat: np.ndarray, size: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Means of the ``size``² windows whose top-left corners are the grid ``rows`` × ``cols``, read
    from a :func:`_summed_area` table: any window size and stride costs the same."""
    top, left = np.ix_(rows, cols)
    return (sat[top + size, left + size] - sat[top, left + size] - sat[top + size, left] + sat[top, left]) / (
        size * size
    )


def _block_features(img: np.ndarray, block: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block on a ``stride`` grid: its coarse content (mean colour of its 2×2 quadrants,
    (n_r, n_c, 4·C)) and its fine detail (mean |∇| of gray, (n_r, n_c))."""
    half = block // 2
    rows = np.arange((img.shape[0] - block) // stride + 1) * stride
    cols = np.arange((img.shape[1] - block) // stride + 1) * stride
    colour = _summed_area(img)
    coarse = np.concatenate(
        [_box_means(colour, half, rows + dr, cols + dc) for dr in (0, half) for dc in (0, half)], axis=-1
    )
    grad = np.pad(_gradient_magnitude(_gray(img)), ((0, 1), (0, 1)), mode="edge")
    return coarse, _box_means(_summed_area(grad), block, rows, cols)


def fog_map(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    *,
    block: int = 32,
    ratio: float = 0.5,
    neighbours: int = 16,
    floor: float = 0.5,
) -> FogMap:
    """Blocks of ``image`` whose fine detail is far below what the reference has for such content.

    Each ``block``-px block of the image is described by its coarse content (the mean colour of
    its four quadrants); its expected detail is the median mean |∇| of the ``neighbours``
    reference blocks (on a half-block grid) whose coarse content is nearest. A block is fogged
    when its detail, averaged over its 3×3 neighbourhood, is below ``ratio`` times the expected
    detail averaged the same way, and that expectation is at least ``floor`` times the
    reference's median block detail. Smooth regions the reference has too (sky, water, a plain
    wall) have smooth look-alikes, a low expectation, and never count; fog — the averaged colour
    of structured content with its structure gone — looks like structured blocks coarsely and is
    found. The neighbourhood average keeps an isolated smooth block among busy ones (which the
    reference has too) from counting: fog is a region, not a block.
    """
    img = _as_image(image, "image")
    ref = _as_image(reference, "reference")
    _check_channels(img, ref)
    block = _check_int(block, "block", 4)
    neighbours = _check_int(neighbours, "neighbours", 1)
    for name, value in (("ratio", ratio), ("floor", floor)):
        if not isinstance(value, (int, float, np.floating)) or not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    if block % 2:
        raise ConfigError(f"block must be even (it is split into quadrants), got {block}")
    _check_fits(img, "image", block, "block")
    _check_fits(ref, "reference", block, "block")

    from scipy.spatial import cKDTree

    ref_coarse, ref_detail = _block_features(ref, block, block // 2)
    ref_coarse = ref_coarse.reshape(-1, ref_coarse.shape[-1])
    ref_detail = ref_detail.ravel()
    if float(ref_detail.max()) == 0.0:
        raise ValueError("reference is flat (its gradient is 0 everywhere): fog has no scale")
    coarse, detail = _block_features(img, block, block)
    k = min(neighbours, ref_detail.size)
    _, nearest = cKDTree(ref_coarse).query(coarse.reshape(-1, coarse.shape[-1]), k=k)
    nearest = np.asarray(nearest).reshape(-1, k)
    expected = np.median(ref_detail[nearest], axis=1).reshape(detail.shape)
    detail_smooth = ndimage.uniform_filter(detail, 3, mode="nearest")
    expected_smooth = ndimage.uniform_filter(expected, 3, mode="nearest")
    fogged = (detail_smooth < ratio * expected_smooth) & (expected_smooth >= floor * float(np.median(ref_detail)))
    return FogMap(fogged=fogged, detail=detail_smooth, expected=expected_smooth, block=block)


# --------------------------------------------------------------------------------------------
# source usage: does the sample draw on the whole reference, or repeat a small part of it?


@dataclass(frozen=True)
class SourceUsage:
    """How a sample draws on its reference (see :func:`source_usage`).

    ``top_share``: the share of the sample matched to the reference's 1 % most-used cells (an even
    draw scores about 0.01·k for k matches per cell; a collapsed one scores high).
    ``coverage``: exp(entropy) of the cell histogram over the number of cells — the share of the
    reference that an even draw of the same spread would use (1 = perfectly even).
    ``repetition``: the highest normalised autocorrelation of the sample's band-passed gray at a
    shift of at least ``min_shift`` px (about 0 for a varied image, near 1 for a lattice of
    repeats); compare with the reference's own value, since a periodic reference repeats too.
    ``cell_counts``: the matches per reference cell, (rows, cols), for maps.
    """

    top_share: float
    coverage: float
    repetition: float
    cell_counts: np.ndarray


def _area_reduce(gray: np.ndarray, factor: int) -> np.ndarray:
    h, w = (gray.shape[0] // factor) * factor, (gray.shape[1] // factor) * factor
    return gray[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _repetition(gray: np.ndarray, min_shift: int) -> float:
    """Highest normalised autocorrelation of the band-passed gray at shifts >= ``min_shift`` (in
    the given array's pixels), over shifts up to half the image each way (enough overlap for a
    stable estimate)."""
    band = gray - ndimage.gaussian_filter(gray, 4.0, mode="reflect")
    band = band - band.mean()
    h, w = band.shape
    spectrum = np.fft.rfft2(band, s=(2 * h, 2 * w))
    corr = np.fft.irfft2(np.abs(spectrum) ** 2, s=(2 * h, 2 * w))
    energy = corr[0, 0] / band.size
    if energy <= 0:
        return 0.0
    shifts_r = np.fft.fftfreq(2 * h, 1.0 / (2 * h))
    shifts_c = np.fft.fftfreq(2 * w, 1.0 / (2 * w))
    dist = np.hypot(shifts_r[:, None], shifts_c[None, :])
    valid = (dist >= min_shift) & (np.abs(shifts_r)[:, None] <= h // 2) & (np.abs(shifts_c)[None, :] <= w // 2)
    if not valid.any():
        return 0.0
    # pixels a shift keeps overlapping, to average the products over
    overlap = np.outer(np.maximum(h - np.abs(shifts_r), 1.0), np.maximum(w - np.abs(shifts_c), 1.0))
    normalised = corr / overlap / energy
    return float(normalised[valid].max())


def source_usage(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    *,
    samples: int = 20_000,
    patch_size: int = 8,
    reduce: int = 4,
    cell: int = 64,
    min_shift: int = 64,
    seed: int = 0,
) -> SourceUsage:
    """Match ``samples`` random patches of the sample to the reference and see where they land.

    Both images are reduced to gray and area-averaged by ``reduce``; ``samples`` random
    ``patch_size``² patches of the reduced sample find their nearest reduced reference patch
    (exact L2 search over every reference patch, FAISS flat index); the matched patch centres,
    back in full-resolution pixels, are counted in ``cell``-px cells of the reference. See
    :class:`SourceUsage` for what is reported. Deterministic for a given ``seed``.
    """
    img = _as_image(image, "image")
    ref = _as_image(reference, "reference")
    _check_channels(img, ref)
    samples = _check_int(samples, "samples", 1)
    patch_size = _check_int(patch_size, "patch_size", 1)
    reduce = _check_int(reduce, "reduce", 1)
    cell = _check_int(cell, "cell", 1)
    min_shift = _check_int(min_shift, "min_shift", 1)
    _check_fits(img, "image", patch_size * reduce, "patch_size·reduce")
    _check_fits(ref, "reference", patch_size * reduce, "patch_size·reduce")

    import faiss

    small_img = _area_reduce(_gray(img), reduce).astype(np.float32)
    small_ref = _area_reduce(_gray(ref), reduce).astype(np.float32)
    ref_patches = np.lib.stride_tricks.sliding_window_view(small_ref, (patch_size, patch_size))
    ref_grid_w = ref_patches.shape[1]
    index = faiss.IndexFlatL2(patch_size * patch_size)
    # added in row bands: the flattened patch matrix of a 15 MP reference is ~1 GB at once
    band = max(1, (1 << 22) // (ref_grid_w * patch_size * patch_size))
    for r0 in range(0, ref_patches.shape[0], band):
        index.add(np.ascontiguousarray(ref_patches[r0 : r0 + band].reshape(-1, patch_size * patch_size)))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, small_img.shape[0] - patch_size + 1, samples)
    cols = rng.integers(0, small_img.shape[1] - patch_size + 1, samples)
    offsets = np.arange(patch_size)
    queries = small_img[(rows[:, None] + offsets)[:, :, None], (cols[:, None] + offsets)[:, None, :]]
    _, found = index.search(np.ascontiguousarray(queries.reshape(samples, -1)), 1)
    found = found[:, 0]
    centre_r = ((found // ref_grid_w) + patch_size / 2) * reduce
    centre_c = ((found % ref_grid_w) + patch_size / 2) * reduce
    n_r, n_c = -(-ref.shape[0] // cell), -(-ref.shape[1] // cell)
    which = np.minimum(centre_r // cell, n_r - 1).astype(np.int64) * n_c + np.minimum(centre_c // cell, n_c - 1).astype(np.int64)
    counts = np.bincount(which, minlength=n_r * n_c)
    top = max(1, math.ceil(0.01 * counts.size))
    top_share = float(np.sort(counts)[::-1][:top].sum() / samples)
    p = counts[counts > 0] / samples
    coverage = float(np.exp(-(p * np.log(p)).sum()) / counts.size)
    repetition = _repetition(small_img.astype(np.float64), max(1, min_shift // reduce))
    return SourceUsage(top_share=top_share, coverage=coverage, repetition=repetition,
                       cell_counts=counts.reshape(n_r, n_c))


# --------------------------------------------------------------------------------------------
# seams: does the border of a held region show?


def border_gradient_ratio(image: npt.ArrayLike, known: npt.ArrayLike) -> float:
    """Mean |gray difference| of neighbouring pixels across the border of a ``known`` region (bool
    (H, W): the pixels an outpainted or inpainted image kept) over the mean of every other pair of
    neighbours. About 1 when the border does not show; a seam, a step in brightness or a blurred
    band makes it larger or smaller."""
    gray = _gray(_as_image(image, "image"))
    known = np.asarray(known, dtype=bool)
    if known.shape != gray.shape:
        raise ValueError(f"known is {known.shape}, the image {gray.shape[:2]}")
    across, elsewhere = [], []
    for axis in (0, 1):
        step = np.abs(np.diff(gray, axis=axis))
        crossing = np.diff(known.astype(np.int8), axis=axis) != 0
        across.append(step[crossing])
        elsewhere.append(step[~crossing])
    across, elsewhere = np.concatenate(across), np.concatenate(elsewhere)
    if across.size == 0 or elsewhere.size == 0:
        raise ValueError("the known region has no border inside the image")
    return float(across.mean() / max(elsewhere.mean(), 1e-12))


def hole_detail(image: npt.ArrayLike, reference: npt.ArrayLike, hole: npt.ArrayLike, *, ring: int = 64) -> float:
    """Mean |∇| of ``image``'s gray inside an inpainted ``hole`` (bool (H, W): the pixels it
    regenerated) over the reference's mean |∇| in the ``ring`` px around the hole: the
    surroundings the fill continues. About 1 when the fill is as detailed as what surrounds it;
    a fogged fill scores far below (``detail_retention`` of the whole image hardly moves when a
    hole of a few per cent of it goes flat)."""
    image, reference = _as_image(image, "image"), _as_image(reference, "reference")
    hole = np.asarray(hole, dtype=bool)
    if not image.shape[:2] == reference.shape[:2] == hole.shape:
        raise ValueError(f"image {image.shape[:2]}, reference {reference.shape[:2]} and hole {hole.shape} differ")
    ring = _check_int(ring, "ring", 1)
    around = ndimage.binary_dilation(hole, iterations=ring) & ~hole
    inside, around = hole[:-1, :-1], around[:-1, :-1]
    if not inside.any() or not around.any():
        raise ValueError("the hole is empty or covers the whole image")
    expected = _gradient_magnitude(_gray(reference))[around].mean()
    return float(_gradient_magnitude(_gray(image))[inside].mean() / max(expected, 1e-12))
