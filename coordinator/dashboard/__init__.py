"""The live dashboard at ``GET /``: three static files (``index.html``, ``dashboard.js``,
``dashboard.css``) that poll ``GET /api/v1/stats``, the API ``pairfarm status`` reads
too. No build step, no CDN, no external font: the coordinator serves every byte itself,
under a Content-Security-Policy that allows only its own origin.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Response
from starlette.exceptions import HTTPException

DIR = Path(__file__).parent
INDEX = "index.html"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def mount(app: FastAPI) -> None:
    """Serve the dashboard on ``app``: ``/`` and ``/dashboard/<asset>``."""

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return _file(INDEX, "text/html; charset=utf-8")

    @app.get("/dashboard/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return _file(name, ASSETS[name])


def _file(name: str, media_type: str) -> Response:
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}
    return Response(content=(DIR / name).read_bytes(), media_type=media_type, headers=headers)
