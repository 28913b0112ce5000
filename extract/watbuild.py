"""Write WAT files in Common Crawl's layout, with warcio's WARC writer.

For tests, the benchmark and trying the command without downloading a crawl: each page
becomes the three WAT records Common Crawl writes for one fetch (the request's, the
response's with ``HTML-Metadata``, and the crawl ``metadata`` record's), each its own gzip
member, after a ``warcinfo`` record. ``raw_record`` writes any payload (a non-JSON record,
for instance). warcio is an independent implementation from fastwarc, the reader.

Resource handling: ``WatBuilder`` is a context manager over one open file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from warcio.warcwriter import WARCWriter

WAT_CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Img:
    src: str
    alt: str | None = None


@dataclass(frozen=True, slots=True)
class WatPage:
    url: str
    images: list[Img] = field(default_factory=list)
    base_href: str | None = None
    anchors: list[str] = field(default_factory=list)  # <a href>, ignored by extract
    title: str = "a page"


def response_envelope(page: WatPage, filename: str) -> dict[str, Any]:
    """The WAT JSON of an HTML response, as Common Crawl writes it."""
    head: dict[str, Any] = {"Title": page.title, "Metas": [{"name": "robots", "content": "all"}]}
    if page.base_href is not None:
        head["Base"] = page.base_href
    links = [{"path": "A@/href", "url": href, "text": "a link"} for href in page.anchors]
    links += [_img_link(img) for img in page.images]
    return _envelope(page.url, "response", filename, {
        "Actual-Content-Type": "application/http; msgtype=response",
        "HTTP-Response-Metadata": {
            "Response-Message": {"Status": "200", "Version": "HTTP/1.1", "Reason": "OK"},
            "Headers": {"Content-Type": "text/html; charset=utf-8"},
            "HTML-Metadata": {"Head": head, "Links": links},
        },
    })


def request_envelope(url: str, filename: str) -> dict[str, Any]:
    return _envelope(url, "request", filename, {
        "Actual-Content-Type": "application/http; msgtype=request",
        "HTTP-Request-Metadata": {"Request-Message": {"Method": "GET", "Path": "/"}},
    })


def _img_link(img: Img) -> dict[str, str]:
    link = {"path": "IMG@/src", "url": img.src}
    if img.alt is not None:
        link["alt"] = img.alt
    return link


def _envelope(url: str, warc_type: str, filename: str,
              payload_meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "Container": {"Filename": filename, "Compressed": True},
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Metadata": {"WARC-Type": warc_type, "WARC-Target-URI": url},
            "Payload-Metadata": payload_meta,
        },
    }


class WatBuilder:
    """Writes a gzipped WAT file record by record."""

    def __init__(self, path: Path, *, gzip: bool = True) -> None:
        self.path = path
        self._file: BinaryIO = path.open("wb")
        self._writer = WARCWriter(self._file, gzip=gzip)
        self._writer.write_record(
            self._writer.create_warcinfo_record(path.name, {"software": "pairfarm watbuild"})
        )

    def page(self, page: WatPage) -> None:
        """The request, response and crawl-metadata records of one fetched page."""
        self.json_record(page.url, request_envelope(page.url, self.path.name))
        self.json_record(page.url, response_envelope(page, self.path.name))
        self.json_record(page.url, _envelope(page.url, "metadata", self.path.name, {
            "Actual-Content-Type": "application/warc-fields",
        }))

    def json_record(self, url: str, document: dict[str, Any]) -> None:
        self.raw_record(url, json.dumps(document).encode())

    def raw_record(self, url: str, payload: bytes) -> None:
        record = self._writer.create_warc_record(
            url, "metadata", payload=io.BytesIO(payload), length=len(payload),
            warc_content_type=WAT_CONTENT_TYPE,
        )
        self._writer.write_record(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WatBuilder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_wat(path: Path, pages: list[WatPage]) -> Path:
    with WatBuilder(path) as builder:
        for page in pages:
            builder.page(page)
    return path
