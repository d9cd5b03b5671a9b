"""Candidate reference positions for every patch of a noisy image: the ``knn`` backend's input.

The index is built once per (reference, scale) over cheap patch *features*, not raw patches:
the first ``search_dims - 1`` principal components of the reference's centred patches (computed
for every position as a convolution with the PCA basis, so no patch matrix is built), plus one
coordinate holding the norm of what the components leave out. For a query with features
(Px, 0) and a reference patch with (Py, ‖Ry‖),

    ‖features(x) - features(y)‖² = ‖P(x - y)‖² + ‖Ry‖²  ≈  ‖x - y‖² - ‖Rx‖² + 2⟨Rx, Ry⟩,

which ranks like the true distance up to the cross term of the residuals. The index only ranks;
the ``knn`` denoiser re-weights the candidates with exact distances on raw reference patches.
``search_dims = 0`` searches raw patches (D dimensions) instead.

The kernel compares x against alpha·y, but ‖x - alpha y‖² = alpha² ‖x/alpha - y‖², so one index
over y serves every step when queried with x/alpha (DESIGN.md §7).

Coherence (PatchMatch-style propagation): a query's good candidates are its grid neighbours'
candidates shifted by one pixel, and its own candidates from the previous step. ``coherence``
("neighbours", "previous" or "both") adds those to the index's results; the pool is ranked by
feature distance, de-duplicated, and the best k are kept. ``search_stride`` > 1 uses coherence
the other way round, to save searches: only every n-th query per axis is searched, and the others
take their cell's searched candidates shifted by their offset.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gigasid.core.jit import numba, parallel_kernels
from gigasid.core.patches import grid_shape, periodic_axes, periodic_pad, unfold_rows
from gigasid.index.search import IndexKind, build_index, load_index


class PatchFeatures:
    """PCA features of P×P patches, computed by convolution with the basis."""

    def __init__(self, reference: torch.Tensor, patch_size: int, dims: int, *, sample: int = 4096, seed: int = 0):
        channels, height, width = reference.shape
        self.patch_size, self.channels = patch_size, channels
        full = channels * patch_size * patch_size
        self.dims = min(dims, full)
        # sample patch rows (C, P, P order, the conv weight layout) for the covariance
        grid_h, grid_w = grid_shape(height, width, patch_size)
        generator = torch.Generator().manual_seed(seed)
        count = grid_h * grid_w
        picks = torch.randperm(count, generator=generator)[: min(sample, count)]
        rows, cols = picks // grid_w, picks % grid_w
        patches = reference.unfold(1, patch_size, 1).unfold(2, patch_size, 1)  # C, gh, gw, P, P
        sampled = patches[:, rows, cols].permute(1, 0, 2, 3).reshape(len(picks), full).to(torch.float64)
        self.mean = sampled.mean(0)
        centred = sampled - self.mean
        # leading right singular vectors of the centred sample = leading principal components.
        # float64, although float32 would do for ranking at half the cost: the SVD's bits depend
        # on the thread count, and in float32 that reached the features (a job then gave other
        # pixels on a machine with another core count); float64's differences are ~1e-16 and
        # have not reached the float32 features in any test (tests/graph/test_resume.py compares
        # a 1-thread run with a 2-thread resume)
        with torch.random.fork_rng():  # svd_lowrank draws from the global generator
            torch.manual_seed(seed)
            # 2 power iterations on a 4096-patch sample: measured at 186x248, the 31 components
            # keep 93.8 % of all patches' centred energy, against 93.96 % for 3 on 8192 and 94.09 %
            # for the exact PCA of all 40 248, in a third of the time (63 vs ~150 ms)
            _, _, vectors = torch.svd_lowrank(centred, q=min(full, self.dims + 8), niter=2)
        basis = vectors[:, : self.dims]  # (full, dims)
        # features are computed in float64 so that a tile's crop gets bit-identical float32
        # features to the whole image's, whatever the matmul's blocking
        self.basis = basis.contiguous()
        self.offset = self.mean @ basis
        self.mean_filter = self.mean.reshape(1, channels, patch_size, patch_size).to(torch.float32)
        self.mean_sq = float(self.mean.pow(2).sum())

    def project(
        self, image: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(C, H, W) → (len(rows)·len(cols), dims): the components of the patches whose top-left
        corners are the grid ``rows`` × ``cols`` (default all), minus the mean's."""
        channels, height, width = image.shape
        size = self.patch_size
        grid_h, grid_w = grid_shape(height, width, size)
        rows = torch.arange(grid_h) if rows is None else rows
        cols = torch.arange(grid_w) if cols is None else cols
        image = image.to(torch.float32).contiguous()
        if _project_rows is not None and image.device.type == "cpu":
            out = np.empty((len(rows) * len(cols), self.dims), dtype=np.float32)
            serial = not parallel_kernels()
            kernel = _project_rows_serial if serial else _project_rows
            # float32 in one fixed summation order per patch: a tile's crop gets the whole
            # image's bits (a matmul's order depends on its shape, hence the float64 path below)
            pixels = np.ascontiguousarray(image.numpy().transpose(1, 2, 0)).reshape(-1)
            kernel(pixels, width * channels, channels, size, rows.numpy().astype(np.int64),
                   cols.numpy().astype(np.int64), self._kernel_basis, self._kernel_offset, out)
            return torch.from_numpy(out)
        return self._project_torch(image, rows, cols)

    def _project_torch(self, image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The torch path of :meth:`project` (any device; ``image`` contiguous float32): float64
        products of ``4096`` patches at a time with the basis, rounded to float32 once. The
        compiled path sums in float32 in another order: the two agree to float32 round-off."""
        channels, height, width = image.shape
        size = self.patch_size
        device = image.device
        basis, offset = self._basis_on(device)
        rows, cols = rows.to(device), cols.to(device)
        corners = image.as_strided(
            (height - size + 1, width - size + 1, channels, size, size),
            (width, 1, height * width, width, 1),
            image.storage_offset(),
        )
        out = torch.empty(len(rows) * len(cols), self.dims, dtype=torch.float32, device=device)
        step = max(1, 4096 // max(1, len(cols)))
        for start in range(0, len(rows), step):
            block = corners[rows[start : start + step]][:, cols].reshape(-1, channels * size * size)
            features = block.to(torch.float64) @ basis - offset
            out[start * len(cols) : start * len(cols) + features.shape[0]] = features.to(torch.float32)
        return out

    def _basis_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(basis, offset) on ``device``: moved once and kept (the saved ones stay on the CPU)."""
        if self.basis.device == device:
            return self.basis, self.offset
        moved = getattr(self, "_moved", None)
        if moved is None or moved[0] != device:
            moved = self._moved = (device, self.basis.to(device), self.offset.to(device))
        return moved[1], moved[2]

    @functools.cached_property
    def _kernel_basis(self) -> np.ndarray:
        """The basis as the kernel reads it: (dims rounded up to 4, P·P·C) float32, each component
        in (H, W, C) order like the patch it multiplies; the padding components are zero."""
        size, channels = self.patch_size, self.channels
        components = self.basis.T.to(torch.float32).reshape(self.dims, channels, size, size)
        padded = np.zeros((-(-self.dims // 4) * 4, size * size * channels), dtype=np.float32)
        padded[: self.dims] = components.permute(0, 2, 3, 1).reshape(self.dims, -1).numpy()
        return padded

    @functools.cached_property
    def _kernel_offset(self) -> np.ndarray:
        return self.offset.to(torch.float32).numpy()

    def residual_norms(self, image: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """‖R(y - mean)‖ for every patch: its distance to the PCA subspace."""
        size = self.patch_size
        energy = F.avg_pool2d(image[None].double().pow(2).sum(0, keepdim=True)[None, 0], size, 1)[0, 0] * size * size
        # ⟨y, mean⟩ by a float32 convolution (a float64 one has no fast CPU kernel: 20x slower);
        # its round-off, ~1e-6 of ‖y‖², is far below what ranking by these norms resolves
        cross = F.conv2d(image[None].to(torch.float32), self.mean_filter.to(image.device))[0, 0].double()
        centred_sq = (energy - 2.0 * cross + self.mean_sq).flatten()
        return (centred_sq - projected.double().pow(2).sum(1)).clamp_min(0.0).sqrt().to(torch.float32)


class ReferenceCandidates:
    """The candidate source of one reference scale (see ``core.image_denoiser.CandidateSource``)."""

    def __init__(
        self,
        reference: torch.Tensor,
        patch_size: int,
        *,
        k: int = 5,
        index: IndexKind = "ivf",
        search_dims: int = 32,
        nlist: int | None = None,
        nprobe: int = 4,
        coherence: str = "none",
        search_stride: int = 1,
        seed: int = 0,
        excluded: torch.Tensor | None = None,
    ):
        if coherence not in ("none", "neighbours", "previous", "both"):
            raise ValueError(f"coherence must be none, neighbours, previous or both, got {coherence!r}")
        self.patch_size, self.k, self.coherence = patch_size, k, coherence
        self.search_stride = search_stride
        _, height, width = reference.shape
        self.ref_grid = grid_shape(height, width, patch_size)
        if search_dims:
            self.features = PatchFeatures(reference, patch_size, search_dims - 1, seed=seed)
            projected = self.features.project(reference)
            residual = self.features.residual_norms(reference, projected)
            vectors = torch.cat([projected, residual[:, None]], 1)
        else:
            self.features = None
            vectors = self._raw_rows(reference)
        self.vectors = vectors.contiguous()
        # inpaint: the patches touching ``excluded`` (bool over the reference's cells) are left out
        # of the index; its row ids map back to grid positions through ``ids``
        self.allowed = self.ids = None
        if excluded is not None:
            from gigasid.core.known import allowed_patches

            self.allowed = allowed_patches(excluded, patch_size).flatten()
            self.ids = torch.nonzero(self.allowed).flatten()
            vectors = self.vectors[self.ids]
        # 2·√N lists: a search costs ~nlist (the coarse quantizer) + nprobe·N/nlist (the lists),
        # balanced at √(nprobe·N), i.e. 2·√N for the default nprobe 4. Measured at 186x248
        # (40 248 patches, nprobe 4): recall@5 0.950 vs 0.932 with 4·√N, same search time, half
        # the training time
        nlist = nlist or 2 * max(1, int(vectors.shape[0] ** 0.5))
        options = {} if index == "exact" else {"nlist": nlist, "nprobe": nprobe, "seed": seed}
        self.index = build_index(vectors.contiguous(), index, **options)
        self.kind, self.nprobe = index, nprobe
        self._previous: tuple[int, torch.Tensor] | None = None  # (step, candidates)
        self.device = torch.device("cpu")

    _STATE = "candidates.pt"
    _INDEX = "index.bin"

    def save(self, directory: str | Path) -> None:
        """Write everything a worker needs to search: the PCA basis, the vectors, the index."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        features = None
        if self.features is not None:
            f = self.features
            features = {"basis": f.basis, "offset": f.offset, "mean_filter": f.mean_filter, "mean_sq": f.mean_sq,
                        "patch_size": f.patch_size, "channels": f.channels, "dims": f.dims, "mean": f.mean}
        # the vectors themselves live in the index: workers never need them (a 300-MP reference's
        # would be ~600 MB per worker)
        state = {"patch_size": self.patch_size, "k": self.k, "coherence": self.coherence,
                 "search_stride": self.search_stride, "ref_grid": self.ref_grid, "features": features,
                 "kind": self.kind, "nprobe": self.nprobe, "ids": self.ids}
        torch.save(state, directory / self._STATE)
        self.index.save(str(directory / self._INDEX))

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceCandidates:
        """Open a saved candidate source (the FAISS lists memory-mapped)."""
        directory = Path(directory)
        state = torch.load(directory / cls._STATE)
        self = cls.__new__(cls)
        self.patch_size, self.k, self.coherence = state["patch_size"], state["k"], state["coherence"]
        self.search_stride, self.ref_grid = state["search_stride"], tuple(state["ref_grid"])
        self.kind, self.nprobe = state["kind"], state["nprobe"]
        self.vectors = None  # not saved: only the coherence pools (in memory only) re-rank with them
        self.features = None
        if state["features"] is not None:
            self.features = PatchFeatures.__new__(PatchFeatures)
            for name, value in state["features"].items():
                setattr(self.features, name, value)
        self.index = load_index(str(directory / cls._INDEX), self.kind, nprobe=self.nprobe)
        self.ids = state.get("ids")
        self.allowed = None
        if self.ids is not None:
            self.allowed = torch.zeros(self.ref_grid[0] * self.ref_grid[1], dtype=torch.bool)
            self.allowed[self.ids] = True
        self._previous = None
        self.device = torch.device("cpu")
        return self

    def to(self, device: torch.device | str) -> ReferenceCandidates:
        """Search on ``device`` (in place): queries are projected there by the torch path of
        :class:`PatchFeatures`, the index moves there (FAISS: a GPU index where the installed
        faiss has GPUs, else the CPU index stays) and candidates come back there. Call it after
        :meth:`save`: what is saved stays device-free."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.index = self.index.to(device)
        if self.ids is not None:
            self.ids, self.allowed = self.ids.to(device), self.allowed.to(device)
        if self.vectors is not None and self.coherence != "none":  # only the coherence pools read them
            self.vectors = self.vectors.to(device)
        self._previous = None
        return self

    def _raw_rows(self, image: torch.Tensor) -> torch.Tensor:
        image = image.to(torch.float32).contiguous()
        return unfold_rows(image, self.patch_size, 0, image.shape[1] - self.patch_size + 1)

    def query_vectors(
        self, image: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Search vectors of the patches at grid rows × cols of ``image`` (default all)."""
        if self.features is None:
            raw = self._raw_rows(image)
            if rows is None:
                return raw
            grid_w = image.shape[2] - self.patch_size + 1
            return raw.view(-1, grid_w, raw.shape[1])[rows][:, cols].reshape(-1, raw.shape[1])
        projected = self.features.project(image, rows, cols)
        return torch.cat([projected, projected.new_zeros(projected.shape[0], 1)], 1)

    def __call__(
        self,
        x_t: torch.Tensor,
        alpha: float,
        *,
        periodic: bool | tuple[bool, bool],
        step: int | None = None,
        origin: tuple[int, int] = (0, 0),
        global_grid: tuple[int, int] | None = None,
        crop: bool = False,
    ) -> torch.Tensor:
        """Candidates for every patch of ``x_t``; see ``core.image_denoiser.CandidateSource``.

        ``origin`` and ``global_grid`` place a crop in the whole image's query grid (a tile plus
        its halo): the strided search picks its searched queries by global position, so a tile
        finds exactly what the whole image finds.
        """
        scaled = x_t.to(device=self.device, dtype=torch.float32) / alpha
        periodic = periodic_axes(periodic)
        if any(periodic) and not crop:
            scaled = periodic_pad(scaled, self.patch_size, periodic)
        grid = grid_shape(*x_t.shape[1:], self.patch_size, periodic=(False, False) if crop else periodic)
        if self.search_stride > 1:
            queries = None
            found = self._strided_search(scaled, grid, origin, global_grid, periodic)
        else:
            queries = self.query_vectors(scaled)
            found = self._search(queries)
        if self.coherence == "none":
            return found
        if crop:
            raise ValueError("coherence needs the whole image; tiled runs use coherence: none")
        pool = [found]
        if self.coherence in ("neighbours", "both"):
            pool += self._propagated(found, grid, periodic)
        previous = self._previous
        if (
            self.coherence in ("previous", "both") and previous is not None and step is not None
            and previous[0] == step + 1 and previous[1].shape == found.shape
        ):
            pool.append(previous[1])
        if queries is None:
            queries = self.query_vectors(scaled)
        best = self._best(torch.cat(pool, 1), queries)
        self._previous = (step, best) if step is not None else None
        return best

    def _strided_search(
        self,
        image: torch.Tensor,
        grid: tuple[int, int],
        origin: tuple[int, int],
        global_grid: tuple[int, int] | None,
        periodic: tuple[bool, bool],
    ) -> torch.Tensor:
        """Search every ``search_stride``-th query of each axis (by global position); the others
        take the candidates of the searched query at the top-left of their cell, shifted by their
        offset from it."""
        stride = self.search_stride
        grid_h, grid_w = grid
        global_grid = global_grid or grid
        ref_h, ref_w = self.ref_grid

        def axis(length: int, start: int, total: int, periodic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            local = torch.arange(length)
            position = local + start
            if periodic:
                position = position % total
            offset = position - torch.div(position, stride, rounding_mode="floor") * stride
            # a query whose searched query lies before the crop only serves the crop's margin,
            # which the caller discards: it searches for itself
            searched = (local - offset).clamp_min(0)
            offset = local - searched
            picked, slot = torch.unique(searched, return_inverse=True)
            return picked, slot, offset

        rows, row_slot, d_row = axis(grid_h, origin[0], global_grid[0], periodic[0])
        cols, col_slot, d_col = axis(grid_w, origin[1], global_grid[1], periodic[1])
        sub = self.query_vectors(image, rows, cols)  # only the searched patches are projected
        found = self._search(sub).view(len(rows), len(cols), -1)
        if _spread_matches is not None and found.device.type == "cpu" and self.allowed is None:
            # the same as below in one compiled pass (~6 ms a step at 186x248)
            out = np.empty((grid_h * grid_w, found.shape[2]), dtype=np.int64)
            _spread_matches(found.contiguous().numpy(), row_slot.numpy(), col_slot.numpy(), d_row.numpy(),
                            d_col.numpy(), ref_h, ref_w, out)
            return torch.from_numpy(out)
        row_slot, col_slot = row_slot.to(found.device), col_slot.to(found.device)
        d_row, d_col = d_row.to(found.device), d_col.to(found.device)
        spread = found[row_slot][:, col_slot]  # (grid_h, grid_w, k)
        ref_row = spread // ref_w + d_row[:, None, None]
        ref_col = spread % ref_w + d_col[None, :, None]
        inside = (spread >= 0) & (ref_row < ref_h) & (ref_col < ref_w)
        if self.allowed is not None:  # a shift onto a left-out patch keeps the searched match too
            shifted_id = (ref_row * ref_w + ref_col).clamp(0, ref_h * ref_w - 1)
            inside &= self.allowed[shifted_id]
        # a shift that leaves the reference keeps the searched match itself (still a close patch)
        shifted = torch.where(inside, ref_row * ref_w + ref_col, spread)
        return _drop_duplicates(shifted.view(grid_h * grid_w, -1))

    def _search(self, queries: torch.Tensor) -> torch.Tensor:
        """The index's k nearest, as reference grid positions (-1: none)."""
        found = self.index.search(queries, self.k)
        if self.ids is None:
            return found
        ids = self.ids.to(found.device)
        return torch.where(found >= 0, ids[found.clamp_min(0)], torch.full_like(found, -1))

    def _propagated(self, found: torch.Tensor, grid: tuple[int, int], periodic: tuple[bool, bool]) -> list[torch.Tensor]:
        """Neighbours' candidates shifted by one pixel toward this query (-1 where invalid)."""
        grid_h, grid_w = grid
        ref_h, ref_w = self.ref_grid
        cand = found.view(grid_h, grid_w, -1)
        valid = cand >= 0
        ref_row, ref_col = cand // ref_w, cand % ref_w
        shifted = []
        for d_row, d_col in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            # the neighbour at (-d_row, -d_col) from us matched q; we match q + (d_row, d_col)
            new_row, new_col = ref_row + d_row, ref_col + d_col
            ok = valid & (new_row >= 0) & (new_row < ref_h) & (new_col >= 0) & (new_col < ref_w)
            moved = torch.where(ok, new_row * ref_w + new_col, torch.full_like(cand, -1))
            moved = torch.roll(moved, shifts=(d_row, d_col), dims=(0, 1))
            # rolled-in rows/cols came from the opposite edge: no neighbour there unless it wraps
            if not periodic[0]:
                if d_row == 1:
                    moved[0] = -1
                elif d_row == -1:
                    moved[-1] = -1
            if not periodic[1]:
                if d_col == 1:
                    moved[:, 0] = -1
                elif d_col == -1:
                    moved[:, -1] = -1
            shifted.append(moved.view(grid_h * grid_w, -1))
        return shifted

    def _best(self, pool: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The k distinct candidates of smallest feature distance in each row of ``pool``."""
        pool, _ = pool.sort(1)
        duplicate = torch.zeros_like(pool, dtype=torch.bool)
        duplicate[:, 1:] = pool[:, 1:] == pool[:, :-1]
        invalid = duplicate | (pool < 0)
        if self.allowed is not None:  # propagated candidates may land on left-out patches
            invalid |= ~self.allowed[pool.clamp_min(0)]
        vecs = self.vectors[pool.clamp_min(0)]  # (M, pool, d)
        dist = (vecs - queries[:, None, :]).pow(2).sum(-1).masked_fill(invalid, float("inf"))
        order = dist.topk(self.k, dim=1, largest=False).indices
        best = pool.gather(1, order)
        return best.masked_fill(invalid.gather(1, order), -1)


def _drop_duplicates(candidates: torch.Tensor) -> torch.Tensor:
    """Replace repeated ids within a row by -1 (a repeat would weigh twice in the softmax)."""
    ordered, _ = candidates.sort(1)
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return ordered.masked_fill(repeated, -1)


# the CPU fast paths of PatchFeatures.project and the strided search; without numba the torch
# code above runs
if numba is None:  # pragma: no cover
    _project_rows = _project_rows_serial = _spread_matches = None
else:

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})
    def _project_block(patches, basis, out):
        """out[p, d] = ⟨patches[p], basis[d]⟩ for 4 patches and every component, 4 components at
        a time: 16 independent sums, each vectorised alike by LLVM (so a patch's bits do not
        depend on its slot in the block), and every load feeds 4 multiply-adds. 2.5x faster
        than one patch at a time (10k patches of 675 values: 8.7 vs 24 ms on 2 threads)."""
        n = patches.shape[1]
        p0, p1, p2, p3 = patches[0], patches[1], patches[2], patches[3]
        for d in range(0, basis.shape[0], 4):
            b0, b1, b2, b3 = basis[d], basis[d + 1], basis[d + 2], basis[d + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
            for i in range(n):
                x0, x1, x2, x3 = p0[i], p1[i], p2[i], p3[i]
                s00 += x0 * b0[i]
                s01 += x0 * b1[i]
                s02 += x0 * b2[i]
                s03 += x0 * b3[i]
                s10 += x1 * b0[i]
                s11 += x1 * b1[i]
                s12 += x1 * b2[i]
                s13 += x1 * b3[i]
                s20 += x2 * b0[i]
                s21 += x2 * b1[i]
                s22 += x2 * b2[i]
                s23 += x2 * b3[i]
                s30 += x3 * b0[i]
                s31 += x3 * b1[i]
                s32 += x3 * b2[i]
                s33 += x3 * b3[i]
            out[0, d], out[0, d + 1], out[0, d + 2], out[0, d + 3] = s00, s01, s02, s03
            out[1, d], out[1, d + 1], out[1, d + 2], out[1, d + 3] = s10, s11, s12, s13
            out[2, d], out[2, d + 1], out[2, d + 2], out[2, d + 3] = s20, s21, s22, s23
            out[3, d], out[3, d + 1], out[3, d + 2], out[3, d + 3] = s30, s31, s32, s33

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _project_row(image, row_len, channels, size, top, cols, basis, offset, patches, sums, out):
        """The patches with top-left corners (top, cols[b]) into out[b], in blocks of 4: each is
        copied contiguous (P rows of P·C values of the (H, W, C) image), then projected."""
        run = size * channels
        dims = out.shape[1]
        for b0 in range(0, len(cols), 4):
            count = min(4, len(cols) - b0)
            for p in range(count):
                x0 = top * row_len + cols[b0 + p] * channels
                for dy in range(size):
                    patches[p, dy * run : (dy + 1) * run] = image[x0 + dy * row_len : x0 + dy * row_len + run]
            _project_block(patches, basis, sums)
            for p in range(count):
                for d in range(dims):
                    out[b0 + p, d] = sums[p, d] - offset[d]

    @numba.njit(nogil=True, parallel=True, cache=True, boundscheck=False)
    def _project_rows(image, row_len, channels, size, rows, cols, basis, offset, out):
        for a in numba.prange(len(rows)):
            patches = np.zeros((4, basis.shape[1]), dtype=np.float32)
            sums = np.empty((4, basis.shape[0]), dtype=np.float32)
            chunk = out[a * len(cols) : (a + 1) * len(cols)]
            _project_row(image, row_len, channels, size, rows[a], cols, basis, offset, patches, sums, chunk)

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _project_rows_serial(image, row_len, channels, size, rows, cols, basis, offset, out):
        patches = np.zeros((4, basis.shape[1]), dtype=np.float32)
        sums = np.empty((4, basis.shape[0]), dtype=np.float32)
        for a in range(len(rows)):
            chunk = out[a * len(cols) : (a + 1) * len(cols)]
            _project_row(image, row_len, channels, size, rows[a], cols, basis, offset, patches, sums, chunk)

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _spread_matches(found, row_slot, col_slot, d_row, d_col, ref_h, ref_w, out):
        """:meth:`ReferenceCandidates._strided_search`'s spreading and :func:`_drop_duplicates`
        in one pass: each query takes its cell's searched matches shifted by its offset (the
        match itself where the shift leaves the reference), sorted, repeats replaced by -1."""
        grid_h, grid_w, k = len(row_slot), len(col_slot), found.shape[2]
        # each match's (row, col), once per searched query (an integer division is slow)
        match_row = np.empty(found.shape, dtype=np.int64)
        match_col = np.empty(found.shape, dtype=np.int64)
        for a in range(found.shape[0]):
            for b in range(found.shape[1]):
                for j in range(k):
                    match_row[a, b, j] = found[a, b, j] // ref_w
                    match_col[a, b, j] = found[a, b, j] - match_row[a, b, j] * ref_w
        for r in range(grid_h):
            for c in range(grid_w):
                row = out[r * grid_w + c]
                a, b = row_slot[r], col_slot[c]
                for j in range(k):
                    match = found[a, b, j]
                    value = match
                    if match >= 0:
                        ref_row = match_row[a, b, j] + d_row[r]
                        ref_col = match_col[a, b, j] + d_col[c]
                        if ref_row < ref_h and ref_col < ref_w:
                            value = ref_row * ref_w + ref_col
                    # insertion sort: k is small
                    at = j
                    while at > 0 and row[at - 1] > value:
                        row[at] = row[at - 1]
                        at -= 1
                    row[at] = value
                for j in range(k - 1, 0, -1):  # a repeat after its first copy (rows are sorted)
                    if row[j] == row[j - 1]:
                        row[j] = -1
