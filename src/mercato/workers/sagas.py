"""The saga runner process part: drives every checkout saga to a terminal state."""

from __future__ import annotations

import os
import socket

from mercato.bootstrap import Container
from mercato.kit.sagas import PrometheusSagaHook, SagaRunner


def build_saga_runner(container: Container, *, owner: str | None = None) -> SagaRunner:
    """A runner for every saga the container defines; in-process checkouts wake it at once, and on
    PostgreSQL so do checkouts committed by other processes (`mercato api` beside this worker)."""
    checkout = container.settings.checkout
    hook = PrometheusSagaHook.for_registry(container.metrics_registry)
    hook.declare(container.saga_definitions)
    runner = SagaRunner(
        container.db,
        container.sagas,
        container.saga_definitions,
        container.clock,
        owner=owner or f"{socket.gethostname()}:{os.getpid()}",
        events=container.saga_events,
        lease_s=checkout.saga_lease_s,
        concurrency=checkout.saga_concurrency,
        # Woken by new sagas (here, or NOTIFY from other processes) and by its own parked retries:
        # the poll is the safety net (kit/storage/signals.py), and what finds the sagas of a runner
        # that died: at most half a lease after its lease expired.
        poll_s=min(container.settings.messaging.relay_interval_s, checkout.saga_lease_s / 2),
        wakeups=container.saga_wakeups,
        # On the container's registry, which the worker's /metrics and the API's (`mercato up`) serve.
        hook=hook,
    )
    container.checkout.on_saga_started(runner.wake)
    return runner
