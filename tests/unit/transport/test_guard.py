"""The SSRF guard: which addresses a dynamic app's upstream may be dialled to (pure rules + resolve)."""

from __future__ import annotations

import ipaddress

import pytest

from bastion.transport.guard import AddressGuard, ForbiddenAddressError, refused_range


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    "addr",
    ["127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::", "224.0.0.1",
     "ff02::1", "255.255.255.255", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "fd00:ec2::254"],
)  # fmt: skip
def test_special_ranges_refused_even_when_everything_is_allowed(addr: str) -> None:
    guard = AddressGuard.from_entries(["0.0.0.0/0", "::/0"])
    assert refused_range(ip(addr)) is not None
    why = guard.refusal(ip(addr), 80, by_name=True)
    assert why is not None and "allow it explicitly" in why


def test_a_specific_cidr_opens_a_special_range() -> None:
    guard = AddressGuard.from_entries(["127.0.0.1/32", "169.254.10.0/24"])
    assert guard.refusal(ip("127.0.0.1"), 8080, by_name=False) is None
    assert guard.refusal(ip("::ffff:127.0.0.1"), 8080, by_name=False) is None
    assert guard.refusal(ip("127.0.0.2"), 8080, by_name=False) is not None
    assert guard.refusal(ip("169.254.10.7"), 80, by_name=False) is None
    assert guard.refusal(ip("169.254.169.254"), 80, by_name=False) is not None


def test_empty_allow_list_allows_nothing_and_networks_or_names_allow() -> None:
    assert AddressGuard().refusal(ip("93.184.216.34"), 443, by_name=False) is not None
    guard = AddressGuard.from_entries(["10.0.0.0/8", "*.example.com", "mcp.example.org"])
    assert guard.refusal(ip("10.1.2.3"), 443, by_name=False) is None
    assert guard.refusal(ip("192.168.1.1"), 443, by_name=False) is not None
    assert guard.host_allowed("a.b.example.com")
    assert guard.host_allowed("MCP.example.org.")
    assert not guard.host_allowed("example.com")  # *.example.com names sub-domains only
    assert not guard.host_allowed("evil-example.com")
    # A name allowed by name still cannot reach a special range it resolves to.
    assert guard.refusal(ip("127.0.0.1"), 443, by_name=True) is not None
    assert guard.refusal(ip("93.184.216.34"), 443, by_name=True) is None


def test_own_listeners_are_never_dialled() -> None:
    guard = AddressGuard.from_entries(["10.0.0.0/8", "127.0.0.1/32"])
    guard.add_listener("10.0.0.5", 3080)
    guard.add_listener("0.0.0.0", 3434)
    assert "own listeners" in (guard.refusal(ip("10.0.0.5"), 3080, by_name=False) or "")
    assert guard.refusal(ip("10.0.0.6"), 3080, by_name=False) is None
    # A wildcard listener: any address of this host on that port, loopback included.
    assert guard.refusal(ip("10.0.0.9"), 3434, by_name=False, is_local=True) is not None
    assert guard.refusal(ip("127.0.0.1"), 3434, by_name=False) is not None
    assert guard.refusal(ip("10.0.0.9"), 3434, by_name=False, is_local=False) is None


async def test_resolve_checks_every_address_of_a_name() -> None:
    guard = AddressGuard.from_entries(["0.0.0.0/0"])
    with pytest.raises(ForbiddenAddressError, match=r"localhost \((127\.0\.0\.1|::1)\)"):
        await guard.resolve("localhost", 80)
    with pytest.raises(ForbiddenAddressError, match=r"169\.254\.169\.254"):
        await guard.resolve("169.254.169.254", 80)
    assert await AddressGuard.from_entries(["127.0.0.1/32"]).resolve("127.0.0.1", 80) == ["127.0.0.1"]


async def test_resolve_refuses_a_local_address_on_a_wildcard_listener_port() -> None:
    guard = AddressGuard.from_entries(["127.0.0.0/8"])
    guard.add_listener("0.0.0.0", 4321)
    with pytest.raises(ForbiddenAddressError, match="own listeners"):
        await guard.resolve("127.0.0.1", 4321)
    assert await guard.resolve("127.0.0.1", 4322) == ["127.0.0.1"]
