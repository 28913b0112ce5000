"""Alt-text cleaning, URL resolution and the candidate filters (pure functions).

A WAT file keeps an ``<img>``'s ``src`` and ``alt`` as the page wrote them. A candidate is
kept when its cleaned alt text has at least ``min_alt_chars`` characters and its ``src``
resolves to an absolute ``http`` or ``https`` URL with a host. Resolution follows the HTML
rule: relative to the document's base URL, which is ``<base href>`` resolved against the
page URL when the page has one, else the page URL. The fragment is removed (it never
reaches the image server, and keeping it would defeat URL dedup).
"""

from __future__ import annotations

import html
from enum import StrEnum
from urllib.parse import urljoin, urlsplit, urlunsplit

DEFAULT_MIN_ALT_CHARS = 5
_HTTP_SCHEMES = frozenset({"http", "https"})
_ABSOLUTE_PREFIXES = ("http://", "https://")  # already absolute: urljoin would return them


class Drop(StrEnum):
    """Why an image link is not a candidate (the keys of the summary's ``dropped``)."""

    NO_ALT = "no_alt"
    SHORT_ALT = "short_alt"
    NOT_HTTP = "not_http"
    BAD_URL = "bad_url"
    DUP_IN_RUN = "dup_in_run"
    DUP_EARLIER_RUN = "dup_earlier_run"


def clean_alt(alt: str) -> str:
    """Decode HTML entities left in the alt text and collapse whitespace runs to one space."""
    if "&" in alt:
        alt = html.unescape(alt)
    return " ".join(alt.split())


def document_base(page_url: str, base_href: str | None) -> str:
    """The URL relative ``src`` values resolve against (``<base href>`` wins when valid)."""
    if not base_href or not base_href.strip():
        return page_url
    try:
        return urljoin(page_url, base_href.strip())
    except ValueError:
        return page_url


def resolve_src(src: str, base: str) -> str | Drop:
    """``src`` as an absolute http(s) URL without fragment, or the reason it is dropped."""
    src = src.strip()
    if not src:
        return Drop.BAD_URL
    try:
        absolute = src if src.startswith(_ABSOLUTE_PREFIXES) else urljoin(base, src)
        parts = urlsplit(absolute)
    except ValueError:
        return Drop.BAD_URL
    if parts.scheme.lower() not in _HTTP_SCHEMES:
        return Drop.NOT_HTTP
    if not parts.hostname:
        return Drop.BAD_URL
    if parts.fragment:
        return urlunsplit(parts._replace(fragment=""))
    return absolute


def check_alt(alt: str | None, min_chars: int) -> str | Drop:
    """The cleaned alt text, or the reason the link is dropped."""
    if alt is None:
        return Drop.NO_ALT
    cleaned = clean_alt(alt)
    if not cleaned:
        return Drop.NO_ALT
    if len(cleaned) < min_chars:
        return Drop.SHORT_ALT
    return cleaned
