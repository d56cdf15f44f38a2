"""Upcasters: turn an event written under an old schema version into the current one on read.

Consumers are written against the current version only; stored events (an outbox, a stream, an
event store) keep the bytes they were written with. Between the two sits a chain of pure
functions, one per step (v1 → v2, v2 → v3, ...), applied in order on read (the approach of
pyeventsourcing's upcasting). A missing step is an error, never a silent pass-through: a consumer
would otherwise get data shaped like an old version while believing it is the current one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["UpcastError", "Upcaster", "Upcasters"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class UpcastError(LookupError):
    """No upcaster chain leads from the stored version to the wanted one."""


class Upcasters:
    """A registry of single-step upcasters per event type."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: the function turns `from_version` data into `from_version + 1` data."""

        def add(fn: Upcaster) -> Upcaster:
            key = (event_type, from_version)
            if key in self._steps:
                raise ValueError(f"{event_type} v{from_version} already has an upcaster")
            self._steps[key] = fn
            return fn

        return add

    def steps(self) -> list[tuple[str, int]]:
        return sorted(self._steps)

    def upcast(
        self, event_type: str, version: int, data: Mapping[str, Any], *, to_version: int
    ) -> dict[str, Any]:
        """`data` (written under `version`) as `to_version` data. The input is never mutated."""
        if version > to_version:
            raise UpcastError(f"{event_type} v{version} is newer than v{to_version}: deploy readers first")
        current = copy.deepcopy(dict(data))
        for step in range(version, to_version):
            fn = self._steps.get((event_type, step))
            if fn is None:
                raise UpcastError(f"no upcaster for {event_type} v{step} -> v{step + 1}")
            current = fn(current)
        return current
