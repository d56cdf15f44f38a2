"""``mercato bench checkout --vs dbos``: the same six-step checkout on DBOS Transact, side by side.

After the Mercato steps, the same rate ladder runs through `mercato.bench.dbos_app` (one process
running DBOS, started here) against two fresh simulator processes (``mercato provider psp`` and
``mercato provider carrier``, as the Mercato side's) and a database of its own on the same
PostgreSQL server (``<Mercato's database>_dbos_<random>``, created and dropped here). ``dbos`` is
the optional ``bench`` extra: this module never imports it; `require_dbos` says how to install it
when it is missing. What each side does beyond the six steps is `BEYOND`, printed with the verdict
and kept in the run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from rich.table import Table
from sqlalchemy.engine import make_url

from mercato.bench.checkout_report import LOAD_GENERATOR, MACHINE, POSTGRESQL, CheckoutStep
from mercato.bench.servers import _clean_env, _pg_execute, start_simulators

INSTALL_HINT = "pip install 'mercato[bench]' (or: pip install dbos)"

BEYOND = {
    "mercato": (
        "HTTP API in front (auth bearer, idempotency key, rate/limit/deadline middlewares, problem+json), "
        "cart and catalog reads, the order + saga rows, the outbox (events for every step) and its relay, "
        "compensations (release stock, void, cancel shipment, refund), step deadlines and retries with "
        "backoff, a separate worker process claiming sagas from the database"
    ),
    "dbos": (
        "workflow + step checkpoints in its system tables (durable resume after a crash), in-process "
        "start (no HTTP front door, no auth), no outbox/events, no compensations (a failed step fails "
        "the workflow), no deadlines; provider idempotency keys from the workflow id, as ours"
    ),
}


class DbosMissing(RuntimeError):
    """The ``bench`` extra is not installed."""


def require_dbos() -> None:
    if importlib.util.find_spec("dbos") is None:
        raise DbosMissing(f"--vs dbos needs DBOS Transact, the optional 'bench' extra: {INSTALL_HINT}")


def dbos_database_url(mercato_url: str | None) -> tuple[str, str, str]:
    """(admin DSN, database name, DBOS URL) on the PostgreSQL server of ``mercato_url``."""
    if mercato_url is None or make_url(mercato_url).get_backend_name() != "postgresql":
        raise ValueError("--vs dbos runs on PostgreSQL: pass --database-url postgresql+asyncpg://…")
    url = make_url(mercato_url)
    # Named after the Mercato side's database, so a session sharing the server keeps its prefix.
    name = f"{(url.database or 'hdb')[:40]}_dbos_{secrets.token_hex(4)}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    target = url.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
    return admin, name, target


@dataclass(frozen=True)
class DbosPlan:
    rates: tuple[float, ...]
    duration_s: float
    warmup_s: float
    drain_s: float
    stop_when_saturated: bool = True
    skus: int = 400
    timeout_s: float = 600.0


def run_dbos_side(plan: DbosPlan, mercato_url: str | None) -> dict[str, Any]:
    """Run the ladder on DBOS; the app's report (``steps``, ``dbos_version``)."""
    require_dbos()
    admin, name, url = dbos_database_url(mercato_url)
    try:
        asyncio.run(_pg_execute(admin, f'CREATE DATABASE "{name}"'))
    except asyncpg.PostgresError as exc:
        raise RuntimeError(f"could not create the DBOS side's database {name}: {exc}") from exc
    try:
        with tempfile.TemporaryDirectory(prefix="mercato-bench-dbos-") as tmp:
            workdir = Path(tmp)
            providers = start_simulators(workdir)
            try:
                plan_path, result_path = workdir / "plan.json", workdir / "result.json"
                plan_path.write_text(
                    json.dumps(
                        {
                            "database_url": url,
                            "psp_url": providers[0].base_url,
                            "carrier_url": providers[1].base_url,
                            "provider_pids": [p.proc.pid for p in providers],
                            "rates": list(plan.rates),
                            "duration_s": plan.duration_s,
                            "warmup_s": plan.warmup_s,
                            "drain_s": plan.drain_s,
                            "stop_when_saturated": plan.stop_when_saturated,
                            "skus": plan.skus,
                        }
                    ),
                    encoding="utf-8",
                )
                log = workdir / "dbos.log"
                started = time.monotonic()
                with log.open("wb") as out:
                    proc = subprocess.run(  # noqa: S603 - our interpreter, our module
                        [sys.executable, "-m", "mercato.bench.dbos_app", str(plan_path), str(result_path)],
                        cwd=workdir,
                        env=_clean_env({}),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=plan.timeout_s,
                        check=False,
                    )
                if proc.returncode != 0 or not result_path.is_file():
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the DBOS side failed (exit {proc.returncode}):\n{tail}")
                result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
                result["elapsed_s"] = time.monotonic() - started
                result["database"] = name
                return result
            finally:
                for server in providers:
                    server.stop()
    finally:
        asyncio.run(_pg_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _per(total_s: float, completed: int) -> float:
    return total_s * 1000 / completed if completed else 0.0


def comparison_rows(mercato: list[CheckoutStep], dbos: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (side, offered rate): completed/s, done p50/p99 and CPU ms per completed workflow
    (the side's own processes, simulators included; and the whole machine)."""
    rows: list[dict[str, Any]] = []
    for step in mercato:
        d = step.to_dict()
        done = step.completion.completed
        cpu = dict(step.server_cpu_s)
        machine = cpu.pop(MACHINE, 0.0)
        # Not Mercato's own processes: the DBOS side's "own" figure has neither.
        cpu.pop(POSTGRESQL, None)
        cpu.pop(LOAD_GENERATOR, None)
        rows.append(
            {
                "side": "mercato",
                "offered_rate": step.offered_rate,
                "completed": done,
                "not_completed": step.counts.errors + step.completion.compensated + step.completion.failed,
                "completed_rate": step.completed_rate,
                "p50_ms": d["completion"]["p50_ms"],
                "p99_ms": d["completion"]["p99_ms"],
                "cpu_ms_per_workflow": _per(sum(cpu.values()), done),
                "machine_cpu_ms_per_workflow": _per(machine, done),
                "machine_cores_busy": step.server_cpu.get("machine (all)", 0.0),
            }
        )
    for raw in dbos.get("steps", []):
        cpu = dict(raw["cpu_s"])
        machine = cpu.pop("machine (all)", 0.0)
        done = int(raw["completed"])
        rows.append(
            {
                "side": f"dbos {dbos.get('dbos_version', '')}".strip(),
                "offered_rate": raw["offered_rate"],
                "completed": done,
                "not_completed": int(raw["failed"]) + int(raw["unfinished"]),
                "completed_rate": raw["completed_rate"],
                "p50_ms": raw["done_p50_ms"],
                "p99_ms": raw["done_p99_ms"],
                "cpu_ms_per_workflow": _per(sum(cpu.values()), done),
                "machine_cpu_ms_per_workflow": _per(machine, done),
                "machine_cores_busy": machine / raw["wall_s"] if raw["wall_s"] > 0 else 0.0,
            }
        )
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Checkout: Mercato vs DBOS, same six steps, simulators and PostgreSQL server")
    for column in (
        "side",
        "offered/s",
        "completed/s",
        "not completed",
        "done p50 ms",
        "done p99 ms",
        "CPU ms/checkout (own procs)",
        "machine CPU ms/checkout",
        "machine cores busy",
    ):
        table.add_column(column, justify="left" if column == "side" else "right", no_wrap=True)
    for row in sorted(rows, key=lambda r: (r["offered_rate"], r["side"])):
        table.add_row(
            row["side"],
            f"{row['offered_rate']:g}",
            f"{row['completed_rate']:.1f}",
            str(row["not_completed"]),
            f"{row['p50_ms']:,.1f}",
            f"{row['p99_ms']:,.1f}",
            f"{row['cpu_ms_per_workflow']:,.1f}",
            f"{row['machine_cpu_ms_per_workflow']:,.1f}",
            f"{row['machine_cores_busy']:.2f}",
        )
    return table


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goal: Mercato's best completed/s ≥ 3× DBOS's best."""
    best = {
        side: max((r["completed_rate"] for r in rows if r["side"].startswith(side)), default=0.0)
        for side in ("mercato", "dbos")
    }
    ratio = best["mercato"] / best["dbos"] if best["dbos"] > 0 else float("inf")
    word = "HELD" if ratio >= 3 else "DID NOT HOLD"
    lines = [
        f"best completed/s: mercato {best['mercato']:.1f}, dbos {best['dbos']:.1f} ({ratio:.2f}×); "
        f"goal ≥ 3× DBOS: {word}",
    ]
    busy = max((r["machine_cores_busy"] for r in rows), default=0.0)
    lines.append(
        f"machine busiest at {busy:.2f} cores during a step (both sides' figures include everything else "
        "running on it: compare runs on a quiet machine)"
    )
    lines += [f"beyond the six steps, {side}: {text}" for side, text in BEYOND.items()]
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for side in sorted({r["side"] for r in rows}):
        mine = sorted((r for r in rows if r["side"] == side), key=lambda r: r["offered_rate"])
        x = [r["offered_rate"] for r in mine]
        axes[0].plot(x, [r["completed_rate"] for r in mine], marker="o", label=side)
        axes[1].plot(x, [r["p50_ms"] for r in mine], marker="o", label=f"{side} p50")
        axes[1].plot(x, [r["p99_ms"] for r in mine], marker="x", linestyle="--", label=f"{side} p99")
        axes[2].plot(x, [r["machine_cpu_ms_per_workflow"] for r in mine], marker="o", label=f"{side} machine")
        axes[2].plot(
            x, [r["cpu_ms_per_workflow"] for r in mine], marker="x", linestyle="--", label=f"{side} own"
        )
    top = max((r["offered_rate"] for r in rows), default=1.0)
    axes[0].plot([0, top], [0, top], color="grey", linewidth=0.8, label="offered")
    titles = ("completed/s vs offered/s", "completion latency (ms)", "CPU ms per completed checkout")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("offered checkouts/s")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
