"""serve: an HTTP service over run_dir/index (pipeline/search/server.py) on serve.host:serve.port,
until stopped (Ctrl-C, SIGTERM): the page at /, POST /search with an image's bytes -> its top-k,
GET /search/by_key, /image/{key}, /failures, /health. It listens on 127.0.0.1 (this machine only)
unless serve.host says otherwise, and then warns: the page shows the gallery's images to whoever
can reach the address."""
from __future__ import annotations

import ipaddress
import logging

import uvicorn

from pipeline.config import Config
from pipeline.eval.rerank import Rerank
from pipeline.run_context import RunContext
from pipeline.search.searcher import Searcher
from pipeline.search.server import create_app

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def run(cfg: Config, ctx: RunContext) -> None:
    s = cfg.serve
    searcher = Searcher(ctx.run.root, device=ctx.device, rerank=Rerank.of(cfg.search.rerank, cfg.rerank))
    app = create_app(searcher, s.k, s.max_megapixels, s.max_bytes)
    log.info("serving %s (%d items, %s) on http://%s:%d: the page at /, POST /search (image bytes), GET /health",
             searcher.folder, searcher.index.index.ntotal, searcher.index.kind, s.host, s.port)
    if not is_loopback(s.host):
        log.warning("serve.host=%s is not this machine's loopback: whoever reaches it can search the index and see "
                    "the gallery's images (no authentication); serve.host=127.0.0.1 keeps it to this machine", s.host)
    uvicorn.run(app, host=s.host, port=s.port, log_level="warning")
