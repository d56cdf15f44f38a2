"""`bench realtime`'s round-trip count (MERCATO_BENCH_TRACE_DIR): the server's writes per peer."""

from __future__ import annotations

from mercato.bench.realtime_trace import count_writes


def test_writes_are_counted_per_peer_and_unknown_fds_are_other() -> None:
    lines = [
        '101 write(7, "\\0\\0\\0", 3) = 3',
        '101 sendto(9, "*3\\r\\n", 20, 0, NULL, 0) = 20',
        '102 writev(9, [{iov_base="x", iov_len=1}], 1) = 1',
        '101 write(12, "\\201\\5hello", 7) = 7',
        '101 write(2, "log", 3) = 3',
        "101 +++ exited with 0 +++",
    ]
    counts = count_writes(lines, {7: "postgresql", 9: "redis", 12: "client"})
    assert counts == {"postgresql": 1, "redis": 2, "client": 1, "other": 1}
