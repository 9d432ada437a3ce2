"""search: the query images search.images (a file, a folder, a list) against run_dir/index ->
a table on stdout (and in the log file), run_dir/search/results.json (per query: its top search.k
with key, label, class name, path, score) and run_dir/search/results.png; search.rerank re-ranks
(pipeline/eval/rerank.py). The same from Python:
`Searcher(run_dir).search(images, k)`."""
from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.data.shards import ShardIndex
from pipeline.eval.rerank import Rerank
from pipeline.run_context import RunContext
from pipeline.run_dir import fresh_dir, replace_dir, write_json
from pipeline.search import results as pictures
from pipeline.search.searcher import Searcher, image_files, open_image

log = logging.getLogger(__name__)


def run(cfg: Config, ctx: RunContext) -> None:
    rd = ctx.run
    files = image_files(cfg.search.images)
    searcher = Searcher(rd.root, device=ctx.device, batch_size=cfg.eval.batch_size,
                        rerank=Rerank.of(cfg.search.rerank, cfg.rerank))
    found = searcher.search(files, cfg.search.k)
    out = fresh_dir(rd.root / "search.tmp")
    write_json(out / "results.json", {"index": str(searcher.folder), "fingerprint": searcher.meta["fingerprint"],
                                      "k": cfg.search.k, "rerank": cfg.search.rerank,
                                      "queries": [{"image": str(f), "results": r} for f, r in zip(files, found)]})
    shards = ShardIndex.load(searcher.gallery)
    pictures.draw([open_image(f) for f in files], [str(f) for f in files], found, shards.image, out / "results.png")
    replace_dir(out, rd.root / "search")
    log.info("search: %d queries, top %d each -> %s", len(files), cfg.search.k, rd.root / "search" / "results.json")
    log.info("\n%s", table(files, found), extra={"file_only": True})
    print(table(files, found), flush=True)  # stdout, so that it can be piped


def table(files, found) -> str:
    lines = [f"{'query':<28}{'rank':>5}  {'score':>7}  {'class':<20}  {'key':<24}path"]
    for f, hits in zip(files, found):
        for rank, hit in enumerate(hits, start=1):
            lines.append(f"{str(f.name if rank == 1 else '')[:27]:<28}{rank:>5}  {hit['score']:>7.4f}  "
                         f"{hit['class'][:19]:<20}  {hit['key'][:23]:<24}{hit['path']}")
    return "\n".join(lines)
