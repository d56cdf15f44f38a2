"""`free_port` never hands out a port from the kernel's ephemeral range (any outgoing connection
may take one of those before the server binds it: `mercato up`'s simulator lost its port in CI)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mercato.kit.ports import RESERVED_PORTS, free_port


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_come_from_below_the_ephemeral_range_and_bind() -> None:
    low = _ephemeral_low()
    for _ in range(200):
        port = free_port()
        assert 1024 <= port < low
        assert port not in RESERVED_PORTS
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_a_taken_or_listening_port_is_never_handed_out() -> None:
    taken: set[int] = set()
    picked = [free_port(taken=taken) for _ in range(50)]
    assert len(set(picked)) == 50
    assert taken == set(picked)
    with socket.socket() as listener:
        # Below the ephemeral range: no outgoing connection takes busy + 1 meanwhile.
        busy = free_port(within=(20000, 29000))
        listener.bind(("127.0.0.1", busy))
        listener.listen()
        assert all(free_port(within=(busy, busy + 1)) == busy + 1 for _ in range(20))


def test_an_exhausted_range_is_an_error_not_a_hang() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        with pytest.raises(OSError, match="no free port"):
            free_port(within=(busy, busy))
