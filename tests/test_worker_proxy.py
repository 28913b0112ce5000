"""Candidate URLs through an HTTP proxy (``http_proxy`` / ``https_proxy`` / ``no_proxy``).

``LocalProxy`` is a real proxy on loopback: absolute-form requests (``GET http://...``)
are forwarded, ``CONNECT host:port`` opens a tunnel; it resolves names from its own
table, and records every request it gets. The worker's SSRF guard stays on: the target
names resolve, for the worker, to public-looking addresses.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import trio
import trio.testing

from pairfarm.outcomes import Outcome
from tests import hostile_server as hs
from tests.conftest import cli_env, run_cli
from worker.batch import Network, open_stage
from worker.errors import FetchFailure, SettingsError
from worker.proxy import proxy_for
from worker.settings import FetchSettings, PipelineSettings, ProxySettings

JPEG = hs.jpeg_bytes(320, 240)
LOOPBACK = ipaddress.ip_address("127.0.0.1")
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class LocalProxy:
    """A forwarding and tunnelling HTTP proxy on loopback. ``names``: its own DNS."""

    names: dict[str, str] = field(default_factory=dict)
    refuse_connect: bool = False
    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[LocalProxy] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                await self._one(client)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def _one(self, client: trio.SocketStream) -> None:
        data = await hs.read_head(client)
        if data is None:
            return
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:] if ": " in ln)}
        self.seen.append(Seen(method, target, headers))
        if method == "CONNECT":
            await self._tunnel(client, target, rest)
        else:
            await self._forward(client, method, target, lines[1:], rest)

    async def _open(self, host: str, port: int) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.names.get(host, host), port)

    async def _tunnel(self, client: trio.SocketStream, target: str, rest: bytes) -> None:
        if self.refuse_connect:
            await client.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        host, port = target.rsplit(":", 1)
        async with await self._open(host, int(port)) as upstream:
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await _relay(client, upstream, rest)

    async def _forward(self, client: trio.SocketStream, method: str, target: str,
                       header_lines: list[str], rest: bytes) -> None:
        parts = urlsplit(target)
        assert parts.scheme == "http" and parts.hostname, target
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        kept = [line for line in header_lines if not line.lower().startswith("proxy-")]
        request = "\r\n".join([f"{method} {path or '/'} HTTP/1.1", *kept]) + "\r\n\r\n"
        async with await self._open(parts.hostname, parts.port or 80) as upstream:
            await upstream.send_all(request.encode("latin-1") + rest)
            await _relay(client, upstream, b"")


async def _relay(client: trio.SocketStream, upstream: trio.SocketStream, pending: bytes) -> None:
    """Bytes both ways until either side closes."""
    async def pipe(src: trio.SocketStream, dst: trio.SocketStream, first: bytes) -> None:
        if first:
            await dst.send_all(first)
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe, client, upstream, pending)
        nursery.start_soon(pipe, upstream, client, b"")


async def _hang_up_on_hello(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                            ) -> None:
    """A listener that closes each connection once its first bytes arrive (a TLS
    client's hello); started with its port."""
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


def _run_virtual(fn: object) -> object:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def _settings(proxy: ProxySettings) -> PipelineSettings:
    return PipelineSettings(fetch=FetchSettings(deadline=20, concurrency=8, proxy=proxy),
                            decode_threads=1)


@dataclass
class Run:
    outcomes: dict[str, Outcome]
    proxy: LocalProxy
    origin: hs.HostileServer
    dialed: list[tuple[object, int]]


def _through(urls: list[str], proxy_settings: object, *, refuse_connect: bool = False,
             names: dict[str, str] | None = None) -> Run:
    """Fetch ``urls`` (``{port}``: the origin's) with the proxy settings that
    ``proxy_settings(proxy_url)`` gives; the worker's DNS: ``names`` and
    img.example.test -> a public address."""
    routes = {"/a.jpg": hs.route_ok(JPEG), "/b.jpg": hs.route_ok(JPEG, "text/html")}

    async def main() -> Run:
        dns, dialer = hs.fake_network(names)
        dialer.routes[LOOPBACK] = "127.0.0.1"  # the proxy's own address
        async with trio.open_nursery() as nursery:
            origin = await hs.start_server(nursery, routes)
            closing = await nursery.start(_hang_up_on_hello)
            proxy: LocalProxy = await nursery.start(LocalProxy(
                names={"img.example.test": "127.0.0.1", "tls.example.test": "127.0.0.1"},
                refuse_connect=refuse_connect).run)
            assert callable(proxy_settings)
            settings = _settings(proxy_settings(proxy.url))
            outcomes: dict[str, Outcome] = {}
            async with open_stage(settings, Network(resolver=dns, dialer=dialer)) as stage:
                for url in urls:
                    concrete = url.format(port=origin.port, closing=closing)
                    try:
                        await stage.decode(await stage.fetch(concrete))
                        outcomes[url] = Outcome.OK
                    except FetchFailure as exc:
                        outcomes[url] = exc.outcome
            nursery.cancel_scope.cancel()
        return Run(outcomes, proxy, origin, list(dialer.dialed))

    return _run_virtual(main)  # type: ignore[return-value]


HTTP_URLS = ["http://img.example.test:{port}/a.jpg", "http://img.example.test:{port}/b.jpg"]


def test_http_urls_go_through_the_proxy_in_absolute_form() -> None:
    run = _through(HTTP_URLS, lambda url: ProxySettings(http=url))
    assert run.outcomes == dict.fromkeys(HTTP_URLS, Outcome.OK)
    port = run.origin.port
    assert [(s.method, s.target) for s in run.proxy.seen] == [
        ("GET", f"http://img.example.test:{port}/a.jpg"),
        ("GET", f"http://img.example.test:{port}/b.jpg")]
    assert len(run.origin.requests) == 2
    # the worker dialled its proxy alone, never the target's address
    assert {address for address, _ in run.dialed} == {LOOPBACK}


@pytest.mark.parametrize("no_proxy", ["img.example.test", ".example.test", "example.test",
                                      "*", "other.test, img.example.test:{port}"])
def test_no_proxy_hosts_are_fetched_directly(no_proxy: str) -> None:
    def settings(url: str) -> ProxySettings:
        return ProxySettings(http=url, https=url, no_proxy=no_proxy)

    if "{port}" in no_proxy:  # host:port entries: the origin's port is known only later
        return _no_proxy_with_port()
    run = _through(HTTP_URLS, settings)
    assert run.outcomes == dict.fromkeys(HTTP_URLS, Outcome.OK)
    assert run.proxy.seen == [] and len(run.origin.requests) == 2
    assert {address for address, _ in run.dialed} == {hs.PUBLIC_IP}


def _no_proxy_with_port() -> None:
    async def main() -> tuple[Outcome, int]:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            origin = await hs.start_server(nursery, {"/a.jpg": hs.route_ok(JPEG)})
            proxy: LocalProxy = await nursery.start(LocalProxy().run)
            settings = _settings(ProxySettings(
                http=proxy.url, no_proxy=f"other.test, img.example.test:{origin.port}"))
            async with open_stage(settings, Network(resolver=dns, dialer=dialer)) as stage:
                await stage.decode(await stage.fetch(origin.url("/a.jpg")))
            nursery.cancel_scope.cancel()
        return Outcome.OK, len(proxy.seen)

    assert _run_virtual(main) == (Outcome.OK, 0)


def test_no_proxy_for_another_host_still_proxies() -> None:
    run = _through(HTTP_URLS[:1], lambda url: ProxySettings(http=url, no_proxy="cdn.example.test"))
    assert run.outcomes == {HTTP_URLS[0]: Outcome.OK} and len(run.proxy.seen) == 1


def test_the_guard_checks_the_target_before_the_proxy_hears_of_it() -> None:
    """Names resolving (for the worker) to loopback, private or metadata addresses, and
    numeric ones, end ssrf_blocked; the proxy (which would reach them) sees nothing."""
    names = {"internal.example.test": "10.0.0.5", "meta.example.test": "169.254.169.254",
             "loop.example.test": "127.0.0.1"}
    urls = ["http://internal.example.test/", "https://meta.example.test/latest/",
            "http://loop.example.test:{port}/a.jpg", "http://127.0.0.1:{port}/a.jpg",
            "http://nowhere.example.test/"]
    run = _through(urls, lambda url: ProxySettings(http=url, https=url), names=names)
    assert run.outcomes == {**dict.fromkeys(urls[:4], Outcome.SSRF_BLOCKED),
                            urls[4]: Outcome.DNS}
    assert run.proxy.seen == [] and run.origin.requests == []


def test_https_urls_go_through_a_connect_tunnel() -> None:
    """The tunnel's far end closes on the TLS hello: the fetch fails ``connect``, after
    the proxy was asked for exactly that host and port."""
    url = "https://tls.example.test:{closing}/a.jpg"
    names = {"tls.example.test": str(hs.PUBLIC_IP)}
    run = _through([url], lambda proxy: ProxySettings(https=proxy), names=names)
    assert run.outcomes == {url: Outcome.CONNECT}
    [seen] = run.proxy.seen
    assert seen.method == "CONNECT" and seen.target.startswith("tls.example.test:")
    assert {address for address, _ in run.dialed} == {LOOPBACK}


def test_a_refused_connect_ends_connect() -> None:
    url = "https://img.example.test/a.jpg"
    run = _through([url], lambda proxy: ProxySettings(https=proxy), refuse_connect=True)
    assert run.outcomes == {url: Outcome.CONNECT}
    assert [s.target for s in run.proxy.seen] == ["img.example.test:443"]


def test_proxy_credentials_are_sent_to_the_proxy_only() -> None:
    def settings(url: str) -> ProxySettings:
        return ProxySettings(http=url.replace("http://", "http://farm:p%40ss@"))

    run = _through(HTTP_URLS[:1], settings)
    assert run.outcomes == {HTTP_URLS[0]: Outcome.OK}
    expected = "Basic " + base64.b64encode(b"farm:p@ss").decode()
    assert run.proxy.seen[0].headers["proxy-authorization"] == expected
    assert "proxy-authorization" not in run.origin.requests[0].headers


# -- settings -----------------------------------------------------------------------------


def test_proxy_settings_from_the_environment() -> None:
    assert ProxySettings.from_environment({}) == ProxySettings()
    env = {"HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2",
           "HTTPS_PROXY": "http://secure:3", "NO_PROXY": "a.test"}
    assert ProxySettings.from_environment(env) == ProxySettings(
        http="http://lower:2", https="http://secure:3", no_proxy="a.test")
    assert ProxySettings.from_environment({"ALL_PROXY": "proxy:8080"}) == ProxySettings(
        http="proxy:8080", https="proxy:8080")


@pytest.mark.parametrize("url", ["socks5://proxy:1080", "https://proxy:443", "http://"])
def test_unsupported_proxies_are_refused_clearly(url: str) -> None:
    with pytest.raises(SettingsError, match="proxy"):
        ProxySettings(https=url)


def test_proxy_for_an_origin() -> None:
    settings = ProxySettings(http="proxy:3128", no_proxy="skip.test")
    found = proxy_for(settings, "http", "img.test", None)
    assert found is not None and found.url.host == b"proxy" and found.url.port == 3128
    assert proxy_for(settings, "https", "img.test", None) is None
    assert proxy_for(settings, "http", "cdn.skip.test", 8080) is None


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), [
    ("*", "img.test", None, True), ("img.test", "img.test", None, True),
    ("img.test", "a.img.test", 443, True), (".img.test", "a.img.test", None, True),
    ("img.test", "notimg.test", None, False), ("x.test, img.test:8080", "img.test", 8080, True),
    ("img.test:8080", "img.test", 80, False), ("127.0.0.1", "127.0.0.1", 9000, True),
    ("::1", "::1", None, True), ("[::1]:8080", "::1", 8080, True),
    ("[::1]:8080", "::1", 80, False), (" , ", "img.test", None, False),
])
def test_no_proxy_rules(no_proxy: str, host: str, port: int | None, bypassed: bool) -> None:
    settings = ProxySettings(http="proxy:3128", no_proxy=no_proxy)
    assert (proxy_for(settings, "http", host, port) is None) is bypassed


# -- the command line ---------------------------------------------------------------------


@contextmanager
def proxy_thread() -> Iterator[LocalProxy]:
    with hs.trio_thread(lambda nursery: nursery.start(LocalProxy().run)) as proxy:
        yield proxy


@pytest.mark.parametrize(("variables", "through"), [
    ({"http_proxy": "{proxy}"}, True),
    ({"HTTP_PROXY": "{proxy}"}, True),
    ({"HTTP_PROXY": "{proxy}", "NO_PROXY": "127.0.0.1"}, False),
    ({"HTTPS_PROXY": "{proxy}"}, False),
])
def test_pairfarm_download_reads_the_proxy_variables(tmp_path: Path, variables: dict[str, str],
                                                     through: bool) -> None:
    env = {k: v for k, v in cli_env().items() if k.lower() not in _PROXY_ENV}
    with proxy_thread() as proxy, hs.server_thread({"/a.jpg": hs.route_ok(JPEG)}) as server:
        env.update({name: value.format(proxy=proxy.url) for name, value in variables.items()})
        (tmp_path / "urls.txt").write_text(f"http://127.0.0.1:{server.port}/a.jpg\n")
        run_cli("download", str(tmp_path / "urls.txt"), "-o", str(tmp_path / "out"),
                "--allow-cidr", "127.0.0.0/8", "--no-progress", env=env)
        seen = sorted(urlsplit(s.target).path for s in proxy.seen)
    rows = pq.read_table(tmp_path / "out" / "00000000.parquet").to_pylist()
    assert [row["error_class"] or "ok" for row in rows] == ["ok"]
    # robots.txt is on by default: the host's robots.txt goes the same way as its image
    assert seen == (["/a.jpg", "/robots.txt"] if through else [])
