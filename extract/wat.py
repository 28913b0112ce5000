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
``TruncatedSource`` (the pages before it have been yielded); for a local file, the last
gzip member is also checked to be whole with nothing after it, which catches a cut inside
the first bytes of a member. A file with no record at all is a ``SourceError``. A payload
that is not JSON, or JSON that is not a WAT envelope, raises ``CorruptRecord`` from
``parse_page``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType

from extract.errors import CorruptRecord, SourceError, TruncatedSource

IMG_PATH = "IMG@/src"
_GZIP_MAGIC = b"\x1f\x8b"


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
    records, last_offset = 0, 0
    try:
        for record in ArchiveIterator(stream, record_types=WarcRecordType.any_type,
                                      parse_http=False):
            payload = _read_whole(record)
            records, last_offset = records + 1, record.stream_pos
            if record.record_type == WarcRecordType.metadata:
                yield payload
    except OSError as exc:
        raise SourceError(f"not a readable WARC file: {exc}") from exc
    except BaseException as exc:
        _raise_if_panic(exc)
        raise
    if records == 0:
        raise SourceError("not a WARC file: no record found")
    if isinstance(stream, str):
        _check_clean_end(stream, last_offset)


def _raise_if_panic(exc: BaseException) -> None:
    """fastwarc's Rust panics arrive as pyo3's ``PanicException`` (a ``BaseException``)."""
    if type(exc).__name__ == "PanicException":
        raise SourceError(f"fastwarc failed on this file: {exc}") from exc


def _read_whole(record: WarcRecord) -> bytes:
    declared = record.headers.get("Content-Length")
    if declared is None or not declared.isdigit():
        raise TruncatedSource("the file ends inside a record header")
    payload = record.reader.read()
    if len(payload) < int(declared):
        raise TruncatedSource(
            f"the file ends inside a record ({len(payload)} of {declared} bytes)"
        )
    return payload


def _check_clean_end(path: str, last_offset: int) -> None:
    """Raise ``TruncatedSource`` unless the last gzip member is whole and nothing follows it.

    fastwarc stops without a word at a gzip member cut too short to hold a header; a WAT
    file has one member per record, so decompressing the last record's member settles it.
    """
    with open(path, "rb") as file:
        file.seek(last_offset)
        tail = file.read()
    if not tail.startswith(_GZIP_MAGIC):
        return  # an uncompressed WARC: the Content-Length checks are all there is
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        inflater.decompress(tail)
    except zlib.error as exc:
        raise TruncatedSource(f"the last gzip member is damaged: {exc}") from exc
    if not inflater.eof:
        raise TruncatedSource("the file ends inside the last record's gzip member")
    if inflater.unused_data:
        raise TruncatedSource(
            f"the file ends with {len(inflater.unused_data)} bytes of an incomplete record"
        )


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
