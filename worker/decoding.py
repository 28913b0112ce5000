"""Content-Encoding decoders that stop at a size cap: no gzip or brotli bomb fills memory.

httpx decodes a whole received chunk at once, and a 64 KB gzip chunk can inflate to
64 MB before any cap could look at it. These decoders bound each step's *output*
(``zlib``'s ``max_length``, brotli's ``output_buffer_limit``), so at most the cap plus
one step is ever held.

Error handling: a corrupt stream raises ``DecodeFailure``; going over the cap raises
``BodyTooLarge``. Both are plain ``ValueError`` subclasses the fetcher turns into outcomes.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from typing import Protocol

_STEP = 256 * 1024


class DecodeFailure(ValueError):
    """The encoded body is corrupt."""


class BodyTooLarge(ValueError):
    """The decoded body passed its cap."""


class Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded output of ``data``, in bounded steps."""
        ...

    def flush(self) -> bytes:
        ...


class Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def flush(self) -> bytes:
        return b""


class ZlibDecoder:
    """gzip (``wbits=31``) or deflate (zlib-wrapped, or raw as some servers send it)."""

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._obj = zlib.decompressobj(31 if gzip else 15)
        self._first = True

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._steps(data)
        except zlib.error as exc:
            raise DecodeFailure(f"corrupt {'gzip' if self._gzip else 'deflate'}: {exc}") from exc

    def _steps(self, data: bytes) -> Iterator[bytes]:
        if self._first and not self._gzip:
            self._first = False
            data = self._sniff_raw_deflate(data)
        while data:
            out = self._obj.decompress(data, _STEP)
            data = self._obj.unconsumed_tail
            if out:
                yield out

    def _sniff_raw_deflate(self, data: bytes) -> bytes:
        if data and (data[0] & 0x0F) != 8:  # no zlib header: raw deflate
            self._obj = zlib.decompressobj(-15)
        return data

    def flush(self) -> bytes:
        return self._obj.flush()


class BrotliDecoder:
    def __init__(self) -> None:
        import brotli

        self._brotli = brotli
        self._obj = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._steps(data)
        except self._brotli.error as exc:
            raise DecodeFailure(f"corrupt brotli: {exc}") from exc

    def _steps(self, data: bytes) -> Iterator[bytes]:
        out = self._obj.process(data, output_buffer_limit=_STEP)
        while True:
            if out:
                yield out
            if self._obj.can_accept_more_data() or self._obj.is_finished():
                return
            out = self._obj.process(b"", output_buffer_limit=_STEP)

    def flush(self) -> bytes:
        return b""


def brotli_available() -> bool:
    try:
        import brotli  # noqa: F401
    except ImportError:
        return False
    return True


def accept_encoding() -> str:
    return "gzip, deflate, br" if brotli_available() else "gzip, deflate"


def decoder_for(content_encoding: str) -> Decoder:
    """A decoder for the (last) content coding; unknown codings raise ``DecodeFailure``."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    if len(codings) > 1:
        raise DecodeFailure(f"stacked content codings are not accepted: {content_encoding}")
    coding = codings[0] if codings else "identity"
    if coding in ("identity", ""):
        return Identity()
    if coding in ("gzip", "x-gzip", "deflate"):
        return ZlibDecoder(gzip=coding != "deflate")
    if coding == "br" and brotli_available():
        return BrotliDecoder()
    raise DecodeFailure(f"unsupported content coding: {coding}")


class CappedBody:
    """Accumulates decoded bytes and raises ``BodyTooLarge`` past ``cap`` bytes.

    The bytes go into one growing buffer (``io.BytesIO``), whose ``getvalue()`` hands
    that buffer over without a copy: joining a list of parts would hold the body twice
    for a moment, 32 MB for a body at the 16 MB cap. Its first ``head_size`` decoded
    bytes are kept apart in ``head`` (the fetcher sniffs them, ``worker.sniff``).
    """

    def __init__(self, decoder: Decoder, cap: int, head_size: int = 16) -> None:
        self._decoder = decoder
        self._cap = cap
        self._buffer = io.BytesIO()
        self._head_size = head_size
        self.head = b""
        self.size = 0
        self.raw_size = 0

    def feed(self, raw: bytes) -> None:
        self.raw_size += len(raw)
        for part in self._decoder.feed(raw):
            self._add(part)

    def finish(self) -> bytes:
        self._add(self._decoder.flush())
        data = self._buffer.getvalue()
        self._buffer = io.BytesIO()
        return data

    def _add(self, part: bytes) -> None:
        self.size += len(part)
        if self.size > self._cap:
            raise BodyTooLarge(f"decoded body over {self._cap} bytes")
        if len(self.head) < self._head_size:
            self.head += part[:self._head_size - len(self.head)]
        self._buffer.write(part)
