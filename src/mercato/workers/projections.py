"""The read side's workers, built from a container: one projector per reporting projection and the
notifications subscriber. Shared by the periodic jobs and `mercato projections ...`."""

from __future__ import annotations

import os
import socket

from mercato.bootstrap import Container, build_projector
from mercato.kit.messaging import Consumer
from mercato.kit.projections import Projector, PrometheusProjectionHook
from mercato.shop.notifications import NotificationsService
from mercato.shop.reporting import PROJECTIONS

__all__ = ["PROJECTOR_BATCH", "build_projectors", "notifications_consumer"]

# Bounded so one pass holds the write transaction (SQLite: the database's only writer) briefly.
PROJECTOR_BATCH = 500


def build_projectors(container: Container) -> dict[str, Projector]:
    hook = PrometheusProjectionHook.for_registry(container.metrics_registry)
    return {p.name: build_projector(container, p, batch_size=PROJECTOR_BATCH, hook=hook) for p in PROJECTIONS}


def notifications_consumer(container: Container) -> Consumer:
    return NotificationsService(container.db, container.clock).consumer(
        container.stream,
        name=f"notifications-{socket.gethostname()}-{os.getpid()}",
        hook=container.messaging_hook,
    )
