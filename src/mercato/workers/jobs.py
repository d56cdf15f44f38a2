"""The shop's periodic jobs, built from a container."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mercato.bootstrap import Container
from mercato.kit.idempotency import purge_expired
from mercato.kit.messaging import OUTBOX_CHANNEL, STREAM_CHANNEL, OutboxRelay
from mercato.kit.privacy import AuditLog
from mercato.kit.sagas import PrometheusSagaHook
from mercato.shop.notifications.service import purge_settled
from mercato.workers.notifier import build_notifier
from mercato.workers.projections import PROJECTOR_BATCH, build_projectors, notifications_consumer
from mercato.workers.reconcile import ReadModelReconciliation
from mercato.workers.retention import MessagingRetention

# Fired by the notifications consumer after it recorded e-mails: the notifier delivers them at once.
NOTIFICATIONS_CHANNEL = "notifications"

# A saga still active this long after its deadline is stuck (`mercato_saga_stuck`); counted this often.
SAGA_STUCK_GRACE_S = 60.0
SAGA_WATCH_INTERVAL_S = 15.0
RETENTION_INTERVAL_S = 3600.0


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    """`run` does one pass and returns how many items it handled (0 when idle).

    When a pass handles `batch` items there is probably a backlog, so the next pass starts at once.
    A `singleton` job must run once across all workers (sweeps, purges, reconciliation, watches):
    only the elected leader runs it, its writes fenced by the term's token (ADR 0041). The others
    (relays, consumers in a group, the notifier's claimed sends) are safe to run in every worker.
    With `wake_on`, a work signal on those channels starts the next pass at once and `interval_s` is
    only the safety poll; with `announces`, a pass that handled something fires that channel.
    `batch_window_s`: a woken pass starts at least this long after the previous one started, so
    under load the signals of many commits are served by one pass over a batch (ADR 0055).
    """

    name: str
    interval_s: float
    run: Callable[[], Awaitable[int]]
    batch: int | None = None
    singleton: bool = False
    wake_on: tuple[str, ...] = ()
    announces: str | None = None
    batch_window_s: float = 0.0


def shop_jobs(container: Container) -> list[PeriodicJob]:
    worker = container.settings.worker
    # The side jobs (none on a checkout's path: sagas wake the runner directly) batch their woken
    # passes: woken by every commit, each ran its fixed statements over one or two messages (ADR 0055).
    side_window_s = worker.side_job_window_s
    # The loops fed by the outbox and the stream wait for its signal; their interval is the safety poll.
    safety_s = container.settings.messaging.relay_interval_s
    on_stream = (STREAM_CHANNEL,)

    async def expire_reservations() -> int:
        return await container.inventory.expire_due(limit=worker.reservation_sweep_batch)

    relay = OutboxRelay(
        container.db,
        container.stream,
        batch_size=container.settings.messaging.relay_batch,
        clock=container.clock,
        hook=container.messaging_hook,
        # The relay tells the stream's consumers, everywhere, that it published: on the SQL log by
        # a NOTIFY riding in its pass's transaction (ADR 0083).
        announces=STREAM_CHANNEL,
    )

    notifier = build_notifier(container)

    async def deliver_notifications() -> int:
        return await notifier.deliver_due(limit=worker.notify_batch)

    last_report: list[Any] = [None, float("-inf")]  # the snapshot published last, and when

    async def report_breakers() -> int:
        reports = container.breaker_reports
        if reports is not None:
            # A change is published at once; an unchanged view only as a heartbeat that keeps it
            # within the readers' freshness bound (a write transaction every pass cost most of an
            # idle process's CPU).
            snapshot = container.breakers.snapshot()
            now = time.monotonic()
            if snapshot != last_report[0] or now - last_report[1] >= reports.ttl_s / 2:
                await reports.publish(snapshot)
                last_report[:] = [snapshot, now]
        return 0  # not "items": a report every pass is the job's idle state

    retention = MessagingRetention(container, relay)
    messaging = container.settings.messaging

    async def purge_idempotency_keys() -> int:
        return await purge_expired(container.db, now=container.clock.now(), batch=1000)

    async def purge_revoked_tokens() -> int:
        # A revocation outlives its token by nothing: the token is refused by its own expiry after.
        return 0 if container.sessions is None else await container.sessions.purge_expired()

    # Only rows past the retention period go; the table's triggers refuse anything younger.
    audit = AuditLog(
        container.db,
        container.clock,
        audited_scopes=frozenset(),
        retention_days=container.settings.privacy.audit_retention_days,
    )

    async def purge_notifications() -> int:
        kept = container.settings.privacy.notifications_kept_days
        return await purge_settled(container.db, container.clock, kept_days=kept)

    saga_metrics = PrometheusSagaHook.for_registry(container.metrics_registry)

    async def watch_sagas() -> int:
        saga_metrics.stuck(await container.sagas.stuck_counts(grace_s=SAGA_STUCK_GRACE_S))
        return 0  # a gauge refreshed every pass, not items

    jobs = [
        PeriodicJob(
            "purge_revoked_tokens",
            container.settings.idempotency.purge_interval_s,
            purge_revoked_tokens,
            singleton=True,
        ),
        PeriodicJob(
            "expire_reservations",
            worker.reservation_sweep_s,
            expire_reservations,
            batch=worker.reservation_sweep_batch,
            singleton=True,
        ),
        PeriodicJob(
            "outbox_relay",
            safety_s,
            relay.relay_once,
            batch=container.settings.messaging.relay_batch,
            wake_on=(OUTBOX_CHANNEL,),
            batch_window_s=side_window_s,
        ),
        PeriodicJob(
            "purge_idempotency_keys",
            container.settings.idempotency.purge_interval_s,
            purge_idempotency_keys,
            singleton=True,
        ),
        # Retention of personal data (docs/privacy.md).
        PeriodicJob("purge_audit_log", RETENTION_INTERVAL_S, audit.purge, batch=1000, singleton=True),
        PeriodicJob(
            "purge_refresh_tokens",
            RETENTION_INTERVAL_S,
            container.identity.purge_refresh_tokens,
            batch=1000,
            singleton=True,
        ),
        PeriodicJob(
            "purge_notifications", RETENTION_INTERVAL_S, purge_notifications, batch=1000, singleton=True
        ),
        # The payment ledgers follow `mercato.payments` (inbox-deduplicated, so redeliveries apply once).
        PeriodicJob(
            "payments_ledger",
            safety_s,
            container.payments.consumer(container.stream, hook=container.messaging_hook).run_once,
            batch=100,
            wake_on=on_stream,
            batch_window_s=side_window_s,
        ),
        # Read models follow the log as often as the relay feeds it, which keeps the read-your-
        # writes gap of the order summaries short in embedded mode (see shop/reporting/api.py).
        *(
            PeriodicJob(
                f"projection:{name}",
                safety_s,
                projector.run_once,
                batch=PROJECTOR_BATCH,
                wake_on=on_stream,
                batch_window_s=side_window_s,
            )
            for name, projector in build_projectors(container).items()
        ),
        # Retention (ADR 0023): published outbox rows, inbox records and (when configured) the
        # stream's entries that every consumer group has acknowledged.
        PeriodicJob(
            "purge_outbox",
            messaging.retention_interval_s,
            retention.purge_outbox,
            messaging.retention_batch,
            singleton=True,
        ),
        PeriodicJob(
            "purge_inbox",
            messaging.retention_interval_s,
            retention.purge_inbox,
            messaging.retention_batch,
            singleton=True,
        ),
        # The chat offline queue's TTL (MERCATO_REALTIME_HISTORY_TTL_S): older messages are purged.
        PeriodicJob(
            "purge_chat_history",
            messaging.retention_interval_s,
            retention.purge_chat_history,
            messaging.retention_batch,
            singleton=True,
        ),
        *(
            [
                PeriodicJob(
                    "trim_stream", messaging.retention_interval_s, retention.trim_stream, singleton=True
                )
            ]
            if retention.trims_stream
            else []
        ),
        # Read models compared with the write model on a sample; the drift becomes a metric.
        PeriodicJob(
            "reconcile_read_models",
            worker.reconcile_interval_s,
            ReadModelReconciliation(container).sample_pass,
            singleton=True,
        ),
        # Choreography: notifications react to order events on their own (inbox-deduplicated).
        PeriodicJob(
            "notifications",
            safety_s,
            notifications_consumer(container).run_once,
            batch=100,
            wake_on=on_stream,
            batch_window_s=side_window_s,
            announces=NOTIFICATIONS_CHANNEL,
        ),
        # ...and deliver the e-mails they recorded (SMTP to the mail provider; retried, deduplicated).
        PeriodicJob(
            "notifier",
            worker.notify_interval_s,
            deliver_notifications,
            batch=worker.notify_batch,
            wake_on=(NOTIFICATIONS_CHANNEL,),
            batch_window_s=side_window_s,
        ),
        # Where the provider calls happen, their breakers are published for /admin/resilience/breakers.
        PeriodicJob("report_breakers", worker.breaker_report_interval_s, report_breakers),
        # Sagas past their deadline and still active: `mercato_saga_stuck`, alerted on (deploy/prometheus).
        PeriodicJob("watch_sagas", SAGA_WATCH_INTERVAL_S, watch_sagas, singleton=True),
    ]
    if container.product_cache is not None:
        # Product changes from the stream drop the cached product everywhere (the durable path
        # behind the writer's own invalidation; see shop/catalog/cache.py).
        consumer = container.product_cache.invalidation_consumer(
            container.db,
            container.stream,
            name=f"catalog-cache-{socket.gethostname()}-{os.getpid()}",
            hook=container.messaging_hook,
        )
        jobs.append(
            PeriodicJob(
                "catalog_cache_invalidation",
                safety_s,
                consumer.run_once,
                batch=consumer.max_messages,
                wake_on=on_stream,
                batch_window_s=side_window_s,
            )
        )
    return jobs
