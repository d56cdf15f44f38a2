"""Instrumentation hooks for messaging, and their Prometheus implementation.

The outbox relay, the consumer runner and the streams call a `MessagingHook`; the default does
nothing, so the kit never needs a metrics registry to work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from mercato.kit.messaging.stream import Stream

__all__ = ["LagReporter", "MessagingHook", "NullMessagingHook", "PrometheusMessagingHook"]


class MessagingHook(Protocol):
    def outbox_backlog(self, *, messages: int, oldest_age_s: float) -> None: ...
    def relay_published(self, *, count: int) -> None: ...
    def consumer_processed(self, *, group: str, topic: str) -> None: ...
    def consumer_redelivered(self, *, group: str, topic: str) -> None: ...
    def consumer_dedup_hit(self, *, group: str, topic: str) -> None: ...
    def dead_lettered(self, *, group: str, topic: str) -> None: ...
    def consumer_lag(self, *, group: str, topic: str, messages: int) -> None: ...


class NullMessagingHook:
    def outbox_backlog(self, *, messages: int, oldest_age_s: float) -> None:
        return None

    def relay_published(self, *, count: int) -> None:
        return None

    def consumer_processed(self, *, group: str, topic: str) -> None:
        return None

    def consumer_redelivered(self, *, group: str, topic: str) -> None:
        return None

    def consumer_dedup_hit(self, *, group: str, topic: str) -> None:
        return None

    def dead_lettered(self, *, group: str, topic: str) -> None:
        return None

    def consumer_lag(self, *, group: str, topic: str, messages: int) -> None:
        return None


class PrometheusMessagingHook:
    """`mercato_messaging_*` metrics, labelled by consumer group and topic (both bounded sets)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["group", "topic"]
        self.backlog = Gauge(
            "mercato_messaging_outbox_backlog_messages",
            "Outbox messages not yet published.",
            registry=registry,
        )
        self.backlog_age = Gauge(
            "mercato_messaging_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox message (0 when none).",
            registry=registry,
        )
        self.published = Counter(
            "mercato_messaging_relay_published_total",
            "Outbox messages the relay published to the stream.",
            registry=registry,
        )
        self.processed = Counter(
            "mercato_messaging_consumer_processed_total",
            "Messages a consumer group handled and acknowledged.",
            labels,
            registry=registry,
        )
        self.redelivered = Counter(
            "mercato_messaging_consumer_redelivered_total",
            "Deliveries that were not the message's first attempt.",
            labels,
            registry=registry,
        )
        self.dedup_hits = Counter(
            "mercato_messaging_consumer_dedup_hits_total",
            "Deliveries skipped because the inbox had already recorded the message.",
            labels,
            registry=registry,
        )
        self.dead = Counter(
            "mercato_messaging_consumer_dead_lettered_total",
            "Messages moved to the dead-letter queue.",
            labels,
            registry=registry,
        )
        self.lag = Gauge(
            "mercato_messaging_consumer_lag_messages",
            "Messages on a topic the group has not acknowledged yet.",
            labels,
            registry=registry,
        )

    def outbox_backlog(self, *, messages: int, oldest_age_s: float) -> None:
        self.backlog.set(messages)
        self.backlog_age.set(oldest_age_s)

    def relay_published(self, *, count: int) -> None:
        self.published.inc(count)

    def consumer_processed(self, *, group: str, topic: str) -> None:
        self.processed.labels(group, topic).inc()

    def consumer_redelivered(self, *, group: str, topic: str) -> None:
        self.redelivered.labels(group, topic).inc()

    def consumer_dedup_hit(self, *, group: str, topic: str) -> None:
        self.dedup_hits.labels(group, topic).inc()

    def dead_lettered(self, *, group: str, topic: str) -> None:
        self.dead.labels(group, topic).inc()

    def consumer_lag(self, *, group: str, topic: str, messages: int) -> None:
        self.lag.labels(group, topic).set(messages)


class LagReporter:
    """`consumer_lag` for a hand-written consumer loop: at most once per `busy_interval_s` from
    passes that had deliveries, and from idle passes at most once per `interval_s` (the count is a
    statement or a round trip of its own). Call it once a pass is done: a count taken between the
    read and the ack counts the batch in hand as lag (and delays that batch by the count's round
    trip). Reported after every busy pass, the count was one more round trip per pass: at tens of
    passes a second, a fixed cost per message. The first idle pass after a skipped busy count
    reports whatever the interval, so a consumer that caught up shows it."""

    def __init__(
        self,
        stream: Stream,
        hook: MessagingHook | None,
        *,
        interval_s: float = 5.0,
        busy_interval_s: float = 1.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._hook = hook
        self._interval_s = interval_s
        self._busy_interval_s = busy_interval_s
        self._now = now
        self._last: dict[tuple[str, str], float] = {}
        self._unreported: set[tuple[str, str]] = set()  # a busy pass's count was skipped since

    async def report(self, topic: str, group: str, *, busy: bool) -> None:
        if self._hook is None:
            return
        key = (topic, group)
        now = self._now()
        last = self._last.get(key)
        # The first idle pass after a busy one whose count was skipped reports at once: the gauge
        # settles on the caught-up value instead of showing the last busy count for an interval.
        settling = not busy and key in self._unreported
        if (
            not settling
            and last is not None
            and now - last < (self._busy_interval_s if busy else self._interval_s)
        ):
            if busy:
                self._unreported.add(key)
            return
        self._unreported.discard(key)
        self._last[key] = now
        self._hook.consumer_lag(group=group, topic=topic, messages=await self._stream.lag(topic, group))
