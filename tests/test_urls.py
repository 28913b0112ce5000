"""pairfarm.urls: URLs cleaned as browsers request them (WHATWG URL rules, http/https)."""

from __future__ import annotations

import random
import re

import pytest

from pairfarm.urls import (
    DOT_SEGMENT_PATTERN,
    MAX_URL_CHARS,
    UNCHANGED_PATTERN,
    UrlProblem,
    clean_url,
)

LONG_PATH = "/" + "a" * (MAX_URL_CHARS - len("http://a.test/"))


@pytest.mark.parametrize(("text", "expected"), [
    # white space and non-ASCII, percent-encoded as UTF-8
    ("http://x.test/a b.jpg", "http://x.test/a%20b.jpg"),
    ("http://x.test/photo 1.jpg?size=big one", "http://x.test/photo%201.jpg?size=big%20one"),
    ("https://x.test/ä/straße.jpg", "https://x.test/%C3%A4/stra%C3%9Fe.jpg"),
    ("https://x.test/画像.jpg?名=値", "https://x.test/%E7%94%BB%E5%83%8F.jpg?%E5%90%8D=%E5%80%A4"),
    ("http://x.test/a.jpg?q=ü", "http://x.test/a.jpg?q=%C3%BC"),
    # path and special-query sets differ: ^ ` { } in the path, ' in the query
    ("http://x.test/{a}`b`?c={d}`'\"", "http://x.test/%7Ba%7D%60b%60?c={d}`%27%22"),
    ("http://x.test/a^b|c[d]?e^f|g", "http://x.test/a%5Eb|c[d]?e^f|g"),
    ("http://x.test/<a>?<b>", "http://x.test/%3Ca%3E?%3Cb%3E"),
    # existing escapes kept, never encoded twice; a lone % kept too
    ("http://x.test/a%20b.jpg", "http://x.test/a%20b.jpg"),
    ("http://x.test/a%20b c%2Fd.jpg?q=%E2%82%AC", "http://x.test/a%20b%20c%2Fd.jpg?q=%E2%82%AC"),
    ("http://x.test/100%.jpg", "http://x.test/100%.jpg"),
    # host: lowercase, IDNA (UTS #46) to punycode, percent-decoded
    ("HTTP://IMG.Example.COM/A.JPG", "http://img.example.com/A.JPG"),
    ("https://Bücher.example/x.jpg", "https://xn--bcher-kva.example/x.jpg"),
    ("https://münchen。de/x.jpg", "https://xn--mnchen-3ya.de/x.jpg"),
    ("https://faß.de/", "https://xn--fa-hia.de/"),
    ("http://☃.net/", "http://xn--n3h.net/"),
    ("http://a_b.bücher.de/x", "http://a_b.xn--bcher-kva.de/x"),
    ("http://ex%41mple.com/x", "http://example.com/x"),
    ("http://[0:0::1]:8080/x", "http://[::1]:8080/x"),
    # default ports dropped, others kept
    ("http://x.test:80/a.jpg", "http://x.test/a.jpg"),
    ("https://x.test:443/a.jpg", "https://x.test/a.jpg"),
    ("http://x.test:443/a.jpg", "http://x.test:443/a.jpg"),
    ("http://x.test:0081/a.jpg", "http://x.test:81/a.jpg"),
    ("http://x.test:/a.jpg", "http://x.test/a.jpg"),
    # fragment dropped, empty query kept, empty path is /
    ("http://x.test/a.jpg#zoom", "http://x.test/a.jpg"),
    ("http://x.test/a.jpg?#", "http://x.test/a.jpg?"),
    ("http://x.test", "http://x.test/"),
    ("http://x.test?q=1", "http://x.test/?q=1"),
    # dot segments and backslashes as a browser resolves them
    ("http://x.test/a/./b/../c.jpg", "http://x.test/a/c.jpg"),
    ("http://x.test/a/%2e%2E/c.jpg", "http://x.test/c.jpg"),
    ("http://x.test/a/b/..", "http://x.test/a/"),
    ("http://x.test/../../c.jpg", "http://x.test/c.jpg"),
    ("http://x.test/.well/..x/c.jpg", "http://x.test/.well/..x/c.jpg"),
    ("http:\\\\x.test\\a\\b.jpg?c\\d", "http://x.test/a/b.jpg?c\\d"),
    ("http:///x.test/a.jpg", "http://x.test/a.jpg"),
    # control characters removed, white space trimmed
    ("  http://x.test/a\tb\n.jpg\r\n ", "http://x.test/ab.jpg"),
    ("\u3000http://x.test/a.jpg\u00a0", "http://x.test/a.jpg"),
    # the longest URL kept
    ("http://a.test" + LONG_PATH, "http://a.test" + LONG_PATH),
])
def test_clean_url_gives_what_a_browser_requests(text: str, expected: str) -> None:
    assert clean_url(text) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("", UrlProblem.MISSING),
    (" \t\x00 ", UrlProblem.MISSING),
    ("ftp://x.test/a.jpg", UrlProblem.NOT_HTTP),
    ("javascript:alert(1)", UrlProblem.NOT_HTTP),
    ("data:image/png;base64,AAAA", UrlProblem.NOT_HTTP),
    ("x.test/a.jpg", UrlProblem.NOT_HTTP),
    ("http://", UrlProblem.BAD),
    ("http://?x", UrlProblem.BAD),
    ("http://:80/a.jpg", UrlProblem.BAD),
    ("http://user:secret@x.test/a.jpg", UrlProblem.BAD),
    ("http://@x.test/a.jpg", UrlProblem.BAD),
    ("http://a b.test/a.jpg", UrlProblem.BAD),
    ("http://a<b.test/", UrlProblem.BAD),
    ("http://a%25b.test/", UrlProblem.BAD),
    ("http://x.test:99999/", UrlProblem.BAD),
    ("http://x.test:8o/", UrlProblem.BAD),
    ("http://[::1/a.jpg", UrlProblem.BAD),
    ("http://[::g]/a.jpg", UrlProblem.BAD),
    ("http://[fe80::1%25eth0]/", UrlProblem.BAD),
    ("http://x.test/" + "a" * (MAX_URL_CHARS - len("http://x.test/") + 1), UrlProblem.TOO_LONG),
    ("http://x.test/" + "é" * 3000, UrlProblem.TOO_LONG),  # 3,014 characters, 18,014 cleaned
])
def test_clean_url_names_why_it_refuses(text: str, problem: UrlProblem) -> None:
    assert clean_url(text) is problem


def test_the_limit_is_at_least_8192_and_a_real_2600_character_url_is_kept() -> None:
    assert MAX_URL_CHARS >= 8192
    real = ("https://images.example-cdn.com/transform/v1/crop?url=" + "%2F".join(
        f"segment{i:04d}" for i in range(176)) + "&w=640&h=480&sig=" + "f" * 100)
    assert 2600 <= len(real) <= 2700
    assert clean_url(real) == real


# URLs as ingest accepted them before the WHATWG rules (ASCII, no white space), in the
# usual form: each must keep its bytes, and so its dedup key in url_hashes.
ALREADY_CLEAN = [
    "http://a.test/1.jpg",
    "https://img.example.com/wp-content/uploads/2019/05/photo-1_Large.jpg?resize=640%2C480",
    "https://cdn.shopify.com/s/files/1/0/products/IMG_1.JPG?v=1500000000&width=600",
    "http://x.test:8080/a/b/c.png",
    "http://10.0.0.1/a.jpg",
    "https://x.test/a%20b%C3%A4.jpg?q=%E2%82%AC&x=[1]|{2}`",
    "https://x.test/path;param=1/~user/!$&'()*+,;=:@/x.jpg",
    "https://x.test/a.jpg?",
    "https://x.test/",
]


@pytest.mark.parametrize("url", ALREADY_CLEAN)
def test_a_clean_url_is_unchanged_byte_for_byte(url: str) -> None:
    cleaned = clean_url(url)
    assert isinstance(cleaned, str) and not isinstance(cleaned, UrlProblem)
    assert cleaned.encode() == url.encode()


def test_cleaning_twice_changes_nothing() -> None:
    for text in ["http://x.test/a b.jpg", "HTTPS://Bücher.example:443/ä?ö#x",
                 "http://x.test/a/../b c/%2e/d", "http:\\\\X.test\\a b"]:
        once = clean_url(text)
        assert clean_url(once) == once


def _random_ascii_url(rnd: random.Random) -> str:
    scheme = rnd.choice(["http://", "https://", "HTTP://", "http:/", "https:///"])
    host = rnd.choice(["x.test", "X.test", "a-b.c_d", "1.2.3.4", "x.test.", "ü.test", "u@x",
                       "x.test:80", "x.test:443", "x.test:8080", "[::1]"])
    start = rnd.choice(["/", "/", "/", "", "?", "\\", "#"])
    pieces = ["/", "/", "?", "#", ".", "..", "%2e", "%2E", "%20", "%", "a", "B", "z9", "-",
              "_", "~", "\\", " ", "\"", "'", "`", "{", "}", "<", ">", "|", "[", "]", "^",
              "@", "&", "=", ";", "é"]
    rest = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 8)))
    return scheme + host + start + rest


def test_the_unchanged_pattern_only_matches_urls_clean_url_keeps() -> None:
    """Ingest passes the rows matching UNCHANGED_PATTERN (and not DOT_SEGMENT_PATTERN)
    through as they are: for each such string clean_url must agree."""
    rnd = random.Random(12)
    matched = 0
    for _ in range(20000):
        url = _random_ascii_url(rnd)
        if re.search(UNCHANGED_PATTERN, url) and not re.search(DOT_SEGMENT_PATTERN, url):
            matched += 1
            assert clean_url(url) == url, url
    assert matched > 400, "the generator must reach the pattern often"


@pytest.mark.parametrize("text", ["http://x.test/a b.jpg?q=ü", "https://Bücher.example/画像.png",
                                  "http://x.test/a|b^[c]?d={e}`|^[f]\\g"])
def test_the_worker_requests_the_cleaned_url_as_it_is(text: str) -> None:
    """The worker hands candidate URLs to httpx: a cleaned URL goes on the wire unchanged."""
    import httpx

    cleaned = clean_url(text)
    assert isinstance(cleaned, str)
    wire = httpx.URL(cleaned)
    assert f"{wire.scheme}://{wire.raw_host.decode()}{wire.raw_path.decode()}" == cleaned
