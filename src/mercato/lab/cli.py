"""`mercato lab <experiment>`: each command runs one experiment and prints/plots its result.

`LABS` is the catalogue: every experiment is registered here once, with the guide's claim it tests
(and the guide section), so `mercato lab list`, the console's Lab page and the docs read one list.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import RESULTS_ROOT, latest_result
from mercato.lab.balancing_cli import balancing_command
from mercato.lab.breaker_cli import breaker_command
from mercato.lab.cache_policy import cache_policy_command
from mercato.lab.canary import canary_command
from mercato.lab.chaos_cli import chaos_command
from mercato.lab.delivery import delivery_command
from mercato.lab.failover_cli import failover_command, restore_command
from mercato.lab.leader import leader_command
from mercato.lab.network_cli import network_command
from mercato.lab.outage import outage_command
from mercato.lab.outage_report import CLAIM as OUTAGE_CLAIM
from mercato.lab.overload import overload_command
from mercato.lab.partition import partition_command
from mercato.lab.ratelimit import ratelimit_command
from mercato.lab.rebalance import rebalance_command
from mercato.lab.slow_consumer import slow_consumer_command
from mercato.lab.stampede import stampede_command

__all__ = ["LABS", "Lab", "app", "catalogue"]


@dataclass(frozen=True, slots=True)
class Lab:
    name: str
    guide: str  # the guide's section(s), e.g. "§1"
    claim: str
    command: Callable[..., Any]


LABS: tuple[Lab, ...] = (
    Lab(
        "balancing",
        "§30",
        "with one instance slow, least-loaded choices (least connections, least outstanding, power of "
        "two choices) keep p99 near the healthy instances'; round robin does not",
        balancing_command,
    ),
    Lab(
        "breaker",
        "§1",
        "during a dependency outage a circuit breaker with a retry budget fails fast and recovers by "
        "itself, where plain retries multiply the load and stretch every caller's latency",
        breaker_command,
    ),
    Lab(
        "cache-policy",
        "§27",
        "at the same cache size W-TinyLFU keeps a higher hit ratio than LRU and LFU on skewed and "
        "shifting workloads",
        cache_policy_command,
    ),
    Lab(
        "canary",
        "§16",
        "a canary ramp gated on the SLO promotes a healthy release to 100 % and rolls a bad one back "
        "automatically, after few requests saw it and little error budget was spent",
        canary_command,
    ),
    Lab(
        "chaos",
        "§2, §36",
        "a saga of idempotent steps survives faults and a worker killed at random: no double charge, no "
        "lost or leaked stock, every checkout terminal within its deadline",
        chaos_command,
    ),
    Lab(
        "delivery",
        "§21",
        "at-least-once delivery with an inbox is effectively once: duplicates arrive, none is applied "
        "twice and none is lost",
        delivery_command,
    ),
    Lab(
        "failover",
        "§15, §38",
        "SIGKILL of the primary under checkout load: a replica is promoted within seconds, with no "
        "committed checkout lost (synchronous replication) and no double capture",
        failover_command,
    ),
    Lab(
        "rebalance",
        "§17",
        "going from N to N+1 shards, consistent hashing, rendezvous and jump hash move about 1/(N+1) of "
        "the keys where mod-N moves about N/(N+1); an online move loses and duplicates nothing",
        rebalance_command,
    ),
    Lab(
        "restore",
        "§24",
        "point-in-time recovery from backups brings back exactly the rows committed before T",
        restore_command,
    ),
    Lab(
        "leader",
        "§7",
        "a leader paused past its lease is replaced, and its late writes are refused by the fencing token "
        "checked in the database: a singleton job runs once per period",
        leader_command,
    ),
    Lab(
        "network",
        "§28",
        "connection reuse saves a handshake per request: keep-alive the TCP (and TLS) setup, HTTP/2 the "
        "connection per concurrent request",
        network_command,
    ),
    Lab("outage", "§8, §1", OUTAGE_CLAIM, outage_command),
    Lab(
        "overload",
        "§33",
        "when offered load exceeds capacity, load shedding keeps goodput up and the admitted requests' "
        "latency bounded",
        overload_command,
    ),
    Lab(
        "partition",
        "§34",
        "cut off from the primary, CP operations (checkout, stock, payments) answer 503 within a second "
        "while AP reads keep serving with an explicit staleness; after healing everything converges",
        partition_command,
    ),
    Lab(
        "ratelimit",
        "§11",
        "under the same bursty traffic the five algorithms differ as the guide says: the token bucket "
        "admits bursts, the windows bound them, the sliding log is exact at a memory cost",
        ratelimit_command,
    ),
    Lab(
        "slow-consumer",
        "§23, §33",
        "bounded per-connection buffers cut off clients that stop reading, without memory growth or "
        "harm to the healthy clients' latency",
        slow_consumer_command,
    ),
    Lab(
        "stampede",
        "§26, §27",
        "request coalescing and early refresh turn a hot key's expiry under 1,000 requests into one "
        "origin load",
        stampede_command,
    ),
)

app = typer.Typer(help="Experiments that measure the guide's claims.", no_args_is_help=True)
for _lab in LABS:
    app.command(_lab.name)(_lab.command)


def catalogue(*, root: Path = RESULTS_ROOT) -> list[dict[str, Any]]:
    """Every lab with its claim and its latest result under `root` (None when it never ran here)."""
    return [
        {
            "name": lab.name,
            "guide": lab.guide,
            "claim": lab.claim,
            "latest": latest_result(lab.name, root=root),
        }
        for lab in LABS
    ]


def _verdict(latest: dict[str, Any] | None) -> str:
    if latest is None:
        return "never run"
    held = latest.get("held")
    word = "held" if held is True else "did not hold" if held is False else "not judged"
    return f"{word} ({latest.get('run', '?')})"


@app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalogue as JSON")] = False,
    results: Annotated[
        Path, typer.Option(file_okay=False, help="Where the run folders are (default ./lab-results)")
    ] = RESULTS_ROOT,
) -> None:
    """Every experiment, the guide's claim it tests, and its latest result in ./lab-results."""
    entries = catalogue(root=results)
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    table = Table(title=f"mercato lab: {len(entries)} experiments (results from {results}/)", show_lines=True)
    table.add_column("lab", no_wrap=True)
    table.add_column("guide", no_wrap=True)
    table.add_column("claim it tests", max_width=70, overflow="fold")
    table.add_column("latest result", max_width=80, overflow="fold")
    for entry in entries:
        latest = entry["latest"]
        detail = _verdict(latest)
        if latest is not None and latest.get("verdict"):
            detail += "\n" + "\n".join(str(line) for line in latest["verdict"][:4])
        table.add_row(entry["name"], entry["guide"], entry["claim"], detail)
    Console(width=200).print(table)
