"""Opening a WAT source: a local path, or an http(s) URL streamed without a temporary file.

Resource handling: ``open_source`` is a context manager; for a URL it holds one httpx client
and one streaming response and closes both on exit. Bytes are read as the WARC reader asks
for them (``iter_raw``: the gzip of a ``.wat.gz`` is the WARC's own compression, not a
transfer encoding, so it is passed through undecoded).

Error handling: a missing or unreadable path, an HTTP error status and any ``httpx`` error
(also one raised mid-stream) become ``SourceError``. Before the body is read, connect
errors, timeouts and 429 / 5xx answers are retried ``HttpPolicy.retries`` times with
exponential backoff; a failure mid-stream is not retried (the file is reported, and a
rerun from ``{run_id}_failed.txt`` is safe).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from extract.errors import SourceError

_CHUNK = 1 << 20
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """Timeout and retries of an http(s) source (Common Crawl answers 503 when busy)."""

    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled each time, at most 60


@contextmanager
def open_source(source: str, *, http: HttpPolicy | None = None) -> Iterator[BinaryIO | str]:
    """A path string (fastwarc opens it itself) or a binary stream of the URL's body."""
    if not is_url(source):
        yield _checked_path(source)
        return
    with _open_url(source, http or HttpPolicy()) as stream:
        yield stream


def _checked_path(source: str) -> str:
    path = Path(source)
    if not path.is_file():
        raise SourceError("no such file")
    return str(path)


@contextmanager
def _open_url(url: str, policy: HttpPolicy) -> Iterator[BinaryIO]:
    import httpx

    try:
        with httpx.Client(timeout=policy.timeout, follow_redirects=True) as client, \
                _response(client, url, policy) as response:
            yield _ChunkStream(response.iter_raw(_CHUNK))  # type: ignore[misc]
    except httpx.HTTPError as exc:
        raise SourceError(f"{type(exc).__name__}: {exc}") from exc


@contextmanager
def _response(client: Any, url: str, policy: HttpPolicy) -> Iterator[Any]:
    """The first 200 response; transient failures (connect errors, timeouts, 429, 5xx)
    are retried before any byte is read, other statuses fail at once."""
    import httpx

    for attempt in range(policy.retries + 1):
        last = attempt == policy.retries
        try:
            with client.stream("GET", url) as response:
                if response.status_code == 200:
                    yield response
                    return
                if last or response.status_code not in _RETRY_STATUSES:
                    raise SourceError(f"HTTP {response.status_code}")
        except (httpx.TransportError, httpx.TimeoutException):
            if last:
                raise
        time.sleep(min(policy.backoff * 2**attempt, 60.0))


class _ChunkStream:
    """A forward-only binary stream over byte chunks: ``read`` and ``tell``, which is all
    fastwarc asks of a Python stream (it calls ``tell`` once and panics without it)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = bytearray()
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._pending) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._pending += chunk
        cut = len(self._pending) if size < 0 else min(size, len(self._pending))
        data = bytes(self._pending[:cut])
        del self._pending[:cut]
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._pending.clear()
