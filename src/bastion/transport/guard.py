"""Which network addresses an upstream connection may be dialled to (the SSRF guard).

An app created through the API (a *dynamic* app) names its upstream URL itself, so
without a guard anyone allowed to create an app could make the gateway connect to
what only the gateway can reach: its own diagnostics listener on loopback, a cloud
metadata service on a link-local address, a database on the private network.  An
:class:`AddressGuard` is the host's answer, built from the app service's
``dynamic_apps.upstream_networks``; apps from the host's own configuration file
are trusted and dialled without one.

Rules (docs/decisions/0014-upstream-address-policy.md):

1. The decision is taken on the address actually dialled: a name is resolved
   once, every address it resolves to is checked, and the connection goes to
   one of exactly those addresses.  A name that resolves differently a moment
   later (DNS rebinding) cannot slip past, because nothing is resolved again.
   A name with *any* refused address is refused as a whole.
2. Always refused, unless a network written in the allow-list is at least as
   specific as the refused range and contains the address (``127.0.0.1/32``
   opens loopback; ``0.0.0.0/0`` does not): unspecified, loopback, link-local
   (which holds ``169.254.169.254``, the cloud metadata service), multicast,
   reserved, broadcast, and the AWS IPv6 metadata address.
3. Never allowed: the gateway's own listeners (proxy, tunnel, diagnostics, auth),
   on any local address when they listen on a wildcard address.
4. Otherwise an address is allowed when an allow-list network contains it, or
   when the URL's host name matches an allowed name (``mcp.example.com`` or
   ``*.example.com``).  An empty allow-list allows nothing.

IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged as the IPv4
address they carry.  The pure part is :meth:`AddressGuard.refusal`;
:meth:`AddressGuard.resolve` adds the name lookup and the local-address test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bastion.errors import UpstreamError

__all__ = ["AddressGuard", "ForbiddenAddressError", "refused_range"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Ranges refused unless opened explicitly (rule 2), with the name shown in refusals.
_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (cloud metadata lives here)"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved or broadcast address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fe80::/10", "a link-local address"),
        ("ff00::/8", "a multicast address"),
        ("fd00:ec2::254/128", "the cloud metadata address"),
    )
)


class ForbiddenAddressError(UpstreamError):
    """The upstream's address is not one this host lets a dynamic app reach.

    The app's creator chose the address, so this is not the upstream's failure; it
    is reported like an unreachable upstream (502) with the reason, and the app's
    creator fixes the app or the host's operator widens ``upstream_networks``.
    """

    http_status = 502
    code = "upstream_forbidden"


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def refused_range(ip: IPAddress) -> tuple[IPNetwork, str] | None:
    """The always-refused range holding ``ip`` (rule 2), or ``None``."""
    ip = _plain(ip)
    for net, why in _REFUSED:
        if ip.version == net.version and ip in net:
            return net, why
    return None


def _name_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass
class AddressGuard:
    """The allow-list for dynamic apps' upstream addresses; see the module docstring."""

    networks: tuple[IPNetwork, ...] = ()
    #: Host names (lower case), exact or ``*.domain``.
    names: tuple[str, ...] = ()
    #: The gateway's own listeners: ``(address, port)``; a wildcard address means every local one.
    listeners: set[tuple[IPAddress, int]] = field(default_factory=set)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> AddressGuard:
        """Entries as validated by the configuration: CIDRs, addresses or host names."""
        networks: list[IPNetwork] = []
        names: list[str] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.append(entry.lower().rstrip("."))
        return cls(tuple(networks), tuple(names))

    def add_listener(self, host: str, port: int) -> None:
        """Record one of the gateway's own listening sockets (rule 3)."""
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            addr = ipaddress.ip_address("0.0.0.0")  # a name: treat as every local address
        self.listeners.add((_plain(addr), port))

    def host_allowed(self, host: str) -> bool:
        """Whether the URL's host name is on the allow-list by name (rule 4)."""
        host = host.lower().rstrip(".")
        return any(_name_matches(p, host) for p in self.names)

    def refusal(self, ip: IPAddress, port: int, *, by_name: bool, is_local: bool = False) -> str | None:
        """Why ``ip:port`` may not be dialled, or ``None``; pure.

        ``by_name``: the URL's host name is allowed by name.  ``is_local``: ``ip``
        is an address of this host (only consulted for a listener's port).
        """
        ip = _plain(ip)
        for addr, lport in self.listeners:
            if lport == port and (ip == addr or (addr.is_unspecified and (is_local or ip.is_loopback))):
                return "it is one of the gateway's own listeners"
        special = refused_range(ip)
        if special is not None:
            net, why = special
            if any(ip in n and n.prefixlen >= net.prefixlen for n in self._same(ip)):
                return None
            return f"it is {why}; allow it explicitly in upstream_networks (e.g. {ip}/{ip.max_prefixlen})"
        if by_name or any(ip in n for n in self._same(ip)):
            return None
        return "it is not in app_service.dynamic_apps.upstream_networks"

    def _same(self, ip: IPAddress) -> Iterable[IPNetwork]:
        return (n for n in self.networks if n.version == ip.version)

    def _needs_local_test(self, ip: IPAddress, port: int) -> bool:
        return any(lport == port and addr.is_unspecified for addr, lport in self.listeners)

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to dial for ``host:port``, every one of them allowed.

        Raises :class:`ForbiddenAddressError` naming the first refused address
        and why, or ``UpstreamError`` when the name does not resolve.
        """
        by_name = self.host_allowed(host)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            addresses: Sequence[str] = [str(literal)]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise UpstreamError(f"cannot resolve {host[:255]!r}: {e.strerror}") from None
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise UpstreamError(f"cannot resolve {host[:255]!r}: no addresses")
        for text in addresses:
            ip = ipaddress.ip_address(text.partition("%")[0])
            local = self._needs_local_test(ip, port) and _is_local(ip)
            why = self.refusal(ip, port, by_name=by_name, is_local=local)
            if why is not None:
                name = host if len(host) <= 255 else host[:255] + "..."  # bounded: an app's URI
                shown = name if literal is not None else f"{name} ({ip})"
                raise ForbiddenAddressError(
                    f"refusing to connect a dynamic app to {shown} port {port}: {why}"
                )
        return list(addresses)


def _is_local(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this host (binding to it succeeds)."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(ip), 0))
        except OSError:
            return False
    return True
