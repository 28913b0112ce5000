"""httpcore network streams over a plain non-blocking socket, driven by Trio's low level.

httpcore's own Trio backend dials with ``trio.open_tcp_stream`` (an address lookup and a
happy-eyeballs nursery, although the guard already holds the one address to dial) and
wraps every read and write in a ``trio.fail_after`` scope and two exception-mapping
context managers. Per image that is a few hundred microseconds of Python, as much as a
tenth of what decoding it costs.

``dial_tcp`` connects a socket to exactly the address given; ``SocketStream`` first
tries the socket without waiting (``recv`` / ``send`` on the non-blocking socket, then
a Trio checkpoint, so a fast server cannot starve other tasks and cancellation is still
seen) and only when the kernel has nothing enters a timeout scope and waits with
``trio.lowlevel.wait_readable`` / ``wait_writable``. What httpcore sees is what its Trio
backend gives: the same per-connect, per-read and per-write timeouts and the same
exceptions (``ConnectTimeout``, ``ConnectError``, ``ReadTimeout``, ``ReadError``,
``WriteTimeout``, ``WriteError``).

The read, write and TLS methods keep httpcore's parameter name, ``timeout``.

TLS: ``start_tls`` hands the socket to ``trio.SSLStream`` and returns a ``TLSStream``,
which reads and writes the way httpcore's Trio backend does.

Resource handling: a stream owns its socket and closes it in ``aclose`` (telling Trio
first, so a task waiting on it wakes with ``ReadError``); a failed dial closes the socket
before raising. After ``start_tls`` the ``TLSStream`` owns the socket.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import trio

from worker.addresses import IPAddress

SocketOption = httpcore.SOCKET_OPTION
_Wait = Callable[[socket.socket], Awaitable[None]]


def _limit(timeout: float | None) -> float:
    return math.inf if timeout is None else timeout


async def dial_tcp(address: IPAddress, port: int, connect_timeout: float | None,
                   socket_options: Iterable[SocketOption] | None) -> SocketStream:
    """A TCP connection to exactly ``address:port`` (TCP_NODELAY, like Trio's streams)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in socket_options or ():
            sock.setsockopt(*option)
        await _connect(sock, (str(address), port), connect_timeout)
    except BaseException:
        sock.close()
        raise
    return SocketStream(sock)


async def _connect(sock: socket.socket, target: tuple[str, int], seconds: float | None) -> None:
    await trio.lowlevel.checkpoint_if_cancelled()
    error = sock.connect_ex(target)
    if error in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        with trio.move_on_after(_limit(seconds)):
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise httpcore.ConnectError(f"{target[0]}:{target[1]}: {os.strerror(error)}")
            return
        raise httpcore.ConnectTimeout(f"{target[0]}:{target[1]}: connect timed out")
    if error:
        raise httpcore.ConnectError(f"{target[0]}:{target[1]}: {os.strerror(error)}")
    await trio.lowlevel.cancel_shielded_checkpoint()


class SocketStream(httpcore.AsyncNetworkStream):
    """A connected non-blocking socket; see the module docstring."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            data = self._sock.recv(max_bytes)
        except BlockingIOError:
            return await self._wait_and_read(max_bytes, timeout)
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc
        await trio.lowlevel.checkpoint()
        return data

    async def _wait_and_read(self, max_bytes: int, seconds: float | None) -> bytes:
        with trio.move_on_after(_limit(seconds)):
            while True:
                await self._wait(trio.lowlevel.wait_readable, httpcore.ReadError)
                try:
                    return self._sock.recv(max_bytes)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise httpcore.ReadError(str(exc)) from exc
        raise httpcore.ReadTimeout(f"no data for {seconds:g}s")

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        view = memoryview(buffer)
        sent = self._send(view)
        if sent == len(view):
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(_limit(timeout)):
            while sent < len(view):
                await self._wait(trio.lowlevel.wait_writable, httpcore.WriteError)
                sent += self._send(view[sent:])
            return
        raise httpcore.WriteTimeout(f"could not write for {timeout:g}s")

    def _send(self, view: memoryview) -> int:
        try:
            return self._sock.send(view)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def _wait(self, wait: _Wait, error: type[httpcore.NetworkError]) -> None:
        try:
            await wait(self._sock)
        except trio.ClosedResourceError as exc:
            raise error("the connection was closed") from exc

    async def aclose(self) -> None:
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None,  # noqa: ASYNC109
                        ) -> httpcore.AsyncNetworkStream:
        transport = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
        stream = trio.SSLStream(transport, ssl_context=ssl_context, server_side=False,
                                server_hostname=server_hostname, https_compatible=True)
        try:
            with trio.move_on_after(_limit(timeout)):
                await stream.do_handshake()
                return TLSStream(stream, self._sock)
            raise httpcore.ConnectTimeout(f"TLS handshake over {timeout:g}s")
        except trio.BrokenResourceError as exc:
            await stream.aclose()
            raise httpcore.ConnectError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
        except BaseException:
            await stream.aclose()
            raise

    def get_extra_info(self, info: str) -> Any:
        return _extra_info(self._sock, info)


class TLSStream(httpcore.AsyncNetworkStream):
    """A ``trio.SSLStream`` with httpcore's timeouts and exceptions."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], sock: socket.socket) -> None:
        self._stream = stream
        self._sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        with trio.move_on_after(_limit(timeout)):
            try:
                return bytes(await self._stream.receive_some(max_bytes))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise httpcore.ReadError(str(exc.__cause__ or exc)) from exc
        raise httpcore.ReadTimeout(f"no data for {timeout:g}s")

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        with trio.move_on_after(_limit(timeout)):
            try:
                await self._stream.send_all(buffer)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise httpcore.WriteError(str(exc.__cause__ or exc)) from exc
            return
        raise httpcore.WriteTimeout(f"could not write for {timeout:g}s")

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None,  # noqa: ASYNC109
                        ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS in TLS (an HTTPS proxy) is not used by the fetcher")

    def get_extra_info(self, info: str) -> Any:
        # "ssl_object" stays None: httpcore reads it only to see whether HTTP/2 was
        # negotiated, and the fetcher's pools speak HTTP/1.1 alone.
        return _extra_info(self._sock, info)


def _extra_info(sock: socket.socket, info: str) -> Any:
    if sock.fileno() == -1:
        return None
    if info == "client_addr":
        return sock.getsockname()
    if info == "server_addr":
        return sock.getpeername()
    if info == "socket":
        return sock
    if info == "is_readable":
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0))
    return None
