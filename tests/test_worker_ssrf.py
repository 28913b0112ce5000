"""The SSRF guard with the production resolver and the default policy.

A canary listener on loopback counts connections: every vector below must end in
``ssrf_blocked`` (or ``invalid_url`` for forms no URL parser accepts) while the canary
sees no connection at all.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
import trio

from pairfarm.outcomes import Outcome
from tests import hostile_server as hs
from worker.addresses import AddressPolicy, parse_cidrs, parse_numeric_host, refusal_class
from worker.batch import Network, open_stage
from worker.errors import FetchFailure, SSRFBlocked
from worker.settings import FetchSettings, PipelineSettings

SETTINGS = PipelineSettings(fetch=FetchSettings(deadline=10), decode_threads=1)

LOOPBACK_FORMS = [
    "127.0.0.1", "localhost", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7F.1",
    "0177.0.0.1", "017700000001", "127.000.000.001", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
    "[::127.0.0.1]", "[2002:7f00:1::1]", "[64:ff9b::7f00:1]", "[64:ff9b:1::7f00:1]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[::1]", "0.0.0.0", "0", "[::]",
]
OTHER_FORMS = [
    "169.254.169.254", "2852039166", "0xA9FEA9FE", "0251.0376.0251.0376", "169.254.43518",
    "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]", "[fd00:ec2::254]", "[fe80::1]",
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "100.127.255.254", "224.0.0.1",
    "[ff02::1]", "240.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.2.1", "[fc00::1]",
]


def _canary_hosts() -> list[str]:
    hosts = ["127.0.0.1"]
    if socket.has_ipv6:
        hosts.append("::1")
    return hosts


async def _fetch_all(hosts: list[str]) -> tuple[dict[str, Outcome], int]:
    outcomes: dict[str, Outcome] = {}
    async with trio.open_nursery() as nursery:
        canary = await hs.start_server(nursery, {"/": hs.route_ok(b"secret" * 2000)})
        extra = []
        for host in _canary_hosts()[1:]:
            try:
                extra.append(await nursery.start(hs.HostileServer({}, host=host,
                                                                  port=canary.port).run))
            except OSError:
                continue
        async with open_stage(SETTINGS, Network()) as stage:  # production resolver + dialer
            for host in hosts:
                try:
                    await stage.fetch(f"http://{host}:{canary.port}/latest/meta-data/")
                    outcomes[host] = Outcome.OK
                except FetchFailure as exc:
                    outcomes[host] = exc.outcome
        nursery.cancel_scope.cancel()
    return outcomes, canary.connections + sum(s.connections for s in extra)


def test_loopback_in_every_form_is_refused_before_connecting() -> None:
    outcomes, connections = trio.run(_fetch_all, LOOPBACK_FORMS)
    assert connections == 0
    assert outcomes == {host: Outcome.SSRF_BLOCKED for host in LOOPBACK_FORMS}


def test_metadata_private_and_special_ranges_are_refused() -> None:
    outcomes, connections = trio.run(_fetch_all, OTHER_FORMS)
    assert connections == 0
    assert outcomes == {host: Outcome.SSRF_BLOCKED for host in OTHER_FORMS}


def test_redirect_from_a_public_host_to_loopback_is_refused() -> None:
    async def main() -> tuple[Outcome, int, list[str]]:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            canary = await hs.start_server(nursery, {"/": hs.route_ok(b"secret" * 2000)})
            hops = {
                "/to-loopback": hs.route_redirect(f"http://127.0.0.1:{canary.port}/"),
                "/to-numeric": hs.route_redirect(f"http://2130706433:{canary.port}/"),
                "/to-metadata": hs.route_redirect("http://169.254.169.254/latest/"),
            }
            public = await hs.start_server(nursery, hops)
            results = []
            async with open_stage(SETTINGS, Network(resolver=dns, dialer=dialer)) as stage:
                for path in hops:
                    with pytest.raises(SSRFBlocked) as info:
                        await stage.fetch(public.url(path))
                    results.append(info.value.outcome)
            nursery.cancel_scope.cancel()
        assert set(results) == {Outcome.SSRF_BLOCKED}
        return results[0], canary.connections, [r.path for r in public.requests]

    outcome, connections, served = trio.run(main)
    assert outcome is Outcome.SSRF_BLOCKED and connections == 0
    assert served == ["/to-loopback", "/to-numeric", "/to-metadata"]


def test_a_name_resolving_to_a_private_address_is_refused_and_never_dialled() -> None:
    async def main() -> tuple[Outcome, int]:
        dns, dialer = hs.fake_network({"internal.example.test": "10.1.2.3",
                                       "meta.example.test": "169.254.169.254"})
        dns.table["mixed.example.test"] = [hs.PUBLIC_IP, ipaddress.ip_address("127.0.0.1")]
        async with open_stage(SETTINGS, Network(resolver=dns, dialer=dialer)) as stage:
            for host in ("internal.example.test", "meta.example.test", "mixed.example.test"):
                with pytest.raises(SSRFBlocked):
                    await stage.fetch(f"http://{host}/x.jpg")
        return Outcome.SSRF_BLOCKED, len(dialer.dialed)

    assert trio.run(main) == (Outcome.SSRF_BLOCKED, 0)


class RebindingDNS(hs.FakeDNS):
    """Public on the first lookup, loopback on every later one (a rebinding attack)."""

    async def resolve(self, host: str) -> list[hs.IPAddress]:
        self.lookups.append(host)
        await trio.lowlevel.checkpoint()
        if len(self.lookups) == 1:
            return [hs.PUBLIC_IP]
        return [ipaddress.ip_address("127.0.0.1")]


def test_dns_rebinding_cannot_move_the_connection() -> None:
    async def main() -> tuple[list[str], list[tuple[hs.IPAddress, int]]]:
        dns = RebindingDNS({})
        _, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, {"/a.jpg": hs.route_ok(hs.jpeg_bytes())})
            async with open_stage(SETTINGS, Network(resolver=dns, dialer=dialer)) as stage:
                for _ in range(3):  # Connection: close -> three connections, three dials
                    await stage.fetch(server.url("/a.jpg", "rebind.example.test"))
            nursery.cancel_scope.cancel()
        return dns.lookups, dialer.dialed

    lookups, dialed = trio.run(main)
    assert lookups == ["rebind.example.test"]  # one answer per batch, then the cache
    assert {address for address, _ in dialed} == {hs.PUBLIC_IP} and len(dialed) == 3


def test_allow_private_and_cidr_allow_list_are_explicit_opt_ins() -> None:
    loop = ipaddress.ip_address("127.0.0.1")
    meta = ipaddress.ip_address("169.254.169.254")
    with pytest.raises(SSRFBlocked):
        AddressPolicy().check(loop, "x")
    AddressPolicy(allow_private=True).check(loop, "x")
    with pytest.raises(SSRFBlocked):
        AddressPolicy(allow_private=True).check(meta, "x")
    AddressPolicy(allow_cidrs=parse_cidrs(["169.254.169.254/32"])).check(meta, "x")
    with pytest.raises(SSRFBlocked):
        AddressPolicy(allow_cidrs=parse_cidrs(["127.0.0.0/8"])).check(meta, "x")


def test_allow_private_lets_a_local_farm_fetch_from_loopback() -> None:
    settings = PipelineSettings(fetch=FetchSettings(policy=AddressPolicy(allow_private=True)))

    async def main() -> bytes:
        async with trio.open_nursery() as nursery:
            body = hs.route_ok(hs.JPEG_START + b"x" * 6000)  # a JPEG's first bytes: sniffed
            server = await hs.start_server(nursery, {"/a.jpg": body})
            async with open_stage(settings, Network()) as stage:
                fetched = await stage.fetch(f"http://127.0.0.1:{server.port}/a.jpg")
            nursery.cancel_scope.cancel()
        return fetched.body

    assert trio.run(main) == hs.JPEG_START + b"x" * 6000


@pytest.mark.parametrize(("host", "address"), [
    ("2852039166", "169.254.169.254"), ("0xA9FEA9FE", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"), ("169.254.43518", "169.254.169.254"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"), ("127.1", "127.0.0.1"),
    ("[::ffff:a9fe:a9fe]", "::ffff:a9fe:a9fe"), ("example.com", None),
    ("1.2.3.4.5", None), ("256.1.1.1", None), ("08.1.1.1", None), ("4294967296", None),
])
def test_numeric_host_forms(host: str, address: str | None) -> None:
    parsed = parse_numeric_host(host)
    assert (None if parsed is None else str(parsed)) == address


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "2002:a9fe:a9fe::", "::ffff:10.0.0.1",
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254
])
def test_python_is_global_is_not_trusted_for_embedded_ipv4(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert refusal_class(ip) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal_class(ipaddress.ip_address(address)) is None


#: One address in each block of the IANA IPv4 and IPv6 Special-Purpose Address Registries,
#: plus multicast, SIIT, site-local and the space outside 2000::/3.
SPECIAL_PURPOSE = [
    ("0.0.0.0/8", "0.1.2.3"), ("10.0.0.0/8", "10.9.8.7"), ("100.64.0.0/10", "100.100.1.1"),
    ("127.0.0.0/8", "127.8.9.10"), ("169.254.0.0/16", "169.254.1.1"),
    ("172.16.0.0/12", "172.31.0.1"), ("192.0.0.0/24", "192.0.0.9"),
    ("192.0.0.0/24", "192.0.0.170"), ("192.0.2.0/24", "192.0.2.77"),
    ("192.31.196.0/24", "192.31.196.1"), ("192.52.193.0/24", "192.52.193.1"),
    ("192.88.99.0/24", "192.88.99.1"), ("192.168.0.0/16", "192.168.77.1"),
    ("192.175.48.0/24", "192.175.48.6"), ("198.18.0.0/15", "198.19.255.1"),
    ("198.51.100.0/24", "198.51.100.5"), ("203.0.113.0/24", "203.0.113.9"),
    ("224.0.0.0/4", "239.1.2.3"), ("240.0.0.0/4", "250.1.2.3"),
    ("255.255.255.255/32", "255.255.255.255"),
    ("::/128", "::"), ("::1/128", "::1"), ("::ffff:0:0/96", "::ffff:10.1.2.3"),
    ("::ffff:0:0:0/96", "::ffff:0:7f00:1"), ("::ffff:0:0:0/96", "::ffff:0:808:808"),
    ("::/96", "::8.8.8.8"), ("64:ff9b::/96", "64:ff9b::10.0.0.1"),
    ("64:ff9b:1::/48", "64:ff9b:1::808:808"), ("100::/64", "100::1"),
    ("100:0:0:1::/64", "100:0:0:1::1"), ("2001::/23", "2001:1::1"),
    ("2001::/23", "2001:1::3"), ("2001::/32", "2001:0:808:808::1"),
    ("2001:2::/48", "2001:2::1"), ("2001:3::/32", "2001:3::1"),
    ("2001:4:112::/48", "2001:4:112::1"), ("2001:10::/28", "2001:10::1"),
    ("2001:20::/28", "2001:20::1"), ("2001:30::/28", "2001:30::1"),
    ("2001:db8::/32", "2001:db8::1"), ("2002::/16", "2002:a00:1::1"),
    ("2620:4f:8000::/48", "2620:4f:8000::1"), ("3fff::/20", "3fff:0fff::1"),
    ("5f00::/16", "5f00::1"), ("fc00::/7", "fd12:3456::1"), ("fe80::/10", "fe80::1"),
    ("fec0::/10", "fec0::1"), ("ff00::/8", "ff0e::1"),
    ("outside 2000::/3", "4000::1"), ("outside 2000::/3", "e000::1"),
]


@pytest.mark.parametrize(("block", "address"), SPECIAL_PURPOSE)
def test_every_special_purpose_block_is_refused_unless_allowed(block: str,
                                                               address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert refusal_class(ip) is not None, block
    with pytest.raises(SSRFBlocked):
        AddressPolicy().check(ip, address)
    AddressPolicy(allow_cidrs=parse_cidrs([f"{address}/{ip.max_prefixlen}"])).check(ip, "x")

