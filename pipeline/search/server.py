"""The HTTP service of stage=serve (FastAPI, run by uvicorn):

    GET  /                  the page (pipeline/search/page/: plain HTML, JavaScript and CSS, no build step)
    POST /search?k=5        body: the image's bytes, Content-Type: image/* (or application/octet-stream)
                            -> {"k": 5, "results": [{"key", "label", "class", "path", "score", "id"}, ...]}
    GET  /search/by_key?key=K&k=5
                            the same from a gallery item, by its stored vector (index/vectors.npy: nothing
                            is embedded) -> {"k", "query": {"key", "label", "class", "id"}, "results"}
    GET  /image/{key}[?split=S]
                            a gallery image's bytes from the shards: the index's gallery, or split S of the
                            run's shards (pipeline/search/images.py: no path from the client is ever opened)
    GET  /failures?offset=0&limit=20
                            the eval stage's queries whose top-1 is wrong, worst first (eval/failures.json)
    GET  /health            -> {"status": "ok", "items": n, "kind": "flat", "fingerprint": "...", "k": serve.k}

A bad request gets a 4xx whose body is one line, {"error": "..."}: 415 for another content type,
400 for an empty body, bytes that are no image, or a bad parameter (k outside 1-MAX_K, a k that is no
number), 413 for a body over serve.max_bytes or an image over serve.max_megapixels (read from its
header: the pixels are never decoded), 404 for an unknown key, split or path, or a run without
eval/failures.json. Decoding, embedding and searching run in the thread pool, so the event loop keeps
answering.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pipeline.errors import UserError
from pipeline.search.images import GALLERY, ImageStore
from pipeline.search.searcher import Searcher, TooLarge, open_image

CONTENT_TYPES = ("image/", "application/octet-stream")
MAX_K = 1000
MAX_LIMIT = 100  # failures per /failures request
PAGE = Path(__file__).with_name("page")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}
# The page loads nothing from elsewhere: its scripts, styles and images come from this service alone.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:",
                "X-Content-Type-Options": "nosniff"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _bad_k(k: int) -> JSONResponse | None:
    return None if 1 <= k <= MAX_K else _error(400, f"k={k}: ask for 1 to {MAX_K} results")


def create_app(searcher: Searcher, k: int = 10, max_megapixels: float = 25.0, max_bytes: int = 20_000_000) -> FastAPI:
    app = FastAPI(title="retrieval search", docs_url=None, redoc_url=None)
    default_k = k
    run_dir = searcher.folder.parent
    images = ImageStore(searcher.gallery, run_dir / "shards")
    rows = {str(key): i for i, key in enumerate(searcher.keys)}
    vectors = searcher.vectors  # memory-mapped: only the rows asked for are read (augmented under index.dba)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        return _error(400, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown paths, wrong methods: one line too
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    for route, (name, media) in PAGE_FILES.items():
        app.add_api_route(route, _page_file(name, media), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    def health():
        return {"status": "ok", "items": int(searcher.index.index.ntotal), "kind": searcher.index.kind,
                "fingerprint": searcher.meta["fingerprint"], "k": default_k}

    @app.post("/search")
    async def search(request: Request, k: int = default_k):
        if bad := _bad_k(k):
            return bad
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(CONTENT_TYPES):
            return _error(415, f"Content-Type {content_type or '(none)'} is not an image; send the image's bytes "
                               f"as image/jpeg, image/png, ... or application/octet-stream")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                return _error(413, f"the body is over {max_bytes} bytes")
        if not body:
            return _error(400, "the body is empty; send the image's bytes")
        try:
            results = await run_in_threadpool(_answer, searcher, bytes(body), k, max_megapixels * 1e6)
        except TooLarge as e:
            return _error(413, str(e))
        except UserError as e:
            return _error(400, str(e))
        return {"k": k, "results": results}

    @app.get("/search/by_key")
    def search_by_key(key: str, k: int = default_k):
        if bad := _bad_k(k):
            return bad
        if key not in rows:
            return _error(404, f"key {key!r} is not in the index")
        i = rows[key]
        results = searcher.search_embeddings(np.array(vectors[i:i + 1], dtype=np.float32), k)[0]
        label = int(searcher.labels[i])
        return {"k": k, "query": {"key": key, "label": label, "class": searcher.class_name(label), "id": i},
                "results": results}

    @app.get("/image/{key:path}")
    def image(key: str, split: str = GALLERY):
        found = images.get(key, split)
        if found is None:
            where = f"split {split!r} of the run's shards" if split else "the index's gallery"
            return _error(404, f"no image {key!r} in {where}")
        return Response(found[0], media_type=found[1], headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/failures")
    def failures(offset: int = 0, limit: int = 20):
        if offset < 0 or not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"offset={offset}, limit={limit}: give offset >= 0 and limit 1 to {MAX_LIMIT}")
        path = run_dir / "eval" / "failures.json"
        if not path.is_file():
            return _error(404, f"{path} does not exist; run stage=eval run_dir={run_dir} "
                               f"(force=true where it ran before failures.json was written)")
        listing = json.loads(path.read_text())
        page = listing["failures"][offset:offset + limit]
        for failure in page:
            for item in filter(None, (failure["query"], failure["top1"], failure["first_correct"])):
                item["class"] = images.class_name(item["split"], item["label"])
                item["searchable"] = images.is_gallery(item["split"]) and item["key"] in rows
        return {**{k: v for k, v in listing.items() if k != "failures"}, "offset": offset,
                "listed": len(listing["failures"]), "failures": page}

    return app


def _page_file(name: str, media_type: str):
    def serve_file():
        return Response((PAGE / name).read_bytes(), media_type=media_type, headers=PAGE_HEADERS)
    return serve_file


def _answer(searcher: Searcher, body: bytes, k: int, max_pixels: float) -> list[dict]:
    image = open_image(body, max_pixels)
    return searcher.search_embeddings(searcher.embed([image]), k)[0]
