"""The chat shard map: which PostgreSQL database holds a room's messages (ADR 0043, guide §17).

A `ShardMap` is a value: the shards (name -> URL, in the order they were added), the layout that owns
keys now (`current`: members + hot-room overrides, placed by `kit.partitioning`), and during a
rebalance the layout being moved to (`target`) with the rooms already switched to it. `route(room)`
answers where to read and write:

- no rebalance, or the room's owner does not change: read and write its owner;
- owner changes, not yet switched: read the old owner, write the old owner AND the new one (dual write);
- switched: read and write the new owner.

The map lives in the main database (`chat_shard_map`, one row with an epoch) and every process caches
it for `refresh_s`; a save is compare-and-set on the epoch, so two operators cannot both rebalance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from mercato.kit.partitioning import Algorithm, Directory, make_placement

__all__ = ["MAIN", "Layout", "Route", "ShardMap"]

MAIN = "main"  # the URL that means "the main database itself" (embedded mode: the only shard)


@dataclass(frozen=True)
class Layout:
    members: tuple[str, ...]
    overrides: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"members": list(self.members), "overrides": dict(self.overrides)}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Layout:
        return Layout(tuple(data["members"]), dict(data.get("overrides", {})))


@dataclass(frozen=True)
class Route:
    read: str
    write: str
    also: str | None = None  # the dual-write target while the room's move is in progress


@dataclass(frozen=True)
class ShardMap:
    epoch: int
    algorithm: Algorithm
    vnodes: int
    shards: tuple[tuple[str, str], ...]
    current: Layout
    target: Layout | None = None
    switched: frozenset[str] = frozenset()
    _directories: dict[str, Directory] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = {name for name, _ in self.shards}
        for layout in (self.current, self.target):
            if layout is None:
                continue
            unknown = (set(layout.members) | set(layout.overrides.values())) - names
            if unknown:
                raise ValueError(f"layout names unknown shards: {sorted(unknown)}")

    @staticmethod
    def initial(urls: Sequence[str], *, algorithm: Algorithm = "ring", vnodes: int = 160) -> ShardMap:
        """The map before anyone saved one: shards s0..sN-1 from the setting (none: the main DB)."""
        given = list(urls) or [MAIN]
        shards = tuple((f"s{i}", url) for i, url in enumerate(given))
        return ShardMap(0, algorithm, vnodes, shards, Layout(tuple(name for name, _ in shards)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shards)

    def url(self, name: str) -> str:
        return dict(self.shards)[name]

    def directory(self, layout: Layout | None = None) -> Directory:
        chosen = layout or self.current
        # The current and target layouts' directories are built once per map (a ring is 160 hashes
        # per shard; `route` runs for every persisted chat message).
        key = "current" if chosen is self.current else "target" if chosen is self.target else None
        cached = self._directories.get(key) if key else None
        if cached is None:
            cached = Directory(
                make_placement(self.algorithm, chosen.members, vnodes=self.vnodes), chosen.overrides
            )
            if key:
                self._directories[key] = cached
        return cached

    def route(self, room: str) -> Route:
        owner = self.directory().owner(room)
        if self.target is None:
            return Route(owner, owner)
        new = self.directory(self.target).owner(room)
        if new == owner:
            return Route(owner, owner)
        if room in self.switched:
            return Route(new, new)
        return Route(read=owner, write=owner, also=new)

    # -- changes (each returns the next epoch's map) ------------------------------------------------

    def with_target(self, target: Layout, *, add: tuple[str, str] | None = None) -> ShardMap:
        if self.target is not None:
            raise ValueError("a rebalance is already in progress")
        shards = self.shards + ((add,) if add else ())
        return replace(self, epoch=self.epoch + 1, shards=shards, target=target, switched=frozenset())

    def with_switched(self, rooms: set[str]) -> ShardMap:
        return replace(self, epoch=self.epoch + 1, switched=self.switched | rooms)

    def finished(self) -> ShardMap:
        if self.target is None:
            raise ValueError("no rebalance in progress")
        return replace(self, epoch=self.epoch + 1, current=self.target, target=None, switched=frozenset())

    # -- persistence ---------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "algorithm": self.algorithm,
                "vnodes": self.vnodes,
                "shards": [list(pair) for pair in self.shards],
                "current": self.current.as_json(),
                "target": self.target.as_json() if self.target else None,
                "switched": sorted(self.switched),
            }
        )

    @staticmethod
    def from_json(epoch: int, body: str) -> ShardMap:
        data = json.loads(body)
        return ShardMap(
            epoch=epoch,
            algorithm=cast(Algorithm, data["algorithm"]),
            vnodes=int(data["vnodes"]),
            shards=tuple((str(n), str(u)) for n, u in data["shards"]),
            current=Layout.from_json(data["current"]),
            target=Layout.from_json(data["target"]) if data.get("target") else None,
            switched=frozenset(data.get("switched", [])),
        )
