"""http(s) sources against a real local HTTP server: streaming, retries, errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from extract.dedup import KeyMode
from extract.fileworker import FileSettings, process_file
from extract.sources import HttpPolicy, _ChunkStream
from extract.watbuild import Img, WatPage, write_wat


class FlakyServer(ThreadingHTTPServer):
    """Serves ``body`` at every path after answering ``failures`` times with ``status``."""

    def __init__(self, body: bytes, failures: int, status: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.body, self.failures, self.status = body, failures, status
        self.requests = 0


class _Handler(BaseHTTPRequestHandler):
    server: FlakyServer

    def do_GET(self) -> None:
        self.server.requests += 1
        if self.server.requests <= self.server.failures:
            self.send_response(self.server.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def wat_body(tmp_path: Path) -> bytes:
    pages = [WatPage(f"https://e.com/{i}", [Img(f"{i}.jpg", f"A mountain lake number {i}")])
             for i in range(50)]
    return write_wat(tmp_path / "x.wat.gz", pages).read_bytes()


@contextmanager
def serve(body: bytes, failures: int = 0, status: int = 503) -> Iterator[FlakyServer]:
    server = FlakyServer(body, failures, status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def settings(retries: int) -> FileSettings:
    return FileSettings(5, 0.5, KeyMode.URL_ALT, HttpPolicy(timeout=5, retries=retries,
                                                            backoff=0.0))


def url_of(server: FlakyServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/crawl/x.wat.gz"


def test_transient_errors_are_retried(wat_body: bytes) -> None:
    with serve(wat_body, failures=2, status=503) as server:
        result = process_file(url_of(server), settings(retries=2))
        assert result.error is None
        assert result.table.num_rows == 50
        assert server.requests == 3


def test_retries_run_out(wat_body: bytes) -> None:
    with serve(wat_body, failures=5, status=503) as server:
        result = process_file(url_of(server), settings(retries=2))
        assert result.error == "HTTP 503"
        assert server.requests == 3


def test_a_client_error_is_not_retried(wat_body: bytes) -> None:
    with serve(wat_body, failures=5, status=403) as server:
        result = process_file(url_of(server), settings(retries=3))
        assert result.error == "HTTP 403"
        assert server.requests == 1


def test_an_unreachable_server_is_a_source_error() -> None:
    server = FlakyServer(b"", 0, 200)
    url = url_of(server)
    server.server_close()  # nothing listens on that port any more
    result = process_file(url, settings(retries=1))
    assert result.error is not None and result.error.startswith("ConnectError")


def test_chunk_stream_reads_across_chunks_and_tells_its_position() -> None:
    stream = _ChunkStream(iter([b"abc", b"", b"defgh", b"i"]))
    assert stream.tell() == 0
    assert stream.read(2) == b"ab"
    assert stream.read(4) == b"cdef"
    assert stream.tell() == 6
    assert stream.read() == b"ghi"
    assert stream.read(5) == b""
    assert stream.tell() == 9
