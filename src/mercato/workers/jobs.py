"""The shop's periodic jobs, built from a container."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mercato.bootstrap import Container
from mercato.kit.idempotency import purge_expired
from mercato.kit.messaging import OutboxRelay
from mercato.workers.projections import PROJECTOR_BATCH, build_projectors, notifications_consumer


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    """`run` does one pass and returns how many items it handled (0 when idle).

    When a pass handles `batch` items there is probably a backlog, so the next pass starts at once.
    """

    name: str
    interval_s: float
    run: Callable[[], Awaitable[int]]
    batch: int | None = None


def shop_jobs(container: Container) -> list[PeriodicJob]:
    worker = container.settings.worker

    async def expire_reservations() -> int:
        return await container.inventory.expire_due(limit=worker.reservation_sweep_batch)

    relay = OutboxRelay(
        container.db,
        container.stream,
        batch_size=container.settings.messaging.relay_batch,
        clock=container.clock,
    )

    async def purge_idempotency_keys() -> int:
        return await purge_expired(container.db, now=container.clock.now(), batch=1000)

    jobs = [
        PeriodicJob(
            "expire_reservations",
            worker.reservation_sweep_s,
            expire_reservations,
            batch=worker.reservation_sweep_batch,
        ),
        PeriodicJob(
            "outbox_relay",
            container.settings.messaging.relay_interval_s,
            relay.relay_once,
            batch=container.settings.messaging.relay_batch,
        ),
        PeriodicJob(
            "purge_idempotency_keys", container.settings.idempotency.purge_interval_s, purge_idempotency_keys
        ),
        # The payment ledgers follow `mercato.payments` (inbox-deduplicated, so redeliveries apply once).
        PeriodicJob(
            "payments_ledger",
            container.settings.messaging.relay_interval_s,
            container.payments.consumer(container.stream).run_once,
            batch=100,
        ),
        # Read models follow the log as often as the relay feeds it, which keeps the read-your-
        # writes gap of the order summaries short in embedded mode (see shop/reporting/api.py).
        *(
            PeriodicJob(
                f"projection:{name}",
                container.settings.messaging.relay_interval_s,
                projector.run_once,
                batch=PROJECTOR_BATCH,
            )
            for name, projector in build_projectors(container).items()
        ),
        # Choreography: notifications react to order events on their own (inbox-deduplicated).
        PeriodicJob(
            "notifications",
            container.settings.messaging.relay_interval_s,
            notifications_consumer(container).run_once,
            batch=100,
        ),
    ]
    if container.product_cache is not None:
        # Product changes from the stream drop the cached product everywhere (the durable path
        # behind the writer's own invalidation; see shop/catalog/cache.py).
        consumer = container.product_cache.invalidation_consumer(
            container.db, container.stream, name=f"catalog-cache-{socket.gethostname()}-{os.getpid()}"
        )
        jobs.append(
            PeriodicJob(
                "catalog_cache_invalidation",
                container.settings.messaging.relay_interval_s,
                consumer.run_once,
                batch=consumer.max_messages,
            )
        )
    return jobs
