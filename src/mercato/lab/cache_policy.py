"""``mercato lab cache-policy``: hit ratio against cache size for LRU, LFU and W-TinyLFU.

Hypothesis (guide §27, ADR 0035): under skewed (Zipf) traffic an admission-aware policy (W-TinyLFU)
keeps a higher hit ratio than LRU at the same byte budget, most of all when the cache is small and
when one-off scans pass through it; LFU does well on a static Zipf but never forgets.

The stores measured are the kit's own (`LruStore`, `TinyLfuStore`, bounded by bytes) and a
byte-bounded LFU written here as the reference. Keys have fixed, varied sizes (a log-normal around
1 KiB), so both the hit ratio and the byte hit ratio are reported. Workloads:

- ``zipf``: every request a Zipf(s) draw over the key space;
- ``zipf+scan``: the same, with 20 % of requests walking once through cold keys (a crawler, an
  export) that are never asked for again;
- ``zipf-shift``: halfway through, popularity is reshuffled (yesterday's best sellers are not
  today's): what a policy that never forgets pays for.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.kit.cache import ByteStore, LruStore, TinyLfuStore

__all__ = ["LfuStore", "PolicyPoint", "cache_policy_command", "run_experiment"]

SIZES_PERCENT = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0)


class LfuStore:
    """Least-frequently-used, bounded by bytes, O(1) per operation (frequency buckets of LRU order
    for ties). Counts never age: the reference for "frequency without forgetting"."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: dict[str, tuple[object, int, int]] = {}  # key -> (value, size, freq)
        self._buckets: dict[int, OrderedDict[str, None]] = {}
        self._min = 0
        self._bytes = 0

    def _touch(self, key: str) -> None:
        value, size, freq = self._items[key]
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]
            if self._min == freq:
                self._min = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None
        self._items[key] = (value, size, freq + 1)

    def get(self, key: str) -> object | None:
        if key not in self._items:
            return None
        self._touch(key)
        return self._items[key][0]

    def put(self, key: str, value: object, size: int) -> int:
        self.delete(key)
        if size > self.max_bytes:
            return 0
        evicted = 0
        while self._bytes + size > self.max_bytes and self._items:
            if self._min not in self._buckets:
                self._min = min(self._buckets)
            victim, _ = self._buckets[self._min].popitem(last=False)
            if not self._buckets[self._min]:
                del self._buckets[self._min]
            self._bytes -= self._items.pop(victim)[1]
            evicted += 1
        self._items[key] = (value, size, 1)
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1
        self._bytes += size
        return evicted

    def delete(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        bucket = self._buckets[item[2]]
        del bucket[key]
        if not bucket:
            del self._buckets[item[2]]
        self._bytes -= item[1]

    def clear(self) -> None:
        self.__init__(max_bytes=self.max_bytes)  # type: ignore[misc]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class PolicyPoint:
    workload: str
    policy: str
    size_percent: float
    max_bytes: int
    hit_ratio: float
    byte_hit_ratio: float
    seconds: float


def key_sizes(keys: int, rng: random.Random) -> list[int]:
    """Bytes per key: log-normal around 1 KiB, clipped to 128 B .. 32 KiB."""
    return [min(32768, max(128, int(rng.lognormvariate(6.9, 0.6)))) for _ in range(keys)]


def zipf_requests(keys: int, requests: int, *, s: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (rank**s) for rank in range(1, keys + 1)]
    cumulative = list(itertools.accumulate(weights))
    order = list(range(keys))
    rng.shuffle(order)  # popularity unrelated to key number (and so to size)
    return [order[i] for i in rng.choices(range(keys), cum_weights=cumulative, k=requests)]


def with_scans(trace: list[int], *, keys: int, share: float, rng: random.Random) -> list[int]:
    """Replace `share` of the requests by one pass over never-repeated cold keys (ids >= keys)."""
    scan = iter(range(keys, keys + len(trace)))
    out = []
    for key in trace:
        out.append(next(scan) if rng.random() < share else key)
    return out


POLICIES: dict[str, Callable[[int, int], ByteStore]] = {
    "LRU": lambda max_bytes, entries: LruStore(max_bytes=max_bytes),
    "LFU": lambda max_bytes, entries: LfuStore(max_bytes=max_bytes),
    "W-TinyLFU": lambda max_bytes, entries: TinyLfuStore(
        max_bytes=max_bytes, expected_entries=max(64, entries)
    ),
}


def replay(store: ByteStore, trace: list[int], sizes: Callable[[int], int]) -> tuple[float, float]:
    hits = hit_bytes = total_bytes = 0
    for key_id in trace:
        key = str(key_id)
        size = sizes(key_id)
        total_bytes += size
        if store.get(key) is not None:
            hits += 1
            hit_bytes += size
        else:
            store.put(key, key_id, size)
    return hits / len(trace), hit_bytes / total_bytes


def run_experiment(
    *, keys: int, requests: int, zipf_s: float, scan_share: float, seed: int
) -> Iterator[PolicyPoint]:
    rng = random.Random(seed)
    sizes_list = key_sizes(keys, rng)
    mean_size = sum(sizes_list) // len(sizes_list)

    def size_of(key_id: int) -> int:
        return sizes_list[key_id] if key_id < keys else sizes_list[key_id % keys]

    base = zipf_requests(keys, requests, s=zipf_s, rng=rng)
    half = requests // 2
    shifted = base[:half] + zipf_requests(keys, requests - half, s=zipf_s, rng=rng)
    workloads = {
        "zipf": base,
        "zipf+scan": with_scans(base, keys=keys, share=scan_share, rng=rng),
        "zipf-shift": shifted,
    }
    total = sum(sizes_list)
    for workload, trace in workloads.items():
        for percent in SIZES_PERCENT:
            max_bytes = max(1024, int(total * percent / 100))
            for name, build in POLICIES.items():
                started = time.perf_counter()
                hit, byte_hit = replay(build(max_bytes, max_bytes // mean_size), trace, size_of)
                yield PolicyPoint(
                    workload, name, percent, max_bytes, hit, byte_hit, time.perf_counter() - started
                )


def table(points: list[PolicyPoint]) -> Table:
    out = Table(title="Hit ratio (byte hit ratio) by cache size, % of the key space's bytes")
    out.add_column("workload")
    out.add_column("size %", justify="right")
    for name in POLICIES:
        out.add_column(name, justify="right")
    rows: dict[tuple[str, float], dict[str, PolicyPoint]] = {}
    for p in points:
        rows.setdefault((p.workload, p.size_percent), {})[p.policy] = p
    for (workload, percent), by_policy in rows.items():
        out.add_row(
            workload,
            f"{percent:g}",
            *(
                f"{by_policy[n].hit_ratio:.3f} ({by_policy[n].byte_hit_ratio:.3f})"
                for n in POLICIES
                if n in by_policy
            ),
        )
    return out


def plot(points: list[PolicyPoint], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(p.workload for p in points))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), sharey=True)
    for ax, workload in zip(axes if len(workloads) > 1 else [axes], workloads, strict=True):
        for name in POLICIES:
            series = [p for p in points if p.workload == workload and p.policy == name]
            ax.plot([p.size_percent for p in series], [p.hit_ratio for p in series], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("cache size, % of the key space's bytes")
        ax.set_title(workload)
        ax.grid(True, alpha=0.3)
    (axes[0] if len(workloads) > 1 else axes).set_ylabel("hit ratio")
    (axes[0] if len(workloads) > 1 else axes).legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def verdict(points: list[PolicyPoint]) -> list[str]:
    lines = []
    for workload in dict.fromkeys(p.workload for p in points):
        for percent in SIZES_PERCENT:
            by = {p.policy: p for p in points if p.workload == workload and p.size_percent == percent}
            gain = by["W-TinyLFU"].hit_ratio - by["LRU"].hit_ratio
            lines.append(
                f"{workload} at {percent:g} %: W-TinyLFU {by['W-TinyLFU'].hit_ratio:.3f} vs LRU "
                f"{by['LRU'].hit_ratio:.3f} ({gain:+.3f}), LFU {by['LFU'].hit_ratio:.3f}"
            )
    return lines


def cache_policy_command(
    keys: Annotated[int, typer.Option(min=100, max=10_000_000, help="Distinct keys")] = 50_000,
    requests: Annotated[int, typer.Option(min=1000, max=50_000_000, help="Requests per run")] = 300_000,
    zipf_s: Annotated[float, typer.Option(min=0.1, max=3.0, help="Zipf exponent")] = 0.9,
    scan_share: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of scan requests")] = 0.2,
    seed: Annotated[int, typer.Option(help="Traffic seed")] = 7,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Hit ratio vs cache size for LRU, LFU and W-TinyLFU under Zipf traffic (with and without scans)."""
    if update_docs:
        check_docs_target("cache-policy")
    points = list(
        run_experiment(keys=keys, requests=requests, zipf_s=zipf_s, scan_share=scan_share, seed=seed)
    )
    Console(width=160).print(table(points))
    run = RunFolder.open("cache-policy", out)
    plot(points, run.figure)
    run.record(
        data={
            "keys": keys,
            "requests": requests,
            "zipf_s": zipf_s,
            "scan_share": scan_share,
            "seed": seed,
            "points": [asdict(p) for p in points],
        },
        tables=[table(points)],
        verdict=verdict(points),
        update_docs=update_docs,
        console=Console(stderr=True),
    )
