"""WAT files: WARC ``metadata`` records whose payload is Common Crawl's JSON envelope.

The part of the envelope this module reads (other keys are ignored)::

    {"Envelope": {
        "WARC-Header-Metadata": {"WARC-Target-URI": "<page URL>", ...},
        "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {
            "Head": {"Base": "<base href>", ...},
            "Links": [{"path": "IMG@/src", "url": "<src>", "alt": "<alt>"}, ...]}}}}}

Records of requests and of non-HTML responses have no ``HTML-Metadata``: they are records,
not pages.

Resource handling: ``iter_payloads`` reads one record at a time from the stream it is given
(fastwarc decompresses gzip members as it goes); it never holds more than one payload.

Error handling: fastwarc's ``OSError`` (not a WARC file, unreadable) becomes
``SourceError``. fastwarc returns the records of a truncated gzip silently, cut short, so a
record without ``Content-Length`` or with a payload shorter than it raises
``TruncatedSource`` (the pages before it have been yielded). A payload that is not JSON, or
JSON that is not a WAT envelope, raises ``CorruptRecord`` from ``parse_page``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType

from extract.errors import CorruptRecord, SourceError, TruncatedSource

IMG_PATH = "IMG@/src"


@dataclass(frozen=True, slots=True)
class ImageLink:
    src: str
    alt: str | None


@dataclass(frozen=True, slots=True)
class Page:
    url: str
    base_href: str | None
    images: list[ImageLink]


def iter_payloads(stream: BinaryIO | str) -> Iterator[bytes]:
    """The payload of every ``metadata`` record of a WAT file (a path or a binary stream)."""
    try:
        records = ArchiveIterator(stream, record_types=WarcRecordType.metadata, parse_http=False)
        for record in records:
            yield _read_whole(record)
    except OSError as exc:
        raise SourceError(f"not a readable WARC file: {exc}") from exc


def _read_whole(record: WarcRecord) -> bytes:
    declared = record.headers.get("Content-Length")
    if declared is None:
        raise TruncatedSource("the file ends inside a record header")
    payload = record.reader.read()
    if len(payload) < int(declared):
        raise TruncatedSource(
            f"the file ends inside a record ({len(payload)} of {declared} bytes)"
        )
    return payload


def parse_page(payload: bytes) -> Page | None:
    """The page a WAT record describes, or None when it is not an HTML response."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(f"payload is not JSON: {exc}") from exc
    try:
        return _page_of(doc["Envelope"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise CorruptRecord(f"payload is not a WAT envelope: {exc!r}") from exc


def _page_of(envelope: dict[str, Any]) -> Page | None:
    html_meta = envelope["Payload-Metadata"].get("HTTP-Response-Metadata", {}).get(
        "HTML-Metadata"
    )
    if html_meta is None:
        return None
    page_url = envelope["WARC-Header-Metadata"]["WARC-Target-URI"]
    if not isinstance(page_url, str):
        raise TypeError("WARC-Target-URI is not a string")
    base = html_meta.get("Head", {}).get("Base")
    images = _image_links(html_meta.get("Links", ()))
    return Page(page_url, base if isinstance(base, str) else None, images)


def _image_links(links: list[dict[str, Any]]) -> list[ImageLink]:
    images = []
    for link in links:
        if link.get("path") == IMG_PATH:
            src = link.get("url")
            alt = link.get("alt")
            if isinstance(src, str):
                images.append(ImageLink(src, alt if isinstance(alt, str) else None))
    return images
