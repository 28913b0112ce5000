"""Opening a WAT source: a local path, or an http(s) URL streamed without a temporary file.

Resource handling: ``open_source`` is a context manager; for a URL it holds one httpx client
and one streaming response and closes both on exit. Bytes are read as the WARC reader asks
for them (``iter_raw``: the gzip of a ``.wat.gz`` is the WARC's own compression, not a
transfer encoding, so it is passed through undecoded).

Error handling: a missing or unreadable path, an HTTP error status and any ``httpx`` error
(also one raised mid-stream) become ``SourceError`` naming the source.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from extract.errors import SourceError

_CHUNK = 1 << 20


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


@contextmanager
def open_source(source: str, *, http_timeout: float = 60.0) -> Iterator[BinaryIO | str]:
    """A path string (fastwarc opens it itself) or a binary stream of the URL's body."""
    if not is_url(source):
        yield _checked_path(source)
        return
    with _open_url(source, http_timeout) as stream:
        yield stream


def _checked_path(source: str) -> str:
    path = Path(source)
    if not path.is_file():
        raise SourceError("no such file")
    return str(path)


@contextmanager
def _open_url(url: str, timeout: float) -> Iterator[BinaryIO]:
    import httpx

    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client, client.stream(
            "GET", url
        ) as response:
            if response.status_code != 200:
                raise SourceError(f"HTTP {response.status_code}")
            yield _ChunkStream(response.iter_raw(_CHUNK))  # type: ignore[misc]
    except httpx.HTTPError as exc:
        raise SourceError(f"{type(exc).__name__}: {exc}") from exc


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
