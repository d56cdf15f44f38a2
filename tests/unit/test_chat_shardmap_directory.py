"""A shard map builds its layouts' placement once (a ring is 160 hashes per shard, and `route` runs
for every persisted chat message), and a changed map builds its own."""

from __future__ import annotations

from mercato.shop.chat.shardmap import Layout, ShardMap


def test_route_reuses_the_current_and_target_directories() -> None:
    current = ShardMap.initial(["postgresql://a", "postgresql://b"])
    assert current.directory() is current.directory()
    moving = current.with_target(Layout(("s0", "s1", "s2")), add=("s2", "postgresql://c"))
    assert moving.directory() is moving.directory()
    assert moving.directory(moving.target) is moving.directory(moving.target)
    assert moving.directory() is not moving.directory(moving.target)
    assert moving.directory() is not current.directory()  # each map its own
    rooms = [f"room-{i}" for i in range(200)]
    assert [current.route(r).write for r in rooms] == [moving.route(r).write for r in rooms]
