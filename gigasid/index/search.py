"""Vector indexes behind one contract: build on (N, d) float32 rows, search (M, d) → (M, k) ids.

``exact`` is a brute-force torch index (chunked matmul + top-k) that returns the true k nearest;
``flat``, ``ivf`` and ``ivfpq`` are FAISS indexes (flat is exact too; the IVF kinds probe
``nprobe`` of ``nlist`` k-means lists, √N by default as in the paper; ``ivf`` keeps its vectors in
float32, or float16 from ``HALF_LISTS_FROM`` vectors on; ``ivfpq`` as product-quantizer codes).
Missing results are -1.
Nothing here is patch-specific.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Literal, Protocol

import numpy as np
import torch

IndexKind = Literal["exact", "flat", "ivf", "ivfpq"]

# ``auto``: exact search while it is cheap, IVF up to where its flat lists stop fitting a worker's
# cache comfortably, IVF-PQ beyond (its codes are 8x smaller than float32 vectors)
AUTO_EXACT_BELOW = 20_000
ADD_CHUNK = 262_144  # vectors added to a FAISS index at a time
# IVF training sample: this many vectors per list (FAISS asks for at least 39) and at least
# TRAIN_MIN. Measured at 186x248 (401 lists): recall@5 on noisy queries 0.858 on a 16 000 sample
# against 0.863 on all 40 248 vectors, in 43 % of the training time (the largest part of
# preparing a small job's index, with the PCA)
TRAIN_PER_LIST = 40
TRAIN_MIN = 10_000
# k-means iterations of the IVF training (FAISS's default is 25): measured at 186x248 (401 lists),
# recall@5 against an exact search over the same vectors 0.950 at 10 vs 0.962 at 25, for 37 % of
# the training time (the largest part of preparing a small job's index)
TRAIN_ITERATIONS = 10
AUTO_PQ_FROM = 2_000_000
# ``ivf`` over this many vectors keeps them in float16 (see FaissIndex): below it the lists stay in
# a core's share of the cache and float32 scans as fast (a paper-size reference has ~40 000)
HALF_LISTS_FROM = 100_000
# an index file from this size on is memory-mapped (shared by a machine's worker processes), below
# it read into memory: FAISS scans mapped lists through its on-disk list type, which prefetches
# every probed list in helper threads at each search (measured on 224 436 vectors of 32 dims,
# 64 009 queries, nprobe 4: 0.64 s mapped, 0.45 s read)
MAP_FROM = 256 * 2**20


def auto_kind(count: int) -> IndexKind:
    """The index kind ``auto`` picks for a scale with ``count`` reference patches."""
    if count < AUTO_EXACT_BELOW:
        return "flat"
    return "ivf" if count < AUTO_PQ_FROM else "ivfpq"


def auto_thresholds() -> str:
    return (f"index auto: flat (exact) below {AUTO_EXACT_BELOW:,} patches, ivf below {AUTO_PQ_FROM:,}, "
            "ivfpq from there")


class VectorIndex(Protocol):
    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(M, d) float32 → (M, k) int64 row ids, nearest first, -1 where fewer than k exist; on
        the queries' device."""

    def to(self, device: torch.device) -> VectorIndex:
        """The index searching on ``device`` (where it can; else itself)."""

    def save(self, path: str) -> None:
        """Write the index to one file; :func:`load_index` opens it again."""


class BruteForceIndex:
    """Exact k nearest neighbours by chunked matmul; the (M, N) distance matrix is never whole.

    Distances are float64: a query's neighbours must not depend on which other queries share
    its chunk (float32 matmul blocking varies with the chunk's size).
    """

    def __init__(self, vectors: torch.Tensor, *, chunk: int = 2048):
        self.vectors = vectors.to(torch.float64).contiguous()
        self.sq_norms = self.vectors.pow(2).sum(1)
        self.chunk = chunk

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        k_eff = min(k, self.vectors.shape[0])
        device = self.vectors.device
        out = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=device)
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk].to(device=device, dtype=torch.float64)
            dist = self.sq_norms - 2.0 * (q @ self.vectors.T)  # + ‖q‖², constant per row
            out[start : start + self.chunk, :k_eff] = dist.topk(k_eff, dim=1, largest=False).indices
        return out.to(queries.device)

    def to(self, device: torch.device) -> BruteForceIndex:
        """Search on ``device``: the vectors move there (in place)."""
        self.vectors, self.sq_norms = self.vectors.to(device), self.sq_norms.to(device)
        return self

    def save(self, path: str) -> None:
        torch.save({"kind": "exact", "vectors": self.vectors}, path)


class FaissIndex:
    """A FAISS index (flat, IVF-Flat or IVF-PQ) over the rows, ids = row numbers."""

    def __init__(
        self,
        vectors: torch.Tensor,
        *,
        kind: IndexKind = "ivf",
        nlist: int | None = None,
        nprobe: int = 2,
        pq_m: int = 8,
        seed: int = 0,
    ):
        import faiss

        data = np.ascontiguousarray(vectors.to(torch.float32).cpu().numpy())
        count, dims = data.shape
        self.kind = kind
        if kind == "flat":
            index = faiss.IndexFlatL2(dims)
        else:
            nlist = nlist or max(1, int(math.sqrt(count)))
            nlist = min(nlist, max(1, count // 39))  # FAISS wants ~39 training points per list
            quantizer = faiss.IndexFlatL2(dims)
            if kind == "ivf" and count >= HALF_LISTS_FROM:
                # float16 lists: a scan reads half the bytes (it is bound by memory, not
                # arithmetic). Measured on 224 436 features of a 5120x2880 reference's latents,
                # 64 009 queries of a job's step, nprobe 4: 0.27-0.38 s against 0.35-0.55 s for
                # float32 lists, the same top 5 for 99.6-99.8 % of queries and the same recall
                # against an exact search; the knn denoiser re-weights the candidates with exact
                # float32 distances either way
                index = faiss.IndexIVFScalarQuantizer(quantizer, dims, nlist, faiss.ScalarQuantizer.QT_fp16)
            elif kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, dims, nlist)
            elif kind == "ivfpq":
                if dims % pq_m:
                    raise ValueError(f"pq_m={pq_m} must divide the search dimension {dims}")
                index = faiss.IndexIVFPQ(quantizer, dims, nlist, pq_m, 8)
            else:
                raise ValueError(f"unknown index kind {kind!r}; valid: exact, flat, ivf, ivfpq")
            index.cp.seed = seed
            index.cp.niter = TRAIN_ITERATIONS
            # train on a sample (k-means cost grows with it; ~64 points per list is plenty), then
            # add every vector in chunks: the build's extra memory stays bounded
            sample = min(count, max(TRAIN_PER_LIST * nlist, TRAIN_MIN))
            picks = np.random.default_rng(seed).choice(count, size=sample, replace=False) if sample < count else None
            index.train(data if picks is None else data[np.sort(picks)])
            index.nprobe = min(nprobe, nlist)
        for start in range(0, count, ADD_CHUNK):
            index.add(data[start : start + ADD_CHUNK])
        self.index = index
        self._quantizer = index if kind == "flat" else quantizer  # keep the quantizer alive

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        # a GPU index takes host arrays too (it copies them over itself)
        q = np.ascontiguousarray(queries.to(torch.float32).cpu().numpy())
        _, ids = self.index.search(q, k)
        return torch.from_numpy(ids).to(queries.device)

    def to(self, device: torch.device) -> FaissIndex:
        """Search on a CUDA ``device`` with a FAISS GPU index (a copy of this one) where the
        installed faiss has GPU support (``faiss.get_num_gpus() > 0``); elsewhere the CPU index
        stays (results come back on the queries' device either way). In place."""
        import faiss

        device = torch.device(device)
        on_gpu = getattr(self, "_gpu_resources", None) is not None
        if device.type != "cuda" or on_gpu or getattr(faiss, "get_num_gpus", lambda: 0)() < 1:
            return self
        resources = faiss.StandardGpuResources()
        nprobe = getattr(self.index, "nprobe", None)
        self.index = faiss.index_cpu_to_gpu(resources, device.index or 0, self.index)
        if nprobe is not None:  # kept by the copy in recent faiss; set it whatever the version
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        self._gpu_resources = resources  # the GPU index lives as long as its resources
        return self

    def save(self, path: str) -> None:
        import faiss

        index = self.index
        if getattr(self, "_gpu_resources", None) is not None:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, path)

    @classmethod
    def open(cls, path: str, *, nprobe: int) -> FaissIndex:
        """Open a saved index: read into memory up to ``MAP_FROM`` bytes; larger IVF lists are
        memory-mapped, so worker processes share their pages."""
        import faiss

        index = None
        if os.path.getsize(path) >= MAP_FROM:
            with contextlib.suppress(RuntimeError):  # kinds that cannot be mapped are read
                index = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        if index is None:
            index = faiss.read_index(path)
        self = cls.__new__(cls)
        self.kind = "flat" if isinstance(index, faiss.IndexFlat) else "ivf"
        if hasattr(index, "nprobe"):
            index.nprobe = min(nprobe, index.nlist)
        self.index, self._quantizer = index, None
        return self


def load_index(path: str, kind: IndexKind, *, nprobe: int = 2) -> VectorIndex:
    """Open an index written by ``save``."""
    if kind == "exact":
        index = BruteForceIndex.__new__(BruteForceIndex)
        index.vectors = torch.load(path)["vectors"]
        index.sq_norms = index.vectors.pow(2).sum(1)
        index.chunk = 2048
        return index
    return FaissIndex.open(path, nprobe=nprobe)


def build_index(vectors: torch.Tensor, kind: IndexKind, **options) -> VectorIndex:
    """The registry: ``exact`` (torch brute force) or a FAISS kind."""
    if kind == "exact":
        return BruteForceIndex(vectors)
    if kind in ("flat", "ivf", "ivfpq"):
        return FaissIndex(vectors, kind=kind, **options)
    raise ValueError(f"unknown index kind {kind!r}; valid: exact, flat, ivf, ivfpq")
