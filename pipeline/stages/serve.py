"""serve: an HTTP service over run_dir/index (pipeline/search/server.py) on serve.host:serve.port,
until stopped (Ctrl-C, SIGTERM). POST /search with an image's bytes -> its top-k; GET /health."""
from __future__ import annotations

import logging

import uvicorn

from pipeline.config import Config
from pipeline.eval.rerank import Rerank
from pipeline.run_context import RunContext
from pipeline.search.searcher import Searcher
from pipeline.search.server import create_app

log = logging.getLogger(__name__)


def run(cfg: Config, ctx: RunContext) -> None:
    s = cfg.serve
    searcher = Searcher(ctx.run.root, device=ctx.device, rerank=Rerank.of(cfg.search.rerank, cfg.rerank))
    app = create_app(searcher, s.k, s.max_megapixels, s.max_bytes)
    log.info("serving %s (%d items, %s) on http://%s:%d: POST /search (image bytes), GET /health",
             searcher.folder, searcher.index.index.ntotal, searcher.index.kind, s.host, s.port)
    uvicorn.run(app, host=s.host, port=s.port, log_level="warning")
