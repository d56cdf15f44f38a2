"""Free loopback ports for the servers a test, lab, bench or `mercato cluster` starts: chosen at run
time so parallel runs never collide on a fixed number, and never from the kernel's ephemeral range.

The kernel hands out its ephemeral ports (32768–60999 on Linux) as the source port of every
outgoing connection. A port it picked for us with `bind(0)` is free only until we close the probe
socket: any client (a connection to PostgreSQL, say) may take it before the server binds it —
`mercato up`'s simulator lost its port that way in CI, on a machine busy with other runs. Below
the range only other pickers compete, at random among ~15,000 ports, and a bound port is skipped.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["PICK_RANGE", "RESERVED_PORTS", "free_port"]

# The shared servers' and the engines' well-known ports: never handed out even when free.
RESERVED_PORTS = frozenset({2379, 2380, 4222, 5432, 6222, 6379, 8008, 8222})
PICK_RANGE = (15000, 30000)
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_ATTEMPTS = 500
_random = random.SystemRandom()


def free_port(
    host: str = "127.0.0.1", *, taken: set[int] | None = None, within: tuple[int, int] | None = None
) -> int:
    """A TCP port nobody listens on right now, in `within` (inclusive; default: `PICK_RANGE`, kept
    below the kernel's ephemeral range), never a reserved one nor one in `taken` (added to it)."""
    low, high = within if within is not None else _below_ephemeral()
    for _ in range(_ATTEMPTS):
        port = _random.randint(low, high)
        if port in RESERVED_PORTS or (taken is not None and port in taken):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        return port
    raise OSError(f"no free port in {low}-{high} after {_ATTEMPTS} tries")


def _below_ephemeral() -> tuple[int, int]:
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = min(PICK_RANGE[1], ephemeral_low - 1)
    low = max(1024, min(PICK_RANGE[0], high - 4096))
    return low, high
