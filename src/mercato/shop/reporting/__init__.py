"""Reporting: CQRS read models built from other contexts' integration events.

Its own context, not part of orders: `order_summary` joins facts from orders (what was bought,
status) and payments (authorized, captured, voided, refunded), and the sales view aggregates
across orders. A read model owned by either writer would have to import the other; here each
writer only publishes events and reporting owns the denormalized tables, which it may drop and
rebuild from the log at any time.
"""

from mercato.shop.reporting.projections import ORDER_SUMMARY, PROJECTIONS, SALES_BY_DAY
from mercato.shop.reporting.service import ReportingService

__all__ = ["ORDER_SUMMARY", "PROJECTIONS", "SALES_BY_DAY", "ReportingService"]
