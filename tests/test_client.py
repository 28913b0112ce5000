"""The API client maps HTTP answers to its error types (scripted transport)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from pairfarm.client import (
    CoordinatorClient,
    LeaseLost,
    Rejected,
    Unauthorized,
    Unavailable,
)
from pairfarm.protocol import API_PREFIX, FailReport


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> CoordinatorClient:
    return CoordinatorClient("http://coord.test", "tok", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, Unauthorized), (403, Unauthorized), (409, LeaseLost), (422, Rejected),
     (413, Rejected), (500, Unavailable), (503, Unavailable)],
)
def test_status_maps_to_error(status: int, error: type[Exception]) -> None:
    client = _client(lambda r: httpx.Response(status, json={"error": "x", "detail": "why"}))
    with pytest.raises(error, match="why"):
        client.fail("download", 7, FailReport(lease_token="t", reason="r"))


def test_network_failure_is_unavailable() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(Unavailable):
        _client(boom).stats()


def test_no_content_means_nothing_to_lease() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    assert _client(handler).lease_download() is None
    assert seen[0].url.path == f"{API_PREFIX}/download/lease"
    assert seen[0].headers["authorization"] == "Bearer tok"


@pytest.mark.parametrize("body", [b"<html>proxy error</html>", b'{"batch_id": "seven"}'])
def test_malformed_answer_is_unavailable(body: bytes) -> None:
    client = _client(lambda r: httpx.Response(200, content=body))
    with pytest.raises(Unavailable, match="malformed DownloadLease"):
        client.lease_download()
