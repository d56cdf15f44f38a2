"""Notifications: e-mail and webhook records made in reaction to order events (choreography).

Nobody tells this context to act. Checkout's orchestrated saga completes or cancels an order and
publishes an event, not knowing notifications exist; this context subscribes to `mercato.orders`
and decides on its own what to send. Adding a reaction needs no change to the saga (the price:
no single place shows the whole flow, and a failure here never compensates the order).
"""

from mercato.shop.notifications.service import CONSUMER_GROUP, NotificationsService

__all__ = ["CONSUMER_GROUP", "NotificationsService"]
