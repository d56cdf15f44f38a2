"""One candidate of `mercato lab leader`: the worker's election, runner and fencing around one job.

Run as its own process (`python -m mercato.lab.leader_node ...`) so the lab can SIGSTOP it like a
long GC pause. It is the worker's code path, not a model of it: `EtcdElection` with the claim on
election, `run_job` with the singleton gate, and `fenced_writes` in `Database.write()`. The job is
period-aligned: each pass waits for the next period boundary, then writes its tick row in one
transaction that lasts `work_s` (the job's work), so a pause can fall inside it. Every outcome is
printed as one JSON line (`tick`, `fenced`, `elected`, `lost`) for the lab to count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time

from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from mercato.kit.coordination import PrometheusElectionHook, Term, claim
from mercato.kit.coordination.etcd import EtcdElection, parse_endpoints
from mercato.kit.storage import Database
from mercato.workers.jobs import PeriodicJob
from mercato.workers.runner import run_job

TICKS_DDL = (
    "CREATE TABLE IF NOT EXISTS lab_leader_ticks ("
    " id BIGSERIAL PRIMARY KEY, period BIGINT NOT NULL, holder TEXT NOT NULL,"
    " token BIGINT, started_at DOUBLE PRECISION NOT NULL,"
    " committed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())"
)


def _say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


class _Hook(PrometheusElectionHook):
    def elected(self, name: str, term: Term) -> None:
        super().elected(name, term)
        _say("elected", token=term.token)

    def lost(self, name: str, reason: str) -> None:
        super().lost(name, reason)
        _say("lost", reason=reason)

    def fenced(self, name: str) -> None:
        super().fenced(name)
        _say("fenced")


async def main(args: argparse.Namespace) -> None:
    engine = create_async_engine(
        args.db, connect_args={"server_settings": {"application_name": args.holder}}, pool_size=2
    )
    db = Database(engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    election = None
    if args.etcd:

        async def on_elected(term: Term) -> None:
            assert term.token is not None
            await claim(db, args.name, term.token)
            granted = None if election is None else election.granted_ttl_s
            _say("claimed", token=term.token, granted=granted)

        election = EtcdElection(
            parse_endpoints(args.etcd),
            args.name,
            args.holder,
            ttl_s=args.ttl,
            hook=_Hook(CollectorRegistry(), election=args.name),
            on_elected=on_elected,
        )

    async def tick() -> int:
        # The term run_pass just checked (no await in between): the token this pass is fenced with.
        term = None if election is None else election.term
        token = None if term is None else term.token
        now = time.time()
        boundary = (int(now // args.period) + 1) * args.period
        await asyncio.sleep(boundary - now)  # period-aligned: one pass per period at most
        started = time.time()
        period = int(started // args.period)
        async with db.write() as conn:
            await conn.execute(
                text(
                    "INSERT INTO lab_leader_ticks (period, holder, token, started_at) VALUES (:p, :h, :t, :s)"
                ),
                {"p": period, "h": args.holder, "t": token, "s": started},
            )
            await asyncio.sleep(args.work)  # the job's work, inside its transaction
        _say("tick", period=period, token=token)
        return 0

    # A follower checks again every tenth of a period; the leader then waits for the next boundary.
    job = PeriodicJob("lab_tick", args.period / 10, tick, singleton=True)
    _say("ready")
    try:
        async with asyncio.TaskGroup() as group:
            if election is not None:
                group.create_task(election.run(stop))
            group.create_task(run_job(job, stop, election=election))
    finally:
        with contextlib.suppress(Exception):
            await engine.dispose()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="leader_node")
    p.add_argument("--db", required=True)
    p.add_argument("--etcd", default="", help="endpoints; empty: no election (the control run)")
    p.add_argument("--name", required=True)
    p.add_argument("--holder", required=True)
    p.add_argument("--period", type=float, default=1.0)
    p.add_argument("--work", type=float, default=0.4)
    p.add_argument("--ttl", type=int, default=2)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
