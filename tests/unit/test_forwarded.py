"""Client-address resolution behind trusted proxies (kit/web/forwarded.py, ADR 0019)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mercato.config import NetworkSettings
from mercato.kit.web.forwarded import (
    FORWARDED,
    MAX_HOPS,
    X_FORWARDED_FOR,
    ForwardedHeader,
    TrustedProxies,
    forwarded_for_chain,
    parse_address,
    resolve_client_address,
)

TRUSTED = TrustedProxies.parse(["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"])

# Addresses inside and outside the trusted set above.
trusted_v4 = st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address((10 << 24) + n)))
trusted_v6 = st.integers(0, 2**96 - 1).map(lambda n: str(ipaddress.IPv6Address((0x20010DB8 << 96) + n)))
trusted_hosts = st.one_of(trusted_v4, trusted_v6, st.just("192.0.2.1"))
untrusted_hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(
    lambda a: parse_address(str(a)) not in TRUSTED
)
# What a client may put in the header itself: anything, including trusted addresses and garbage.
header_junk = st.lists(
    st.one_of(
        trusted_hosts,
        untrusted_hosts.map(str),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        st.sampled_from(["unknown", "_hidden", "", " ", "[::1", "1.2.3.4:99999", '"', ";", "for="]),
    ),
    max_size=8,
)


def _format(host: str, header: ForwardedHeader) -> str:
    if header == X_FORWARDED_FOR:
        return host
    address = ipaddress.ip_address(host)
    return f'for="[{host}]"' if address.version == 6 else f"for={host}"


@settings(max_examples=400)
@given(
    client=untrusted_hosts,
    proxies=st.lists(trusted_hosts, min_size=1, max_size=5),
    forged=header_junk,
    header=st.sampled_from([X_FORWARDED_FOR, FORWARDED]),
    split_lines=st.booleans(),
)
def test_a_client_cannot_choose_its_address_by_adding_entries(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    proxies: list[str],
    forged: list[str],
    header: ForwardedHeader,
    split_lines: bool,
) -> None:
    """client → proxies[0] → ... → proxies[-1] (the peer). Each proxy appends whom it saw; the client
    started the header with whatever it liked. The resolved address is the client's, always."""
    # The client's own text is one raw line (it may contain commas and quotes); each proxy appends.
    forged_line = ", ".join(forged)
    appended = [_format(str(client), header)] + [_format(p, header) for p in proxies[:-1]]
    lines = [forged_line, *appended] if split_lines else [", ".join([forged_line, *appended])]
    peer = proxies[-1]
    resolved = resolve_client_address(peer, lines, trusted=TRUSTED, header=header)
    assert resolved == str(parse_address(str(client)))


@given(peer=untrusted_hosts, lines=st.lists(st.text(max_size=80), max_size=4))
def test_an_untrusted_peer_is_the_client_whatever_the_headers(
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address, lines: list[str]
) -> None:
    for header in (X_FORWARDED_FOR, FORWARDED):
        assert resolve_client_address(str(peer), lines, trusted=TRUSTED, header=header) == str(
            parse_address(str(peer))
        )


@given(
    peer=st.one_of(trusted_hosts, untrusted_hosts.map(str), st.text(max_size=30)), lines=st.lists(st.text())
)
def test_arbitrary_input_never_raises_and_answers_an_address_or_the_peer(peer: str, lines: list[str]) -> None:
    for header in (X_FORWARDED_FOR, FORWARDED):
        resolved = resolve_client_address(peer, lines, trusted=TRUSTED, header=header)
        assert resolved == peer or parse_address(str(resolved)) is not None


def test_trust_nobody_by_default() -> None:
    nobody = TrustedProxies.parse(NetworkSettings().trusted_proxies)
    assert not nobody
    assert resolve_client_address("127.0.0.1", ["6.6.6.6"], trusted=nobody) == "127.0.0.1"


@pytest.mark.parametrize(
    ("peer", "lines", "expected"),
    [
        # The right-most untrusted hop, not the left-most (which the client wrote).
        ("10.0.0.1", ["1.1.1.1, 203.0.113.7"], "203.0.113.7"),
        ("10.0.0.1", ["1.1.1.1, 203.0.113.7, 10.0.0.9"], "203.0.113.7"),
        # Several header lines are one list.
        ("10.0.0.1", ["1.1.1.1", "203.0.113.7", "10.0.0.9"], "203.0.113.7"),
        # Ports and brackets are stripped; IPv4-mapped IPv6 is IPv4.
        ("10.0.0.1", ["203.0.113.7:5555"], "203.0.113.7"),
        ("10.0.0.1", ["[2001:db9::1]:443"], "2001:db9::1"),
        ("::ffff:10.0.0.1", ["::ffff:203.0.113.7"], "203.0.113.7"),
        # Garbage at a hop: stop at the trusted proxy that wrote it.
        ("10.0.0.1", ["203.0.113.7, not-an-ip, 10.0.0.9"], "10.0.0.9"),
        ("10.0.0.1", ["unknown"], "10.0.0.1"),
        ("10.0.0.1", [""], "10.0.0.1"),
        ("10.0.0.1", ["203.0.113.7:99999"], "10.0.0.1"),
        ("10.0.0.1", ["fe80::1%eth0"], "10.0.0.1"),
        # Everyone trusted: the request came from inside; the left-most is the origin.
        ("10.0.0.1", ["10.0.0.7, 10.0.0.8"], "10.0.0.7"),
        # Not an IP peer (a Unix socket, a test client): returned as is, headers ignored.
        ("testclient", ["203.0.113.7"], "testclient"),
        (None, ["203.0.113.7"], None),
    ],
)
def test_x_forwarded_for_cases(peer: str | None, lines: list[str], expected: str | None) -> None:
    assert resolve_client_address(peer, lines, trusted=TRUSTED) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["for=203.0.113.7;proto=https;by=10.0.0.1"], "203.0.113.7"),
        (['for="[2001:db9::17]:4711"'], "2001:db9::17"),
        (["for=1.1.1.1, for=203.0.113.7;proto=http", "for=10.0.0.9"], "203.0.113.7"),
        # A quoted comma in another parameter splits the element: coarser (the proxy), never forged.
        (['for=203.0.113.7;host="a,b"'], "10.0.0.1"),
        # RFC 7239 obfuscated identifiers and elements without `for` name nobody we can key on.
        (["for=_hidden, for=10.0.0.9"], "10.0.0.9"),
        (["proto=https"], "10.0.0.1"),
        (['for="unterminated'], "10.0.0.1"),
    ],
)
def test_forwarded_cases(lines: list[str], expected: str) -> None:
    assert resolve_client_address("10.0.0.1", lines, trusted=TRUSTED, header=FORWARDED) == expected


def test_the_header_the_proxies_do_not_write_is_ignored() -> None:
    """The proxy writes X-Forwarded-For; a `Forwarded` the client sent passes through untouched and
    must not be read: choosing the header is part of the trust configuration."""
    headers = {"x-forwarded-for": ["203.0.113.7"], "forwarded": ["for=6.6.6.6"]}
    resolved = resolve_client_address("10.0.0.1", headers["x-forwarded-for"], trusted=TRUSTED)
    assert resolved == "203.0.113.7"


def test_the_walk_is_bounded() -> None:
    chain = ", ".join(["203.0.113.7"] + [f"10.0.1.{i}" for i in range(MAX_HOPS + 10)])
    resolved = resolve_client_address("10.0.0.1", [chain], trusted=TRUSTED)
    assert resolved is not None
    assert parse_address(resolved) in TRUSTED


def test_an_unbalanced_quote_cannot_swallow_what_proxies_append() -> None:
    line = 'for="6.6.6.6, for=203.0.113.7'  # the client's text, then its proxy's element, one line
    assert forwarded_for_chain([line], FORWARDED) == ['"6.6.6.6', "203.0.113.7"]
    assert resolve_client_address("10.0.0.1", [line], trusted=TRUSTED, header=FORWARDED) == "203.0.113.7"


def test_trusted_proxies_refuse_a_typo() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        TrustedProxies.parse(["10.0.0.0/33"])


def test_settings_accept_a_comma_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mercato.config import Settings

    monkeypatch.setenv("MERCATO_NETWORK_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1")
    monkeypatch.setenv("MERCATO_NETWORK_FORWARDED_HEADER", "forwarded")
    network = Settings().network
    assert network.trusted_proxies == ["10.0.0.0/8", "192.0.2.1"]
    assert network.forwarded_header == "forwarded"


def test_settings_refuse_a_bad_proxy_entry() -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        NetworkSettings(trusted_proxies=["10.0.0.300"])
