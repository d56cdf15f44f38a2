"""Log lines keep a client's network, never its address."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from mercato.kit.privacy import network_prefix


def test_ipv4_keeps_the_slash_24_and_ipv6_the_slash_48() -> None:
    assert network_prefix("203.0.113.7") == "203.0.113.0/24"
    assert network_prefix("2001:db8:1:2::7") == "2001:db8:1::/48"
    assert network_prefix("::ffff:198.51.100.9") == "198.51.100.0/24"


def test_what_is_not_an_address_is_dropped_not_logged_raw() -> None:
    assert network_prefix(None) is None
    assert network_prefix("") is None
    assert network_prefix("testclient") is None
    assert network_prefix("/run/mercato.sock") is None


@given(st.ip_addresses())
def test_the_prefix_contains_the_address_and_hides_its_host_part(ip: ipaddress.IPv4Address) -> None:
    prefix = network_prefix(str(ip))
    assert prefix is not None
    network = ipaddress.ip_network(prefix)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert mapped in network
    assert network.prefixlen == (24 if mapped.version == 4 else 48)
