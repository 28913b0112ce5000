"""Unit tests of alt-text cleaning and URL resolution (pure functions)."""

from __future__ import annotations

import pytest

from extract.links import Drop, check_alt, clean_alt, document_base, resolve_src

PAGE = "https://www.example.com/blog/2021/post.html?x=1"


@pytest.mark.parametrize(("src", "base", "expected"), [
    ("cat.jpg", PAGE, "https://www.example.com/blog/2021/cat.jpg"),
    ("../img/cat.jpg", PAGE, "https://www.example.com/blog/img/cat.jpg"),
    ("/img/cat.jpg", PAGE, "https://www.example.com/img/cat.jpg"),
    ("//cdn.example.net/cat.jpg", PAGE, "https://cdn.example.net/cat.jpg"),
    ("http://other.example.org/a.png", PAGE, "http://other.example.org/a.png"),
    ("  cat.jpg\n", PAGE, "https://www.example.com/blog/2021/cat.jpg"),
    ("cat.jpg#zoom", PAGE, "https://www.example.com/blog/2021/cat.jpg"),
    ("?size=2", PAGE, "https://www.example.com/blog/2021/post.html?size=2"),
    ("cat.jpg", "http://static.example.org/base/", "http://static.example.org/base/cat.jpg"),
    # cleaned by pairfarm.urls, as ingest cleans: what a browser requests
    ("my cat.jpg", PAGE, "https://www.example.com/blog/2021/my%20cat.jpg"),
    ("/bilder/straße.jpg?größe=2", PAGE,
     "https://www.example.com/bilder/stra%C3%9Fe.jpg?gr%C3%B6%C3%9Fe=2"),
    ("http://Bücher.Example/a b.jpg", PAGE, "http://xn--bcher-kva.example/a%20b.jpg"),
    ("//CDN.Example.net:443/a%20b.jpg", PAGE, "https://cdn.example.net/a%20b.jpg"),
    ("img\\cat.jpg?a\\b", PAGE, "https://www.example.com/blog/2021/img/cat.jpg?a\\b"),
    ("\\\\cdn.example.net\\cat.jpg", PAGE, "https://cdn.example.net/cat.jpg"),
    ("http:///a.jpg", PAGE, "http://a.jpg/"),  # WHATWG skips the extra slash
])
def test_resolve_src_gives_absolute_http_urls(src: str, base: str, expected: str) -> None:
    assert resolve_src(src, base) == expected


@pytest.mark.parametrize(("src", "reason"), [
    ("data:image/png;base64,iVBORw0KGgo=", Drop.NOT_HTTP),
    ("javascript:void(0)", Drop.NOT_HTTP),
    ("ftp://files.example.com/a.jpg", Drop.NOT_HTTP),
    ("mailto:a@example.com", Drop.NOT_HTTP),
    ("", Drop.BAD_URL),
    ("   ", Drop.BAD_URL),
    ("http://[::1/a.jpg", Drop.BAD_URL),
    ("http://", Drop.BAD_URL),
    ("http://user:pw@example.com/a.jpg", Drop.BAD_URL),
    ("http://a b.example.com/a.jpg", Drop.BAD_URL),
    ("/" + "a" * 8200, Drop.URL_TOO_LONG),
])
def test_resolve_src_drops_what_cannot_be_downloaded(src: str, reason: Drop) -> None:
    assert resolve_src(src, PAGE) is reason


def test_document_base_prefers_base_href_resolved_against_the_page() -> None:
    assert document_base(PAGE, "/static/") == "https://www.example.com/static/"
    assert document_base(PAGE, "http://cdn.example.org/x/") == "http://cdn.example.org/x/"
    assert document_base(PAGE, None) == PAGE
    assert document_base(PAGE, "  ") == PAGE
    assert document_base(PAGE, "http://[bad") == PAGE


def test_clean_alt_decodes_entities_and_collapses_whitespace() -> None:
    assert clean_alt("Fish &amp; chips &eacute;t&#233; &lt;3") == "Fish & chips été <3"
    assert clean_alt("  a\tcat \n on  a mat ") == "a cat on a mat"
    assert clean_alt("東京タワーの夜景") == "東京タワーの夜景"


@pytest.mark.parametrize(("alt", "expected"), [
    (None, Drop.NO_ALT),
    ("", Drop.NO_ALT),
    ("   ", Drop.NO_ALT),
    ("logo", Drop.SHORT_ALT),
    ("&amp;&amp;", Drop.SHORT_ALT),  # two characters once decoded
    ("a  b", Drop.SHORT_ALT),  # three characters once collapsed
    ("Logo!", "Logo!"),
    ("夜景の写真", "夜景の写真"),  # five characters, not fifteen bytes
])
def test_check_alt_applies_the_minimum_length_to_the_cleaned_text(
        alt: str | None, expected: str | Drop) -> None:
    assert check_alt(alt, 5) == expected
