"""The vector-index contract (``gigasid.index.search``) and the reference candidate source.

One contract for every index kind: (M, d) float32 queries → (M, k) int64 row ids, nearest first,
-1 where fewer than k exist. Exact kinds must agree with a float64 ``cdist`` argsort; the
approximate kinds are held to a measured recall.
"""

from __future__ import annotations

import pytest
import torch

from gigasid.core.patches import grid_shape
from gigasid.core.pyramid import resample
from gigasid.index.candidates import ReferenceCandidates
from gigasid.index.search import BruteForceIndex, FaissIndex, build_index

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exact_neighbours(queries: torch.Tensor, vectors: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cdist(queries.double(), vectors.double()).argsort(1)[:, :k]


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth))
    return hits / truth.numel()


@pytest.fixture(scope="module")
def gaussian() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(3000, 32, generator=generator)
    queries = torch.randn(300, 32, generator=generator)
    return vectors, queries


@pytest.fixture(scope="module")
def clustered() -> tuple[torch.Tensor, torch.Tensor]:
    """64 Gaussian clusters in 32-d, queries near data points: how patch features look."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(64, 32, generator=generator)
    labels = torch.randint(0, 64, (4000,), generator=generator)
    vectors = centres[labels] + 0.35 * torch.randn(4000, 32, generator=generator)
    queries = vectors[:400] + 0.05 * torch.randn(400, 32, generator=generator)
    return vectors, queries


@pytest.mark.parametrize(
    "make",
    [
        lambda v: BruteForceIndex(v, chunk=128),
        lambda v: FaissIndex(v, kind="flat"),
        lambda v: build_index(v, "exact"),
        lambda v: build_index(v, "flat"),
    ],
    ids=["brute", "faiss-flat", "registry-exact", "registry-flat"],
)
def test_exact_indexes_match_float64_argsort(make, gaussian) -> None:
    vectors, queries = gaussian
    found = make(vectors).search(queries, 10)
    assert found.shape == (300, 10) and found.dtype == torch.int64
    # i.i.d. Gaussian data: consecutive neighbour distances differ by ~1e-2, far above float32
    # round-off (~1e-5), so the order itself must match, not just the set
    assert torch.equal(found, exact_neighbours(queries, vectors, 10))


def test_exact_index_on_near_ties_returns_the_true_distances() -> None:
    # real-patch-like data has near-ties (relative gaps ~1e-5) that float32 may order either way;
    # the contract there is the distances, not the ids
    generator = torch.Generator().manual_seed(2)
    base = resample(torch.randn(3, 12, 16, generator=generator), (40, 60))
    vectors = base.unfold(1, 4, 1).unfold(2, 4, 1).permute(1, 2, 0, 3, 4).reshape(-1, 48)
    queries = vectors[::7] + 0.01 * torch.randn(vectors[::7].shape, generator=generator)
    truth = torch.cdist(queries.double(), vectors.double())
    best = truth.sort(1).values[:, :8]
    for index in (BruteForceIndex(vectors), FaissIndex(vectors, kind="flat")):
        found = index.search(queries, 8)
        got = truth.gather(1, found)
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4)


def test_fewer_rows_than_k_pads_with_minus_one() -> None:
    vectors = torch.eye(3, 8)
    queries = torch.eye(3, 8)[:2]
    for index in (BruteForceIndex(vectors), FaissIndex(vectors, kind="flat")):
        found = index.search(queries, 5)
        assert found.shape == (2, 5)
        assert found[:, 0].tolist() == [0, 1]
        assert (found[:, 3:] == -1).all()
        assert sorted(found[0, :3].tolist()) == [0, 1, 2]


@pytest.fixture(scope="module")
def approximate(clustered):
    vectors, _ = clustered
    return {"ivf": FaissIndex(vectors, kind="ivf"), "ivfpq": FaissIndex(vectors, kind="ivfpq")}


@pytest.mark.parametrize("kind,bound_at_10,bound_at_1", [("ivf", 0.95, 0.99), ("ivfpq", 0.6, 0.95)])
def test_approximate_recall(kind, bound_at_10, bound_at_1, clustered, approximate) -> None:
    vectors, queries = clustered
    found = approximate[kind].search(queries, 10)
    assert found.shape == (400, 10) and found.dtype == torch.int64
    assert int(found.min()) >= 0 and int(found.max()) < 4000  # every slot filled with a real row
    truth = exact_neighbours(queries, vectors, 10)
    # measured on this data (N = 4000, d = 32, √N = 63 lists, nprobe = 2, 8x8-bit PQ):
    # ivf recall@10 0.996, recall@1 1.0; ivfpq recall@10 0.745 (PQ codes blur the tail), recall@1 1.0
    assert recall(found, truth) >= bound_at_10
    assert recall(found[:, :1], truth[:, :1]) >= bound_at_1


def test_ivf_recall_on_isotropic_data_grows_with_nprobe(gaussian) -> None:
    vectors, queries = gaussian
    truth = exact_neighbours(queries, vectors, 10)
    index = FaissIndex(vectors, kind="ivf", nprobe=2)
    low = recall(index.search(queries, 10), truth)
    index.index.nprobe = 54  # every list: IVF-Flat then scans everything, so it is exact
    full = recall(index.search(queries, 10), truth)
    # i.i.d. Gaussian data is IVF's worst case: measured 0.26 with nprobe = 2 of 54 lists
    assert 0.2 < low < full
    assert full == 1.0


def test_large_ivf_lists_are_float16_and_rank_like_exact(monkeypatch) -> None:
    """From ``HALF_LISTS_FROM`` vectors the lists are float16: scanning them all finds the exact
    neighbours up to near-ties that float16 rounding reorders."""
    import faiss

    from gigasid.index import search

    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(3000, 32, generator=generator)
    queries = torch.randn(300, 32, generator=generator)
    monkeypatch.setattr(search, "HALF_LISTS_FROM", 2000)
    index = FaissIndex(vectors, kind="ivf", nprobe=2)
    assert isinstance(index.index, faiss.IndexIVFScalarQuantizer)
    index.index.nprobe = index.index.nlist
    found = index.search(queries, 10)
    truth = exact_neighbours(queries, vectors, 10)
    assert recall(found, truth) >= 0.995
    # a neighbour that differs is a near-tie: its true distance is within float16's relative
    # precision of the true 10th neighbour's
    distance = torch.cdist(queries.double(), vectors.double())
    tenth = distance.gather(1, truth[:, 9:10])
    assert bool((distance.gather(1, found) <= tenth * (1 + 2e-3)).all())
    monkeypatch.setattr(search, "HALF_LISTS_FROM", 10**9)
    assert isinstance(FaissIndex(vectors, kind="ivf", nprobe=2).index, faiss.IndexIVFFlat)


def test_index_errors() -> None:
    vectors = torch.randn(500, 30)
    with pytest.raises(ValueError, match="pq_m=8 must divide"):
        FaissIndex(vectors, kind="ivfpq")
    with pytest.raises(ValueError, match="exact, flat, ivf, ivfpq"):
        build_index(vectors, "hnsw")


# --- the candidate source -------------------------------------------------------------------


def _texture(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = resample(torch.randn(3, height // 3, width // 3, generator=generator), (height, width))
    return (0.45 * low / low.std() + 0.1 * torch.randn(3, height, width, generator=generator)).clamp(-1, 1)


@pytest.mark.parametrize("index", ["exact", "flat", "ivf"])
@pytest.mark.parametrize("search_dims", [0, 16])
def test_reference_candidates_shape_and_range(index: str, search_dims: int) -> None:
    reference = _texture(30, 36, seed=0)
    size = 5
    ref_count = (30 - size + 1) * (36 - size + 1)
    source = ReferenceCandidates(reference, size, k=4, index=index, search_dims=search_dims)
    generator = torch.Generator().manual_seed(1)
    for shape, periodic in [((30, 36), False), ((22, 50), False), ((22, 50), True)]:
        x_t = 0.8 * _texture(*shape, seed=2) + 0.2 * torch.randn(3, *shape, generator=generator)
        found = source(x_t, 0.8, periodic=periodic)
        grid_h, grid_w = grid_shape(*shape, size, periodic=periodic)
        assert found.shape == (grid_h * grid_w, 4) and found.dtype == torch.int64
        assert int(found.min()) >= 0 and int(found.max()) < ref_count


def test_raw_exact_candidates_of_the_reference_contain_itself() -> None:
    reference = _texture(30, 36, seed=3)
    size = 5
    source = ReferenceCandidates(reference, size, k=3, index="exact", search_dims=0)
    found = source(reference, 1.0, periodic=False)
    grid_h, grid_w = grid_shape(30, 36, size)
    own = torch.arange(grid_h * grid_w)
    # every patch is at distance 0 from itself: it is the exact nearest neighbour
    assert bool((found == own[:, None]).any(1).all())
    assert torch.equal(found[:, 0], own)


def _assert_distinct(found: torch.Tensor) -> None:
    ordered = found.sort(1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    rows = repeated.any(1).nonzero().flatten()
    assert len(rows) == 0, (
        f"{len(rows)} rows repeat a candidate, e.g. row {int(rows[0])}: {found[rows[0]].tolist()}"
    )


@pytest.mark.parametrize("coherence", ["neighbours", "previous", "both"])
def test_coherent_candidates_are_distinct(coherence: str) -> None:
    reference = _texture(30, 36, seed=4)
    size = 5
    source = ReferenceCandidates(reference, size, k=6, index="ivf", search_dims=8, coherence=coherence)
    generator = torch.Generator().manual_seed(5)
    clean = _texture(26, 40, seed=6)
    for step, (alpha, sigma) in zip((3, 2, 1), [(0.5, 0.5), (0.75, 0.25), (0.9999, 1e-4)]):
        x_t = alpha * clean + sigma * torch.randn(3, 26, 40, generator=generator)
        for periodic in (False, True):
            found = source(x_t, alpha, periodic=periodic, step=step)
            grid_h, grid_w = grid_shape(26, 40, size, periodic=periodic)
            assert found.shape == (grid_h * grid_w, 6)
            assert int(found.max()) < 26 * 32 and int(found.min()) >= -1  # reference grid 26 x 32
            _assert_distinct(found)


@pytest.mark.parametrize("stride", [2, 3])
def test_strided_search_candidates(stride: int) -> None:
    reference = _texture(30, 36, seed=7)
    size = 5
    ref_h, ref_w = grid_shape(30, 36, size)
    source = ReferenceCandidates(reference, size, k=4, index="exact", search_dims=0, search_stride=stride)
    found = source(reference, 1.0, periodic=False)
    grid_h, grid_w = ref_h, ref_w
    assert found.shape == (grid_h * grid_w, 4)
    # -1 marks a slot whose shifted candidate repeated another one; every row keeps valid ids
    assert int(found.min()) >= -1 and int(found.max()) < ref_h * ref_w
    assert bool((found >= 0).any(1).all())
    # the searched queries (every stride-th per axis) find themselves; the others inherit their
    # cell's candidates shifted by their offset, so they find themselves too (the reference is
    # its own best match everywhere)
    own = torch.arange(grid_h * grid_w)
    assert bool((found == own[:, None]).any(1).all())
    # k candidates per query means k distinct patches: a repeated one would count twice in the
    # knn denoiser's softmax
    _assert_distinct(found)


@pytest.mark.parametrize("periodic", [False, True])
def test_compiled_spread_equals_the_torch_path(periodic: bool, monkeypatch) -> None:
    """The strided search's compiled spreading (shift, fallback at the reference's edge, sort,
    repeats to -1) gives exactly the torch code's candidates, -1 slots included."""
    from gigasid.index import candidates

    if candidates._spread_matches is None:
        pytest.skip("numba is not installed: only the torch path exists")
    reference = _texture(24, 30, seed=3)
    size = 5
    source = ReferenceCandidates(reference, size, k=5, index="exact", search_dims=8, search_stride=2)
    generator = torch.Generator().manual_seed(5)
    x_t = 0.5 * _texture(27, 33, seed=4) + 0.5 * torch.randn(3, 27, 33, generator=generator)
    real_search = source.index.search

    def search_with_gaps(queries, k):  # some empty slots, as an IVF with few lists returns
        found = real_search(queries, k)
        found[::7, -1] = -1
        return found

    source.index.search = search_with_gaps
    compiled = source(x_t, 0.5, periodic=periodic)
    monkeypatch.setattr(candidates, "_spread_matches", None)
    assert torch.equal(compiled, source(x_t, 0.5, periodic=periodic))
    assert bool((compiled == -1).any())  # the -1 slots were exercised


def test_auto_kind_picks_by_size():
    from gigasid.index.search import AUTO_EXACT_BELOW, AUTO_PQ_FROM, auto_kind, auto_thresholds

    assert auto_kind(100) == "flat"
    assert auto_kind(AUTO_EXACT_BELOW) == "ivf"
    assert auto_kind(AUTO_PQ_FROM - 1) == "ivf"
    assert auto_kind(AUTO_PQ_FROM) == "ivfpq"
    assert f"{AUTO_PQ_FROM:,}" in auto_thresholds()


def test_ivf_trained_on_a_sample_finds_what_a_full_training_finds(monkeypatch):
    """Training on a sample and adding in chunks (bounded build memory) keeps recall."""
    import gigasid.index.search as search

    monkeypatch.setattr(search, "TRAIN_MIN", 1000)  # train on 200·20 = 4000 of the 40000
    monkeypatch.setattr(search, "TRAIN_PER_LIST", 20)
    monkeypatch.setattr(search, "ADD_CHUNK", 7000)  # six adds, the last one partial
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 16, generator=generator) * 4
    data = centres[torch.randint(0, 64, (40_000,), generator=generator)] + torch.randn(40_000, 16, generator=generator)
    queries = data[:500] + 0.05 * torch.randn(500, 16, generator=generator)
    exact = search.build_index(data, "flat").search(queries, 5)
    index = search.build_index(data, "ivf", nlist=200, nprobe=8)
    found = index.search(queries, 5)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)) / exact.numel()
    assert recall > 0.9
    assert index.index.ntotal == 40_000
