"""The notifier job's wiring: notifications' delivery over SMTP, customers' addresses from identity."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from mercato.bootstrap import Container
from mercato.shop.identity.service import IdentityService
from mercato.shop.notifications.delivery import DeliverySettings, NotificationDelivery
from mercato.shop.notifications.smtp import SmtpMailSender

__all__ = ["build_notifier"]


class _IdentityDirectory:
    """Notifications' `RecipientDirectory` on identity's service (contexts meet only in wiring)."""

    def __init__(self, identity: IdentityService) -> None:
        self._identity = identity

    async def emails_of(self, customer_ids: Sequence[uuid.UUID]) -> Mapping[uuid.UUID, str]:
        # One read for a notifier pass's customers (was one per mail: two statements each).
        return {user.id: user.email for user in await self._identity.users(list(customer_ids))}


def build_notifier(container: Container) -> NotificationDelivery:
    settings = container.settings
    worker, providers = settings.worker, settings.providers
    # A send that hangs past the lease would let another worker claim the row: keep the lease above it.
    lease_s = max(60.0, 3 * worker.notify_timeout_s)
    return NotificationDelivery(
        container.db,
        container.clock,
        sender=SmtpMailSender(
            host=providers.host,
            port=providers.mail_smtp_port,
            timeout_s=worker.notify_timeout_s,
            clock=container.clock,
        ),
        directory=_IdentityDirectory(container.identity),
        settings=DeliverySettings(
            sender_address=worker.notify_sender,
            max_attempts=worker.notify_max_attempts,
            backoff_base_s=worker.notify_backoff_base_s,
            backoff_cap_s=worker.notify_backoff_cap_s,
            lease_s=lease_s,
        ),
    )
