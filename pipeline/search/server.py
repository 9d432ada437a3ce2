"""The HTTP service of stage=serve (FastAPI, run by uvicorn):

    POST /search?k=5   body: the image's bytes, Content-Type: image/* (or application/octet-stream)
                       -> {"k": 5, "results": [{"key", "label", "class", "path", "score", "id"}, ...]}
    GET  /health       -> {"status": "ok", "items": n, "kind": "flat", "fingerprint": "..."}

A bad request gets a 4xx whose body is one line, {"error": "..."}: 415 for another content type,
400 for an empty body or bytes that are no image, 413 for a body over serve.max_bytes or an image
over serve.max_megapixels (read from its header: the pixels are never decoded), 422 for a bad k.
Decoding, embedding and searching run in the thread pool, so the event loop keeps answering.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pipeline.errors import UserError
from pipeline.search.searcher import Searcher, TooLarge, open_image

CONTENT_TYPES = ("image/", "application/octet-stream")
MAX_K = 1000


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(searcher: Searcher, k: int = 10, max_megapixels: float = 25.0, max_bytes: int = 20_000_000) -> FastAPI:
    app = FastAPI(title="retrieval search", docs_url=None, redoc_url=None)
    default_k = k

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        return _error(422, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    @app.get("/health")
    def health():
        return {"status": "ok", "items": int(searcher.index.index.ntotal), "kind": searcher.index.kind,
                "fingerprint": searcher.meta["fingerprint"]}

    @app.post("/search")
    async def search(request: Request, k: int = default_k):
        if not 1 <= k <= MAX_K:
            return _error(422, f"k={k}: ask for 1 to {MAX_K} results")
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

    return app


def _answer(searcher: Searcher, body: bytes, k: int, max_pixels: float) -> list[dict]:
    image = open_image(body, max_pixels)
    return searcher.search_embeddings(searcher.embed([image]), k)[0]
