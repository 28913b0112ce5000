"""Alt-text cleaning, URL resolution and the candidate filters (pure functions).

A WAT file keeps an ``<img>``'s ``src`` and ``alt`` as the page wrote them. A candidate is
kept when its cleaned alt text has at least ``min_alt_chars`` characters and its ``src``
resolves to an absolute ``http`` or ``https`` URL with a host. Resolution follows the HTML
rule: relative to the document's base URL, which is ``<base href>`` resolved against the
page URL when the page has one, else the page URL (a backslash before the query counts as
``/``, as in browsers). The absolute URL is then cleaned by ``pairfarm.urls.clean_url``,
the function ingest uses: percent-encoded, IDNA host, no fragment (it never reaches the
image server, and keeping it would defeat URL dedup), at most 8,192 characters.
"""

from __future__ import annotations

import html
from enum import StrEnum
from urllib.parse import urljoin

from pairfarm.urls import UrlProblem, clean_url

DEFAULT_MIN_ALT_CHARS = 5
_ABSOLUTE_PREFIXES = ("http://", "https://")  # already absolute: urljoin would return them


class Drop(StrEnum):
    """Why an image link is not a candidate (the keys of the summary's ``dropped``)."""

    NO_ALT = "no_alt"
    SHORT_ALT = "short_alt"
    NOT_HTTP = "not_http"
    BAD_URL = "bad_url"
    URL_TOO_LONG = "url_too_long"
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


_DROP_FOR = {UrlProblem.MISSING: Drop.BAD_URL, UrlProblem.NOT_HTTP: Drop.NOT_HTTP,
             UrlProblem.BAD: Drop.BAD_URL, UrlProblem.TOO_LONG: Drop.URL_TOO_LONG}


def resolve_src(src: str, base: str) -> str | Drop:
    """``src`` as the absolute http(s) URL a browser requests, or why it is dropped."""
    src = src.strip()
    if not src:
        return Drop.BAD_URL
    if not src.startswith(_ABSOLUTE_PREFIXES):
        try:
            src = urljoin(base, _slashes(src))
        except ValueError:
            return Drop.BAD_URL
    cleaned = clean_url(src)
    return _DROP_FOR[cleaned] if isinstance(cleaned, UrlProblem) else cleaned


def _slashes(src: str) -> str:
    """A relative ``src`` with its backslashes before the query as slashes (the WHATWG
    rule for http(s) URLs: ``\\cdn.test\\a.jpg`` is ``//cdn.test/a.jpg``)."""
    if "\\" not in src:
        return src
    cut = min((i for i in (src.find("?"), src.find("#")) if i >= 0), default=len(src))
    return src[:cut].replace("\\", "/") + src[cut:]


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
