"""`mercato bench realtime` end to end, small: both servers, the client processes on their sans-I/O
connections, every message delivered to every member of its room and timed."""

from __future__ import annotations

from pathlib import Path

from mercato.bench.realtime import run_realtime_bench


def test_every_message_reaches_every_member_of_its_room_on_both_servers(tmp_path: Path) -> None:
    connections, rooms = 40, 4
    results = run_realtime_bench(
        connections=connections,
        rooms=rooms,
        rate=20,
        seconds=2,
        workdir=tmp_path,
        database_url=None,
        client_processes=2,
    )
    by_server = {r.server: r for r in results}
    assert set(by_server) == {"mercato", "bare websockets"}
    for result in results:
        assert result.sent >= 30
        # Each room has connections / rooms members, every one of them a reader of every message.
        assert result.deliveries == result.sent * connections // rooms
        assert 0 < result.p50_ms <= result.p99_ms < 2000
        assert result.cpu_ms_per_1000 is not None
        assert result.cpu_ms_per_1000 > 0
