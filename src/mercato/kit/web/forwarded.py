"""Which address is the client's, when reverse proxies stand between it and us (ADR 0019).

Each proxy appends the address of whoever connected to it to `X-Forwarded-For` (or adds a `for=`
element to RFC 7239 `Forwarded`). Only entries appended by a proxy we trust can be believed, and we
know a proxy is trusted only by its address. So the walk starts at the socket peer and goes right to
left: while the address at hand is a trusted proxy, the entry to its left is what that proxy saw and is
believed; the first address that is not a trusted proxy is the client. Anything a client writes into
the header itself lies to the left of its own address, which its first proxy appended, so it is never
reached.

    >>> trusted = TrustedProxies.parse(["10.0.0.0/8"])
    >>> resolve_client_address("10.0.0.2", ["6.6.6.6, 203.0.113.7, 10.0.0.1"], trusted=trusted)
    '203.0.113.7'
    >>> resolve_client_address("203.0.113.9", ["1.2.3.4"], trusted=trusted)  # peer not trusted
    '203.0.113.9'

Malformed input never raises: an entry that is not an address (garbage, `unknown`, an RFC 7239
obfuscated `_hidden` name) ends the walk at the last address known to be right, which is a trusted
proxy's; that is coarser (everyone behind that proxy shares it) but can never be chosen by a client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FORWARDED",
    "MAX_HOPS",
    "X_FORWARDED_FOR",
    "ForwardedHeader",
    "TrustedProxies",
    "forwarded_for_chain",
    "parse_address",
    "resolve_client_address",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]
X_FORWARDED_FOR: ForwardedHeader = "x-forwarded-for"
FORWARDED: ForwardedHeader = "forwarded"
# More trusted hops than this is a misconfiguration or an attack; the walk stops there (bounded work).
MAX_HOPS = 32
# Longer than any address with a port; longer entries are garbage and are not parsed.
_MAX_ENTRY_CHARS = 64


def parse_address(value: str) -> IPAddress | None:
    """An address from a header entry or socket peer: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `::1`, or None.

    IPv4-mapped IPv6 (`::ffff:1.2.3.4`, what a dual-stack socket reports) becomes the IPv4 address, so one
    client has one spelling and one rate-limit key.
    """
    text = value.strip().strip('"').strip()
    if not text or len(text) > _MAX_ENTRY_CHARS:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or (text[end + 1 :] and not _is_port(text[end + 1 :])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
        text = host
    if "%" in text:  # a zone id (fe80::1%eth0) names an interface of the sender, not a client
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    digits = text[1:]
    return (
        text[:1] == ":"
        and 1 <= len(digits) <= 5
        and digits.isascii()
        and digits.isdigit()
        and int(digits) <= 65535
    )


@dataclass(frozen=True)
class TrustedProxies:
    """The addresses whose forwarding headers we believe. Empty (the default) trusts nobody.

    IPv4 networks also cover the IPv4-mapped IPv6 spelling a dual-stack socket reports, because
    `parse_address` maps those back to IPv4 before asking.
    """

    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> TrustedProxies:
        """Addresses or CIDRs (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`); a malformed one raises ValueError,
        because a typo here silently trusting nobody (or everybody) is worse than refusing to start."""
        networks: list[IPNetwork] = []
        for entry in entries:
            text = entry.strip()
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an IP address or CIDR: {entry!r}") from exc
            networks.append(network)
        return cls(tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return any(address.version == net.version and address in net for net in self.networks)


def forwarded_for_chain(values: Sequence[str], header: ForwardedHeader) -> list[str]:
    """The hops named by every line of `header`, left (the first proxy's client) to right (the last hop).

    Several header lines are one list in order (RFC 9110 §5.3). For `Forwarded`, each element's `for=`
    parameter is the hop; an element without one is a hop we cannot name (an empty string).
    """
    hops: list[str] = []
    for value in values:
        for element in _split_list(value):
            if header == X_FORWARDED_FOR:
                hops.append(element.strip())
            else:
                hops.append(_forwarded_for(element))
    return hops


def _split_list(value: str) -> list[str]:
    """Comma-separated elements, split on every comma, quotes or not.

    RFC 7239 allows a quoted comma inside a parameter, but no node name contains one; honouring quotes
    would let a client's unbalanced `"` swallow the entries proxies append after it (they append to the
    same line). A legitimately quoted comma only makes a fragment with no `for=`, which stops the walk
    at a trusted proxy: coarser, never forgeable.
    """
    return value.split(",")


def _forwarded_for(element: str) -> str:
    for pair in element.split(";"):
        name, sep, value = pair.partition("=")
        if sep and name.strip().lower() == "for":
            return value.strip()
    return ""


def resolve_client_address(
    peer: str | None,
    forwarded: Sequence[str],
    *,
    trusted: TrustedProxies,
    header: ForwardedHeader = X_FORWARDED_FOR,
) -> str | None:
    """The client's address: the right-most hop that is not a trusted proxy, walked from the peer.

    - `peer` is the socket peer (the ASGI `client` host); `forwarded` every line of `header`.
    - The peer not trusted (or not an address): the peer, whatever the headers say.
    - A hop that is not an address: the last trusted address (see the module docstring).
    - Every hop trusted: the left-most one (the request came from inside).

    Returns the canonical spelling (`::ffff:1.2.3.4` → `1.2.3.4`); a peer that is not an IP address
    (a Unix socket, a test client's name) is returned as is.
    """
    peer_address = parse_address(peer) if peer is not None else None
    if peer_address is None:
        return peer
    if peer_address not in trusted or not forwarded:
        return str(peer_address)
    current = peer_address
    hops = forwarded_for_chain(forwarded, header)
    for steps, hop in enumerate(reversed(hops)):
        if steps >= MAX_HOPS:
            break
        address = parse_address(hop)
        if address is None:
            break  # the trusted proxy at `current` wrote something we cannot use: stop at it
        current = address
        if address not in trusted:
            break
    return str(current)
