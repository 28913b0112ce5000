"""What a body is, from its first bytes: an image the decoder opens, or something else.

The Content-Type header does not decide: servers send JPEGs as ``text/html`` or
``application/octet-stream``, and HTML error pages as ``image/jpeg``. The fetcher looks
at the first ``SNIFF_BYTES`` decoded bytes of a body instead, with the accept test of
each format the decoder opens (Pillow's own, the one ``Image.open`` runs on the same 16
bytes), so the answer is exactly the decoder's: an image is kept whatever its type
says, and an HTML page, a text or a PDF is refused after its first bytes (``not_image``)
without reading the rest.

``what_it_is`` names what a refused body looks like, for the failure's detail only.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

#: bytes ``Image.open`` reads to choose a format
SNIFF_BYTES = 16

_MARKUP = ((b"<!doctype html", "HTML"), (b"<html", "HTML"), (b"<head", "HTML"),
           (b"<body", "HTML"), (b"<?xml", "XML"), (b"<svg", "SVG"))
_BOM = b"\xef\xbb\xbf"
_TEXT_BYTES = frozenset(b"\t\n\r\f") | frozenset(range(0x20, 0x7F))


def image_format(head: bytes, formats: Sequence[str]) -> str | None:
    """The first of ``formats`` whose decoder accepts a body starting with ``head``."""
    Image.init()
    for name in formats:
        entry = Image.OPEN.get(name.upper())
        if entry is None:
            continue
        accept = entry[1]
        # Pillow: no test accepts all; a string is a reason for refusing
        result = True if accept is None else accept(head)
        if result is True or (result and not isinstance(result, str)):
            return name
    return None


def what_it_is(head: bytes) -> str:
    """A short name for a body that is no image: HTML, XML, SVG, PDF, JSON, text, binary."""
    start = head.removeprefix(_BOM).lstrip().lower()
    for prefix, name in _MARKUP:
        if start.startswith(prefix):
            return name
    if start.startswith(b"%pdf"):
        return "PDF"
    if start[:1] in (b"{", b"["):
        return "JSON"
    if start and all(byte in _TEXT_BYTES for byte in head.removeprefix(_BOM)):
        return "text"
    return "binary"
