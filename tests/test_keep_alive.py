"""Kept-alive connections to the coordinator: ``--keep-alive`` reaches the server, the
clients let an idle connection go before the server closes it, and the server can hold
thousands of them (its open files limit is raised at start)."""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from coordinator.errors import SettingsError
from coordinator.settings import CoordinatorSettings, make_settings
from pairfarm.client import KEEPALIVE_S, LIMITS
from tests.conftest import RunningCoordinator, start_coordinator

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: coordinator\r\nConnection: keep-alive\r\n\r\n"


@contextmanager
def coordinator(db_url: str, log: Path, *args: str) -> Iterator[RunningCoordinator]:
    running = start_coordinator(db_url, log, *args)
    try:
        yield running
    finally:
        running.stop()


def answered(sock: socket.socket) -> bytes:
    """Send one /healthz request on ``sock`` and read its whole answer."""
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the answer ended: {data!r}"
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` within ``seconds`` (it sends nothing else)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_an_idle_connection_outlives_uvicorns_five_seconds(db_url: str, tmp_path: Path) -> None:
    with coordinator(db_url, tmp_path / "c.log") as running, connect(running.url) as sock:
        assert b" 200 " in answered(sock)
        assert not closed_within(sock, 6.0)  # uvicorn alone closes it after 5 s
        assert b" 200 " in answered(sock)  # the same connection serves the next call


def test_keep_alive_flag_sets_when_the_server_closes(db_url: str, tmp_path: Path) -> None:
    with coordinator(db_url, tmp_path / "c.log", "--keep-alive", "1") as running, \
            connect(running.url) as sock:
        assert b" 200 " in answered(sock)
        assert closed_within(sock, 10.0)


def test_clients_let_go_before_the_server_does() -> None:
    assert LIMITS.keepalive_expiry == KEEPALIVE_S
    assert CoordinatorSettings().keep_alive_s > KEEPALIVE_S


@pytest.mark.parametrize("seconds", [0, 3601])
def test_keep_alive_out_of_range_is_refused(seconds: int) -> None:
    with pytest.raises(SettingsError, match="keep-alive"):
        make_settings(keep_alive_s=seconds)


def test_open_files_limit_is_raised_to_the_hard_limit(db_url: str, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard if hard != resource.RLIM_INFINITY else 1024)
    if low >= hard:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        with coordinator(db_url, tmp_path / "c.log") as running:
            server = psutil.Process(running.proc.pid)
            assert server.rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
