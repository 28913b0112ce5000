"""Which network addresses a worker may connect to: the SSRF guard's policy.

Workers run on cloud VMs where ``169.254.169.254`` hands out credentials and private
networks hold databases. A candidate URL comes from the open web, so by default the
worker connects only to *public* unicast addresses. Refused: every block of the IANA IPv4
and IPv6 Special-Purpose Address Registries (loopback, private, CGNAT, link-local,
documentation, benchmarking, AS112, AMT, ORCHID, SRv6 SIDs ``5f00::/16``, the IETF
protocol assignments ``192.0.0.0/24`` and ``2001::/23`` with Teredo inside, ...),
multicast, reserved space, the SIIT block ``::ffff:0:0:0/96``, and every IPv6 address
outside global unicast ``2000::/3``, including the deprecated IPv4-compatible ``::/96`` and
the local-use NAT64 ``64:ff9b:1::/48``. Three IPv6 forms route to the IPv4 address they
carry and are judged by it: IPv4-mapped ``::ffff:0:0/96``, 6to4 ``2002::/16`` and the
well-known NAT64 prefix ``64:ff9b::/96``.

Python's ``ipaddress.is_global`` is not enough on its own: in 3.11 it answers True for
``64:ff9b::a9fe:a9fe`` (NAT64 of the metadata address), ``2002:7f00:1::1`` (6to4 of
loopback), ``::ffff:0:7f00:1`` (SIIT) and ``5f00::1`` (SRv6), so the tables below are
checked first and the embedded IPv4 address is extracted and checked as well.

Numeric host forms that ``inet_aton`` accepts (``2852039166``, ``0xA9FEA9FE``,
``0251.0376.0251.0376``, ``127.1``) are parsed here too, so that they are judged as the
addresses they are and never sent to a resolver.

Opt-in for local farms and tests: ``allow_private`` lets loopback, private, CGNAT and
ULA addresses through (link-local, the metadata range, stays refused); ``allow_cidrs``
lets exactly the listed networks through, whatever they are.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from worker.errors import SettingsError, SSRFBlocked

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4_REFUSED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified / this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", "AS112 direct delegation"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
)

#: IPv6 blocks refused whatever they carry. The IPv4-carrying forms that route to the IPv4
#: address (mapped, 6to4, well-known NAT64) are not here: they are judged by it.
_V6_REFUSED: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("::ffff:0:0:0/96", "SIIT IPv4-translated"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy prefix"),
    ("2001::/32", "Teredo"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("2620:4f:8000::/48", "AS112 direct delegation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6 SIDs"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)

#: Classes that ``allow_private`` lets through. Link-local is never among them.
_PRIVATE_CLASSES = frozenset(
    {"private", "loopback", "carrier-grade NAT", "unique local (private)"}
)


def _nets(table: tuple[tuple[str, str], ...]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), label) for net, label in table)


_V4_NETS = _nets(_V4_REFUSED)
_V6_NETS = _nets(_V6_REFUSED)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4_COMPAT = ipaddress.ip_network("::/96")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _NAT64) or (
        address in _V4_COMPAT and int(address) > 1
    ):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal_class(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address, or None when it is."""
    if isinstance(address, ipaddress.IPv4Address):
        own = _lookup(address, _V4_NETS)
        return own if own is not None or address.is_global else "not globally routable"
    return _v6_refusal_class(address)


def _v6_refusal_class(address: ipaddress.IPv6Address) -> str | None:
    own = _lookup(address, _V6_NETS)
    if own is not None:
        return own
    inner = embedded_ipv4(address)
    if inner is not None:
        inner_class = refusal_class(inner)
        return None if inner_class is None else f"{inner_class} (IPv4 {inner} inside IPv6)"
    if address not in _GLOBAL_UNICAST:
        return "outside global unicast 2000::/3"
    return None if address.is_global else "not globally routable"


def _lookup(address: IPAddress, nets: tuple[tuple[IPNetwork, str], ...]) -> str | None:
    for net, label in nets:
        if address in net:
            return label
    return None


def parse_numeric_host(host: str) -> IPAddress | None:
    """The address a numeric host denotes, in every form ``inet_aton`` accepts, or None.

    ``2852039166``, ``0xA9FEA9FE``, ``0251.0376.0251.0376``, ``169.254.43518`` and
    ``[::ffff:a9fe:a9fe]`` all denote an address; ``example.com`` does not.
    """
    text = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    return _inet_aton(text)


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_c_number(part) for part in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        return None
    value = last
    for i, part in enumerate(head):
        value |= part << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _c_number(part: str) -> int | None:
    """A C integer literal as inet_aton reads it: 0x hex, leading-zero octal, decimal."""
    lowered = part.lower()
    try:
        if lowered.startswith("0x"):
            return int(lowered[2:] or "0", 16)
        if len(lowered) > 1 and lowered.startswith("0"):
            return int(lowered[1:], 8)
        return int(lowered, 10) if lowered.isdigit() else None
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True)
class AddressPolicy:
    """The SSRF guard's decision: which addresses the worker may connect to.

    The default refuses every non-public address; see the module docstring.
    """

    allow_private: bool = False
    allow_cidrs: tuple[IPNetwork, ...] = field(default=())

    def check(self, address: IPAddress, host: str) -> None:
        """Raise ``SSRFBlocked`` unless the worker may connect to ``address``."""
        if any(address in net for net in self.allow_cidrs):
            return
        reason = refusal_class(address)
        if reason is None:
            return
        if self.allow_private and reason in _PRIVATE_CLASSES:
            return
        raise SSRFBlocked(f"{host} -> {address}: {reason}")


def parse_cidrs(values: tuple[str, ...] | list[str]) -> tuple[IPNetwork, ...]:
    """Networks from ``10.0.0.0/8``-style strings; a bad one is a ``SettingsError``."""
    try:
        return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())
    except ValueError as exc:
        raise SettingsError(f"invalid CIDR in the allow-list: {exc}") from exc
