"""Client addresses, minimized for logs.

An IP address identifies a subscriber, so a log line keeps only its network: the /24 of an IPv4
address and the /48 of an IPv6 one (the usual site allocation). That still groups the requests of one
abusive network for triage, and it is what log retention may keep; the exact address lives only where
the decision needs it (the rate limiter's short-lived keys).
"""

from __future__ import annotations

import ipaddress

__all__ = ["network_prefix"]

_IPV4_PREFIX = 24
_IPV6_PREFIX = 48


def network_prefix(address: str | None) -> str | None:
    """`203.0.113.7` -> `203.0.113.0/24`, `2001:db8:1:2::7` -> `2001:db8:1::/48`; None or a value that
    is not an IP address (a Unix socket path, a test client name) -> None, never the raw value."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = _IPV4_PREFIX if ip.version == 4 else _IPV6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
