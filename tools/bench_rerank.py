"""What each re-ranking buys and costs (pipeline/eval/rerank.py): recall@1 and MAP@R under the run's own
protocol (leave-one-out included), and the time per query, for none / aqe / dba / kreciprocal.

    python tools/bench_rerank.py runs/quickstart                       # a run whose eval stage has run
    python tools/bench_rerank.py runs/study/rsk/<run>                  # a glyphs study run (tools/study_glyphs.py)
    python tools/bench_rerank.py EXPORT --work runs/bench_glyphs -- data=glyphs ...   # an export folder:
                       # stage=eval in --work with eval.export=EXPORT (the keys after -- make its shards)

A run directory is read, not changed: its eval embeddings (run_dir/embeddings/<--model>/<split>.npz) and
its saved config (the protocol, rerank.*). Per method, one row:
- recall@1, map@r: retrieval_metrics(..., rerank=) on the protocol's first evaluation;
- ms/query: Rerank.search over an exact (flat) faiss index of the gallery, k = 10, the protocol's queries
  (at most --queries) in one batch on every thread, as the Searcher runs it (dba: against the augmented
  gallery; leave-one-out queries exclude themselves as in the eval);
- build_s: dba's augmentation of the whole gallery (what index.dba=true adds to stage=index).
Timings are only meaningful on an idle machine; the command and the machine go into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.loader import resolve
from pipeline.eval.inference import load_embeddings
from pipeline.eval.metrics import retrieval_metrics
from pipeline.eval.rerank import METHODS, Rerank, augment, exact_search
from pipeline.models.encoders import is_exported

ROOT = Path(__file__).resolve().parents[1]


def evaluated_run(source: Path, work: Path | None, keys: list[str], model: str) -> Path:
    """The run directory to read: `source` itself, or --work after stage=eval of the export `source`."""
    if not is_exported(source):
        return source
    if work is None:
        sys.exit(f"{source} is an export folder: give --work DIR (a run directory for its eval) and the data keys")
    subprocess.run([sys.executable, str(ROOT / "pipeline" / "run.py"), "stage=eval", f"run_dir={work}",
                    f"eval.export={source.resolve()}", f"eval.models=[{model}]", "eval.diagnostics=false",
                    "eval.show_queries=0", *keys], check=True)
    return work


def bench(run: Path, model: str, methods: list[str], queries: int, k: int = 10) -> list[dict]:
    cfg = resolve([f"run_dir={run}"], run).config
    proto, params = cfg.protocol(), cfg.rerank
    e = proto.evaluations[0]
    q = load_embeddings(run / "embeddings" / model / f"{e.query}.npz")
    g = load_embeddings(run / "embeddings" / model / f"{e.gallery}.npz") if e.gallery else None
    gallery = (g if g else q)["embeddings"].astype(np.float32)
    rows = np.random.default_rng(0).permutation(len(q["embeddings"]))[:queries]
    timed = np.ascontiguousarray(q["embeddings"][rows], dtype=np.float32)
    out = []
    for method in methods:
        rr = Rerank.of(method, params)
        metrics = retrieval_metrics(q["embeddings"], q["labels"], *((g["embeddings"], g["labels"]) if g else (None, None)),
                                    ks=proto.ks, nmi=False, rerank=rr)
        build = None
        searched = gallery
        if method == "dba":
            start = time.perf_counter()
            searched = augment(gallery, params.n, params.alpha)
            build = time.perf_counter() - start
        search = exact_search(searched)
        start = time.perf_counter()
        rr.search(search, searched, timed, k, None if g else rows)
        per_query = (time.perf_counter() - start) / len(rows)
        out.append({"data": cfg.data.name, "evaluation": e.name, "method": method, "recall@1": metrics["recall@1"],
                    "map@r": metrics["map@r"], "ms_per_query": 1e3 * per_query, "build_s": build,
                    "queries": metrics["num_queries"], "gallery": len(gallery)})
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'data':<14}{'method':<13}{'recall@1':>9}{'map@r':>9}{'ms/query':>10}{'build_s':>9}  queries x gallery"]
    for r in rows:
        build = f"{r['build_s']:>9.2f}" if r["build_s"] is not None else f"{'-':>9}"
        lines.append(f"{r['data']:<14}{r['method']:<13}{r['recall@1']:>9.4f}{r['map@r']:>9.4f}"
                     f"{r['ms_per_query']:>10.3f}{build}  {r['queries']} x {r['gallery']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    keys = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path, help="run directories (eval done) or export folders")
    parser.add_argument("--work", type=Path, help="run directory for an export folder's stage=eval")
    parser.add_argument("--model", default="finetuned", help="the embeddings of eval.models to read")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--queries", type=int, default=1000, help="queries timed (a seeded sample)")
    args = parser.parse_args(argv)
    rows = []
    for source in args.sources:
        run = evaluated_run(source, args.work, keys, args.model)
        rows += bench(run, args.model, args.methods.split(","), args.queries)
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
