"""The retention jobs: published outbox rows, inbox records, stream entries (ADR 0023), and chat
messages past the offline queue's TTL (`MERCATO_REALTIME_HISTORY_TTL_S`, docs/realtime.md).

Each method is one pass of a `PeriodicJob` (see `workers/jobs.py`) returning how many rows or
entries it removed; the ages come from `MessagingSettings` (`MERCATO_MESSAGING_*_RETENTION_S`).
"""

from __future__ import annotations

from datetime import timedelta

from mercato.bootstrap import Container
from mercato.kit.messaging import Inbox, OutboxRelay
from mercato.kit.messaging.retention import trim_stream

__all__ = ["MessagingRetention"]


class MessagingRetention:
    def __init__(self, container: Container, relay: OutboxRelay) -> None:
        self._container = container
        self._relay = relay
        self._settings = container.settings.messaging
        self._inbox = Inbox(clock=container.clock)

    @property
    def trims_stream(self) -> bool:
        return self._settings.stream_retention_s is not None

    async def purge_outbox(self) -> int:
        s = self._settings
        return await self._relay.purge_published(older_than_s=s.outbox_retention_s, limit=s.retention_batch)

    async def purge_inbox(self) -> int:
        before = self._container.clock.now() - timedelta(seconds=self._settings.inbox_retention_s)
        async with self._container.db.write() as conn:
            return await self._inbox.purge(conn, before=before, limit=self._settings.retention_batch)

    async def purge_chat_history(self) -> int:
        return await self._container.chat.purge_expired(limit=self._settings.retention_batch)

    async def trim_stream(self) -> int:
        retention_s = self._settings.stream_retention_s
        if retention_s is None:
            return 0
        before = self._container.clock.now() - timedelta(seconds=retention_s)
        c = self._container
        return await trim_stream(c.stream, c.db, before=before, limit=self._settings.retention_batch)
