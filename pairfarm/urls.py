"""Image URLs cleaned as a browser fetches them (the WHATWG URL Standard, http/https only).

``clean_url(text)`` returns the URL a browser would request for ``text``, or the
``UrlProblem`` that refuses it. Ingest (``coordinator.ingest.validate``) and ``pairfarm
extract`` (``extract.links``) both call it, so a URL gets one form, and one dedup key,
whichever way it came in. The rules, in order:

1. C0 control characters (U+0000-U+001F) and DEL are removed wherever they are (WHATWG
   removes tab and newlines and encodes the others; a dataset column holding them has
   them by accident), then white space is trimmed from both ends. Nothing left:
   ``missing_url``.
2. The scheme must be ``http`` or ``https`` (any case; written lowercase), else
   ``not_http``. As in browsers, the slashes after it may be any number of ``/`` or ``\\``
   (``http:\\\\a.test`` and ``http:///a.test`` are ``http://a.test/``).
3. The authority ends at the first ``/``, ``\\``, ``?`` or ``#``. A user name or password
   (``user:pass@``) is refused (``bad_url``): browsers block credentials in image requests.
4. The host is percent-decoded; an ASCII host is lowercased; a host with other characters
   is mapped with UTS #46 and written as punycode by the ``idna`` package, label by label
   (``Bücher.example`` -> ``xn--bcher-kva.example``; a label that IDNA 2008 refuses but
   UTS #46 maps, such as an emoji, is written as punycode of its mapped form, as browsers
   do). An IPv6 literal is written in its short form. An empty host, a forbidden host
   character (space, ``<``, ``>``, ``^``, ``|``, ``%`` after decoding, ...) or a label the
   mapping refuses: ``bad_url``. Numeric IPv4 hosts are kept as written (the worker's SSRF
   guard reads every numeric form).
5. The port must be digits up to 65535 (else ``bad_url``); 80 for http and 443 for https
   are dropped, like an empty port.
6. In the path ``\\`` is ``/``, ``.`` and ``..`` segments (also as ``%2e``) are resolved,
   and an empty path is ``/``. Path and query are percent-encoded with the WHATWG path and
   special-query percent-encode sets: space, ``"``, ``<``, ``>``, every non-ASCII character
   (as its UTF-8 bytes), and in the path also ``^``, `````, ``{``, ``}``, in the query
   ``'``.
   ``%`` is never encoded: ``%20`` stays ``%20`` (no double encoding).
7. The fragment (``#...``) is dropped: a browser does not send it.
8. The cleaned URL must be at most ``MAX_URL_CHARS`` (8,192) characters, else
   ``url_too_long``.

A URL that is already in this form (lowercase scheme and host, no default port, no
fragment, no dot segments, only ASCII characters outside the encode sets) comes back
unchanged, byte for byte.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from enum import StrEnum
from urllib.parse import quote, unquote_to_bytes

import idna

MAX_URL_CHARS = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}

_CONTROLS = re.compile("[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_AUTHORITY_END = re.compile(r"[/\\?#]")
_FORBIDDEN_HOST = re.compile(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f]")
_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))
#: what quote() leaves alone: printable ASCII less the WHATWG encode set, plus '%'
_PATH_SAFE = "".join(c for c in _PRINTABLE if c not in '"#<>?^`{}')
_QUERY_SAFE = "".join(c for c in _PRINTABLE if c not in "\"#<>'")
_PATH_CLEAN = re.compile(f"[{re.escape(_PATH_SAFE)}]*")
_QUERY_CLEAN = re.compile(f"[{re.escape(_QUERY_SAFE)}]*")
_PATH_KEPT = _PATH_SAFE.replace("\\", "")  # a path's backslash becomes a slash
#: A URL matching this and not ``DOT_SEGMENT_PATTERN`` is one ``clean_url`` returns
#: unchanged (length aside): lowercase http(s), a lowercase ASCII host name without user
#: or port, a path and an optional query of printable ASCII outside the percent-encode
#: sets, no fragment. Written for RE2 too (``pyarrow.compute.match_substring_regex``):
#: ingest checks whole columns with it and cleans only the other rows one by one.
UNCHANGED_PATTERN = (f"^https?://[a-z0-9._-]+/[{re.escape(_PATH_KEPT)}]*"
                     f"(?:\\?[{re.escape(_QUERY_SAFE)}]*)?$")
#: a ``.`` or ``..`` path segment (also as ``%2e``); the query may match too: harmless
DOT_SEGMENT_PATTERN = "(?i)/(?:\\.|%2e){1,2}(?:[/?]|$)"
_DOT_SEGMENT = re.compile(r"/(?:\.|%2e){1,2}(?:/|$)", re.IGNORECASE)
_SINGLE_DOT = frozenset({".", "%2e"})
_DOUBLE_DOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})


class UrlProblem(StrEnum):
    """Why a URL is refused; the values are ingest's reject reasons."""

    MISSING = "missing_url"
    NOT_HTTP = "not_http"
    BAD = "bad_url"
    TOO_LONG = "url_too_long"


class _Refused(Exception):
    def __init__(self, problem: UrlProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


def clean_url(text: str) -> str | UrlProblem:
    """``text`` as the URL a browser requests, or why it is refused (module docstring)."""
    try:
        url = _clean(text)
    except _Refused as exc:
        return exc.problem
    return url if len(url) <= MAX_URL_CHARS else UrlProblem.TOO_LONG


def _clean(text: str) -> str:
    if _CONTROLS.search(text):
        text = _CONTROLS.sub("", text)
    text = text.strip()
    if not text:
        raise _Refused(UrlProblem.MISSING)
    scheme = _SCHEME.match(text)
    if scheme is None or scheme.group(1).lower() not in DEFAULT_PORTS:
        raise _Refused(UrlProblem.NOT_HTTP)
    name = scheme.group(1).lower()
    after = text[scheme.end():].lstrip("/\\")
    end = _AUTHORITY_END.search(after)
    authority, rest = (after[:end.start()], after[end.start():]) if end else (after, "")
    return f"{name}://{_authority(authority, name)}{_path_and_query(rest)}"


def _authority(authority: str, scheme: str) -> str:
    if "@" in authority:
        raise _Refused(UrlProblem.BAD)
    host, port = _split_port(authority)
    written = _host(host)
    if port is None or port == DEFAULT_PORTS[scheme]:
        return written
    return f"{written}:{port}"


def _split_port(authority: str) -> tuple[str, int | None]:
    """Host and port; the port None when absent or empty."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _Refused(UrlProblem.BAD)
        host, after = authority[:close + 1], authority[close + 1:]
        if after and not after.startswith(":"):
            raise _Refused(UrlProblem.BAD)
        digits = after[1:]
    else:
        host, _, digits = authority.partition(":")
    if not digits:
        return host, None
    if not (digits.isascii() and digits.isdigit()) or int(digits) > 65535:
        raise _Refused(UrlProblem.BAD)
    return host, int(digits)


def _host(host: str) -> str:
    if host.startswith("["):
        if "%" in host:  # a zone identifier: not in URLs
            raise _Refused(UrlProblem.BAD)
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError as exc:
            raise _Refused(UrlProblem.BAD) from exc
    if "%" in host:
        try:
            host = unquote_to_bytes(host).decode()
        except UnicodeDecodeError as exc:
            raise _Refused(UrlProblem.BAD) from exc
    if not host.isascii():
        host = _domain_to_ascii(host)
    if not host or _FORBIDDEN_HOST.search(host):
        raise _Refused(UrlProblem.BAD)
    return host.lower()


@functools.lru_cache(maxsize=4096)
def _domain_to_ascii(host: str) -> str:
    """UTS #46 mapping, then punycode for each label that is not ASCII."""
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        raise _Refused(UrlProblem.BAD) from exc
    return ".".join(_label_to_ascii(label) for label in mapped.split("."))


def _label_to_ascii(label: str) -> str:
    if label.isascii():
        return label
    try:
        return idna.alabel(label).decode("ascii")
    except idna.IDNAError:
        return "xn--" + label.encode("punycode").decode("ascii")


def _path_and_query(rest: str) -> str:
    """The path (always from ``/``) and the query of ``rest``; the fragment dropped."""
    rest = rest.partition("#")[0]
    path, mark, query = rest.partition("?")
    written = _path(path.replace("\\", "/"))
    if mark:
        written += "?" + _encode(query, _QUERY_CLEAN, _QUERY_SAFE)
    return written


def _path(path: str) -> str:
    if not path:
        return "/"
    if _DOT_SEGMENT.search(path) is None:
        return _encode(path, _PATH_CLEAN, _PATH_SAFE)
    segments = path[1:].split("/")
    kept: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        folded = segment.lower()
        if folded in _DOUBLE_DOT:
            if kept:
                kept.pop()
            if last:
                kept.append("")
        elif folded in _SINGLE_DOT:
            if last:
                kept.append("")
        else:
            kept.append(segment)
    return _encode("/" + "/".join(kept), _PATH_CLEAN, _PATH_SAFE)


def _encode(text: str, clean: re.Pattern[str], safe: str) -> str:
    """``text`` with the characters outside ``safe`` percent-encoded as UTF-8."""
    if clean.fullmatch(text):
        return text
    return quote(text, safe=safe, errors="surrogatepass")
