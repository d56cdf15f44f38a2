"""``mercato lab rebalance``: what adding a shard costs, per placement, and the online move itself.

Hypotheses (guide §17 "rebalancing: consistent hashing; move only affected shards"):

1. Going from N to N+1 shards, consistent hashing (160 virtual nodes), rendezvous and jump hash move
   about 1/(N+1) of the keys; mod-N moves about N/(N+1).
2. Under Zipf-distributed key popularity the hash spreads *keys* evenly but not *load*: the hottest
   key alone makes one shard the busiest; a directory override (the hot key pinned to the
   least-loaded shard) lowers the skew.
3. The online move (`mercato shards add`: copy, dual-write, verify under a fence, switch, clean up)
   under concurrent writes from two processes loses nothing and duplicates nothing; its duration and
   the write latency during it are measured (PostgreSQL databases made on the given server).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.kit.partitioning import Algorithm, Directory, loads, make_placement, plan_rebalance, skew
from mercato.lab.rebalance_online import OnlineMoveResult, run_online_move, scratch_databases

__all__ = ["MovedRow", "SkewRow", "moved_fractions", "rebalance_command", "zipf_skew"]

ALGORITHMS: tuple[Algorithm, ...] = ("mod", "ring", "rendezvous", "jump")


@dataclass(frozen=True)
class MovedRow:
    algorithm: str
    n: int
    keys: int
    moved: int
    fraction: float
    expected: float


@dataclass(frozen=True)
class SkewRow:
    algorithm: str
    shards: int
    key_skew: float
    load_skew: float
    load_skew_hot_pinned: float
    hottest_key_share: float


def _nodes(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def moved_fractions(ns: list[int], keys: int) -> list[MovedRow]:
    names = [f"room-{i}" for i in range(keys)]
    rows = []
    for n in ns:
        for algorithm in ALGORITHMS:
            plan = plan_rebalance(
                names, make_placement(algorithm, _nodes(n)), make_placement(algorithm, _nodes(n + 1))
            )
            expected = n / (n + 1) if algorithm == "mod" else 1 / (n + 1)
            rows.append(MovedRow(algorithm, n, keys, len(plan.moves), plan.moved_fraction, expected))
    return rows


def zipf_skew(shards: int, keys: int, exponent: float, seed: int = 7) -> list[SkewRow]:
    names = [f"room-{i}" for i in range(keys)]
    rng = random.Random(seed)
    rng.shuffle(names)  # popularity rank is independent of the name
    weights = {name: 1.0 / (rank + 1) ** exponent for rank, name in enumerate(names)}
    total = sum(weights.values())
    hottest = names[0]
    rows = []
    for algorithm in ALGORITHMS:
        placement = make_placement(algorithm, _nodes(shards))
        per = loads(names, placement, weights)
        # The directory pins the hot key to the shard least loaded without it.
        without = dict(per)
        without[placement.owner(hottest)] -= weights[hottest]
        pinned = Directory(placement, {hottest: min(without, key=lambda s: without[s])})
        rows.append(
            SkewRow(
                algorithm,
                shards,
                round(skew(loads(names, placement)), 3),
                round(skew(per), 3),
                round(skew(loads(names, pinned, weights)), 3),
                round(weights[hottest] / total, 4),
            )
        )
    return rows


async def _online(admin_dsn: str, rooms: int, rate_hz: float) -> OnlineMoveResult:
    async with scratch_databases(admin_dsn, "mercato_lab_rebalance", 3) as (main, s1, s2):
        return await run_online_move(
            main, [s1], s2, rooms=rooms, processes=2, rate_per_room_hz=rate_hz, warmup_s=2.0, cooldown_s=1.0
        )


def tables(moved: list[MovedRow], skews: list[SkewRow], online: OnlineMoveResult | None) -> list[Table]:
    t1 = Table(title="Keys moved going N -> N+1 shards")
    for col in ("N", "algorithm", "moved", "fraction", "claim"):
        t1.add_column(col, justify="right")
    for r in moved:
        t1.add_row(str(r.n), r.algorithm, str(r.moved), f"{r.fraction:.3f}", f"{r.expected:.3f}")
    t2 = Table(title=f"Skew (max/mean) over {skews[0].shards} shards, Zipf key popularity")
    for col in ("algorithm", "keys", "load", "load, hot key pinned", "hottest key share"):
        t2.add_column(col, justify="right")
    for s in skews:
        t2.add_row(
            s.algorithm,
            f"{s.key_skew:.3f}",
            f"{s.load_skew:.3f}",
            f"{s.load_skew_hot_pinned:.3f}",
            f"{s.hottest_key_share:.2%}",
        )
    out = [t1, t2]
    if online is not None:
        t3 = Table(
            title=f"Online add-shard {online.shards_before} -> {online.shards_before + 1}, writes continuing"
        )
        for col in ("phase", "writes", "p50 ms", "p99 ms", "max ms"):
            t3.add_column(col, justify="right")
        for phase, lat in online.latency_ms.items():
            t3.add_row(
                phase, str(int(lat["n"])), f"{lat['p50']:.1f}", f"{lat['p99']:.1f}", f"{lat['max']:.1f}"
            )
        out.append(t3)
    return out


def plot(moved: list[MovedRow], skews: list[SkewRow], online: OnlineMoveResult | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if online is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    ns = sorted({r.n for r in moved})
    width = 0.2
    for i, algorithm in enumerate(ALGORITHMS):
        values = [next(r.fraction for r in moved if r.n == n and r.algorithm == algorithm) for n in ns]
        axes[0].bar([j + (i - 1.5) * width for j in range(len(ns))], values, width, label=algorithm)
    axes[0].plot(range(len(ns)), [1 / (n + 1) for n in ns], "k_", markersize=30, label="1/(N+1)")
    axes[0].plot(range(len(ns)), [n / (n + 1) for n in ns], "r_", markersize=30, label="N/(N+1)")
    axes[0].set_xticks(range(len(ns)), [f"{n}->{n + 1}" for n in ns])
    axes[0].set_ylabel("share of keys moved")
    axes[0].set_title("Keys moved when adding a shard")
    axes[0].legend(fontsize=7)
    xs = range(len(skews))
    axes[1].bar([x - 0.2 for x in xs], [s.load_skew for s in skews], 0.4, label="Zipf load")
    axes[1].bar([x + 0.2 for x in xs], [s.load_skew_hot_pinned for s in skews], 0.4, label="hot key pinned")
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    axes[1].set_xticks(list(xs), [s.algorithm for s in skews])
    axes[1].set_ylabel("max / mean shard load")
    axes[1].set_title("Skew under Zipf popularity")
    axes[1].legend(fontsize=7)
    if online is not None:
        phases = list(online.latency_ms)
        axes[2].bar(
            [p + " p50" for p in phases], [online.latency_ms[p]["p50"] for p in phases], color="tab:blue"
        )
        axes[2].bar(
            [p + " p99" for p in phases], [online.latency_ms[p]["p99"] for p in phases], color="tab:red"
        )
        axes[2].set_ylabel("write latency, ms")
        axes[2].set_title(
            f"Online move: {online.report.duration_s:.1f} s, lost {online.lost}, dup {online.duplicated}"
        )
        axes[2].tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(moved: list[MovedRow], skews: list[SkewRow], online: OnlineMoveResult | None) -> list[str]:
    lines = []
    consistent = [r for r in moved if r.algorithm != "mod"]
    worst = max(consistent, key=lambda r: abs(r.fraction - r.expected) / r.expected)
    ok = all(abs(r.fraction - r.expected) <= 0.25 * r.expected for r in consistent)
    lines.append(
        f"claim 1/(N+1) for ring, rendezvous, jump: {'held' if ok else 'did not hold'} "
        f"(worst: {worst.algorithm} {worst.n}->{worst.n + 1} moved {worst.fraction:.3f} "
        f"vs {worst.expected:.3f})"
    )
    mods = [r for r in moved if r.algorithm == "mod"]
    ok_mod = all(abs(r.fraction - r.expected) <= 0.03 for r in mods)
    lines.append(
        f"claim N/(N+1) for mod-N: {'held' if ok_mod else 'did not hold'} ("
        + ", ".join(f"{r.n}->{r.n + 1}: {r.fraction:.3f}" for r in mods)
        + ")"
    )
    lowered = [s for s in skews if s.load_skew_hot_pinned < s.load_skew - 0.01]
    share = skews[0].hottest_key_share
    floor = share * skews[0].shards
    lines.append(
        f"Zipf: keys spread evenly (key skew <= {max(s.key_skew for s in skews):.2f}) but load skew reaches "
        f"{max(s.load_skew for s in skews):.2f}; pinning the hot key to the least-loaded shard lowered "
        f"it for "
        f"{len(lowered)}/{len(skews)} placements ("
        + ", ".join(f"{s.algorithm} {s.load_skew:.2f}->{s.load_skew_hot_pinned:.2f}" for s in skews)
        + f"); floor {floor:.2f}: the hottest key alone is {share:.1%} of the load, more than a shard's "
        f"fair share ({1 / skews[0].shards:.1%}), so only splitting that key could go lower"
    )
    if online is not None:
        safe = online.lost == 0 and online.duplicated == 0 and online.rooms_out_of_order == 0
        lines.append(
            f"online move: {'held' if safe else 'did not hold'}: {online.sent} writes acknowledged, "
            f"{online.stored} stored, lost {online.lost}, duplicated {online.duplicated}; moved "
            f"{online.report.moved_rooms}/{online.rooms} rooms (owner changes {online.owner_changes}) in "
            f"{online.report.duration_s:.2f} s; "
            f"write p99 {online.latency_ms['before']['p99']:.1f} ms before, "
            f"{online.latency_ms['during']['p99']:.1f} ms during"
        )
    return lines


def rebalance_command(
    keys: Annotated[
        int, typer.Option(min=1000, max=2_000_000, help="Keys for the placement counts")
    ] = 100_000,
    zipf_exponent: Annotated[
        float, typer.Option(min=0.1, max=3.0, help="Zipf exponent of key popularity")
    ] = 1.1,
    online: Annotated[bool, typer.Option(help="Also run the online move on PostgreSQL")] = True,
    pg_dsn: Annotated[
        str, typer.Option(help="PostgreSQL server where the lab makes (and drops) its databases")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    rooms: Annotated[int, typer.Option(min=4, max=5000, help="Rooms written during the online move")] = 60,
    rate_hz: Annotated[float, typer.Option(min=0.1, max=100, help="Writes per room per second")] = 1.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Keys moved N -> N+1 (mod-N vs ring vs rendezvous vs jump), skew under Zipf, the online move."""
    if update_docs:
        check_docs_target("rebalance")
    moved = moved_fractions([2, 4, 8, 16], keys)
    skews = zipf_skew(8, keys, zipf_exponent)
    result = asyncio.run(_online(pg_dsn, rooms, rate_hz)) if online else None
    rendered = tables(moved, skews, result)
    console = Console(width=180, stderr=as_json)
    for t in rendered:
        console.print(t)
    lines = verdict(moved, skews, result)
    for line in lines:
        console.print(line)
    data: dict[str, Any] = {
        "moved": [asdict(r) for r in moved],
        "skew": [asdict(s) for s in skews],
        "online": result.as_dict() if result else None,
        "verdict": lines,
    }
    if as_json:
        import json

        print(json.dumps(data, indent=2, default=str))
    run = RunFolder.open("rebalance", out)
    plot(moved, skews, result, run.figure)
    run.record(
        data=data, tables=rendered, verdict=lines, update_docs=update_docs, console=Console(stderr=True)
    )
