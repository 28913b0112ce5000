"""``pairfarm serve-search``: the search API, the samples' images and a search page.

Routes::

    GET  /api/v1/search?text=...|url=...&k=20&safe=true&dedup=true&punsafe_threshold=0.5
    POST /api/v1/search   {"text" | "url" | "image_base64", "k", "safe", "dedup",
                           "punsafe_threshold"}
    GET  /api/v1/images/{id}   the indexed sample's image from its shard (404: not here)
    GET  /healthz
    GET  /                the page (``search/page``: index.html, search.js, search.css)

Answers: ``{"results": [{"id", "url", "caption", "similarity", "punsafe", "pwatermark",
"image"}], "candidates", "unsafe_removed", "duplicates_removed"}``, best first.

Error handling: a ``QueryError`` answers 400 with its message; a ``SearchDataError`` 500.
The page is served under a Content-Security-Policy that allows only this origin.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi import Query as Param
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from search.engine import DEFAULT_PUNSAFE, MAX_K, Query, Results
from search.errors import QueryError, SearchDataError
from search.service import SearchService

PREFIX = "/api/v1"
PAGE = Path(__file__).parent / "page"
ASSETS = {"index.html": "text/html; charset=utf-8",
          "search.js": "text/javascript; charset=utf-8",
          "search.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class SearchRequest(BaseModel):
    text: str | None = None
    url: str | None = None
    image_base64: str | None = None
    k: int = Field(default=20, ge=1, le=MAX_K)
    safe: bool = True
    dedup: bool = True
    punsafe_threshold: float = Field(default=DEFAULT_PUNSAFE, ge=0.0, le=1.0)


class SearchHit(BaseModel):
    id: int
    url: str | None
    caption: str | None
    similarity: float
    punsafe: float | None
    pwatermark: float | None
    image: str  # this server's path of the sample's image


class SearchResponse(BaseModel):
    results: list[SearchHit]
    candidates: int
    unsafe_removed: int
    duplicates_removed: int


def create_app(service: SearchService) -> FastAPI:
    app = FastAPI(title="pairfarm search", docs_url=None, redoc_url=None)
    _errors(app)

    @app.get(f"{PREFIX}/search", response_model=SearchResponse)
    def search_get(*, text: str | None = None, url: str | None = None,
                   k: int = Param(20, ge=1, le=MAX_K), safe: bool = True, dedup: bool = True,
                   punsafe_threshold: float = Param(DEFAULT_PUNSAFE, ge=0.0, le=1.0),
                   ) -> SearchResponse:
        query = Query(k=k, safe=safe, dedup=dedup, punsafe_threshold=punsafe_threshold)
        return _response(service.search(query, text=text, url=url))

    @app.post(f"{PREFIX}/search", response_model=SearchResponse)
    def search_post(body: SearchRequest) -> SearchResponse:
        query = Query(k=body.k, safe=body.safe, dedup=body.dedup,
                      punsafe_threshold=body.punsafe_threshold)
        image = None if body.image_base64 is None else _image(body.image_base64)
        return _response(service.search(query, text=body.text, url=body.url, image=image))

    @app.get(f"{PREFIX}/images/{{sample_id}}")
    def image(sample_id: int) -> Response:
        found = service.image_of(sample_id)
        if found is None:
            raise HTTPException(404, f"no image of sample {sample_id} here")
        return Response(content=found[0], media_type=found[1],
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {"ok": True, "vectors": service.engine.index.ntotal}

    _page(app)
    return app


def _image(text: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise QueryError(f"image_base64 is not base64: {exc}") from exc


def _response(results: Results) -> SearchResponse:
    hits = [SearchHit(id=h.id, url=h.url, caption=h.caption, similarity=h.similarity,
                      punsafe=h.punsafe, pwatermark=h.pwatermark,
                      image=f"{PREFIX}/images/{h.id}") for h in results.hits]
    return SearchResponse(results=hits, candidates=results.candidates,
                          unsafe_removed=results.unsafe_removed,
                          duplicates_removed=results.duplicates_removed)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(QueryError)
    def bad_query(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(SearchDataError)
    def bad_data(request: Request, exc: SearchDataError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)


def _page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return _file("index.html")

    @app.get("/page/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS or name == "index.html":
            raise HTTPException(404, f"no page file {name!r}")
        return _file(name)


def _file(name: str) -> Response:
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}
    return Response(content=(PAGE / name).read_bytes(), media_type=ASSETS[name],
                    headers=headers)
