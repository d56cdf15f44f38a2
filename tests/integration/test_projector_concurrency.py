"""Two projectors of one projection (two workers) at once: each message applied exactly once.

A live pass claims its ranges with a compare-and-set on the checkpoint (ADR 0074): the second
projector waits on the first one's row locks, finds the positions moved and leaves those partitions
out. Small batches and many partitions, so the two keep meeting on the same rows (both databases).
"""

from __future__ import annotations

import asyncio

from mercato.bootstrap import Container
from mercato.kit.projections import Projection, Projector
from mercato.kit.storage import Database
from tests.integration.test_projections import TOPIC, Counting, counts, db, publish, rows

__all__ = ["db"]  # the fixture, used by name


async def test_two_projectors_of_one_projection_apply_each_message_once(
    container: Container, db: Database
) -> None:
    counting = Counting()
    projection = Projection(name="test_counts", topics=(TOPIC,), tables=(counts,), apply=counting.apply)
    workers = [Projector(db, projection, batch_size=7) for _ in range(2)]
    keys = 16
    total = 0
    for wave in range(4):
        await publish(container, 60, keys=keys)
        total += 60

        async def drain(projector: Projector) -> int:
            applied = 0
            while (step := await projector.run_once()) or await projector.lag():
                applied += step
                await asyncio.sleep(0)
            return applied

        applied = await asyncio.gather(*(drain(w) for w in workers))
        assert sum(applied) == 60, f"wave {wave}: {applied}"
    assert counting.calls == total
    per_key = await rows(db)
    assert sum(a for _, a, _ in per_key) == total
    assert sum(t for _, _, t in per_key) == 4 * sum(range(60))
