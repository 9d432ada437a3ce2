"""A faiss index over L2-normalised embeddings (inner product = cosine), sized to a memory budget.

    kind   what faiss holds in RAM                          per vector        search
    flat   IndexFlatIP: every vector                        4 d bytes         exact
    hnsw   HNSW32 over 8-bit scalar-quantised vectors       d + 256 bytes     graph walk (efSearch)
    ivfpq  IVF (nlist lists) over PQ codes of m bytes        m + 8 bytes       nprobe lists scanned

(+ 4 d bytes per vector for hnsw/ivfpq when the re-ranking's float vectors are held in RAM, below)

hnsw and ivfpq return a shortlist of `rerank` x k candidates, re-ranked by the exact inner product
with the float vectors: in RAM by faiss (IndexRefineFlat, C++) where the float vectors fit the budget
beside the index, else here from `vectors.npy` memory-mapped (only the listed rows are read; the
budget is for RAM). `auto` takes flat while the vectors fit the budget and a single query stays cheap
(FLAT_MAX_ITEMS), else hnsw where it fits, else ivfpq with the largest PQ code that fits.
The quantisers are trained on a seeded sample; efSearch / nprobe are then the smallest values whose
recall@10 on held-out queries (leave-one-out, against exact search) reaches index.target_recall.

Why faiss's own `index_factory` and not autofaiss: autofaiss 2.18 pins numpy < 2 (pip would
downgrade this project's numpy 2.x) and brings pandas, pyarrow and its own embedding readers; it
tunes for a latency target rather than for recall, and has no exact re-ranking of a shortlist.
What it would choose (an index string from a memory budget, then a search parameter) is the few
lines of `choose`, `factory_string` and `tune` below, on the same faiss.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from pipeline.errors import UserError
from pipeline.eval import faiss_device

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivfpq")
FLAT_MAX_ITEMS = 200_000  # one exact query reads n x d floats: ~10 ms on one core at d = 512
HNSW_M = 32
HNSW_GRAPH_BYTES = HNSW_M * 2 * 4  # level-0 neighbour lists: 2M int32 per vector
OVERHEAD = 1.2  # allocator slack and faiss's own tables over the raw sizes below


def flat_bytes(n: int, d: int) -> float:
    return 4.0 * n * d


def hnsw_bytes(n: int, d: int) -> float:
    return n * (d + HNSW_GRAPH_BYTES)


def ivfpq_bytes(n: int, d: int, m: int, nlist: int) -> float:
    return n * (m + 8) + 4.0 * nlist * d  # codes + ids, and the coarse centroids


def choose(kind: str, n: int, d: int, budget_gb: float) -> str:
    """The kind `auto` stands for (any other kind is checked to fit the budget)."""
    budget = budget_gb * 2**30 / OVERHEAD
    fits = {"flat": flat_bytes(n, d) <= budget, "hnsw": hnsw_bytes(n, d) <= budget,
            "ivfpq": ivfpq_bytes(n, d, _pq_bytes_options(d)[0], _nlist(n)) <= budget}  # its smallest code
    if kind == "auto":
        kind = ("flat" if fits["flat"] and n <= FLAT_MAX_ITEMS else "hnsw" if fits["hnsw"]
                else "ivfpq")
    if not fits[kind]:
        raise UserError(f"index.kind={kind} for {n} vectors of {d} dimensions does not fit "
                        f"index.max_memory_gb={budget_gb}; raise it or use index.kind=auto")
    return kind


def _nlist(n: int) -> int:
    """IVF lists: about 4 sqrt(n), a power of two, with >= 39 training points per list."""
    return max(1, min(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))), n // 39))


def _pq_bytes_options(d: int) -> list[int]:
    """PQ code sizes (sub-quantisers) that divide d, smallest first: >= 8 dims each (d = 512: up to 64
    bytes), or 16 bytes of >= 2 dims for small d. The codes only shortlist (exact re-ranking follows),
    and k-means on sub-vectors of 2-4 dims trains many times slower per byte for little gain."""
    return [m for m in (4, 8, 16, 32, 64, 128) if d % m == 0 and m <= min(d // 2, max(d // 8, 16))] or [1]


def factory_string(kind: str, n: int, d: int, budget_gb: float) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M},SQ8"
    nlist = _nlist(n)
    budget = budget_gb * 2**30 / OVERHEAD
    m = max([m for m in _pq_bytes_options(d) if ivfpq_bytes(n, d, m, nlist) <= budget] or [_pq_bytes_options(d)[0]])
    nbits = min(8, max(1, int(math.log2(max(2, n // 4)))))  # PQ needs >= 2^nbits training points
    return f"IVF{nlist},PQ{m}x{nbits}"


@dataclass
class VectorIndex:
    """A faiss index and, for hnsw/ivfpq, the float vectors its shortlist is re-ranked with."""
    index: faiss.Index
    kind: str
    factory: str
    vectors: np.ndarray | None = None  # (n, d) float32 memory map, for refine = "disk"
    rerank: int = 1
    params: dict | None = None  # faiss search parameters (efSearch / nprobe)
    refine: str = "none"  # none (flat) | ram (faiss IndexRefineFlat) | disk (here, from `vectors`)

    def set_params(self, params: dict) -> None:
        space = faiss.ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(self.index, name, value)
        self.params = dict(params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first, (q, k) each; ids -1 / scores -inf where the gallery runs out."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.index.ntotal)
        if self.refine != "disk":
            return self.index.search(queries, k)
        _, shortlist = self.index.search(queries, k * self.rerank)
        return rerank(queries, shortlist, self.vectors, k)

    def save(self, folder: Path) -> None:
        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / "index.json").write_text(json.dumps({"kind": self.kind, "factory": self.factory, "rerank": self.rerank,
                                                       "refine": self.refine, "params": self.params or {}}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "VectorIndex":
        spec = json.loads((folder / "index.json").read_text())
        vectors = np.asarray(np.load(folder / "vectors.npy", mmap_mode="r")) if spec["refine"] == "disk" else None
        found = cls(faiss.read_index(str(folder / "index.faiss")), spec["kind"], spec["factory"], vectors, spec["rerank"],
                    refine=spec["refine"])
        found.set_params(spec["params"])
        return found


def rerank(queries: np.ndarray, shortlist: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The shortlist's k best by exact inner product (only the listed rows of `vectors` are read)."""
    rows = vectors[np.maximum(shortlist, 0)]  # (q, candidates, d)
    scores = np.matmul(rows, queries[:, :, None])[:, :, 0]
    scores[shortlist < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(shortlist, order, axis=1)


def build(vectors: np.ndarray, kind: str, budget_gb: float, train_rows: np.ndarray, rerank_factor: int,
          use_gpu: bool = True, refine: str | None = None) -> VectorIndex:
    """Train (on vectors[train_rows]) and fill an index of `kind` (flat | hnsw | ivfpq). refine: ram |
    disk for hnsw/ivfpq (None: ram where the float vectors fit the budget beside the index)."""
    n, d = vectors.shape
    factory = factory_string(kind, n, d, budget_gb)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = 80
    if kind == "ivfpq":  # index_factory turns on polysemous training (minutes of annealing for codes
        index.do_polysemous_training = False  # we never compare by Hamming distance: polysemous_ht stays 0)
    faiss_device.cpu_threads()
    device = faiss_device.gpu_device() if use_gpu and kind == "ivfpq" else None  # probed: see faiss_device
    gpu = device is not None
    if gpu:  # IVF-PQ trains and adds on the GPU, then comes back to be saved and searched on the CPU
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, device, index)
    if not index.is_trained:
        index.train(np.ascontiguousarray(vectors[np.sort(train_rows)], dtype=np.float32))
    _add(index, vectors)
    if gpu:
        index = faiss.index_gpu_to_cpu(index)
    if kind == "flat":
        refine = "none"
    elif refine is None:
        in_ram = flat_bytes(n, d) + {"hnsw": hnsw_bytes(n, d), "ivfpq": n * 80.0}[kind]
        refine = "ram" if in_ram * OVERHEAD <= budget_gb * 2**30 else "disk"
    if refine == "ram":  # faiss re-ranks in C++: k_factor x k candidates from the base index
        index = faiss.IndexRefineFlat(index, faiss.swig_ptr(np.ascontiguousarray(vectors, dtype=np.float32)))
        index.k_factor = rerank_factor
    log.info("index: %s over %d x %d, re-ranking %s%s", factory, n, d, refine, " (built on the GPU)" if gpu else "")
    return VectorIndex(index, kind, factory, vectors if refine == "disk" else None,
                       1 if kind == "flat" else rerank_factor, refine=refine)


def _add(index: faiss.Index, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), 65536):  # in blocks: the vectors may be a memory map
        index.add(np.ascontiguousarray(vectors[start:start + 65536], dtype=np.float32))


def tune(found: VectorIndex, vectors: np.ndarray, queries: np.ndarray, target: float, k: int = 10) -> dict:
    """The smallest efSearch / nprobe whose recall@k (leave-one-out, queries = gallery rows) reaches
    `target`; the largest tried where none does. Sets it on the index and returns it."""
    from pipeline.search.quality import exact_neighbours, leave_one_out, recall_at

    if found.kind == "flat":
        return {}
    k = min(k, len(vectors) - 1)
    truth = exact_neighbours(vectors, queries, k)
    if found.kind == "hnsw":
        name, values = "efSearch", [v for v in (16, 32, 64, 128, 256, 512, 1024) if v >= k * found.rerank] or [1024]
    else:
        nlist = faiss.extract_index_ivf(found.index).nlist
        name, values = "nprobe", [2**i for i in range(int(math.log2(nlist)) + 1)] + [nlist] * (nlist & (nlist - 1) > 0)
    for value in values:
        found.set_params({name: value})
        got = leave_one_out(found.search, vectors, queries, k)
        reached = recall_at(got, truth, k)
        if reached >= target:
            break
    log.info("index: %s=%d (recall@%d %.4f on %d held-out queries, target %.2f)", name, value, k, reached,
             len(queries), target)
    return found.params
