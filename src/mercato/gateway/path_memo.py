"""What an edge step decides from a request's path alone, remembered per path (ADR 0068).

Shedding's class and the edge cache's marker depend only on the method and path, so each is worked
out once per path instead of by regular expressions on every request. Paths carry ids, so a memo is
bounded: emptied when full (one decision per path again), and a path longer than `PATH_MAX` is
decided each time (a few thousand of them are not worth the memory).
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["MEMO_SIZE", "PATH_MAX", "remember"]

MEMO_SIZE = 4096
PATH_MAX = 256

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, path: str, value: V) -> V:
    """`value`, kept in `memo` under `key` unless `path` is too long to be worth keeping."""
    if len(path) <= PATH_MAX:
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[key] = value
    return value
