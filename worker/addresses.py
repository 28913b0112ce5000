"""Which network addresses a worker may connect to: the SSRF guard's policy.

Workers run on cloud VMs where ``169.254.169.254`` hands out credentials and private
networks hold databases. A candidate URL comes from the open web, so by default the
worker connects only to *public* unicast addresses. An address is refused when it is
loopback, private (RFC 1918, ULA), link-local, CGNAT (100.64.0.0/10), multicast,
reserved, unspecified, documentation or benchmarking space, or an IPv6 address that
hides a refused IPv4 address (IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible ``::/96``,
6to4 ``2002::/16``, Teredo ``2001::/32``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``).

Python's ``ipaddress.is_global`` is not enough on its own: in 3.11 it answers True for
``64:ff9b::a9fe:a9fe`` (NAT64 of the metadata address) and ``2002:7f00:1::1`` (6to4 of
loopback), so the embedded IPv4 address is extracted and checked as well.

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
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
)

_V6_REFUSED: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
    ("2001:10::/28", "ORCHID"),
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
        return _lookup(address, _V4_NETS)
    own = _lookup(address, _V6_NETS)
    if own is not None:
        return own
    inner = embedded_ipv4(address)
    if inner is not None:
        inner_class = _lookup(inner, _V4_NETS)
        return None if inner_class is None else f"{inner_class} (IPv4 {inner} inside IPv6)"
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
