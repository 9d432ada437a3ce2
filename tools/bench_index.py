"""Index at scale, and the HTTP service under load (issue 24; results in BENCHMARKS.md).

    python tools/bench_index.py scale --n 1000000 --dim 512 --kind ivfpq
    python tools/bench_index.py load --run-dir runs/demo --requests 1000 --clients 8 [--endpoints search,by_key,image,page]

scale: n synthetic vectors with cluster structure (--clusters centres on the unit sphere, each
vector its centre plus a Gaussian in a shared --intrinsic-dimensional subspace plus isotropic
--noise, L2-normalised: see `clustered`), the index built as stage=index builds it (pipeline/search/: train on a sample, fill,
tune efSearch / nprobe to --target-recall, re-rank from the memory-mapped vectors), then measured as
index/report.json is (recall@1/10/100 against exact on held-out items, leave-one-out; single-query
latency on one thread; throughput). Then bare faiss with the same factory string, the same training
sample, the same search parameter and the same shortlist (faiss.IndexRefineFlat, k_factor = rerank,
vectors in RAM): its build time, recall@10 and single-query p50 on the same queries, and the ratios.

load: stage=serve's app (pipeline/search/server.py) over run_dir's index in a separate process on
127.0.0.1, and --clients threads sending requests until --requests are answered, taking the --endpoints
in turn: `search` posts a gallery image (POST /search?k=10), `by_key` searches from a gallery item
(GET /search/by_key?k=10), `image` fetches a gallery image (GET /image/{key}), `page` the page (GET /).
Latency p50/p99 and errors (any status but 200) per endpoint and in all, requests per second in all.
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.search import faiss_index, quality  # noqa: E402


def clustered(n: int, d: int, clusters: int, spread: float, noise: float, intrinsic: int, seed: int) -> np.ndarray:
    """Centres on the unit sphere; each vector its centre + a Gaussian of `spread` per direction in a
    shared `intrinsic`-dimensional subspace (embeddings have few effective dimensions) + isotropic
    noise of `noise` per dimension; L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((intrinsic, d), dtype=np.float32) / np.sqrt(d)  # rows of norm ~1
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        size = min(100_000, n - start)
        block = (centres[rng.integers(0, clusters, size)]
                 + spread * rng.standard_normal((size, intrinsic), dtype=np.float32) @ basis
                 + noise * rng.standard_normal((size, d), dtype=np.float32))
        out[start:start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def p50_single(search, vectors: np.ndarray, rows: np.ndarray) -> float:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    for row in rows:
        q = np.ascontiguousarray(vectors[row:row + 1])
        start = time.perf_counter()
        search(q, 10)
        times.append(time.perf_counter() - start)
    faiss.omp_set_num_threads(threads)
    return 1e3 * float(np.median(times))


def scale(args) -> dict:
    start = time.perf_counter()
    vectors = clustered(args.n, args.dim, args.clusters, args.spread, args.noise, args.intrinsic, args.seed)
    print(f"generated {args.n} x {args.dim} in {time.perf_counter() - start:.1f} s", flush=True)
    order = np.random.default_rng(args.seed).permutation(args.n)
    q = args.queries
    report_rows, tune_rows, train_rows = np.sort(order[:q]), np.sort(order[q:2 * q]), order[q:][:args.train_sample]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        np.save(Path(tmp) / "vectors.npy", vectors)
        mapped = np.load(Path(tmp) / "vectors.npy", mmap_mode="r")
        kind = faiss_index.choose(args.kind, args.n, args.dim, args.max_memory_gb)
        start = time.perf_counter()
        ours = faiss_index.build(vectors, kind, args.max_memory_gb, train_rows, args.rerank)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        params = faiss_index.tune(ours, vectors, tune_rows, args.target_recall)
        tune_s = time.perf_counter() - start
        ours.vectors = mapped if kind != "flat" else None
        result = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread,
                  "intrinsic": args.intrinsic, "noise": args.noise, "kind": kind,
                  "factory": ours.factory, "params": params, "rerank": ours.rerank, "build_s": build_s,
                  "tune_s": tune_s, "index_gb": quality.index_bytes(ours.index) / 2**30,
                  **quality.measure(ours.search, vectors, report_rows)}
        result["peak_rss_gb"] = quality.peak_rss_gb()
        print(json.dumps(result, indent=1), flush=True)
        # bare faiss: the same factory, training rows, parameter and shortlist, in one faiss object
        start = time.perf_counter()
        base = faiss.index_factory(args.dim, ours.factory, faiss.METRIC_INNER_PRODUCT)
        if kind == "ivfpq":
            base.do_polysemous_training = False
        if kind == "hnsw":
            base.hnsw.efConstruction = 80
        bare = faiss.IndexRefineFlat(base) if kind != "flat" else base  # the float vectors in RAM
        if kind != "flat":
            bare.k_factor = ours.rerank
        bare.train(np.ascontiguousarray(vectors[np.sort(train_rows)]))
        bare.add(vectors)
        for name, value in params.items():
            faiss.ParameterSpace().set_index_parameter(base, name, value)
        bare_build = time.perf_counter() - start
        truth = quality.exact_neighbours(vectors, report_rows, 10)
        found = quality.leave_one_out(bare.search, vectors, report_rows, 10)
        latency_rows = report_rows[:1000]
        ours_p50, bare_p50 = p50_single(ours.search, vectors, latency_rows), p50_single(bare.search, vectors, latency_rows)
        result["bare_faiss"] = {"build_s": bare_build, "recall@10": quality.recall_at(found, truth, 10),
                                "p50_ms": bare_p50, "ours_p50_ms_same_run": ours_p50, "p50_ratio": ours_p50 / bare_p50}
    return result


SERVE = """
import sys, uvicorn
from pipeline.search.searcher import Searcher
from pipeline.search.server import create_app
uvicorn.run(create_app(Searcher(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def load(args) -> dict:
    from pipeline.data.shards import ShardIndex

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    meta = json.loads((Path(args.run_dir) / "index" / "meta.json").read_text())
    shards = ShardIndex.load(Path(args.run_dir) / meta["gallery"])
    bodies, keys = [], []
    for i in range(0, len(shards), max(1, len(shards) // 50)):
        buf = io.BytesIO()
        shards.image(i).save(buf, format="PNG")
        bodies.append(buf.getvalue())
        keys.append(urllib.parse.quote(shards.keys[i], safe=""))
    endpoints = args.endpoints.split(",")
    unknown = set(endpoints) - set(ENDPOINTS)
    if unknown:
        raise SystemExit(f"--endpoints: {sorted(unknown)} unknown; choose among {list(ENDPOINTS)}")
    root = str(Path(__file__).resolve().parents[1])
    server = subprocess.Popen([sys.executable, "-c", SERVE, args.run_dir, str(port)], cwd=root,
                              env={**__import__("os").environ, "PYTHONPATH": root})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        latencies, errors, lock, counter = [], [], threading.Lock(), iter(range(args.requests))  # errors: messages
        by_endpoint = {name: ([], []) for name in endpoints}  # name -> (latencies, errors)

        def client():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name = endpoints[i % len(endpoints)]
                request = ENDPOINTS[name](url, bodies[i % len(bodies)], keys[i % len(keys)])
                start = time.perf_counter()
                error = None
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        response.read()
                        error = None if response.status == 200 else f"status {response.status}"
                except (urllib.error.URLError, ConnectionError) as e:  # HTTPError (4xx, 5xx) included
                    error = str(e)
                took = time.perf_counter() - start
                with lock:
                    for times, failed in (latencies, errors), by_endpoint[name]:
                        times.append(took)
                        if error:
                            failed.append(f"{name}: {error}")

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {**summary(latencies, errors), "clients": args.clients, "requests_per_s": len(latencies) / wall,
            "wall_s": wall, "index_items": len(shards),
            "endpoints": {name: summary(*by_endpoint[name]) for name in endpoints}}


def summary(latencies: list[float], errors: list[str]) -> dict:
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3],
            "p50_ms": 1e3 * float(np.percentile(latencies, 50)) if latencies else None,
            "p99_ms": 1e3 * float(np.percentile(latencies, 99)) if latencies else None}


# The requests of the load test, one per endpoint: (service URL, a gallery image's PNG, its quoted key) -> request.
ENDPOINTS = {
    "search": lambda url, body, key: urllib.request.Request(f"{url}/search?k=10", data=body, method="POST",
                                                            headers={"Content-Type": "image/png"}),
    "by_key": lambda url, body, key: urllib.request.Request(f"{url}/search/by_key?key={key}&k=10"),
    "image": lambda url, body, key: urllib.request.Request(f"{url}/image/{key}"),
    "page": lambda url, body, key: urllib.request.Request(f"{url}/"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--clusters", type=int, default=1000)
    s.add_argument("--spread", type=float, default=0.1, help="within-cluster spread per intrinsic direction")
    s.add_argument("--intrinsic", type=int, default=32, help="dimensions of the shared within-cluster subspace")
    s.add_argument("--noise", type=float, default=0.005, help="isotropic noise per dimension")
    s.add_argument("--kind", default="ivfpq", choices=["auto", *faiss_index.KINDS])
    s.add_argument("--max-memory-gb", type=float, default=8.0)
    s.add_argument("--rerank", type=int, default=4)
    s.add_argument("--target-recall", type=float, default=0.95)
    s.add_argument("--queries", type=int, default=1000)
    s.add_argument("--train-sample", type=int, default=100_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tmp", default=None, help="folder for the memory-mapped vectors (default: the system's)")
    s.add_argument("--out", default=None, help="also write the result as JSON here")
    lo = sub.add_parser("load")
    lo.add_argument("--run-dir", required=True, help="a run directory with index/ (stage=index)")
    lo.add_argument("--requests", type=int, default=1000)
    lo.add_argument("--clients", type=int, default=8)
    lo.add_argument("--endpoints", default="search,by_key,image,page",
                    help="comma-separated, taken in turn: search (POST /search), by_key, image, page (GET /)")
    lo.add_argument("--out", default=None)
    args = parser.parse_args()
    result = scale(args) if args.command == "scale" else load(args)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
