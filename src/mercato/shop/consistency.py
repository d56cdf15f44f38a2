"""Which of the shop's reads a replica may serve, and how stale they may be: the one place that
decides (ADR 0032). A use case not listed here reads the primary. Every service names its policy
from this table; none asks which engine or node it is on.

- Catalog browsing: public, already cached at the edge for seconds; a replica a few seconds behind
  shows nothing a cache would not. No read-your-writes: shoppers do not write the catalog.
- A customer's order history: must show the order they just placed (read-your-writes through the
  consistency token their checkout response carried), otherwise a replica at most 2 s behind.
- The back office's list of all orders: a dashboard, staleness of a few seconds is fine.

Writes, checkout, stock, payments and every saga step read the primary: their invariants need the
latest committed state, and a worker has no consistency token to present.
"""

from __future__ import annotations

from mercato.kit.storage import Staleness

CATALOG_BROWSE = Staleness(max_lag_s=5.0, read_your_writes=False)
CUSTOMER_ORDERS = Staleness(max_lag_s=2.0, read_your_writes=True)
BACK_OFFICE_ORDERS = Staleness(max_lag_s=5.0, read_your_writes=False)
