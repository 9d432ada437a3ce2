"""index: a gallery embedded with the exported model (or index.checkpoint) -> a faiss index, run_dir/index/.

Every rank embeds its share of the gallery's shards (finished shards are kept in index.parts/, so a
killed run resumes without embedding them again); rank 0 builds the index (pipeline/search/) and writes

    index/index.faiss, index.json    the faiss index, its kind, factory string and search parameters
    index/vectors.npy                the float embeddings (exact re-ranking of hnsw/ivfpq shortlists; with
                                     index.dba=true, augmented: pipeline/eval/rerank.py)
    index/items.npz                  id -> key, label, source path
    index/meta.json                  the model (source, fingerprint), preprocessing, gallery folder, and
                                     "dba": {"n", "alpha"} or null
    index/report.json                recall@1/10/100 vs exact on held-out queries, latency, throughput,
                                     build time, memory (pipeline/search/quality.py)
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.eval import rerank
from pipeline.eval import sources as models
from pipeline.parallel import distributed
from pipeline.run_context import RunContext
from pipeline.run_dir import fresh_dir, replace_dir, write_json
from pipeline.search import faiss_index, gallery, quality

log = logging.getLogger(__name__)

DISTRIBUTED = True  # every rank embeds its shards; rank 0 builds the index


def run(cfg: Config, ctx: RunContext) -> None:
    rd, world = ctx.run, ctx.world
    source = gallery.model_source(cfg, rd)
    loaded = models.load(source, rd.root)
    model, model_cfg = loaded.model, loaded.config
    fingerprint = gallery.fingerprint(model, model_cfg)
    folder = gallery.folder_of(cfg, rd)
    prep = gallery.preprocessing_of(model_cfg, cfg.data.eval_resize)
    out = rd.root / "index"
    tag = {"fingerprint": fingerprint, "gallery": str(folder), "preprocessing": prep,
           "shards": hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()}
    parts = gallery.parts_folder(out, tag)
    vectors = gallery.embed_gallery(model, model_cfg, folder, cfg.data.eval_resize, cfg.eval.batch_size, ctx.device,
                                    parts, cfg.data.workers)
    if world.is_main:
        meta = {"fingerprint": fingerprint, "source": source.record(), "preprocessing": prep,
                "gallery": models.relative(folder, rd.root), "embed_dim": int(vectors.shape[1]) if vectors.size else 0}
        build(cfg, vectors, gallery.items(folder), meta, out)
    distributed.barrier()
    if world.is_main:
        shutil.rmtree(parts)


def build(cfg: Config, vectors: np.ndarray, items: dict, meta: dict, out: Path) -> None:
    """Choose, train, fill and tune the index, measure it, and swap the finished folder into place."""
    n, d = vectors.shape
    ic = cfg.index
    if n < 2:
        raise UserError(f"the gallery {meta['gallery']} has {n} item(s); an index needs at least 2")
    order = np.random.default_rng(cfg.seed).permutation(n)
    q = min(ic.queries, max(1, n // 4))
    report_rows, tune_rows = order[:q], order[q:2 * q]  # held out from the quantisers' training sample
    train_rows = order[q:][:ic.train_sample]
    kind = faiss_index.choose(ic.kind, n, d, ic.max_memory_gb)
    dba = {"n": cfg.rerank.n, "alpha": cfg.rerank.alpha} if ic.dba else None
    if dba:  # database-side augmentation: the index holds (and search.rerank=dba expects) the augmented vectors
        log.info("index: database-side augmentation of %d vectors (rerank.n=%d, rerank.alpha=%g)", n, dba["n"], dba["alpha"])
        vectors = rerank.augment(vectors, dba["n"], dba["alpha"])
    tmp = fresh_dir(out.with_name("index.tmp"))
    np.save(tmp / "vectors.npy", vectors)
    start = time.perf_counter()
    found = faiss_index.build(vectors, kind, ic.max_memory_gb, train_rows, ic.rerank, use_gpu=ic.gpu)
    params = faiss_index.tune(found, vectors, np.sort(tune_rows), ic.target_recall)
    build_s = time.perf_counter() - start
    if found.refine == "disk":  # measured as a Searcher reads them
        found.vectors = np.asarray(np.load(tmp / "vectors.npy", mmap_mode="r"))
    report = {"kind": kind, "chosen_by": "auto" if ic.kind == "auto" else "index.kind", "factory": found.factory,
              "params": params, "rerank": found.rerank, "refine": found.refine, "items": n, "dim": d,
              **quality.measure(found.search, vectors, np.sort(report_rows)),
              "build_s": build_s,
              "memory": {"index_gb": quality.index_bytes(found.index) / 2**30,
                         "vectors_on_disk_gb": (tmp / "vectors.npy").stat().st_size / 2**30,
                         "peak_rss_gb": quality.peak_rss_gb(), "budget_gb": ic.max_memory_gb},
              "query_rows": np.sort(report_rows).tolist()}
    found.save(tmp)
    np.savez(tmp / "items.npz", **items)
    write_json(tmp / "meta.json", {**meta, "kind": kind, "items": n, "dba": dba})
    write_json(tmp / "report.json", report)
    replace_dir(tmp, out)
    log.info("index %s (%s) over %d items -> %s\n%s", kind, found.factory, n, out, summary(report))


def summary(report: dict) -> str:
    recalls = "  ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith("recall@"))
    lat = report["latency_ms"]
    return (f"{recalls}  (vs exact, {report['queries']} held-out queries)\n"
            f"latency p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms (1 thread, k=10)  "
            f"throughput {report['throughput_qps']['value']:.0f} queries/s  build {report['build_s']:.1f} s  "
            f"index {report['memory']['index_gb']:.3f} GiB  peak RSS {report['memory']['peak_rss_gb']:.2f} GiB")

